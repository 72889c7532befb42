//! End-to-end scenarios run against every shape of the bus.

use eventbus_testkit::cluster::{API_KEY_NAME, Endpoints};
use eventbus_testkit::ws::Ws;
use serde_json::{Value, json};

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

/// An event published over HTTP reaches a WebSocket subscriber with its seq and source.
pub async fn publish_over_http_reaches_websocket(bus: &Endpoints) {
    let service = bus.service_token().await;
    let alice = bus
        .auth
        .client_token(&service, "alice", &["orders"], &[])
        .await;
    let (mut ws, welcome) = Ws::hello(&bus.ws, &alice).await;
    assert_eq!(welcome["identity"], "alice");
    assert_eq!(welcome["role"], "client");
    assert!(welcome["connection"].is_string());
    let subscribed = ws.subscribe(json!({"channel": "orders", "ref": 1})).await;
    assert_eq!(subscribed["ref"], 1);
    let head = subscribed["head"].as_u64().expect("head");

    let answer = bus
        .api
        .publish(&service, &json!({"channel": "orders", "type": "order_placed", "source": "forged", "data": {"n": 1}}))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let stored = &answer.body["events"][0];
    assert_eq!(stored["seq"], head + 1);
    assert_eq!(stored["duplicate"], false);

    let event = &ws.events(1).await[0];
    assert_eq!(event["seq"], head + 1);
    assert_eq!(event["channel"], "orders");
    assert_eq!(event["type"], "order_placed");
    assert_eq!(
        event["source"], API_KEY_NAME,
        "source is the publisher's identity, never what it claims"
    );
    assert_eq!(event["data"], json!({"n": 1}));
    assert_eq!(event["id"], stored["id"]);

    // The same id again is the same event: same seq, nothing new delivered.
    let again = bus
        .api
        .publish(
            &service,
            &json!({"id": stored["id"], "channel": "orders", "type": "order_placed"}),
        )
        .await;
    assert_eq!(again.body["events"][0]["seq"], head + 1);
    assert_eq!(again.body["events"][0]["duplicate"], true);
    ws.send(json!({"op": "ping", "ref": "p"})).await;
    let pong = ws.recv().await;
    assert_eq!(
        pong,
        json!({"op": "pong", "ref": "p"}),
        "a duplicate must not be delivered"
    );
    ws.close().await;
}

