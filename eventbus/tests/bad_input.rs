//! Bad input gets the documented error, and the services keep serving.

use eventbus_testkit::Cluster;
use eventbus_testkit::cluster::Endpoints;
use eventbus_testkit::ws::{Closed, Ws};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn head(bus: &Endpoints, token: &str, channel: &str) -> u64 {
    bus.api
        .history(token, channel, "after=0&limit=1")
        .await
        .body["head"]
        .as_u64()
        .expect("head")
}

async fn token_with_ttl(bus: &Endpoints, service: &str, sub: &str, ttl_s: u64) -> String {
    bus.auth
        .token(Some(service), json!({"sub": sub, "role": "client", "subscribe": ["orders"], "publish": ["orders"], "ttl_s": ttl_s}))
        .await
}

/// Waits until a token's expiry has passed on the wall clock.
async fn wait_until_expired(token: &str) {
    use base64_free::claims_exp;
    let exp = claims_exp(token);
    eventbus_testkit::eventually("the token to expire", || async move {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        (now >= exp).then_some(())
    })
    .await;
}

mod base64_free {
    /// The `exp` claim of a JWT, read without verifying it.
    pub fn claims_exp(token: &str) -> u64 {
        let payload = token.split('.').nth(1).expect("jwt payload");
        let bytes = decode_base64url(payload);
        let claims: serde_json::Value = serde_json::from_slice(&bytes).expect("claims json");
        claims["exp"].as_u64().expect("exp")
    }

    fn decode_base64url(text: &str) -> Vec<u8> {
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut bits = 0u32;
        let mut count = 0;
        let mut out = Vec::new();
        for c in text.bytes() {
            let value = alphabet.iter().position(|a| *a == c).expect("base64url") as u32;
            bits = (bits << 6) | value;
            count += 6;
            if count >= 8 {
                count -= 8;
                out.push((bits >> count) as u8);
                bits &= (1 << count) - 1;
            }
        }
        out
    }
}

