//! Retention end to end: history below the first retained seq is refused as truncated, over HTTP
//! and over WebSocket, never silently skipped.

use eventbus_testkit::ws::Ws;
use eventbus_testkit::{Cluster, eventually};
use serde_json::{Value, json};

#[tokio::test]
async fn truncated_history_is_reported_not_skipped() {
    let cluster = Cluster::start_tuned(None, |store| {
        store.settings.retention = vec!["ticker:max_events=10".parse().expect("rule")];
        store.settings.retention_interval_s = 1;
    })
    .await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let batch: Vec<Value> = (0..30)
        .map(|i| json!({"channel": "ticker", "type": "tick", "key": format!("k{}", i % 3), "data": i}))
        .collect();
    assert_eq!(
        bus.api.publish(&service, &Value::Array(batch)).await.status,
        200
    );

    let refused = eventually("retention to let the old ticks go", || {
        let api = bus.api.clone();
        let service = service.clone();
        async move {
            let answer = api.history(&service, "ticker", "after=0").await;
            (answer.status == 410).then_some(answer)
        }
    })
    .await;
    assert_eq!(refused.problem(), "truncated");
    assert_eq!(refused.body["first_seq"], 21);
    let kept = bus.api.history(&service, "ticker", "after=20").await;
    assert_eq!(kept.status, 200);
    assert_eq!(kept.body["events"].as_array().map(Vec::len), Some(10));
    assert_eq!(
        bus.api
            .history(&service, "ticker", "after=20&compact=true")
            .await
            .body["events"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    let (mut ws, _) = Ws::hello(&bus.ws, &service).await;
    ws.send(json!({"op": "subscribe", "channel": "ticker", "after": 5, "ref": 1}))
        .await;
    let error = ws.recv().await;
    assert_eq!(error["code"], "truncated", "{error}");
    assert_eq!(error["first_seq"], 21);
    assert_eq!(error["channel"], "ticker");
    assert_eq!(error["ref"], 1);
    ws.subscribe(json!({"channel": "ticker", "after": 20}))
        .await;
    let events = ws.events(10).await;
    assert_eq!(events[0]["seq"], 21);
    assert_eq!(events[9]["seq"], 30);
    cluster.stop().await;
}
