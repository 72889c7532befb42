//! Webhooks against a real HTTP receiver: every event once, in order per channel, signed; a
//! receiver that fails its first attempts still gets everything; positions survive a restart;
//! a receiver that never answers makes the webhook dead with its last error visible; bad
//! registrations get problem documents.

mod common;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use common::AllInOne;
use eventbus_testkit::eventually;
use serde_json::{Value, json};

const SECRET: &str = "webhook-secret-0123456789";

/// The receivers here listen on loopback, which production mode refuses unless allowed.
fn allow_loopback(config: &mut eventbus::serve::Config) {
    config.hooks.destinations.allow_networks = vec!["127.0.0.0/8".parse().expect("cidr")];
}

#[derive(Default)]
struct Receiver {
    /// Requests to refuse (503) before accepting.
    refuse: AtomicU32,
    attempts: AtomicU32,
    /// Accepted deliveries, in arrival order.
    accepted: Mutex<Vec<Value>>,
}

async fn start_receiver(receiver: Arc<Receiver>) -> String {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let receiver = receiver.clone();
            async move {
                receiver.attempts.fetch_add(1, Ordering::SeqCst);
                if receiver
                    .refuse
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                common::assert_signed(&headers, SECRET, &body);
                assert_eq!(headers["content-type"], "application/cloudevents+json");
                let event: Value = serde_json::from_slice(&body).expect("JSON");
                receiver.accepted.lock().expect("lock").push(event);
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn seqs(receiver: &Receiver, channel: &str) -> Vec<u64> {
    receiver
        .accepted
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| e["channel"] == channel)
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn webhooks_deliver_every_event_once_in_order_signed_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(dir, false, allow_loopback).await;
    let api = bus.endpoints.api.clone();
    let service = bus.endpoints.service_token().await;
    api.publish(
        &service,
        &json!({"channel": "hooks.a", "type": "before", "data": 0}),
    )
    .await;

    let receiver = Arc::new(Receiver::default());
    receiver.refuse.store(3, Ordering::SeqCst);
    let url = start_receiver(receiver.clone()).await;
    let registered = api
        .send(
            api.post("/v1/webhooks")
                .bearer_auth(&service)
                .json(&json!({"url": url, "channels": ["hooks.*"], "secret": SECRET})),
        )
        .await;
    assert_eq!(registered.status, 201, "{:?}", registered.body);
    assert!(
        registered.body.get("secret").is_none(),
        "the secret is never shown"
    );
    let id = registered.body["id"].as_str().expect("id").to_owned();

    for (channel, n) in [("hooks.a", 3), ("hooks.b", 2)] {
        for i in 0..n {
            let answer = api
                .publish(
                    &service,
                    &json!({"channel": channel, "type": "t", "data": i}),
                )
                .await;
            assert_eq!(answer.status, 200);
        }
    }
    eventually("5 deliveries", || async {
        (receiver.accepted.lock().expect("lock").len() >= 5).then_some(())
    })
    .await;
    // Registered after hooks.a#1: that one is not delivered; the rest once each, in order.
    assert_eq!(seqs(&receiver, "hooks.a"), [2, 3, 4]);
    assert_eq!(seqs(&receiver, "hooks.b"), [1, 2]);
    assert!(
        receiver.attempts.load(Ordering::SeqCst) >= 8,
        "3 refused, 5 accepted"
    );

    // A restart keeps the positions: nothing is delivered twice, new events follow.
    let dir = bus.stop().await;
    let bus = AllInOne::start_with(dir, false, allow_loopback).await;
    let api = bus.endpoints.api.clone();
    let service = bus.endpoints.service_token().await;
    api.publish(
        &service,
        &json!({"channel": "hooks.b", "type": "t", "data": "after"}),
    )
    .await;
    eventually("the delivery after the restart", || async {
        (seqs(&receiver, "hooks.b") == [1, 2, 3]).then_some(())
    })
    .await;
    assert_eq!(seqs(&receiver, "hooks.a"), [2, 3, 4]);
    let shown = api
        .send(api.get(&format!("/v1/webhooks/{id}")).bearer_auth(&service))
        .await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.body["state"], "active");
    assert_eq!(shown.body["positions"]["hooks.b"], 3);
    bus.stop().await;
}

/// A bus whose webhooks die after two failed attempts in a row.
async fn dying_after_two_attempts() -> AllInOne {
    let dir = tempfile::tempdir().expect("temp dir");
    AllInOne::start_with(dir, false, |c| {
        allow_loopback(c);
        c.hooks.webhook_max_attempts = 2
    })
    .await
}

