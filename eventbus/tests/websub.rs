//! The WebSub hub (`/v1/websub`) against a subscriber written here from the W3C Recommendation:
//! discovery through `Link` headers; intent verification before anything is delivered (a
//! subscriber that does not echo the challenge gets nothing); content distribution in seq order,
//! each event once, signed with `X-Hub-Signature`; unsubscribing (verified too); a lease that
//! ends; a restart; requests the hub refuses.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::AllInOne;
use eventbus_testkit::eventually;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "subscriber-secret";

/// A verification request: the callback's name, its `hub.*` parameters, when it came.
type Verification = (String, HashMap<String, String>, tokio::time::Instant);

/// What the subscriber saw, per callback name.
#[derive(Default)]
struct Subscriber {
    /// Verification requests (`hub.*` parameters), in order, with when they came.
    verifications: Mutex<Vec<Verification>>,
    /// Content distributions: the event and its headers.
    deliveries: Mutex<Vec<(String, Value, HeaderMap)>>,
    /// While set, callbacks named `flaky*` answer content distribution with 503.
    failing: std::sync::atomic::AtomicBool,
    /// Content distribution attempts to `flaky*` callbacks, answered or not.
    flaky_attempts: std::sync::atomic::AtomicU32,
}

impl Subscriber {
    fn verifications(&self, name: &str) -> Vec<HashMap<String, String>> {
        let seen = self.verifications.lock().expect("lock");
        seen.iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, q, _)| q.clone())
            .collect()
    }

    fn seqs(&self, name: &str) -> Vec<u64> {
        let seen = self.deliveries.lock().expect("lock");
        seen.iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, e, _)| e["seq"].as_u64().expect("seq"))
            .collect()
    }
}

