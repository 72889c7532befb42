//! Hooks to the application (docs/protocol.md §9) against a real HTTP backend written here: the
//! connect hook lets a WebSocket or SSE client in by its cookie alone, or refuses with the app's
//! reason; the subscribe and publish hooks decide for clients on their channels (allow, refuse,
//! replace data); an app that times out or answers nonsense refuses; every request is signed.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::AllInOne;
use eventbus_testkit::ws::{Closed, Ws};
use serde_json::{Value, json};

const SECRET: &str = "app-hook-secret-0123456789";

/// What the app was asked, per hook.
#[derive(Default)]
struct App {
    asked: Mutex<Vec<Value>>,
}

impl App {
    fn asked(&self, hook: &str) -> Vec<Value> {
        self.asked
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r["hook"] == hook)
            .cloned()
            .collect()
    }

    fn count(&self, hook: &str, channel: &str) -> usize {
        self.asked(hook)
            .iter()
            .filter(|r| r["channel"] == channel)
            .count()
    }
}

/// The application's backend: sessions by cookie, rooms with members, a word filter. Every
/// request's signature and request id are checked before it is answered.
async fn start_app(app: Arc<App>) -> String {
    let handler = move |headers: HeaderMap, body: Bytes| {
        let app = app.clone();
        async move {
            common::assert_signed(&headers, SECRET, &body);
            let request: Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(
                headers["x-eventbus-request-id"].to_str().expect("ascii"),
                request["request_id"].as_str().expect("request_id"),
            );
            app.asked.lock().expect("lock").push(request.clone());
            let answer = match request["hook"].as_str().expect("hook") {
                "connect" => {
                    let cookie = request["headers"]["cookie"].as_str().unwrap_or("");
                    match cookie {
                        "session=alice" => json!({
                            "allow": true, "identity": "alice", "subscribe": ["news"],
                            "publish": ["chat.>"], "expires_in": 600,
                        }),
                        "session=slow" => std::future::pending().await,
                        "session=garbage" => return (StatusCode::OK, "not json").into_response(),
                        "session=broken" => {
                            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
                        }
                        "session=nameless" => json!({"allow": true}),
                        "session=brief" => {
                            json!({"allow": true, "identity": "brief", "expires_in": 1})
                        }
                        // An answer far larger than any decision: not read to its end.
                        "session=huge" => {
                            json!({"allow": true, "identity": "huge", "padding": "x".repeat(100_000)})
                        }
                        _ => json!({"allow": false, "reason": "not logged in"}),
                    }
                }
                "subscribe" => match request["channel"].as_str().expect("channel") {
                    "rooms.open" => json!({"allow": true}),
                    "rooms.slow" => std::future::pending().await,
                    "rooms.bad" => json!({"allow": "yes"}),
                    _ => json!({"allow": false, "reason": "members only"}),
                },
                "publish" => match request["channel"].as_str().expect("channel") {
                    "chat.clean" => {
                        let text = request["event"]["data"]["text"].as_str().unwrap_or("");
                        if text.contains("darn") {
                            json!({"allow": true, "data": {"text": text.replace("darn", "****")}})
                        } else {
                            json!({"allow": true})
                        }
                    }
                    "chat.slow" => std::future::pending().await,
                    "chat.bad" => json!([]),
                    _ => json!({"allow": false, "reason": "this room is read-only"}),
                },
                other => panic!("unknown hook {other}"),
            };
            axum::Json(answer).into_response()
        }
    };
    let router = axum::Router::new().route("/hooks", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hooks", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

async fn bus_with_hooks(app: Arc<App>, cache_s: u64) -> AllInOne {
    bus_tuned(app, cache_s, |_| {}).await
}

async fn bus_tuned(
    app: Arc<App>,
    cache_s: u64,
    tune: impl FnOnce(&mut eventbus::serve::Config),
) -> AllInOne {
    let url = start_app(app).await;
    let dir = tempfile::tempdir().expect("temp dir");
    AllInOne::start_with(dir, false, move |config| {
        tune(config);
        let hooks = &mut config.app_hooks;
        hooks.connect_url = Some(url.clone());
        hooks.subscribe_url = Some(url.clone());
        hooks.subscribe_channels = vec!["rooms.>".into()];
        hooks.publish_url = Some(url);
        hooks.publish_channels = vec!["chat.>".into()];
        hooks.secret = Some(SECRET.into());
        hooks.headers = vec!["cookie".into(), "x-app-session".into()];
        hooks.timeout_ms = 1000;
        hooks.cache_s = cache_s;
    })
    .await
}

/// Connects with a cookie and says hello without a token.
async fn hello_with_cookie(url: &str, cookie: &str) -> Ws {
    let mut ws = Ws::connect_with(url, &[("cookie", cookie), ("x-not-passed", "secret")]).await;
    ws.send(json!({"op": "hello", "ref": 1})).await;
    ws
}

#[tokio::test]
async fn the_connect_hook_lets_a_cookie_in_and_refuses_with_the_apps_reason() {
    let app = Arc::new(App::default());
    let bus = bus_with_hooks(app.clone(), 0).await;
    let ws_url = &bus.endpoints.ws;

    // Allowed: the app's identity and grants, a client.
    let mut alice = hello_with_cookie(ws_url, "session=alice").await;
    let welcome = alice.recv().await;
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    assert_eq!(welcome["identity"], "alice");
    assert_eq!(welcome["role"], "client");
    assert_eq!(welcome["ref"], 1);
    let lifetime =
        welcome["expires_at"].as_u64().expect("expires_at") - eventbus_auth_client::claims::now_s();
    assert!((590..=600).contains(&lifetime), "the app's expires_in");
    alice.subscribe(json!({"channel": "news"})).await;
    alice
        .send(json!({"op": "subscribe", "channel": "other"}))
        .await;
    assert_eq!(
        alice.recv().await["code"],
        "forbidden",
        "only what the app granted"
    );
    let service = bus.endpoints.service_token().await;
    let published = bus
        .endpoints
        .api
        .publish(
            &service,
            &json!({"channel": "news", "type": "t", "data": 1}),
        )
        .await;
    assert_eq!(published.status, 200);
    assert_eq!(alice.events(1).await[0]["data"], 1);
    // All the app saw of the request: the allow-listed headers.
    let connect = &app.asked("connect")[0];
    assert_eq!(connect["transport"], "websocket");
    assert_eq!(connect["headers"], json!({"cookie": "session=alice"}));

    // Refused: the app's reason in an error frame, then 4003.
    let mut stranger = hello_with_cookie(ws_url, "session=nobody").await;
    let refused = stranger.recv().await;
    assert_eq!(refused["code"], "refused", "{refused}");
    assert_eq!(refused["message"], "not logged in");
    assert_eq!(refused["ref"], 1);
    assert_eq!(stranger.closed().await, Closed::Code(4003));

    // No decision (no answer in time, not JSON, a 500, allow without identity): refused, 1013.
    for cookie in [
        "session=slow",
        "session=garbage",
        "session=broken",
        "session=nameless",
        "session=huge",
    ] {
        let mut ws = hello_with_cookie(ws_url, cookie).await;
        let frame = ws.recv().await;
        assert_eq!(frame["code"], "hook_unavailable", "{cookie}: {frame}");
        assert_eq!(ws.closed().await, Closed::Code(1013), "{cookie}");
    }

    // Operators see the hooks' decisions.
    let api = &bus.endpoints.api;
    let metrics = api
        .get("/metrics")
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for outcome in ["allowed", "refused", "unavailable"] {
        assert!(
            metrics.contains(&format!(
                "eventbus_app_hook_requests_total{{hook=\"connect\",outcome=\"{outcome}\"}}"
            )),
            "{outcome} counted"
        );
    }

    // The app's lifetime holds: at its end the connection closes (4001), and a reconnect asks again.
    let mut brief = hello_with_cookie(ws_url, "session=brief").await;
    assert_eq!(brief.recv().await["op"], "welcome");
    assert_eq!(brief.closed().await, Closed::Code(4001));

    // SSE: the same hook, the same answers as HTTP statuses.
    let base = &bus.endpoints.api.base;
    let sse = |cookie: &'static str| {
        reqwest::Client::new()
            .get(format!("{base}/v1/sse?channel=news"))
            .header("cookie", cookie)
            .send()
    };
    let mut stream = sse("session=alice").await.expect("GET /v1/sse");
    assert_eq!(stream.status(), 200);
    bus.endpoints
        .api
        .publish(
            &service,
            &json!({"channel": "news", "type": "t", "data": 2}),
        )
        .await;
    let mut text = String::new();
    while !text.contains("\"data\":2") {
        let chunk = tokio::time::timeout(eventbus_testkit::WAIT, stream.chunk())
            .await
            .expect("an SSE message in time")
            .expect("read")
            .expect("stream open");
        text.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
    }
    assert_eq!(
        app.asked("connect").last().expect("asked")["transport"],
        "sse"
    );
    let refused = sse("session=nobody").await.expect("GET /v1/sse");
    assert_eq!(refused.status(), 403);
    let problem: Value = refused.json().await.expect("problem");
    assert_eq!(problem["code"], "refused");
    assert_eq!(problem["detail"], "not logged in");
    let unavailable = sse("session=broken").await.expect("GET /v1/sse");
    assert_eq!(unavailable.status(), 503);
}

#[tokio::test]
async fn without_a_connect_hook_a_hello_needs_a_token() {
    let bus = AllInOne::start(false).await;
    let mut ws = hello_with_cookie(&bus.endpoints.ws, "session=alice").await;
    assert_eq!(ws.recv().await["code"], "unauthorized");
    assert_eq!(ws.closed().await, Closed::Code(4001));
}

#[tokio::test]
async fn the_subscribe_hook_decides_client_subscriptions_on_its_channels() {
    let app = Arc::new(App::default());
    let bus = bus_with_hooks(app.clone(), 60).await;
    let service = bus.endpoints.service_token().await;
    // A token that names none of the rooms: the app decides those.
    let token = bus
        .endpoints
        .auth
        .client_token(&service, "bob", &["news"], &[])
        .await;
    let (mut bob, _) = Ws::hello(&bus.endpoints.ws, &token).await;

    bob.subscribe(json!({"channel": "rooms.open"})).await;
    let asked = &app.asked("subscribe")[0];
    assert_eq!(asked["identity"], "bob");
    assert_eq!(asked["channel"], "rooms.open");
    bob.send(json!({"op": "subscribe", "channel": "rooms.secret", "ref": "s"}))
        .await;
    let refused = bob.recv().await;
    assert_eq!(refused["code"], "refused", "{refused}");
    assert_eq!(refused["message"], "members only");
    for channel in ["rooms.slow", "rooms.bad"] {
        bob.send(json!({"op": "subscribe", "channel": channel}))
            .await;
        let frame = bob.recv().await;
        assert_eq!(frame["code"], "hook_unavailable", "{channel}: {frame}");
    }
    // Not the hook's channels: the token alone, the app is not asked.
    bob.send(json!({"op": "subscribe", "channel": "elsewhere"}))
        .await;
    assert_eq!(bob.recv().await["code"], "forbidden");
    assert_eq!(app.count("subscribe", "elsewhere"), 0);
    // What no grant may hold, the app is not asked for either.
    bob.send(json!({"op": "subscribe", "channel": "rooms.*"}))
        .await;
    assert_eq!(bob.recv().await["code"], "pattern_not_allowed");
    // The connection stayed through every refusal, and the allowed room delivers.
    bus.endpoints
        .api
        .publish(
            &service,
            &json!({"channel": "rooms.open", "type": "t", "data": "hi"}),
        )
        .await;
    assert_eq!(bob.events(1).await[0]["data"], "hi");

    // Answers are kept for EVENTBUS_HOOK_CACHE_S: asked once for the same identity and room;
    // an app that could not decide is asked again.
    bob.subscribe(json!({"channel": "rooms.open"})).await;
    assert_eq!(app.count("subscribe", "rooms.open"), 1);
    bob.send(json!({"op": "subscribe", "channel": "rooms.bad"}))
        .await;
    assert_eq!(bob.recv().await["code"], "hook_unavailable");
    assert_eq!(app.count("subscribe", "rooms.bad"), 2);

    // A refresh keeps what the app allowed (the fresh token does not name it either).
    let fresh = bus
        .endpoints
        .auth
        .client_token(&service, "bob", &["news"], &[])
        .await;
    bob.send(json!({"op": "refresh", "token": fresh})).await;
    assert_eq!(bob.recv().await["op"], "refreshed", "no subscription ended");

    // SSE and history over HTTP follow the same decision.
    let sse = |channel: &str| {
        reqwest::Client::new()
            .get(format!(
                "{}/v1/sse?channel={channel}",
                bus.endpoints.api.base
            ))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(sse("rooms.open").await.expect("sse").status(), 200);
    let refused = sse("rooms.secret").await.expect("sse");
    assert_eq!(refused.status(), 403);
    assert_eq!(
        refused.json::<Value>().await.expect("problem")["code"],
        "refused"
    );
    let api = &bus.endpoints.api;
    assert_eq!(
        api.history(&token, "rooms.open", "after=0").await.status,
        200
    );
    let secret = api.history(&token, "rooms.secret", "after=0").await;
    assert_eq!(secret.status, 403);
    assert_eq!(secret.body["code"], "refused");

    // Services are the app's backend: their tokens decide, the app is not asked.
    let before = app.asked("subscribe").len();
    let (mut backend, _) = Ws::hello(&bus.endpoints.ws, &service).await;
    backend.subscribe(json!({"channel": "rooms.secret"})).await;
    assert_eq!(app.asked("subscribe").len(), before);
}

#[tokio::test]
async fn the_publish_hook_allows_refuses_or_rewrites_client_events() {
    let app = Arc::new(App::default());
    let bus = bus_with_hooks(app.clone(), 60).await;
    let service = bus.endpoints.service_token().await;
    let api = &bus.endpoints.api;
    let token = bus
        .endpoints
        .auth
        .client_token(&service, "carol", &["chat.>"], &["chat.>"])
        .await;
    let (mut reader, _) = Ws::hello(&bus.endpoints.ws, &service).await;
    reader.subscribe(json!({"channel": "chat.>"})).await;
    let (mut carol, _) = Ws::hello(&bus.endpoints.ws, &token).await;

    // Allowed as sent; allowed with data replaced (same id: a retry is still a duplicate).
    let mut acks = HashMap::new();
    for (n, text) in ["hello", "darn it"].into_iter().enumerate() {
        carol
            .send(json!({"op": "publish", "ref": n, "event": {
                "id": format!("e{n}"), "channel": "chat.clean", "type": "said", "data": {"text": text}}}))
            .await;
        let ack = carol.recv_op("ack").await;
        acks.insert(n, ack);
    }
    let seen = reader.events(2).await;
    assert_eq!(seen[0]["data"]["text"], "hello");
    assert_eq!(
        seen[1]["data"]["text"], "**** it",
        "the app's data replaced the client's"
    );
    assert_eq!(seen[1]["id"], "e1");
    assert_eq!(seen[1]["source"], "carol");
    let asked = &app.asked("publish")[1];
    assert_eq!(asked["identity"], "carol");
    assert_eq!(asked["event"]["data"]["text"], "darn it");
    carol
        .send(json!({"op": "publish", "ref": "again", "event": {
            "id": "e1", "channel": "chat.clean", "type": "said", "data": {"text": "darn it"}}}))
        .await;
    let again = carol.recv_op("ack").await;
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["seq"], acks[&1]["seq"]);

    // Refused, or no decision: an error frame, nothing stored, the connection stays.
    for (channel, code) in [
        ("chat.closed", "refused"),
        ("chat.slow", "hook_unavailable"),
        ("chat.bad", "hook_unavailable"),
    ] {
        carol
            .send(json!({"op": "publish", "ref": channel, "event": {
                "channel": channel, "type": "said", "data": {}}}))
            .await;
        let frame = carol.recv().await;
        assert_eq!(frame["op"], "error", "{channel}: {frame}");
        assert_eq!(frame["code"], code, "{channel}: {frame}");
        assert_eq!(frame["ref"], channel);
        assert_eq!(
            api.history(&service, channel, "after=0").await.body["head"],
            0,
            "{channel}: nothing stored"
        );
    }
    assert_eq!(
        app.asked("publish")
            .iter()
            .find(|r| r["channel"] == "chat.closed")
            .expect("asked")["event"]["type"],
        "said"
    );

    // HTTP publishes by clients ask the same hook: no way around it.
    let refused = api
        .publish(
            &token,
            &json!({"channel": "chat.closed", "type": "said", "data": {}}),
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(refused.body["code"], "refused");
    assert_eq!(refused.body["detail"], "this room is read-only");
    let rewritten = api
        .publish(
            &token,
            &json!({"channel": "chat.clean", "type": "said", "data": {"text": "darn"}}),
        )
        .await;
    assert_eq!(rewritten.status, 200);
    assert_eq!(reader.events(1).await[0]["data"]["text"], "****");
    // Services publish by their tokens alone.
    let before = app.asked("publish").len();
    let by_service = api
        .publish(
            &service,
            &json!({"channel": "chat.closed", "type": "notice", "data": {}}),
        )
        .await;
    assert_eq!(by_service.status, 200);
    assert_eq!(app.asked("publish").len(), before);
}

#[tokio::test]
async fn a_client_over_its_rate_does_not_get_the_app_asked() {
    let app = Arc::new(App::default());
    let bus = bus_tuned(app.clone(), 0, |config| {
        config.publish_rate.per_second = 1;
        config.publish_rate.burst = Some(1);
    })
    .await;
    let service = bus.endpoints.service_token().await;
    let token = bus
        .endpoints
        .auth
        .client_token(&service, "dave", &[], &["chat.>"])
        .await;
    let event = json!({"channel": "chat.clean", "type": "said", "data": {"text": "hi"}});
    let api = &bus.endpoints.api;
    assert_eq!(api.publish(&token, &event).await.status, 200);
    assert_eq!(api.publish(&token, &event).await.status, 429);
    // The WebSocket has a budget of its own (per way in).
    let (mut ws, _) = Ws::hello(&bus.endpoints.ws, &token).await;
    ws.send(json!({"op": "publish", "event": event})).await;
    assert_eq!(ws.recv().await["op"], "ack");
    ws.send(json!({"op": "publish", "event": event})).await;
    assert_eq!(ws.recv().await["code"], "rate_limited");
    assert_eq!(
        app.count("publish", "chat.clean"),
        2,
        "asked for the first of each way in only"
    );
}