#[tokio::test]
async fn a_receiver_that_never_answers_makes_the_webhook_dead_with_its_error() {
    let bus = dying_after_two_attempts().await;
    let api = bus.endpoints.api.clone();
    let service = bus.endpoints.service_token().await;
    let registered = api
        .send(api.post("/v1/webhooks").bearer_auth(&service).json(
            &json!({"url": "http://127.0.0.1:9/nobody", "channels": ["dead.>"], "secret": SECRET}),
        ))
        .await;
    assert_eq!(registered.status, 201);
    let id = registered.body["id"].as_str().expect("id").to_owned();
    api.publish(&service, &json!({"channel": "dead.x", "type": "t"}))
        .await;
    let shown = eventually("the webhook to be dead", || async {
        let shown = api
            .send(api.get(&format!("/v1/webhooks/{id}")).bearer_auth(&service))
            .await;
        (shown.body["state"] == "dead").then_some(shown)
    })
    .await;
    assert!(
        shown.body["last_error"]
            .as_str()
            .expect("error")
            .contains("cannot reach")
    );
    assert_eq!(shown.body["failures"], 2);

    // Listing and deleting.
    let listed = api
        .send(api.get("/v1/webhooks").bearer_auth(&service))
        .await;
    assert_eq!(listed.body["webhooks"].as_array().expect("list").len(), 1);
    let deleted = api
        .send(
            api.delete(&format!("/v1/webhooks/{id}"))
                .bearer_auth(&service),
        )
        .await;
    assert_eq!(deleted.status, 204);
    let again = api
        .send(
            api.delete(&format!("/v1/webhooks/{id}"))
                .bearer_auth(&service),
        )
        .await;
    assert_eq!(again.status, 404);
    bus.stop().await;
}

#[tokio::test]
async fn bad_webhook_registrations_get_problems() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(dir, false, allow_loopback).await;
    let api = bus.endpoints.api.clone();
    let service = bus.endpoints.service_token().await;
    let client = bus
        .endpoints
        .auth
        .client_token(&service, "alice", &["x"], &[])
        .await;
    let good = json!({"url": "http://127.0.0.1:9/h", "channels": ["a.*"], "secret": SECRET});
    let post = |token: Option<String>, body: Value| {
        let api = api.clone();
        async move {
            let mut request = api.post("/v1/webhooks").json(&body);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            api.send(request).await
        }
    };
    assert_eq!(post(None, good.clone()).await.status, 401);
    assert_eq!(post(Some(client), good.clone()).await.status, 403);
    let mut cases = Vec::new();
    for (field, value) in [
        ("url", json!("ftp://example.com")),
        ("channels", json!([])),
        ("channels", json!(["a..b"])),
        ("secret", json!("short")),
        ("channels", json!("a.*")),
        ("url", json!(7)),
    ] {
        let mut body = good.clone();
        body[field] = value;
        cases.push((field, body));
    }
    let mut unknown = good.clone();
    unknown["colour"] = json!("red");
    cases.push(("colour", unknown));
    cases.push(("body", json!("not an object")));
    for (what, body) in cases {
        let answer = post(Some(service.clone()), body).await;
        assert_eq!(answer.status, 400, "{what}: {:?}", answer.body);
        // The member at fault is named, whether its value is invalid or of the wrong type.
        let named = answer.body.get("field").and_then(Value::as_str);
        assert_eq!(named, (what != "body").then_some(what), "{:?}", answer.body);
    }
    let missing = api
        .send(api.get("/v1/webhooks/nope").bearer_auth(&service))
        .await;
    assert_eq!(missing.status, 404);
    bus.stop().await;
}