#[tokio::test]
async fn http_bad_input_gets_problem_documents() {
    let cluster = Cluster::start().await;
    let bus = &cluster.endpoints;
    let service = bus.service_token().await;
    let before = head(bus, &service, "orders").await;

    let cases: Vec<(reqwest::RequestBuilder, u16, &str, Option<&str>)> = vec![
        (
            bus.api
                .post("/v1/events")
                .bearer_auth(&service)
                .header("content-type", "application/json")
                .body("{\"type\":"),
            400,
            "invalid-request",
            None,
        ),
        (
            bus.api
                .post("/v1/events")
                .bearer_auth(&service)
                .json(&json!({"channel": "orders"})),
            400,
            "invalid-request",
            Some("type"),
        ),
        (
            bus.api
                .post("/v1/events")
                .bearer_auth(&service)
                .json(&json!({"channel": "bad..name", "type": "t"})),
            400,
            "invalid-request",
            Some("channel"),
        ),
        (
            bus.api
                .post("/v1/events")
                .bearer_auth(&service)
                .json(&json!({"channel": "orders", "type": "t", "Colour": "red"})),
            400,
            "invalid-request",
            Some("Colour"),
        ),
        (
            bus.api
                .post("/v1/events")
                .bearer_auth(&service)
                .json(&json!({"channel": "orders", "type": "t", "data": "x".repeat(70_000)})),
            413,
            "too-large",
            None,
        ),
        (
            bus.api
                .post("/v1/events")
                .bearer_auth(&service)
                .json(&json!({"channel": "orders", "type": "t", "data": "x".repeat(5_000_000)})),
            413,
            "too-large",
            None,
        ),
        (
            bus.api
                .post("/v1/events")
                .bearer_auth(&service)
                .header("content-type", "text/plain")
                .body("hello"),
            415,
            "unsupported-media-type",
            None,
        ),
        (
            bus.api
                .post("/v1/events")
                .json(&json!({"channel": "orders", "type": "t"})),
            401,
            "unauthorized",
            None,
        ),
        (
            bus.api
                .post("/v1/events")
                .bearer_auth("not.a.token")
                .json(&json!({"channel": "orders", "type": "t"})),
            401,
            "unauthorized",
            None,
        ),
        (
            bus.api
                .get("/v1/channels/orders/events?after=x")
                .bearer_auth(&service),
            400,
            "invalid-request",
            Some("after"),
        ),
        (
            bus.api
                .get("/v1/channels/orders/events?after=999999")
                .bearer_auth(&service),
            400,
            "invalid-request",
            Some("after"),
        ),
        (
            bus.api
                .get("/v1/channels/orders/events?since=1")
                .bearer_auth(&service),
            400,
            "invalid-request",
            Some("since"),
        ),
        (
            bus.api
                .get("/v1/channels/orders.*/events")
                .bearer_auth(&service),
            400,
            "invalid-request",
            Some("channel"),
        ),
        (
            bus.api.get("/v1/channels/orders/events"),
            401,
            "unauthorized",
            None,
        ),
        (
            bus.auth
                .post("/v1/tokens")
                .bearer_auth(&service)
                .json(&json!({"sub": "x", "colour": 1})),
            400,
            "invalid-request",
            Some("colour"),
        ),
        (
            bus.auth
                .post("/v1/tokens")
                .bearer_auth(&service)
                .json(&json!({"ttl_s": -1})),
            400,
            "invalid-request",
            Some("ttl_s"),
        ),
        (
            bus.auth
                .post("/v1/tokens")
                .bearer_auth(&service)
                .json(&json!({"sub": "not valid!", "role": "client"})),
            400,
            "invalid-request",
            Some("sub"),
        ),
        (
            bus.auth
                .post("/v1/tokens")
                .bearer_auth("wrong-key-0123456789")
                .json(&json!({})),
            401,
            "unauthorized",
            None,
        ),
    ];
    for (i, (request, status, problem, field)) in cases.into_iter().enumerate() {
        let answer = bus.api.send(request).await;
        assert_eq!(answer.status.as_u16(), status, "case {i}: {}", answer.body);
        assert_eq!(answer.problem(), problem, "case {i}: {}", answer.body);
        assert_eq!(
            answer.headers["content-type"], "application/problem+json",
            "case {i}"
        );
        if let Some(field) = field {
            assert_eq!(answer.body["field"], field, "case {i}: {}", answer.body);
        }
    }

    // A batch is refused whole, naming the bad event's index; nothing of it is stored.
    let batch = json!([{"channel": "orders", "type": "t"}, {"channel": "orders"}, {"channel": "orders", "type": "t"}]);
    let answer = bus.api.publish(&service, &batch).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["index"], 1);
    assert_eq!(head(bus, &service, "orders").await, before);

    // A client may publish only where its token says, and cannot mint tokens.
    let client = bus
        .auth
        .client_token(&service, "alice", &["orders"], &["chat.*"])
        .await;
    let answer = bus
        .api
        .publish(&client, &json!({"channel": "orders", "type": "t"}))
        .await;
    assert_eq!(
        (answer.status.as_u16(), answer.problem()),
        (403, "forbidden".to_owned())
    );
    let answer = bus.api.history(&client, "payments", "after=0").await;
    assert_eq!(
        (answer.status.as_u16(), answer.problem()),
        (403, "forbidden".to_owned())
    );
    let answer = bus
        .auth
        .send(
            bus.auth
                .post("/v1/tokens")
                .bearer_auth(&client)
                .json(&json!({"sub": "x"})),
        )
        .await;
    assert_eq!(answer.status, 403);

    // An expired token is refused and says why.
    let short = token_with_ttl(bus, &service, "brief", 1).await;
    wait_until_expired(&short).await;
    let answer = bus
        .api
        .publish(&short, &json!({"channel": "orders", "type": "t"}))
        .await;
    assert_eq!(answer.status, 401);
    assert!(
        answer.body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("expired"),
        "{}",
        answer.body
    );

    // Nothing above was stored, and the service still serves.
    assert_eq!(head(bus, &service, "orders").await, before);
    let answer = bus
        .api
        .publish(&service, &json!({"channel": "orders", "type": "t"}))
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["events"][0]["seq"], before + 1);
    cluster.stop().await;
}

async fn expect_error(ws: &mut Ws, frame: Value, code: &str) {
    ws.send(frame.clone()).await;
    let answer = ws.recv().await;
    assert_eq!(answer["op"], "error", "{frame} -> {answer}");
    assert_eq!(answer["code"], code, "{frame} -> {answer}");
}

async fn still_open(ws: &mut Ws) {
    ws.send(json!({"op": "ping", "ref": "alive"})).await;
    assert_eq!(ws.recv().await, json!({"op": "pong", "ref": "alive"}));
}

