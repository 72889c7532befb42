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
    cluster.stop().await;
}

#[tokio::test]
async fn all_in_one() {
    let bus = AllInOne::start(false).await;
    scenarios::publish_over_http_reaches_websocket(&bus.endpoints).await;
    scenarios::resume_gets_exactly_what_was_missed(&bus.endpoints).await;
    scenarios::websocket_publish_inbox_and_compaction(&bus.endpoints).await;
    scenarios::catch_up_races_live_publishing(&bus.endpoints).await;
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