/// A dead webhook, retried, goes on from where it stopped: the event it could not deliver comes
/// first, then the rest, each once, and its state, failures and error are clear.
#[tokio::test]
async fn a_dead_webhook_retried_delivers_from_where_it_stopped() {
    let bus = dying_after_two_attempts().await;
    let api = bus.endpoints.api.clone();
    let service = bus.endpoints.service_token().await;
    let receiver = Arc::new(Receiver::default());
    receiver.refuse.store(2, Ordering::SeqCst);
    let url = start_receiver(receiver.clone()).await;
    let registered = api
        .send(
            api.post("/v1/webhooks")
                .bearer_auth(&service)
                .json(&json!({"url": url, "channels": ["retry.>"], "secret": SECRET})),
        )
        .await;
    assert_eq!(registered.status, 201);
    let id = registered.body["id"].as_str().expect("id").to_owned();
    let show = || {
        let api = api.clone();
        let service = service.clone();
        let id = id.clone();
        async move {
            api.send(api.get(&format!("/v1/webhooks/{id}")).bearer_auth(&service))
                .await
        }
    };
    api.publish(
        &service,
        &json!({"channel": "retry.a", "type": "t", "data": 1}),
    )
    .await;
    eventually("the webhook to be dead", || async {
        (show().await.body["state"] == "dead").then_some(())
    })
    .await;
    api.publish(
        &service,
        &json!({"channel": "retry.a", "type": "t", "data": 2}),
    )
    .await;

    // A client token may not; the owner's service token sets it going. A retry of what is not
    // there is a 404.
    let client = bus
        .endpoints
        .auth
        .client_token(&service, "alice", &["retry.a"], &[])
        .await;
    let refused = api
        .send(
            api.post(&format!("/v1/webhooks/{id}/retry"))
                .bearer_auth(&client),
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let missing = api
        .send(api.post("/v1/webhooks/nope/retry").bearer_auth(&service))
        .await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    let retried = api
        .send(
            api.post(&format!("/v1/webhooks/{id}/retry"))
                .bearer_auth(&service),
        )
        .await;
    assert_eq!(retried.status, 200, "{}", retried.body);
    assert_eq!(retried.body["state"], "active");
    assert_eq!(retried.body["failures"], 0);
    assert_eq!(retried.body["last_error"], Value::Null);
    eventually("both events delivered", || async {
        (seqs(&receiver, "retry.a").len() >= 2).then_some(())
    })
    .await;
    assert_eq!(
        seqs(&receiver, "retry.a"),
        vec![1, 2],
        "from where it stopped, each once"
    );
    let shown = show().await;
    assert_eq!(shown.body["state"], "active");
    assert_eq!(shown.body["delivered"], 2);
    bus.stop().await;
}

/// Registrations and deliveries all save the webhook file at once: it must stay whole (auth
/// refused to start on a torn one), hold every registration, and every position saved after a
/// delivery. Several worker threads, as in production, so that saves really overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_and_deliveries_keep_the_webhook_file_whole() {
    const HOOKS: usize = 12;
    const EVENTS: usize = 10;
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(dir, false, allow_loopback).await;
    let api = bus.endpoints.api.clone();
    let service = bus.endpoints.service_token().await;
    let receiver = Arc::new(Receiver::default());
    let url = start_receiver(receiver.clone()).await;
    for i in 0..HOOKS {
        let answer = api
            .publish(
                &service,
                &json!({"channel": format!("race.{i}"), "type": "t"}),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
    let mut tasks = Vec::new();
    for i in 0..HOOKS {
        let (api, service, url) = (api.clone(), service.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let registered = api
                .send(api.post("/v1/webhooks").bearer_auth(&service).json(
                    &json!({"url": url, "channels": [format!("race.{i}")], "secret": SECRET}),
                ))
                .await;
            assert_eq!(registered.status, 201, "{:?}", registered.body);
            for n in 0..EVENTS {
                let answer = api
                    .publish(
                        &service,
                        &json!({"channel": format!("race.{i}"), "type": "t", "data": n}),
                    )
                    .await;
                assert_eq!(answer.status, 200);
            }
            registered.body["id"].as_str().expect("id").to_owned()
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.expect("task"));
    }
    let head = 1 + EVENTS as u64;
    let all_delivered = |api: eventbus_testkit::http::Http, service: String| async move {
        let listed = api
            .send(api.get("/v1/webhooks").bearer_auth(&service))
            .await;
        let hooks = listed.body["webhooks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        (hooks.len() == HOOKS
            && hooks.iter().all(|h| {
                let channel = h["channels"][0].as_str().unwrap_or_default();
                h["positions"][channel] == head
            }))
        .then_some(hooks)
    };
    eventually("every event delivered to every webhook", || {
        all_delivered(api.clone(), service.clone())
    })
    .await;

    let dir = bus.stop().await;
    let bus = AllInOne::start_with(dir, false, allow_loopback).await;
    let api = bus.endpoints.api.clone();
    let service = bus.endpoints.service_token().await;
    let hooks = all_delivered(api, service)
        .await
        .expect("after a restart: every registration, every position as delivered");
    let mut found: Vec<String> = hooks
        .iter()
        .map(|h| h["id"].as_str().expect("id").to_owned())
        .collect();
    found.sort();
    ids.sort();
    assert_eq!(found, ids);
    bus.stop().await;
}

/// Webhook state lives in the store under the bus's own channels (`_bus.`): no token reads them,
/// listing does not show them, and they never reach subscribers (their secrets among them).
#[tokio::test]
async fn the_bus_own_state_is_out_of_every_token_s_reach() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(dir, false, allow_loopback).await;
    let service = bus.endpoints.service_token().await;
    let (mut ws, _) = eventbus_testkit::ws::Ws::hello(&bus.endpoints.ws, &service).await;
    ws.subscribe(json!({"channel": ">"})).await;
    let url = start_receiver(Arc::default()).await;
    let api = &bus.endpoints.api;
    let registered = api
        .send(
            api.post("/v1/webhooks")
                .bearer_auth(&service)
                .json(&json!({"url": url, "channels": ["x.*"], "secret": SECRET})),
        )
        .await;
    assert_eq!(registered.status, 201, "{}", registered.body);
    // The store commits in order: once the marker arrives, the registration went by before it.
    api.publish(&service, &json!({"channel": "marker", "type": "t"}))
        .await;
    loop {
        let frame = ws.recv().await;
        let channel = frame["event"]["channel"].as_str().unwrap_or("");
        assert!(!channel.starts_with("_bus."), "a subscriber saw {frame}");
        if channel == "marker" {
            break;
        }
    }
    for channel in [
        "_bus.hooks.registrations",
        "_bus.hooks.progress",
        "_bus.hooks.lease",
    ] {
        let read = api.history(&service, channel, "after=0").await;
        assert_eq!(read.status, 403, "{channel}: {}", read.body);
        let written = api
            .publish(&service, &json!({"channel": channel, "type": "t"}))
            .await;
        assert_eq!(written.status, 403, "{channel}: {}", written.body);
    }
    let listed = api
        .send(
            api.get("/v1/channels?prefix=_&limit=100")
                .bearer_auth(&service),
        )
        .await;
    assert_eq!(listed.body["channels"], json!([]), "{}", listed.body);
    bus.stop().await;
}

/// Narrowed tokens against the webhook API of the hooks service: a client token has none of it,
/// a narrowed service token registers only within its grant, and nobody sees or deletes another
/// owner's webhook.
#[tokio::test]
async fn the_webhook_api_gives_each_token_its_own_and_no_more() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(dir, false, allow_loopback).await;
    let api = &bus.endpoints.api;
    let auth = &bus.endpoints.auth;
    let service = bus.endpoints.service_token().await;
    let narrow = auth
        .token(
            Some(&service),
            json!({"subscribe": ["billing.*"], "publish": ["billing.*"]}),
        )
        .await;
    let client = auth
        .client_token(&service, "alice", &["billing.a"], &[])
        .await;
    let url = start_receiver(Arc::default()).await;
    let register = |token: String, channels: Value| {
        let body = json!({"url": url, "channels": channels, "secret": SECRET});
        api.send(api.post("/v1/webhooks").bearer_auth(token).json(&body))
    };

    assert_eq!(
        register(client.clone(), json!(["billing.a"])).await.status,
        403
    );
    let listed = api.send(api.get("/v1/webhooks").bearer_auth(&client)).await;
    assert_eq!(listed.status, 403);
    assert_eq!(
        register(narrow.clone(), json!(["inbox.*"])).await.status,
        403
    );
    assert_eq!(register(narrow.clone(), json!([">"])).await.status, 403);

    let own = register(service.clone(), json!(["orders.*"])).await;
    assert_eq!(own.status, 201, "{}", own.body);
    let id = own.body["id"].as_str().expect("id");
    // Another identity is another owner.
    let other_client = auth.client_token(&service, "mallory", &["x.a"], &[]).await;
    for token in [&client, &other_client] {
        let shown = api
            .send(api.get(&format!("/v1/webhooks/{id}")).bearer_auth(token))
            .await;
        assert!(matches!(shown.status.as_u16(), 403 | 404), "{}", shown.body);
        let deleted = api
            .send(api.delete(&format!("/v1/webhooks/{id}")).bearer_auth(token))
            .await;
        assert!(
            matches!(deleted.status.as_u16(), 403 | 404),
            "{}",
            deleted.body
        );
    }
    // The owner's narrowed token may not set going again what it may not read itself.
    let retried = api
        .send(
            api.post(&format!("/v1/webhooks/{id}/retry"))
                .bearer_auth(&narrow),
        )
        .await;
    assert_eq!(retried.status, 403, "{}", retried.body);
    assert_eq!(retried.body["field"], "channels");
    for token in [&client, &other_client] {
        let retried = api
            .send(
                api.post(&format!("/v1/webhooks/{id}/retry"))
                    .bearer_auth(token),
            )
            .await;
        assert!(
            matches!(retried.status.as_u16(), 403 | 404),
            "{}",
            retried.body
        );
    }
    let still = api
        .send(api.get(&format!("/v1/webhooks/{id}")).bearer_auth(&service))
        .await;
    assert_eq!(still.status, 200, "the owner still has it");
    bus.stop().await;
}
