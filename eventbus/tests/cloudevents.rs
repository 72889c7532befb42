//! CloudEvents at the publishing edge: structured, batched and binary mode store the same event.

use eventbus_testkit::Cluster;
use serde_json::{Value, json};

#[tokio::test]
async fn structured_batched_and_binary_mode_store_the_same_event() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let event = |id: &str| {
        json!({"specversion": "1.0", "id": id, "type": "com.example.order", "source": "ignored",
               "channel": "ce", "subject": "order-1", "datacontenttype": "application/json",
               "traceparent": "00-abc", "data": {"total": 42}})
    };
    let structured = bus
        .api
        .send(
            bus.api
                .post("/v1/events")
                .bearer_auth(&service)
                .header("content-type", "application/cloudevents+json")
                .body(event("s").to_string()),
        )
        .await;
    assert_eq!(structured.status, 200, "{}", structured.body);
    let batched = bus
        .api
        .send(
            bus.api
                .post("/v1/events")
                .bearer_auth(&service)
                .header("content-type", "application/cloudevents-batch+json")
                .body(json!([event("b")]).to_string()),
        )
        .await;
    assert_eq!(batched.status, 200, "{}", batched.body);
    let binary = bus
        .api
        .send(
            bus.api
                .post("/v1/events")
                .bearer_auth(&service)
                .header("ce-specversion", "1.0")
                .header("ce-id", "x")
                .header("ce-type", "com.example.order")
                .header("ce-source", "ignored")
                .header("ce-channel", "ce")
                .header("ce-subject", "order-1")
                .header("ce-traceparent", "00-abc")
                .header("content-type", "application/json")
                .body(json!({"total": 42}).to_string()),
        )
        .await;
    assert_eq!(binary.status, 200, "{}", binary.body);

    let stored = bus.api.history(&service, "ce", "after=0").await.body["events"]
        .as_array()
        .expect("events")
        .clone();
    assert_eq!(stored.len(), 3);
    // Apart from what differs by construction (id, seq, time), the three are the same event.
    let normalised: Vec<Value> = stored
        .iter()
        .map(|e| {
            let mut e = e.clone();
            for field in ["id", "seq", "time"] {
                e.as_object_mut().expect("object").remove(field);
            }
            e
        })
        .collect();
    assert_eq!(normalised[0], normalised[1]);
    assert_eq!(normalised[0], normalised[2]);
    assert_eq!(
        normalised[0]["source"], "billing",
        "source is the publisher, in every mode"
    );
    assert_eq!(normalised[0]["traceparent"], "00-abc");
    assert_eq!(normalised[0]["data"], json!({"total": 42}));

    // Binary mode with a body that does not match its content type is refused.
    let bad = bus
        .api
        .send(
            bus.api
                .post("/v1/events")
                .bearer_auth(&service)
                .header("ce-specversion", "1.0")
                .header("ce-type", "t")
                .header("ce-channel", "ce")
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await;
    assert_eq!(bad.status, 400);

    // Binary mode without a Content-Type (as the official Python SDK sends it): a JSON body is
    // JSON data, anything else is bytes.
    for (body, channel) in [(r#"{"total": 42}"#, "ce.untyped"), ("\u{1}raw", "ce.bytes")] {
        let answer = bus
            .api
            .send(
                bus.api
                    .post("/v1/events")
                    .bearer_auth(&service)
                    .header("ce-specversion", "1.0")
                    .header("ce-type", "t")
                    .header("ce-channel", channel)
                    .body(body),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let untyped = bus.api.history(&service, "ce.untyped", "after=0").await;
    assert_eq!(untyped.body["events"][0]["data"], json!({"total": 42}));
    assert!(untyped.body["events"][0].get("data_base64").is_none());
    let bytes = bus.api.history(&service, "ce.bytes", "after=0").await;
    assert!(
        bytes.body["events"][0]["data_base64"].is_string(),
        "{}",
        bytes.body
    );
    cluster.stop().await;
}

/// A WebSocket client that asks for the `cloudevents.json` subprotocol gets bare CloudEvents
/// (`channel` and `seq` as extension attributes), from history and live alike.
#[tokio::test]
async fn the_cloudevents_subprotocol_delivers_plain_cloudevents() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let publish = |text: &'static str| {
        let (api, service) = (bus.api.clone(), service.clone());
        async move {
            let event =
                json!({"channel": "ce.out", "type": "com.example.said", "data": {"text": text}});
            assert_eq!(api.publish(&service, &event).await.status, 200);
        }
    };
    publish("from history").await;

    let mut request = bus.ws.as_str().into_client_request().expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "cloudevents.json".parse().expect("header"),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect");
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "cloudevents.json"
    );
    ws.send(Message::text(
        json!({"op": "hello", "token": service}).to_string(),
    ))
    .await
    .expect("send");
    let mut frames = Vec::new();
    let read = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| -> Value {
        loop {
            let message = tokio::time::timeout(eventbus_testkit::WAIT, ws.next())
                .await
                .expect("a frame in time")
                .expect("open")
                .expect("frame");
            if let Message::Text(text) = message {
                return serde_json::from_str::<Value>(text.as_str()).expect("JSON");
            }
        }
    };
    assert_eq!(
        read(&mut ws).await["op"],
        "welcome",
        "control frames keep their op"
    );
    ws.send(Message::text(
        json!({"op": "subscribe", "channel": "ce.out", "after": 0}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(read(&mut ws).await["op"], "subscribed");
    frames.push(read(&mut ws).await);
    publish("live").await;
    frames.push(read(&mut ws).await);
    for (frame, (seq, text)) in frames.iter().zip([(1, "from history"), (2, "live")]) {
        assert!(frame.get("op").is_none(), "a bare CloudEvent: {frame}");
        assert_eq!(frame["specversion"], "1.0");
        assert_eq!(frame["type"], "com.example.said");
        assert_eq!(frame["channel"], "ce.out");
        assert_eq!(frame["seq"], seq);
        assert_eq!(frame["data"]["text"], text);
        for required in ["id", "source"] {
            assert!(frame[required].is_string(), "{required} in {frame}");
        }
    }
    cluster.stop().await;
}