#[tokio::test]
async fn websocket_bad_input_gets_error_frames_and_close_codes() {
    let mut cluster = Cluster::start().await;
    let quick = cluster
        .add_gateway_with(|config| config.settings.hello_timeout_s = 1)
        .await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let alice = bus
        .auth
        .client_token(&service, "alice", &["orders", "chat.*"], &["chat.*"])
        .await;
    let (mut ws, _) = Ws::hello(&bus.ws, &alice).await;

    let other = bus
        .auth
        .client_token(&service, "mallory", &["orders"], &[])
        .await;
    // Each refused frame and the code it must get; the connection stays open throughout.
    let refused = [
        (
            json!({"op": "subscribe", "channel": "inbox.bob"}),
            "forbidden",
        ),
        (
            json!({"op": "subscribe", "channel": "chat.*"}),
            "pattern_not_allowed",
        ),
        (
            json!({"op": "subscribe", "channel": "payments"}),
            "forbidden",
        ),
        (
            json!({"op": "subscribe", "channel": "a..b"}),
            "invalid_channel",
        ),
        (
            json!({"op": "subscribe", "channel": "orders", "group": "g"}),
            "group_not_allowed",
        ),
        (
            json!({"op": "subscribe", "channel": "orders", "after": 1_000_000}),
            "after_beyond_head",
        ),
        (
            json!({"op": "subscribe", "channel": "orders", "colour": "red"}),
            "invalid_frame",
        ),
        (json!({"op": "dance"}), "unknown_op"),
        (
            json!({"op": "unsubscribe", "channel": "never"}),
            "not_subscribed",
        ),
        (
            json!({"op": "hello", "token": alice}),
            "already_authenticated",
        ),
        (
            json!({"op": "publish", "event": {"channel": "orders", "type": "t"}}),
            "forbidden",
        ),
        (
            json!({"op": "publish", "event": {"channel": "chat.x"}}),
            "invalid_event",
        ),
        (
            json!({"op": "publish", "event": {"channel": "chat.x", "type": "t", "data": "x".repeat(70_000)}}),
            "too_large",
        ),
    ];
    for (frame, code) in refused {
        expect_error(&mut ws, frame, code).await;
    }
    ws.send_raw(Message::text("not json")).await;
    assert_eq!(ws.recv().await["code"], "bad_frame");
    ws.send_raw(Message::binary(vec![1, 2, 3])).await;
    assert_eq!(ws.recv().await["code"], "bad_frame");
    ws.send(json!({"op": "dance", "ref": 42})).await;
    assert_eq!(
        ws.recv().await["ref"],
        42,
        "an error answer carries the ref"
    );
    still_open(&mut ws).await;

    // A refresh with another identity's token is refused, and ends the connection (4001).
    let (mut stolen, _) = Ws::hello(&bus.ws, &alice).await;
    expect_error(
        &mut stolen,
        json!({"op": "refresh", "token": other}),
        "identity_mismatch",
    )
    .await;
    assert_eq!(stolen.closed().await, Closed::Code(4001));

    // A frame over the limit closes with 4009.
    ws.send_raw(Message::text("x".repeat(200 * 1024))).await;
    assert_eq!(ws.closed().await, Closed::Code(4009));

    // The first frame must be hello (4000); a bad token closes with 4001.
    let mut ws = Ws::connect(&bus.ws).await;
    ws.send(json!({"op": "ping"})).await;
    assert_eq!(ws.recv().await["code"], "unauthorized");
    assert_eq!(ws.closed().await, Closed::Code(4000));
    let mut ws = Ws::connect(&bus.ws).await;
    ws.send(json!({"op": "hello", "token": "garbage"})).await;
    assert_eq!(ws.recv().await["code"], "unauthorized");
    assert_eq!(ws.closed().await, Closed::Code(4001));

    // No hello in time: 4001.
    let mut ws = Ws::connect(&quick).await;
    assert_eq!(ws.closed().await, Closed::Code(4001));

    // A token given at the upgrade: bad ones are refused before the upgrade.
    match tokio_tungstenite::connect_async(format!("{}?token=garbage", bus.ws)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let mut ws = Ws::connect(&format!("{}?token={alice}", bus.ws)).await;
    assert_eq!(ws.recv().await["op"], "welcome");

    // An expired token: refused at hello; and a connection whose token expires is closed with 4001.
    let brief = token_with_ttl(&bus, &service, "brief", 2).await;
    let (mut expiring, _) = Ws::hello(&bus.ws, &brief).await;
    wait_until_expired(&brief).await;
    let mut late = Ws::connect(&bus.ws).await;
    late.send(json!({"op": "hello", "token": brief})).await;
    assert_eq!(late.recv().await["code"], "token_expired");
    assert_eq!(late.closed().await, Closed::Code(4001));
    assert_eq!(expiring.recv_op("error").await["code"], "token_expired");
    assert_eq!(expiring.closed().await, Closed::Code(4001));

    // A refresh in time keeps a connection alive past its first token.
    let first = token_with_ttl(&bus, &service, "renewer", 2).await;
    let (mut renewer, _) = Ws::hello(&bus.ws, &first).await;
    let second = token_with_ttl(&bus, &service, "renewer", 60).await;
    renewer
        .send(json!({"op": "refresh", "token": second, "ref": 1}))
        .await;
    assert_eq!(renewer.recv().await["op"], "refreshed");
    wait_until_expired(&first).await;
    still_open(&mut renewer).await;

    // After all that, the gateway still serves.
    still_open(&mut ws).await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_slow_consumer_is_closed_without_delaying_others() {
    let mut cluster = Cluster::start().await;
    let gateway = cluster
        .add_gateway_with(|config| config.settings.queue_len = 64)
        .await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let token = bus
        .auth
        .client_token(&service, "watcher", &["firehose"], &[])
        .await;

    let (mut stalled, _) = Ws::hello(&gateway, &token).await;
    stalled.subscribe(json!({"channel": "firehose"})).await;
    let (mut fast, _) = Ws::hello(&gateway, &token).await;
    fast.subscribe(json!({"channel": "firehose"})).await;

    // 600 events of 32 KiB: far more than the stalled reader's queue and socket buffers hold.
    const TOTAL: usize = 600;
    let api = bus.api.clone();
    let publisher_token = service.clone();
    let publisher = tokio::spawn(async move {
        for round in 0..TOTAL / 10 {
            let batch: Vec<Value> = (0..10)
                .map(|i| json!({"channel": "firehose", "type": "blob", "data": {"n": round * 10 + i, "pad": "x".repeat(32 * 1024)}}))
                .collect();
            assert_eq!(
                api.publish(&publisher_token, &Value::Array(batch))
                    .await
                    .status,
                200
            );
        }
    });
    let events = fast.events(TOTAL).await;
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (1..=TOTAL as u64).collect::<Vec<_>>(),
        "the fast reader gets everything, in order"
    );
    publisher.await.expect("publisher");

    let mut received = 0;
    let ending = loop {
        match stalled.next().await {
            Ok(frame) if frame["op"] == "event" => received += 1,
            Ok(frame) => panic!("unexpected frame {frame}"),
            Err(closed) => break closed,
        }
    };
    assert!(
        received < TOTAL,
        "the stalled reader was cut off, not served everything"
    );
    assert!(
        matches!(ending, Closed::Code(4008) | Closed::Dropped),
        "the stalled reader is closed as a slow consumer, got {ending:?}"
    );
    cluster.stop().await;
}

/// One refusal, one status, on every HTTP endpoint that reads a channel (history, SSE, presence,
/// snapshots): a channel the token does not grant is 403, a malformed one 400, a bad token 401.
#[tokio::test]
async fn the_same_refusal_gets_the_same_status_everywhere() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let alice = bus
        .auth
        .client_token(&service, "alice", &["room.1"], &[])
        .await;
    let reads = |channel: &str| {
        [
            (
                bus.api.clone(),
                format!("/v1/channels/{channel}/events?after=0"),
            ),
            (bus.api.clone(), format!("/v1/channels/{channel}/snapshot")),
            (bus.auth.clone(), format!("/v1/presence/{channel}")),
        ]
    };
    let sse = |channel: &str| {
        let ws = bus.ws.replace("ws://", "http://").replace("/v1/ws", "");
        format!("{ws}/v1/sse?channel={channel}")
    };
    for (channel, token, status) in [
        ("room.2", alice.as_str(), 403),
        ("a..b", alice.as_str(), 400),
        ("room.1", "not-a-token", 401),
    ] {
        for (http, path) in reads(channel) {
            let answer = http.send(http.get(&path).bearer_auth(token)).await;
            assert_eq!(
                answer.status, status,
                "{path} with {channel}: {}",
                answer.body
            );
        }
        let answer = reqwest::Client::new()
            .get(sse(channel))
            .bearer_auth(token)
            .send()
            .await
            .expect("sse");
        assert_eq!(answer.status(), status, "SSE with {channel}");
    }
    cluster.stop().await;
}