/// A subscriber that reconnects with `after` gets exactly what it missed, in order, then live.
pub async fn resume_gets_exactly_what_was_missed(bus: &Endpoints) {
    let service = bus.service_token().await;
    let bob = bus
        .auth
        .client_token(&service, "bob", &["chat.*"], &[])
        .await;
    let channel = "chat.room-7";
    let (mut ws, _) = Ws::hello(&bus.ws, &bob).await;
    let head = ws.subscribe(json!({"channel": channel})).await["head"]
        .as_u64()
        .expect("head");
    for i in 0..3 {
        let answer = bus
            .api
            .publish(
                &service,
                &json!({"channel": channel, "type": "said", "data": i}),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
    let seen = seqs(&ws.events(3).await);
    assert_eq!(seen, vec![head + 1, head + 2, head + 3]);
    let last = head + 3;
    ws.close().await;

    // 100 events while bob is away: 50 one by one, 50 in one batch.
    for i in 0..50 {
        let answer = bus
            .api
            .publish(
                &service,
                &json!({"channel": channel, "type": "said", "data": i}),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
    let batch: Vec<Value> = (50..100)
        .map(|i| json!({"channel": channel, "type": "said", "data": i}))
        .collect();
    let answer = bus.api.publish(&service, &Value::Array(batch)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["events"].as_array().map(Vec::len), Some(50));

    let (mut ws, _) = Ws::hello(&bus.ws, &bob).await;
    let subscribed = ws
        .subscribe(json!({"channel": channel, "after": last}))
        .await;
    assert_eq!(subscribed["head"], last + 100);
    let missed = ws.events(100).await;
    assert_eq!(seqs(&missed), (last + 1..=last + 100).collect::<Vec<_>>());
    assert_eq!(missed[99]["data"], 99);

    let answer = bus
        .api
        .publish(
            &service,
            &json!({"channel": channel, "type": "said", "data": "live"}),
        )
        .await;
    assert_eq!(answer.status, 200);
    let live = ws.events(1).await;
    assert_eq!(
        live[0]["seq"],
        last + 101,
        "live continues right after the catch-up, nothing doubled"
    );
    ws.close().await;
}

/// WebSocket publishing is acknowledged once durable; `to` reaches the identity's inbox; a compacted
/// catch-up holds only the newest event per key.
pub async fn websocket_publish_inbox_and_compaction(bus: &Endpoints) {
    let service = bus.service_token().await;
    let carol = bus
        .auth
        .client_token(&service, "carol", &["board"], &["board"])
        .await;
    let dave = bus
        .auth
        .client_token(&service, "dave", &["board"], &[])
        .await;
    let (mut writer, _) = Ws::hello(&bus.ws, &carol).await;
    let (mut reader, _) = Ws::hello(&bus.ws, &dave).await;
    let head = reader.subscribe(json!({"channel": "board"})).await["head"]
        .as_u64()
        .expect("head");

    writer
        .send(json!({"op": "publish", "ref": 9, "event": {"channel": "board", "type": "card_moved", "key": "card-1", "data": {"col": "done"}}}))
        .await;
    let ack = writer.recv_op("ack").await;
    assert_eq!(ack["ref"], 9);
    assert_eq!(ack["seq"], head + 1);
    assert_eq!(ack["channel"], "board");
    let delivered = reader.events(1).await;
    assert_eq!(delivered[0]["source"], "carol");
    assert_eq!(delivered[0]["key"], "card-1");

    // A message to dave's inbox reaches him without any subscribe.
    let answer = bus
        .api
        .publish(
            &service,
            &json!({"to": "dave", "type": "direct", "data": "psst"}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["events"][0]["channel"], "inbox.dave");
    let direct = reader.events(1).await;
    assert_eq!(direct[0]["channel"], "inbox.dave");
    assert_eq!(direct[0]["data"], "psst");

    // Compaction: card-1 moves twice more, card-2 is created then deleted.
    let batch = json!([
        {"channel": "board", "type": "card_moved", "key": "card-1", "data": {"col": "review"}},
        {"channel": "board", "type": "card_added", "key": "card-2", "data": {"col": "todo"}},
        {"channel": "board", "type": "card_moved", "key": "card-1", "data": {"col": "shipped"}},
        {"channel": "board", "type": "card_removed", "key": "card-2", "deleted": true}
    ]);
    assert_eq!(bus.api.publish(&service, &batch).await.status, 200);
    let (mut late, _) = Ws::hello(&bus.ws, &dave).await;
    late.subscribe(json!({"channel": "board", "after": head, "compact": true}))
        .await;
    let backlog = late.events(1).await;
    assert_eq!(backlog[0]["key"], "card-1");
    assert_eq!(backlog[0]["data"], json!({"col": "shipped"}));
    late.send(json!({"op": "ping"})).await;
    assert_eq!(
        late.recv().await["op"],
        "pong",
        "deleted and superseded keys are left out"
    );

    let history = bus
        .api
        .history(&dave, "board", &format!("after={head}&compact=true"))
        .await;
    assert_eq!(history.status, 200);
    assert_eq!(history.body["events"].as_array().map(Vec::len), Some(1));
    assert_eq!(history.body["head"], head + 5);
    let full = bus
        .api
        .history(&dave, "board", &format!("after={head}&limit=2"))
        .await;
    assert_eq!(
        seqs(full.body["events"].as_array().expect("events")),
        vec![head + 1, head + 2]
    );
    assert_eq!(full.body["next_after"], head + 2);
    writer.close().await;
    reader.close().await;
    late.close().await;
}

/// Subscribers that catch up while events keep arriving switch from history to live with nothing
/// missed and nothing doubled.
pub async fn catch_up_races_live_publishing(bus: &Endpoints) {
    let service = bus.service_token().await;
    let reader = bus
        .auth
        .client_token(&service, "erin", &["race"], &[])
        .await;
    const TOTAL: u64 = 400;
    let api = bus.api.clone();
    let publisher_token = service.clone();
    let publisher = tokio::spawn(async move {
        for round in 0..TOTAL / 10 {
            let batch: Vec<Value> = (0..10)
                .map(|i| json!({"channel": "race", "type": "tick", "data": round * 10 + i}))
                .collect();
            let answer = api.publish(&publisher_token, &Value::Array(batch)).await;
            assert_eq!(answer.status, 200, "{}", answer.body);
        }
    });
    // Subscribers join at different moments of the stream, each from the start of the channel.
    let mut readers = Vec::new();
    for joined_at in [0u64, 50, 150, 300] {
        eventbus_testkit::eventually("the stream to progress", || {
            let api = bus.api.clone();
            let reader = reader.clone();
            async move {
                let answer = api.history(&reader, "race", "after=0&limit=1").await;
                answer.body["head"]
                    .as_u64()
                    .filter(|head| *head >= joined_at)
            }
        })
        .await;
        let (mut ws, _) = Ws::hello(&bus.ws, &reader).await;
        ws.subscribe(json!({"channel": "race", "after": 0})).await;
        readers.push(tokio::spawn(async move {
            let events = ws.events(TOTAL as usize).await;
            assert_eq!(seqs(&events), (1..=TOTAL).collect::<Vec<_>>());
            ws.send(json!({"op": "ping"})).await;
            assert_eq!(
                ws.recv().await["op"],
                "pong",
                "nothing after the last event"
            );
            ws.close().await;
        }));
    }
    publisher.await.expect("publisher");
    for reader in readers {
        reader.await.expect("reader saw every event once, in order");
    }
}

/// A long catch-up takes turns with the connection's live events: a subscriber reading a long
/// history of one channel still gets another channel's events meanwhile, and the channel it
/// catches up on stays gap-free and once-only while it keeps growing.
pub async fn a_long_catch_up_shares_the_connection(bus: &Endpoints) {
    let service = bus.service_token().await;
    let reader = bus
        .auth
        .client_token(&service, "fay", &["archive", "pulse"], &[])
        .await;
    const HISTORY: u64 = 20_000;
    for round in 0..HISTORY / 1000 {
        let batch: Vec<Value> = (0..1000)
            .map(|i| json!({"channel": "archive", "type": "old", "data": round * 1000 + i}))
            .collect();
        let answer = bus.api.publish(&service, &Value::Array(batch)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let (mut ws, _) = Ws::hello(&bus.ws, &reader).await;
    ws.subscribe(json!({"channel": "pulse"})).await;
    ws.subscribe(json!({"channel": "archive", "after": 0}))
        .await;
    let first = ws.events(1).await;
    assert_eq!(seqs(&first), vec![1]);
    // While the history streams: an event on the other channel, and more on the one catching up.
    let publish = |channel: &str, n: u64| json!({"channel": channel, "type": "new", "data": n});
    let answer = bus.api.publish(&service, &publish("pulse", 0)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let more: Vec<Value> = (0..5).map(|n| publish("archive", n)).collect();
    let answer = bus.api.publish(&service, &Value::Array(more)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    let mut archive = seqs(&first);
    let mut pulse_at = None;
    while archive.len() < (HISTORY + 5) as usize || pulse_at.is_none() {
        let event = ws.events(1).await.remove(0);
        match event["channel"].as_str() {
            Some("archive") => archive.push(event["seq"].as_u64().expect("seq")),
            Some("pulse") => {
                assert!(pulse_at.is_none(), "pulse's event once");
                pulse_at = Some(archive.len());
            }
            other => panic!("an event of {other:?}"),
        }
    }
    assert_eq!(archive, (1..=HISTORY + 5).collect::<Vec<_>>());
    let pulse_at = pulse_at.expect("pulse's event");
    assert!(
        pulse_at < HISTORY as usize,
        "the live event waited for the whole history: it came after {pulse_at} of {HISTORY} events"
    );
    ws.send(json!({"op": "ping"})).await;
    assert_eq!(ws.recv().await["op"], "pong", "nothing more");
    ws.close().await;
}
