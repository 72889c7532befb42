//! Many gateways on one NATS: delivery across gateways, queue groups, gap refill after a NATS
//! restart, and the goodbye (1001) at shutdown.

use std::collections::BTreeSet;

use eventbus_testkit::Cluster;
use eventbus_testkit::ws::{Closed, Ws};
use serde_json::{Value, json};

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn clients_on_two_gateways_receive_the_same_stream() {
    let mut cluster = Cluster::start().await;
    let second = cluster.add_gateway().await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let token = bus
        .auth
        .client_token(&service, "viewer", &["scores"], &[])
        .await;
    let (mut a, _) = Ws::hello(&bus.ws, &token).await;
    let (mut b, _) = Ws::hello(&second, &token).await;
    a.subscribe(json!({"channel": "scores"})).await;
    b.subscribe(json!({"channel": "scores"})).await;
    let batch: Vec<Value> = (0..50)
        .map(|i| json!({"channel": "scores", "type": "goal", "data": i}))
        .collect();
    assert_eq!(
        bus.api.publish(&service, &Value::Array(batch)).await.status,
        200
    );
    assert_eq!(seqs(&a.events(50).await), (1..=50).collect::<Vec<_>>());
    assert_eq!(seqs(&b.events(50).await), (1..=50).collect::<Vec<_>>());
    cluster.stop().await;
}

