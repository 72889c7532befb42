//! One event end to end, against the separate services on a real NATS and against the all-in-one.

mod common;

use common::{AllInOne, scenarios};
use eventbus_testkit::Cluster;
use serde_json::json;

#[tokio::test]
async fn separate_services_on_nats() {
    let cluster = Cluster::start().await;
    scenarios::publish_over_http_reaches_websocket(&cluster.endpoints).await;
    scenarios::resume_gets_exactly_what_was_missed(&cluster.endpoints).await;
    scenarios::websocket_publish_inbox_and_compaction(&cluster.endpoints).await;
    scenarios::catch_up_races_live_publishing(&cluster.endpoints).await;
    scenarios::a_long_catch_up_shares_the_connection(&cluster.endpoints).await;
    cluster.stop().await;
}

#[tokio::test]
async fn all_in_one() {
    let bus = AllInOne::start(false).await;
    scenarios::publish_over_http_reaches_websocket(&bus.endpoints).await;
    scenarios::resume_gets_exactly_what_was_missed(&bus.endpoints).await;
    scenarios::websocket_publish_inbox_and_compaction(&bus.endpoints).await;
    scenarios::catch_up_races_live_publishing(&bus.endpoints).await;
    scenarios::a_long_catch_up_shares_the_connection(&bus.endpoints).await;
    bus.stop().await;
}

#[tokio::test]
async fn development_mode_gives_tokens_without_an_api_key_and_only_then() {
    let dev = AllInOne::start(true).await;
    let token = dev
        .endpoints
        .auth
        .token(
            None,
            json!({"sub": "demo", "role": "client", "subscribe": ["demo"], "publish": ["demo"]}),
        )
        .await;
    let answer = dev
        .endpoints
        .api
        .publish(&token, &json!({"channel": "demo", "type": "greeting"}))
        .await;
    assert_eq!(answer.status, 200);
    dev.stop().await;

    let prod = AllInOne::start(false).await;
    let refused = prod
        .endpoints
        .auth
        .send(prod.endpoints.auth.post("/v1/tokens").json(&json!({})))
        .await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.problem(), "unauthorized");
    prod.stop().await;
}

#[tokio::test]
async fn all_in_one_restart_keeps_events_and_tokens() {
    let bus = AllInOne::start(false).await;
    let service = bus.endpoints.service_token().await;
    for i in 0..5 {
        let answer = bus
            .endpoints
            .api
            .publish(
                &service,
                &json!({"channel": "kept", "type": "t", "data": i}),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
    let dir = bus.stop().await;
    let bus = AllInOne::start_in(dir, false).await;
    let history = bus.endpoints.api.history(&service, "kept", "after=0").await;
    assert_eq!(
        history.status, 200,
        "a token from before the restart is still valid: {}",
        history.body
    );
    assert_eq!(history.body["head"], 5);
    assert_eq!(history.body["events"][4]["data"], 4);
    bus.stop().await;
}

/// The all-in-one's publishes reach its store in process: a stop while they pour in answers each
/// one in flight (or refuses it) before the log closes, and every publish answered 200 is there,
/// once, after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_under_load_keeps_every_acknowledged_publish() {
    let bus = AllInOne::start(false).await;
    let service = bus.endpoints.service_token().await;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut publishers = tokio::task::JoinSet::new();
    for p in 0..8 {
        let (api, service, acked) = (bus.endpoints.api.clone(), service.clone(), acked.clone());
        publishers.spawn(async move {
            for n in 0.. {
                let id = format!("p{p}-{n}");
                let sent = api
                    .post("/v1/events")
                    .bearer_auth(&service)
                    .json(&json!({"id": id, "channel": "under.load", "type": "t", "data": n}))
                    .send()
                    .await;
                match sent {
                    Ok(answer) if answer.status() == 200 => acked.lock().expect("lock").push(id),
                    // Refused or cut off while stopping: not acknowledged, nothing promised.
                    _ => return,
                }
            }
        });
    }
    eventbus_testkit::eventually("300 publishes acknowledged", || {
        let acked = acked.clone();
        async move { (acked.lock().expect("lock").len() >= 300).then_some(()) }
    })
    .await;
    let dir = bus.stop().await;
    while publishers.join_next().await.is_some() {}
    let acked = acked.lock().expect("lock").clone();

    let bus = AllInOne::start_in(dir, false).await;
    let mut stored = Vec::new();
    let mut after = 0;
    loop {
        let page = bus
            .endpoints
            .api
            .history(&service, "under.load", &format!("after={after}&limit=1000"))
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        let events = page.body["events"].as_array().expect("events").clone();
        if events.is_empty() {
            break;
        }
        for event in &events {
            after = event["seq"].as_u64().expect("seq");
            assert_eq!(after as usize, stored.len() + 1, "seqs are contiguous");
            stored.push(event["id"].as_str().expect("id").to_owned());
        }
    }
    let unique: std::collections::HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "an event stored twice");
    for id in &acked {
        assert!(
            unique.contains(id),
            "{id} was acknowledged and is not in the log"
        );
    }
    bus.stop().await;
}