/// A WebSub subscriber (§5.3 and §7 of the Recommendation). Callbacks named `refuse*` do not
/// confirm their intent (404); `wrong*` answer 200 with another body than the challenge; `hang*`
/// never answer.
async fn start_subscriber(subscriber: Arc<Subscriber>) -> String {
    let verify = {
        let subscriber = subscriber.clone();
        move |Path(name): Path<String>, Query(query): Query<HashMap<String, String>>| {
            let subscriber = subscriber.clone();
            async move {
                subscriber.verifications.lock().expect("lock").push((
                    name.clone(),
                    query.clone(),
                    tokio::time::Instant::now(),
                ));
                if name.starts_with("refuse") {
                    return StatusCode::NOT_FOUND.into_response();
                }
                if name.starts_with("wrong") {
                    return "not the challenge".into_response();
                }
                if name.starts_with("hang") {
                    return std::future::pending().await;
                }
                query["hub.challenge"].clone().into_response()
            }
        }
    };
    let distribute = move |Path(name): Path<String>, headers: HeaderMap, body: Bytes| {
        let subscriber = subscriber.clone();
        async move {
            use std::sync::atomic::Ordering::SeqCst;
            if name.starts_with("flaky") {
                subscriber.flaky_attempts.fetch_add(1, SeqCst);
                if subscriber.failing.load(SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
            }
            // §7: X-Hub-Signature: sha256=<hex HMAC of the body with the subscriber's secret>.
            let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
            mac.update(&body);
            let expected: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(
                headers["x-hub-signature"].to_str().expect("ascii"),
                format!("sha256={expected}"),
                "content distribution is signed with the subscriber's secret"
            );
            let event: Value = serde_json::from_slice(&body).expect("JSON");
            subscriber
                .deliveries
                .lock()
                .expect("lock")
                .push((name, event, headers));
            StatusCode::NO_CONTENT
        }
    };
    let app = axum::Router::new().route("/cb/{name}", axum::routing::get(verify).post(distribute));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}/cb", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

async fn bus() -> AllInOne {
    bus_in(tempfile::tempdir().expect("temp dir")).await
}

async fn bus_in(dir: tempfile::TempDir) -> AllInOne {
    AllInOne::start_with(dir, false, |config| {
        config.websub.channels = vec!["news.>".into()];
        // The subscriber listens on loopback, which production mode refuses unless allowed.
        config.hooks.destinations.allow_networks = vec!["127.0.0.0/8".parse().expect("cidr")];
    })
    .await
}

/// POSTs a form to the hub; the status.
async fn hub(bus: &AllInOne, form: &[(&str, &str)]) -> (u16, Value) {
    let api = &bus.endpoints.api;
    let answer = api
        .send(
            api.post("/v1/websub")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(
                    url::form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(form)
                        .finish(),
                ),
        )
        .await;
    (answer.status.as_u16(), answer.body)
}

/// Subscribes `callback` to `topic` with the test's secret (and a lease, if given): 202.
async fn subscribe(bus: &AllInOne, topic: &str, callback: &str, lease: Option<&str>) {
    let mut form = vec![
        ("hub.mode", "subscribe"),
        ("hub.topic", topic),
        ("hub.callback", callback),
        ("hub.secret", SECRET),
    ];
    if let Some(lease) = lease {
        form.push(("hub.lease_seconds", lease));
    }
    let (status, body) = hub(bus, &form).await;
    assert_eq!(status, 202, "{body}");
}

/// Publishes to `channel`, an event per look, until `done`: when exactly a subscription starts
/// after its verification is the hub's affair.
async fn publish_until(
    bus: &AllInOne,
    token: &str,
    channel: &str,
    what: &str,
    done: impl Fn() -> bool,
) {
    let mut n = 0;
    eventually(what, || {
        n += 1;
        let ready = done();
        async move {
            if !ready {
                publish(bus, token, channel, n).await;
            }
            ready.then_some(())
        }
    })
    .await;
}

async fn publish(bus: &AllInOne, token: &str, channel: &str, n: u64) {
    let answer = bus
        .endpoints
        .api
        .publish(token, &json!({"channel": channel, "type": "t", "data": n}))
        .await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn websub_verifies_intent_then_delivers_signed_in_order_until_unsubscribed() {
    let bus = bus().await;
    let api = &bus.endpoints.api;
    let service = bus.endpoints.service_token().await;
    let subscriber = Arc::new(Subscriber::default());
    let callbacks = start_subscriber(subscriber.clone()).await;

    // Discovery (§4): the topic's responses name the hub and the topic, even to strangers.
    let topic = format!("{}/v1/channels/news.a/events", api.base);
    let hub_url = format!("{}/v1/websub", api.base);
    let anonymous = api.send(api.get("/v1/channels/news.a/events")).await;
    assert_eq!(anonymous.status, 401);
    let link = anonymous.headers["link"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(
        link,
        format!("<{hub_url}>; rel=\"hub\", <{topic}>; rel=\"self\"")
    );
    let read = api.history(&service, "news.a", "after=0").await;
    assert_eq!(read.headers["link"].to_str().expect("ascii"), link);
    let private = api.history(&service, "private.a", "after=0").await;
    assert!(
        private.headers.get("link").is_none(),
        "only public channels"
    );

    publish(&bus, &service, "news.a", 0).await;
    let callback = format!("{callbacks}/a");
    subscribe(&bus, &topic, &callback, Some("3600")).await;
    // §5.3: the hub asks the subscriber first, with a challenge to echo.
    let asked = eventually("the intent verification", || async {
        subscriber.verifications("a").first().cloned()
    })
    .await;
    assert_eq!(asked["hub.mode"], "subscribe");
    assert_eq!(asked["hub.topic"], topic);
    assert_eq!(asked["hub.lease_seconds"], "3600");
    assert!(asked["hub.challenge"].len() >= 16);

    // Content distribution: events published after the verification, each once, in order. When
    // exactly the subscription starts is the hub's: publish until the first arrives.
    publish_until(&bus, &service, "news.a", "the first delivery", || {
        !subscriber.seqs("a").is_empty()
    })
    .await;
    let first = subscriber.seqs("a")[0];
    assert!(first > 1, "nothing from before the verification");
    for _ in 0..5 {
        publish(&bus, &service, "news.a", 0).await;
    }
    let head = api
        .history(&service, "news.a", "after=0&limit=1")
        .await
        .body["head"]
        .as_u64()
        .expect("head");
    eventually("every later event", || async {
        (subscriber.seqs("a").last() == Some(&head)).then_some(())
    })
    .await;
    assert_eq!(
        subscriber.seqs("a"),
        (first..=head).collect::<Vec<_>>(),
        "each event once, in seq order"
    );
    {
        let deliveries = subscriber.deliveries.lock().expect("lock");
        let (_, event, headers) = &deliveries[0];
        assert_eq!(event["channel"], "news.a");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["link"].to_str().expect("ascii"), link);
    }

    // Subscribers that do not confirm their intent are never delivered to.
    for name in ["refuse", "wrong"] {
        subscribe(&bus, &topic, &format!("{callbacks}/{name}"), None).await;
        let asked = eventually("the verification", || async {
            subscriber.verifications(name).first().cloned()
        })
        .await;
        assert_eq!(asked["hub.lease_seconds"], "864000", "the default lease");
    }

    // Unsubscribing is verified too; then nothing more comes. Another subscriber, verified after,
    // is the witness that later events went out.
    let (status, _) = hub(
        &bus,
        &[
            ("hub.mode", "unsubscribe"),
            ("hub.topic", &topic),
            ("hub.callback", &callback),
        ],
    )
    .await;
    assert_eq!(status, 202);
    eventually("the unsubscribe verification", || async {
        subscriber
            .verifications("a")
            .iter()
            .any(|q| q["hub.mode"] == "unsubscribe")
            .then_some(())
    })
    .await;
    subscribe(&bus, &topic, &format!("{callbacks}/witness"), None).await;
    publish_until(
        &bus,
        &service,
        "news.a",
        "the witness's first delivery",
        || !subscriber.seqs("witness").is_empty(),
    )
    .await;
    // Events while unsubscribed, then the same callback subscribes again: a new subscription
    // starts at the head of its verification, so none of those reach it (a subscription the
    // unsubscribe had left in place would deliver them first: delivery is in seq order).
    for _ in 0..3 {
        publish(&bus, &service, "news.a", 0).await;
    }
    let gap_end = api
        .history(&service, "news.a", "after=0&limit=1")
        .await
        .body["head"]
        .as_u64()
        .expect("head");
    subscribe(&bus, &topic, &callback, None).await;
    eventually("the second subscribe's verification", || async {
        (subscriber.verifications("a").len() == 3).then_some(())
    })
    .await;
    let before = subscriber.seqs("a").len();
    publish_until(
        &bus,
        &service,
        "news.a",
        "a delivery to the new subscription",
        || subscriber.seqs("a").len() > before,
    )
    .await;
    let after_unsubscribe = subscriber.seqs("a")[before..].to_vec();
    assert!(
        after_unsubscribe.iter().all(|seq| *seq > gap_end),
        "nothing while unsubscribed (up to {gap_end}): {after_unsubscribe:?}"
    );
    assert!(subscriber.seqs("refuse").is_empty() && subscriber.seqs("wrong").is_empty());
}

#[tokio::test]
async fn a_websub_lease_ends_the_subscription() {
    let bus = bus().await;
    let api = &bus.endpoints.api;
    let service = bus.endpoints.service_token().await;
    let subscriber = Arc::new(Subscriber::default());
    let callbacks = start_subscriber(subscriber.clone()).await;
    let topic = format!("{}/v1/channels/news.lease/events", api.base);
    for (name, lease) in [("short", "2"), ("long", "3600")] {
        subscribe(&bus, &topic, &format!("{callbacks}/{name}"), Some(lease)).await;
    }
    let verified_at = eventually("the short lease's verification", || async {
        let seen = subscriber.verifications.lock().expect("lock");
        seen.iter()
            .find(|(n, _, _)| n == "short")
            .map(|(_, _, at)| *at)
    })
    .await;
    publish_until(&bus, &service, "news.lease", "both to receive", || {
        !subscriber.seqs("short").is_empty() && !subscriber.seqs("long").is_empty()
    })
    .await;
    // The lease is the feature under test: its end is waited for, past the 2 s granted.
    tokio::time::sleep_until(verified_at + Duration::from_millis(2500)).await;
    publish(&bus, &service, "news.lease", 1000).await;
    let head = api
        .history(&service, "news.lease", "after=0&limit=1")
        .await
        .body["head"]
        .as_u64()
        .expect("head");
    eventually("the long lease to get the last event", || async {
        (subscriber.seqs("long").last() == Some(&head)).then_some(())
    })
    .await;
    assert!(
        !subscriber.seqs("short").contains(&head),
        "nothing after the lease ended"
    );
}

#[tokio::test]
async fn the_hub_refuses_bad_requests_with_problems() {
    let bus = bus().await;
    let api = &bus.endpoints.api;
    let topic = format!("{}/v1/channels/news.a/events", api.base);
    let cb = "http://127.0.0.1:9/cb";
    let json = api
        .send(
            api.post("/v1/websub")
                .json(&json!({"hub.mode": "subscribe"})),
        )
        .await;
    assert_eq!(json.status, 415);
    // Anyone may make the hub call out: it verifies at most 64 subscribers at once.
    let callbacks = start_subscriber(Arc::new(Subscriber::default())).await;
    for i in 0..64 {
        subscribe(&bus, &topic, &format!("{callbacks}/hang{i}"), None).await;
    }
    let (status, body) = hub(
        &bus,
        &[
            ("hub.mode", "subscribe"),
            ("hub.topic", &topic),
            ("hub.callback", &format!("{callbacks}/one-too-many")),
        ],
    )
    .await;
    assert_eq!(status, 429, "{body}");
    for (form, status, field) in [
        (
            vec![("hub.topic", topic.as_str()), ("hub.callback", cb)],
            400,
            "hub.mode",
        ),
        (
            vec![
                ("hub.mode", "follow"),
                ("hub.topic", &topic),
                ("hub.callback", cb),
            ],
            400,
            "hub.mode",
        ),
        (
            vec![("hub.mode", "subscribe"), ("hub.topic", &topic)],
            400,
            "hub.callback",
        ),
        (
            vec![
                ("hub.mode", "subscribe"),
                ("hub.topic", &topic),
                ("hub.callback", "ftp://x/"),
            ],
            400,
            "hub.callback",
        ),
        (
            vec![
                ("hub.mode", "subscribe"),
                ("hub.topic", "https://elsewhere/feed"),
                ("hub.callback", cb),
            ],
            400,
            "hub.topic",
        ),
        (
            vec![("hub.mode", "subscribe"), ("hub.callback", cb)],
            400,
            "hub.topic",
        ),
        (
            vec![
                ("hub.mode", "subscribe"),
                ("hub.topic", "http://h/v1/channels/private.a/events"),
                ("hub.callback", cb),
            ],
            403,
            "hub.topic",
        ),
        (
            vec![
                ("hub.mode", "subscribe"),
                ("hub.topic", "http://h/v1/channels/_bus.hooks.lease/events"),
                ("hub.callback", cb),
            ],
            403,
            "hub.topic",
        ),
        (
            vec![
                ("hub.mode", "subscribe"),
                ("hub.topic", &topic),
                ("hub.callback", cb),
                ("hub.lease_seconds", "soon"),
            ],
            400,
            "hub.lease_seconds",
        ),
        (
            vec![
                ("hub.mode", "subscribe"),
                ("hub.topic", &topic),
                ("hub.callback", cb),
                ("hub.secret", &"s".repeat(200)),
            ],
            400,
            "hub.secret",
        ),
        // Internal addresses, as for webhooks (only 127.0.0.0/8 is allowed here).
        (
            vec![
                ("hub.mode", "subscribe"),
                ("hub.topic", &topic),
                ("hub.callback", "http://169.254.169.254/"),
            ],
            400,
            "hub.callback",
        ),
    ] {
        let (got, body) = hub(&bus, &form).await;
        assert_eq!(got, status, "{form:?}: {body}");
        assert_eq!(body["field"], field, "{form:?}: {body}");
    }
}

#[tokio::test]
async fn subscribing_again_revives_a_subscription_that_gave_up() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(dir, false, |config| {
        config.websub.channels = vec!["news.>".into()];
        config.hooks.destinations.allow_networks = vec!["127.0.0.0/8".parse().expect("cidr")];
        // One failed attempt and delivery stops.
        config.hooks.webhook_max_attempts = 1;
    })
    .await;
    let api = &bus.endpoints.api;
    let service = bus.endpoints.service_token().await;
    let subscriber = Arc::new(Subscriber::default());
    let callbacks = start_subscriber(subscriber.clone()).await;
    let topic = format!("{}/v1/channels/news.flaky/events", api.base);
    let callback = format!("{callbacks}/flaky");
    subscribe(&bus, &topic, &callback, None).await;
    publish_until(&bus, &service, "news.flaky", "the first delivery", || {
        !subscriber.seqs("flaky").is_empty()
    })
    .await;

    // The subscriber fails once: the hub gives up on it.
    subscriber.failing.store(true, SeqCst);
    let attempts = subscriber.flaky_attempts.load(SeqCst);
    publish(&bus, &service, "news.flaky", 1).await;
    eventually("the failed attempt", || async {
        (subscriber.flaky_attempts.load(SeqCst) > attempts).then_some(())
    })
    .await;
    subscriber.failing.store(false, SeqCst);
    publish(&bus, &service, "news.flaky", 2).await;
    let head = api
        .history(&service, "news.flaky", "after=0&limit=1")
        .await
        .body["head"]
        .as_u64()
        .expect("head");

    // Back, it subscribes again (again, until the hub has seen it dead: when it marks it so is
    // the hub's): delivery goes on from where it stopped, nothing skipped.
    let delivered_before = subscriber.seqs("flaky");
    let mut asked = 0;
    eventually("delivery to go on", || {
        let done = subscriber.seqs("flaky").last() == Some(&head);
        let verified = subscriber.verifications("flaky").len();
        let again = !done && verified == asked + 1;
        if again {
            asked += 1;
        }
        let (bus, topic, callback) = (&bus, &topic, &callback);
        async move {
            if again {
                subscribe(bus, topic, callback, None).await;
            }
            done.then_some(())
        }
    })
    .await;
    let last_before = *delivered_before.last().expect("delivered");
    assert_eq!(
        subscriber.seqs("flaky"),
        delivered_before
            .into_iter()
            .chain(last_before + 1..=head)
            .collect::<Vec<_>>(),
        "every event once, in order, across the pause"
    );
}

#[tokio::test]
async fn a_websub_subscription_survives_a_restart_without_doubles() {
    let bus = bus().await;
    let service = bus.endpoints.service_token().await;
    let subscriber = Arc::new(Subscriber::default());
    let callbacks = start_subscriber(subscriber.clone()).await;
    let topic = format!("{}/v1/channels/news.kept/events", bus.endpoints.api.base);
    subscribe(&bus, &topic, &format!("{callbacks}/kept"), None).await;
    publish_until(&bus, &service, "news.kept", "the first delivery", || {
        !subscriber.seqs("kept").is_empty()
    })
    .await;
    let first = subscriber.seqs("kept")[0];

    // Stopped with events it has not delivered yet, started again on the same data (and another
    // port: the subscription names the callback, not the bus).
    publish(&bus, &service, "news.kept", 1).await;
    let dir = bus.stop().await;
    let bus = bus_in(dir).await;
    let service = bus.endpoints.service_token().await;
    publish(&bus, &service, "news.kept", 2).await;
    let head = bus
        .endpoints
        .api
        .history(&service, "news.kept", "after=0&limit=1")
        .await
        .body["head"]
        .as_u64()
        .expect("head");
    eventually("every event after the restart", || async {
        (subscriber.seqs("kept").last() == Some(&head)).then_some(())
    })
    .await;
    // At least once: a delivery under way at the stop may come again, never out of order.
    let seqs = subscriber.seqs("kept");
    assert!(seqs.is_sorted(), "in order across the restart: {seqs:?}");
    let mut once = seqs.clone();
    once.dedup();
    assert_eq!(
        once,
        (first..=head).collect::<Vec<_>>(),
        "none lost: {seqs:?}"
    );
    assert!(
        seqs.len() <= once.len() + 1,
        "at most the one in flight again: {seqs:?}"
    );
}

#[tokio::test]
async fn the_webhook_api_does_not_reach_websub_subscriptions() {
    // WebSub subscriptions live among the webhooks' registrations, owned by nobody: no token
    // lists, reads, retries or deletes them through /v1/webhooks.
    let bus = bus().await;
    let api = &bus.endpoints.api;
    let service = bus.endpoints.service_token().await;
    let subscriber = Arc::new(Subscriber::default());
    let callbacks = start_subscriber(subscriber.clone()).await;
    let topic = format!("{}/v1/channels/news.owned/events", api.base);
    let callback = format!("{callbacks}/owned");
    subscribe(&bus, &topic, &callback, None).await;
    publish_until(&bus, &service, "news.owned", "the first delivery", || {
        !subscriber.seqs("owned").is_empty()
    })
    .await;
    // Its id, as the hub makes it (sha256 of callback and topic): known to an attacker too.
    let digest = <Sha256 as sha2::Digest>::digest(format!("{callback}\n{topic}").as_bytes());
    let id: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    let id = format!("websub-{id}");
    let listed = api
        .send(api.get("/v1/webhooks").bearer_auth(&service))
        .await;
    assert_eq!(listed.body["webhooks"], json!([]), "{}", listed.body);
    for request in [
        api.get(&format!("/v1/webhooks/{id}")),
        api.delete(&format!("/v1/webhooks/{id}")),
        api.post(&format!("/v1/webhooks/{id}/retry")),
    ] {
        let answer = api.send(request.bearer_auth(&service)).await;
        assert_eq!(answer.status, 404, "{}", answer.body);
    }
    // And it still delivers.
    let before = subscriber.seqs("owned").len();
    publish_until(&bus, &service, "news.owned", "delivery to go on", || {
        subscriber.seqs("owned").len() > before
    })
    .await;
}