#[tokio::test]
async fn a_queue_group_spans_gateways_and_each_event_reaches_one_member() {
    let mut cluster = Cluster::start().await;
    let second = cluster.add_gateway().await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let (mut first_worker, _) = Ws::hello(&bus.ws, &service).await;
    let (mut second_worker, _) = Ws::hello(&second, &service).await;
    first_worker
        .subscribe(json!({"channel": "jobs.*", "group": "workers"}))
        .await;
    second_worker
        .subscribe(json!({"channel": "jobs.*", "group": "workers"}))
        .await;
    // Both queue subscriptions must be known to NATS before publishing: a ping round trip on
    // each connection comes after its subscribe was registered.
    for worker in [&mut first_worker, &mut second_worker] {
        worker.send(json!({"op": "ping"})).await;
        assert_eq!(worker.recv().await["op"], "pong");
    }

    const TOTAL: u64 = 200;
    let batch: Vec<Value> = (0..TOTAL)
        .map(|i| json!({"channel": "jobs.render", "type": "job", "data": i}))
        .collect();
    assert_eq!(
        bus.api.publish(&service, &Value::Array(batch)).await.status,
        200
    );
    // Mark the end on a channel both hear directly, so each knows when it has all of its share.
    let mut seen = BTreeSet::new();
    let mut shares = Vec::new();
    for worker in [&mut first_worker, &mut second_worker] {
        let mut mine = 0;
        while seen.len() < TOTAL as usize {
            match tokio::time::timeout(std::time::Duration::from_millis(500), worker.next()).await {
                Ok(Ok(frame)) if frame["op"] == "event" => {
                    let seq = frame["event"]["seq"].as_u64().expect("seq");
                    assert!(
                        seen.insert(seq),
                        "seq {seq} reached two members of the group"
                    );
                    mine += 1;
                }
                Ok(other) => panic!("unexpected {other:?}"),
                // This member has nothing more queued for now: read the other.
                Err(_) => break,
            }
        }
        shares.push(mine);
    }
    assert_eq!(
        seen.len() as u64,
        TOTAL,
        "every event reached one member (shares {shares:?})"
    );
    assert!(
        shares.iter().all(|s| *s > 0),
        "both gateways' members got work: {shares:?}"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn a_nats_restart_loses_nothing_for_subscribers() {
    let mut cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let token = bus
        .auth
        .client_token(&service, "watcher", &["stream"], &[])
        .await;
    let (mut ws, _) = Ws::hello(&bus.ws, &token).await;
    ws.subscribe(json!({"channel": "stream"})).await;
    let publish = |n: usize| {
        let batch: Vec<Value> = (0..n)
            .map(|i| json!({"channel": "stream", "type": "tick", "data": i}))
            .collect();
        let api = bus.api.clone();
        let service = service.clone();
        async move {
            assert_eq!(
                api.publish(&service, &Value::Array(batch)).await.status,
                200
            )
        }
    };
    publish(20).await;
    assert_eq!(seqs(&ws.events(20).await), (1..=20).collect::<Vec<_>>());

    // Messages published while NATS is down never cross the backbone.
    cluster.nats.kill();
    publish(30).await;
    cluster.nats.restart().await;

    // After the backbone is back, the next event reveals the gap and the gateway refills it from the
    // store: the subscriber sees every seq once, in order. Publish until the backbone carries again.
    let mut received = Vec::new();
    let mut published = 50;
    while received.last().is_none_or(|last: &u64| *last < published) {
        publish(1).await;
        published += 1;
        while let Ok(Ok(frame)) =
            tokio::time::timeout(std::time::Duration::from_millis(300), ws.next()).await
        {
            assert_eq!(frame["op"], "event", "{frame}");
            received.push(frame["event"]["seq"].as_u64().expect("seq"));
        }
        assert!(
            published < 200,
            "the gateway never caught up after the NATS restart"
        );
    }
    assert_eq!(
        received,
        (21..=published).collect::<Vec<_>>(),
        "exactly once, in order, nothing lost"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn a_gateway_says_goodbye_with_1001_at_shutdown() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let (mut ws, _) = Ws::hello(&bus.ws, &service).await;
    let closed = tokio::spawn(async move { ws.closed().await });
    cluster.stop().await;
    assert_eq!(closed.await.expect("reader"), Closed::Code(1001));
}

#[tokio::test]
async fn a_gap_on_the_backbone_is_refilled_from_the_store_before_anything_newer() {
    // The store's own publishes go nowhere; this test is the backbone, and it loses messages.
    let cluster = Cluster::start_with_detached_store().await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let token = bus
        .auth
        .client_token(&service, "watcher", &["lossy"], &[])
        .await;
    let (mut ws, _) = Ws::hello(&bus.ws, &token).await;
    ws.subscribe(json!({"channel": "lossy"})).await;
    let batch: Vec<Value> = (0..10)
        .map(|i| json!({"channel": "lossy", "type": "tick", "data": i}))
        .collect();
    assert_eq!(
        bus.api.publish(&service, &Value::Array(batch)).await.status,
        200
    );
    let stored = bus.api.history(&service, "lossy", "after=0").await.body["events"]
        .as_array()
        .expect("events")
        .clone();

    let nats = async_nats::connect(cluster.nats.url()).await.expect("nats");
    // As the store puts them on the backbone: the event's JSON with `seq` first.
    let carry = |seq: usize| {
        let mut event = stored[seq - 1].clone();
        event.as_object_mut().expect("object").remove("seq");
        let body = serde_json::to_vec(&event).expect("json");
        nats.publish(
            "eventbus.ch.lossy",
            eventbus_model::with_seq(&body, seq as u64),
        )
    };
    // Seq 1 arrives; 2-6 are lost; 7 arrives, then 7 again (a duplicate), then 10 (8 and 9 lost).
    for seq in [1, 7, 7, 10] {
        carry(seq).await.expect("publish");
    }
    nats.flush().await.expect("flush");
    let events = ws.events(10).await;
    assert_eq!(seqs(&events), (1..=10).collect::<Vec<_>>());
    assert_eq!(events[4]["data"], 4, "refilled events are the stored ones");
    ws.send(json!({"op": "ping"})).await;
    assert_eq!(ws.recv().await["op"], "pong", "the duplicate 7 was dropped");
    cluster.stop().await;
}

#[tokio::test]
async fn a_silent_peer_is_dropped_and_a_live_one_kept() {
    let mut cluster = Cluster::start().await;
    let gateway = cluster
        .add_gateway_with(|config| config.settings.ping_interval_s = 1)
        .await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let (mut live, _) = Ws::hello(&gateway, &service).await;
    let (mut silent, _) = Ws::hello(&gateway, &service).await;
    // The behaviour under test is about time: the silent peer does not read (so it answers no
    // server ping) for over two ping intervals, while the live one keeps talking.
    let started = tokio::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(3500) {
        live.send(json!({"op": "ping"})).await;
        assert_eq!(live.recv().await["op"], "pong");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(
        silent.closed().await,
        Closed::Dropped,
        "the silent peer was dropped"
    );
    live.send(json!({"op": "ping"})).await;
    assert_eq!(
        live.recv().await["op"],
        "pong",
        "the live peer is still served"
    );
    cluster.stop().await;
}

#[tokio::test]
async fn a_tail_the_backbone_never_carried_still_arrives() {
    // Nothing the store commits reaches NATS: only the gateway's tail check can deliver it.
    let mut cluster = Cluster::start_with_detached_store().await;
    let gateway = cluster
        .add_gateway_with(|config| config.settings.tail_check_s = 1)
        .await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let token = bus
        .auth
        .client_token(&service, "watcher", &["quiet", "calm"], &[])
        .await;
    let (mut ws, _) = Ws::hello(&gateway, &token).await;
    let head = ws.subscribe(json!({"channel": "quiet"})).await["head"]
        .as_u64()
        .expect("head");
    ws.subscribe(json!({"channel": "calm"})).await;
    // Two channels with different tails: the check asks for both heads in one call, and each
    // channel must be caught up to its own.
    let batch: Vec<Value> = (0..3)
        .map(|i| json!({"channel": "quiet", "type": "tick", "data": i}))
        .chain([json!({"channel": "calm", "type": "tick", "data": 0})])
        .collect();
    assert_eq!(
        bus.api.publish(&service, &Value::Array(batch)).await.status,
        200
    );
    let mut events = ws.events(4).await;
    events.sort_by_key(|e| e["channel"] == "calm");
    assert_eq!(
        seqs(&events),
        vec![head + 1, head + 2, head + 3, 1],
        "quiet's three events in order, then calm's one"
    );
    ws.send(json!({"op": "ping"})).await;
    assert_eq!(ws.recv().await["op"], "pong", "each event once");
    cluster.stop().await;
}

/// Whoever can publish on NATS is not trusted with the subscribers: a message that is no event,
/// or that announces a seq far beyond the store's head, is dropped (and counted), and the
/// subscriber goes on receiving the real events, connected.
#[tokio::test]
async fn forged_backbone_messages_are_dropped_and_never_close_subscribers() {
    let cluster = Cluster::start_with_detached_store().await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let (mut ws, _) = Ws::hello(&bus.ws, &service).await;
    ws.subscribe(json!({"channel": "forged"})).await;
    let stored = bus
        .api
        .publish(
            &service,
            &json!({"channel": "forged", "type": "real", "data": 1}),
        )
        .await;
    assert_eq!(stored.status, 200);
    let nats = async_nats::connect(cluster.nats.url()).await.expect("nats");
    let metrics = || eventbus_runtime::metrics::metrics();
    let (malformed, beyond) = (
        metrics().backbone_malformed.get(),
        metrics().backbone_beyond_head.get(),
    );
    for payload in [
        br#"{"seq":1,"channel":"forged" garbage"#.to_vec(),
        br#"{"seq":1000000,"channel":"forged","type":"fake","data":"poison"}"#.to_vec(),
    ] {
        nats.publish("eventbus.ch.forged", payload.into())
            .await
            .expect("publish");
    }
    // The real event 1, as the store carries it: delivered, in order, after the forged ones.
    let real = bus.api.history(&service, "forged", "after=0").await.body["events"][0].clone();
    let mut body = real.clone();
    body.as_object_mut().expect("object").remove("seq");
    nats.publish(
        "eventbus.ch.forged",
        eventbus_model::with_seq(&serde_json::to_vec(&body).expect("json"), 1),
    )
    .await
    .expect("publish");
    nats.flush().await.expect("flush");
    let events = ws.events(1).await;
    assert_eq!(
        (&events[0]["seq"], &events[0]["type"]),
        (&json!(1), &json!("real"))
    );
    ws.send(json!({"op": "ping"})).await;
    assert_eq!(
        ws.recv().await["op"],
        "pong",
        "still connected, nothing forged delivered"
    );
    assert!(metrics().backbone_malformed.get() > malformed);
    assert!(metrics().backbone_beyond_head.get() > beyond);
    cluster.stop().await;
}
