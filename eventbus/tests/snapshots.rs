//! Snapshots over HTTP: a service stores its state of a channel as of a seq; a consumer reads the
//! latest snapshot and the events after it.

use eventbus_testkit::Cluster;
use serde_json::{Value, json};

#[tokio::test]
async fn a_consumer_rebuilds_from_the_latest_snapshot_and_what_followed() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let batch: Vec<Value> = (1..=10)
        .map(|n| json!({"channel": "cart.42", "type": "item_added", "data": {"price": n}}))
        .collect();
    assert_eq!(
        bus.api.publish(&service, &Value::Array(batch)).await.status,
        200
    );

    let none = bus
        .api
        .send(
            bus.api
                .get("/v1/channels/cart.42/snapshot")
                .bearer_auth(&service),
        )
        .await;
    assert_eq!(none.status, 200);
    assert_eq!(none.body["snapshot"], Value::Null);
    assert_eq!(none.body["events"].as_array().map(Vec::len), Some(10));

    let put = |seq: u64, data: Value| {
        bus.api.send(bus.api.put_json(
            "/v1/channels/cart.42/snapshot",
            &service,
            &json!({"seq": seq, "data": data}),
        ))
    };
    let stored = put(6, json!({"total": 21})).await;
    assert_eq!(stored.status, 200, "{}", stored.body);
    assert_eq!(stored.body, json!({"channel": "cart.42", "seq": 6}));

    let read = bus
        .api
        .send(
            bus.api
                .get("/v1/channels/cart.42/snapshot")
                .bearer_auth(&service),
        )
        .await;
    assert_eq!(
        read.body["snapshot"],
        json!({"seq": 6, "data": {"total": 21}})
    );
    let after: Vec<u64> = read.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(after, vec![7, 8, 9, 10]);
    assert_eq!(read.body["head"], 10);
    let total: u64 = 21
        + read.body["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["data"]["price"].as_u64().expect("price"))
            .sum::<u64>();
    assert_eq!(total, 55, "snapshot + events after it = the whole history");

    // Bad snapshots are refused and change nothing.
    assert_eq!(
        put(4, json!({})).await.status,
        400,
        "snapshots only move forward"
    );
    assert_eq!(put(11, json!({})).await.status, 400, "not beyond the head");
    let unknown = bus
        .api
        .send(bus.api.put_json(
            "/v1/channels/cart.42/snapshot",
            &service,
            &json!({"seq": 7, "data": 1, "extra": 1}),
        ))
        .await;
    assert_eq!(unknown.status, 400);
    let text = bus
        .api
        .send(
            bus.api
                .put("/v1/channels/cart.42/snapshot")
                .bearer_auth(&service)
                .body("{}"),
        )
        .await;
    assert_eq!(text.status, 415);
    let reader = bus
        .auth
        .client_token(&service, "shopper", &["cart.42"], &[])
        .await;
    let forbidden = bus
        .api
        .send(bus.api.put_json(
            "/v1/channels/cart.42/snapshot",
            &reader,
            &json!({"seq": 8, "data": {}}),
        ))
        .await;
    assert_eq!(forbidden.status, 403);
    let by_client = bus
        .api
        .send(
            bus.api
                .get("/v1/channels/cart.42/snapshot?limit=2")
                .bearer_auth(&reader),
        )
        .await;
    assert_eq!(by_client.status, 200, "subscribers may read it");
    assert_eq!(by_client.body["snapshot"]["seq"], 6);
    assert_eq!(by_client.body["events"].as_array().map(Vec::len), Some(2));
    assert_eq!(by_client.body["next_after"], 8);
    cluster.stop().await;
}
