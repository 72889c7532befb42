//! Nobody gets more than they were given, in production mode: each row is an attack and the
//! answer it must get.

mod common;

use base64::Engine;
use common::AllInOne;
use eventbus_testkit::cluster::API_KEY_SECRET;
use eventbus_testkit::eventually;
use eventbus_testkit::http::Http;
use serde_json::{Value, json};

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("jwt payload");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64"),
    )
    .expect("json")
}

async fn mint(auth: &Http, credential: &str, body: Value) -> (u16, Value) {
    let answer = auth
        .send(auth.post("/v1/tokens").bearer_auth(credential).json(&body))
        .await;
    (answer.status.as_u16(), answer.body)
}

#[tokio::test]
async fn a_token_never_mints_more_than_it_holds() {
    let bus = AllInOne::start(false).await;
    let auth = bus.endpoints.auth.clone();
    let narrow_request =
        json!({"subscribe": ["billing.*", "inbox.*"], "publish": ["billing.*"], "ttl_s": 600});
    let (status, narrow) = mint(&auth, API_KEY_SECRET, narrow_request).await;
    assert_eq!(status, 200, "{narrow}");
    let narrow = narrow["token"].as_str().expect("token").to_owned();
    let narrow_exp = claims(&narrow)["exp"].as_u64().expect("exp");
    let (_, no_inbox) = mint(
        &auth,
        API_KEY_SECRET,
        json!({"subscribe": ["billing.*"], "publish": ["billing.*"], "ttl_s": 600}),
    )
    .await;
    let no_inbox = no_inbox["token"].as_str().expect("token").to_owned();
    let client = auth
        .token(
            Some(API_KEY_SECRET),
            json!({"sub": "carol", "subscribe": ["billing.a"]}),
        )
        .await;

    // (minter, request, status, the field a refusal names)
    let rows: Vec<(&str, &str, Value, u16, Option<&str>)> = vec![
        ("same grant by default", &narrow, json!({}), 200, None),
        (
            "narrower",
            &narrow,
            json!({"subscribe": ["billing.eu"], "publish": []}),
            200,
            None,
        ),
        (
            "wider subscribe",
            &narrow,
            json!({"subscribe": [">"]}),
            403,
            Some("subscribe"),
        ),
        (
            "wider publish",
            &narrow,
            json!({"publish": ["billing.*", "orders"]}),
            403,
            Some("publish"),
        ),
        (
            "pattern over a literal",
            &narrow,
            json!({"subscribe": ["billing.>"]}),
            403,
            Some("subscribe"),
        ),
        ("longer life", &narrow, json!({"ttl_s": 86400}), 200, None),
        (
            "client within",
            &narrow,
            json!({"sub": "alice", "subscribe": ["billing.alice"]}),
            200,
            None,
        ),
        (
            "client beyond",
            &narrow,
            json!({"sub": "alice", "role": "client", "subscribe": ["anything.>"]}),
            403,
            Some("subscribe"),
        ),
        (
            "client publishing beyond",
            &narrow,
            json!({"sub": "alice", "publish": ["chat.*"]}),
            403,
            Some("publish"),
        ),
        (
            "client without the inbox",
            &no_inbox,
            json!({"sub": "alice", "subscribe": ["billing.alice"]}),
            403,
            Some("sub"),
        ),
        (
            "service for another",
            &narrow,
            json!({"sub": "other", "role": "service"}),
            403,
            None,
        ),
        (
            "client token minting",
            &client,
            json!({"sub": "dave"}),
            403,
            None,
        ),
        (
            "api key beyond",
            API_KEY_SECRET,
            json!({"sub": "alice", "subscribe": ["anything.>"], "ttl_s": 86400}),
            200,
            None,
        ),
    ];
    for (name, minter, request, status, field) in rows {
        let (got, body) = mint(&auth, minter, request.clone()).await;
        assert_eq!(got, status, "{name}: {request} -> {body}");
        if let Some(field) = field {
            assert_eq!(body["field"], field, "{name}: {body}");
        }
        if got == 200 && minter == narrow {
            let minted = claims(body["token"].as_str().expect("token"));
            assert!(
                minted["exp"].as_u64().expect("exp") <= narrow_exp,
                "{name}: expires after its minter"
            );
            if minted["role"] == "service" && request.get("subscribe").is_none() {
                assert_eq!(
                    minted["subscribe"],
                    json!(["billing.*", "inbox.*"]),
                    "{name}"
                );
                assert_eq!(minted["publish"], json!(["billing.*"]), "{name}");
            }
        }
    }

    // A chain narrows, never widens back: a token minted by a narrowed one mints within it.
    let (_, narrower) = mint(
        &auth,
        &narrow,
        json!({"subscribe": ["billing.eu"], "publish": []}),
    )
    .await;
    let narrower = narrower["token"].as_str().expect("token").to_owned();
    let (status, _) = mint(&auth, &narrower, json!({"subscribe": ["billing.*"]})).await;
    assert_eq!(status, 403);
    let (status, again) = mint(&auth, &narrower, json!({})).await;
    assert_eq!(status, 200);
    let again = claims(again["token"].as_str().expect("token"));
    assert_eq!(
        (&again["subscribe"], &again["publish"]),
        (&json!(["billing.eu"]), &json!([]))
    );
    bus.stop().await;
}

#[tokio::test]
async fn a_refresh_is_a_new_grant_and_snapshots_are_written_by_services() {
    use eventbus_testkit::ws::Ws;
    let bus = AllInOne::start(false).await;
    let api = bus.endpoints.api.clone();
    let service = bus.endpoints.service_token().await;
    let client = |subscribe: Value| {
        let auth = bus.endpoints.auth.clone();
        async move {
            auth.token(
                Some(API_KEY_SECRET),
                json!({"sub": "alice", "subscribe": subscribe, "publish": ["room.*"]}),
            )
            .await
        }
    };
    let both = client(json!(["room.a", "room.b"])).await;
    let only_b = client(json!(["room.b"])).await;
    let (mut ws, _) = Ws::hello(&bus.endpoints.ws, &both).await;
    ws.subscribe(json!({"channel": "room.a"})).await;
    ws.subscribe(json!({"channel": "room.b"})).await;
    ws.send(json!({"op": "refresh", "token": only_b, "ref": "r"}))
        .await;
    let ended = ws.recv().await;
    assert_eq!(
        (&ended["op"], &ended["code"], &ended["channel"]),
        (&json!("error"), &json!("forbidden"), &json!("room.a")),
        "{ended}"
    );
    assert_eq!(ws.recv().await["op"], "refreshed");
    // room.a is no longer delivered; room.b is.
    for channel in ["room.a", "room.b"] {
        let answer = api
            .publish(
                &service,
                &json!({"channel": channel, "type": "t", "data": channel}),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
    let next = ws.recv().await;
    assert_eq!(next["event"]["channel"], "room.b", "{next}");

    // Snapshots: a client allowed to publish to room.* may not write room.x's state.
    let published = api
        .publish(&service, &json!({"channel": "room.x", "type": "t"}))
        .await;
    assert_eq!(published.status, 200);
    let snapshot = json!({"seq": 1, "data": {"owned": true}});
    let by_client = api
        .send(api.put_json("/v1/channels/room.x/snapshot", &only_b, &snapshot))
        .await;
    assert_eq!(by_client.status, 403, "{}", by_client.body);
    let by_service = api
        .send(api.put_json("/v1/channels/room.x/snapshot", &service, &snapshot))
        .await;
    assert_eq!(by_service.status, 200, "{}", by_service.body);
    bus.stop().await;
}

/// A refresh that narrows the grant in the middle of a long catch-up ends that subscription at
/// once: after its `forbidden` frame, not one more event of the channel, though most of its
/// history was still to be read; the channel still allowed goes on.
#[tokio::test]
async fn a_narrowing_refresh_stops_a_catch_up_in_progress() {
    use eventbus_testkit::ws::Ws;
    let bus = AllInOne::start(false).await;
    let api = bus.endpoints.api.clone();
    let service = bus.endpoints.service_token().await;
    for round in 0..20 {
        let batch: Vec<Value> = (0..1000)
            .map(|i| json!({"channel": "vault", "type": "t", "data": round * 1000 + i}))
            .collect();
        assert_eq!(
            api.publish(&service, &Value::Array(batch)).await.status,
            200
        );
    }
    let client = |subscribe: Value| {
        let auth = bus.endpoints.auth.clone();
        async move {
            auth.token(
                Some(API_KEY_SECRET),
                json!({"sub": "mallory", "subscribe": subscribe, "publish": []}),
            )
            .await
        }
    };
    let both = client(json!(["vault", "lobby"])).await;
    let lobby_only = client(json!(["lobby"])).await;
    let (mut ws, _) = Ws::hello(&bus.endpoints.ws, &both).await;
    ws.subscribe(json!({"channel": "lobby"})).await;
    ws.subscribe(json!({"channel": "vault", "after": 0})).await;
    assert_eq!(ws.events(1).await[0]["seq"], 1);
    ws.send(json!({"op": "refresh", "token": lobby_only, "ref": "r"}))
        .await;
    // Pages already written may arrive first, in order; then the subscription ends.
    let mut last = 1;
    loop {
        let frame = ws.recv().await;
        if frame["op"] == "event" {
            assert_eq!(frame["event"]["seq"], last + 1, "{frame}");
            last += 1;
            continue;
        }
        assert_eq!(
            (&frame["op"], &frame["code"], &frame["channel"]),
            (&json!("error"), &json!("forbidden"), &json!("vault")),
            "{frame}"
        );
        break;
    }
    assert!(
        last < 20_000,
        "the whole history was sent before the refresh was read"
    );
    assert_eq!(ws.recv().await["op"], "refreshed");
    let answer = api
        .publish(&service, &json!({"channel": "lobby", "type": "t"}))
        .await;
    assert_eq!(answer.status, 200);
    let next = ws.recv().await;
    assert_eq!(
        next["event"]["channel"], "lobby",
        "nothing more of vault: {next}"
    );
    ws.send(json!({"op": "ping"})).await;
    assert_eq!(ws.recv().await["op"], "pong");
    bus.stop().await;
}
/// A receiver on loopback that records what it is sent; `status` is what it answers.
async fn receiver(
    status: u16,
    location: Option<String>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = recording(got.clone(), status, location);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://127.0.0.1:{port}/hook"), got)
}

fn recording(
    got: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    status: u16,
    location: Option<String>,
) -> axum::Router {
    axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (got, location) = (got.clone(), location.clone());
            async move {
                got.lock()
                    .expect("lock")
                    .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                let mut response = axum::http::Response::builder().status(status);
                if let Some(location) = location {
                    response = response.header("location", location);
                }
                response.body(axum::body::Body::empty()).expect("response")
            }
        }),
    )
}

fn allow_loopback(config: &mut eventbus::serve::Config) {
    config.hooks.destinations.allow_networks = vec!["127.0.0.0/8".parse().expect("cidr")];
}

async fn register(bus: &AllInOne, token: &str, url: &str, channels: Value) -> (u16, Value) {
    let api = &bus.endpoints.api;
    let answer = api
        .send(api.post("/v1/webhooks").bearer_auth(token).json(
            &json!({"url": url, "channels": channels, "secret": "webhook-secret-0123456789"}),
        ))
        .await;
    (answer.status.as_u16(), answer.body)
}

async fn webhook(bus: &AllInOne, token: &str, id: &str) -> Value {
    let api = &bus.endpoints.api;
    api.send(api.get(&format!("/v1/webhooks/{id}")).bearer_auth(token))
        .await
        .body
}

#[tokio::test]
async fn webhooks_stay_within_their_owners_grant_and_away_from_internal_addresses() {
    let bus = AllInOne::start(false).await;
    let auth = bus.endpoints.auth.clone();
    let full = bus.endpoints.service_token().await;
    let narrow = auth
        .token(
            Some(API_KEY_SECRET),
            json!({"subscribe": ["billing.*"], "publish": ["billing.*"]}),
        )
        .await;
    // The grant: every channel pattern within the owner's subscribe grant.
    for channels in [
        json!(["inbox.*"]),
        json!([">"]),
        json!(["billing.*", "orders"]),
    ] {
        let (status, body) =
            register(&bus, &narrow, "http://127.0.0.1:9/h", channels.clone()).await;
        assert_eq!(
            (status, &body["field"]),
            (403, &json!("channels")),
            "{channels}: {body}"
        );
    }
    // Internal destinations, by address or by name, are refused outside development mode.
    for url in [
        "http://127.0.0.1:9/h",
        "http://localhost:9/h",
        "http://10.0.0.1/h",
        "http://172.16.5.4/h",
        "http://192.168.1.1/h",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://[::1]:9/h",
        "http://[::ffff:127.0.0.1]:9/h",
        "http://[fd00:ec2::254]/h",
        "http://0.0.0.0:9/h",
    ] {
        let (status, body) = register(&bus, &full, url, json!(["billing.*"])).await;
        assert_eq!(
            (status, &body["field"]),
            (400, &json!("url")),
            "{url}: {body}"
        );
    }
    bus.stop().await;
}

#[tokio::test]
async fn webhook_destinations_are_checked_at_every_delivery_and_redirects_are_not_followed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(dir, false, allow_loopback).await;
    let service = bus.endpoints.service_token().await;
    // A redirect to another internal address is a failed delivery, never followed.
    let (inner_url, inner) = receiver(204, None).await;
    let (redirecting_url, redirecting) = receiver(307, Some(inner_url.clone())).await;
    let (status, hook) = register(&bus, &service, &redirecting_url, json!(["redirect.*"])).await;
    assert_eq!(status, 201, "{hook}");
    let id = hook["id"].as_str().expect("id").to_owned();
    let (literal_url, literal) = receiver(204, None).await;
    let by_name_url = literal_url.replace("127.0.0.1", "localhost");
    let mut later = Vec::new();
    for url in [&literal_url, &by_name_url] {
        let (status, hook) = register(&bus, &service, url, json!(["later.*"])).await;
        assert_eq!(status, 201, "{hook}");
        later.push(hook["id"].as_str().expect("id").to_owned());
    }
    let api = bus.endpoints.api.clone();
    api.publish(&service, &json!({"channel": "redirect.a", "type": "t"}))
        .await;
    let shown = eventually("the redirect to count as a failure", || {
        let (bus, service, id) = (&bus, service.clone(), id.clone());
        async move {
            let shown = webhook(bus, &service, &id).await;
            (shown["failures"].as_u64() >= Some(1)).then_some(shown)
        }
    })
    .await;
    assert!(
        shown["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("307"),
        "{shown}"
    );
    assert!(!redirecting.lock().expect("lock").is_empty());
    assert!(
        inner.lock().expect("lock").is_empty(),
        "the redirect was followed"
    );

    // The same registrations, after a restart without the operator's allowance: no delivery.
    let dir = bus.stop().await;
    let bus = AllInOne::start_in(dir, false).await;
    let service = bus.endpoints.service_token().await;
    bus.endpoints
        .api
        .publish(&service, &json!({"channel": "later.a", "type": "t"}))
        .await;
    for id in &later {
        let shown = eventually("the webhook to stop", || {
            let (bus, service, id) = (&bus, service.clone(), id.clone());
            async move {
                let shown = webhook(bus, &service, &id).await;
                (shown["state"] == "dead" || shown["failures"].as_u64() >= Some(1)).then_some(shown)
            }
        })
        .await;
        let error = shown["last_error"].as_str().unwrap_or_default();
        assert!(error.contains("internal"), "{shown}");
    }
    assert!(
        literal.lock().expect("lock").is_empty(),
        "delivered to an internal address"
    );
    bus.stop().await;
}

#[tokio::test]
async fn https_webhooks_work_with_a_ca_the_operator_trusts() {
    let ca = eventbus_testkit::tls::TestCa::new();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let base = ca.serve(recording(got.clone(), 204, None)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca.write(dir.path());
    let data = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(data, false, move |c| {
        allow_loopback(c);
        c.trust.ca_file = Some(ca_file);
    })
    .await;
    let service = bus.endpoints.service_token().await;
    let (status, hook) = register(&bus, &service, &format!("{base}/hook"), json!(["tls.*"])).await;
    assert_eq!(status, 201, "{hook}");
    bus.endpoints
        .api
        .publish(
            &service,
            &json!({"channel": "tls.a", "type": "t", "data": "secret"}),
        )
        .await;
    eventually("the event over https", || {
        let got = got.clone();
        async move { (!got.lock().expect("lock").is_empty()).then_some(()) }
    })
    .await;
    assert_eq!(got.lock().expect("lock")[0]["data"], "secret");
    bus.stop().await;

    // Without the CA, the same receiver is not trusted: the delivery fails, saying why.
    let data = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(data, false, allow_loopback).await;
    let service = bus.endpoints.service_token().await;
    let (_, hook) = register(&bus, &service, &format!("{base}/hook"), json!(["tls.*"])).await;
    let id = hook["id"].as_str().expect("id").to_owned();
    bus.endpoints
        .api
        .publish(&service, &json!({"channel": "tls.b", "type": "t"}))
        .await;
    let shown = eventually("the untrusted delivery to fail", || {
        let (bus, service, id) = (&bus, service.clone(), id.clone());
        async move {
            let shown = webhook(bus, &service, &id).await;
            (shown["failures"].as_u64() >= Some(1)).then_some(shown)
        }
    })
    .await;
    assert!(shown["last_error"].is_string(), "{shown}");
    assert_eq!(got.lock().expect("lock").len(), 1);
    bus.stop().await;
}

#[tokio::test]
async fn a_connection_holds_a_bounded_number_of_subscriptions() {
    use eventbus_testkit::ws::Ws;
    let bus = AllInOne::start(false).await;
    let service = bus.endpoints.service_token().await;
    let (mut ws, _) = Ws::hello(&bus.endpoints.ws, &service).await;
    for n in 0..1000 {
        ws.subscribe(json!({"channel": format!("s.{n}")})).await;
    }
    ws.send(json!({"op": "subscribe", "channel": "s.1000"}))
        .await;
    let refused = ws.recv().await;
    assert_eq!(refused["code"], "too_many_subscriptions", "{refused}");
    ws.send(json!({"op": "ping", "ref": 1})).await;
    assert_eq!(ws.recv().await["op"], "pong", "the connection stays");
    ws.send(json!({"op": "unsubscribe", "channel": "s.0"}))
        .await;
    assert_eq!(ws.recv().await["op"], "unsubscribed");
    ws.subscribe(json!({"channel": "s.1000"})).await;
    bus.stop().await;
}

/// Opens `n` connections that send the start of a request and never finish it.
async fn half_sent(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        out.push(stream);
    }
    out
}

/// Whether the server closed `stream` (EOF or reset) within `wait`.
async fn closed_within(stream: &mut tokio::net::TcpStream, wait: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or the like before the close is fine too.
            Ok(Ok(_)) => continue,
        }
    }
}

/// Waits until the bus serves a new request again (connections under the cap were freed).
async fn until_served(bus: &AllInOne, what: &str) {
    let api = bus.endpoints.api.clone();
    eventually(what, || {
        let api = api.clone();
        async move {
            let answer = api.get("/healthz").send().await.ok()?;
            (answer.status() == 200).then_some(())
        }
    })
    .await;
}

fn addr_of(bus: &AllInOne) -> std::net::SocketAddr {
    bus.endpoints
        .api
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("addr")
}

#[tokio::test]
async fn half_sent_requests_are_closed_and_never_starve_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(dir, false, |c| c.http.header_timeout_s = 2).await;
    let addr = addr_of(&bus);
    let mut slow = half_sent(addr, 1500).await;
    let api = bus.endpoints.api.clone();
    let started = std::time::Instant::now();
    let answer = api.send(api.get("/healthz")).await;
    assert_eq!(answer.status, 200);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "a normal request waited {:?} behind 1,500 half-sent ones",
        started.elapsed()
    );
    for (i, stream) in slow.iter_mut().enumerate() {
        assert!(
            closed_within(stream, std::time::Duration::from_secs(10)).await,
            "half-sent request {i} was never closed"
        );
    }
    bus.stop().await;
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_are_refused_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(dir, false, |c| c.http.max_connections = 40).await;
    let addr = addr_of(&bus);
    let mut held = half_sent(addr, 40).await;
    let mut extra = half_sent(addr, 1).await;
    assert!(
        closed_within(&mut extra[0], std::time::Duration::from_secs(2)).await,
        "a connection past the cap was kept"
    );
    assert!(
        !closed_within(&mut held[0], std::time::Duration::from_millis(200)).await,
        "the held ones are served on"
    );
    drop(held);
    until_served(&bus, "room again once connections close").await;
    bus.stop().await;
}

/// Idempotency is per (channel, source, id), as CloudEvents defines an event's identity: another
/// publisher cannot squat an id.
#[tokio::test]
async fn another_publisher_cannot_squat_an_id() {
    let bus = AllInOne::start(false).await;
    let api = bus.endpoints.api.clone();
    let first = bus.endpoints.service_token().await;
    let other = bus
        .endpoints
        .auth
        .client_token(&first, "mallory", &[], &["shared"])
        .await;
    let event = json!({"id": "same-id", "channel": "shared", "type": "t"});
    let squat = api.publish(&other, &event).await;
    assert_eq!(squat.status, 200, "{}", squat.body);
    let own = api.publish(&first, &event).await;
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(own.body["events"][0]["duplicate"], false, "{}", own.body);
    assert_ne!(own.body["events"][0]["seq"], squat.body["events"][0]["seq"]);
    // Each publisher's own retry is its duplicate.
    for (token, answer) in [(&first, &own), (&other, &squat)] {
        let retry = api.publish(token, &event).await;
        assert_eq!(retry.body["events"][0]["duplicate"], true);
        assert_eq!(
            retry.body["events"][0]["seq"],
            answer.body["events"][0]["seq"]
        );
    }
    bus.stop().await;
}

#[tokio::test]
async fn a_publish_rate_per_identity_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(dir, false, |c| {
        c.publish_rate.per_second = 1;
        c.publish_rate.burst = Some(5);
    })
    .await;
    let api = bus.endpoints.api.clone();
    let noisy = bus.endpoints.service_token().await;
    let quiet = bus
        .endpoints
        .auth
        .client_token(&noisy, "quiet", &[], &["rate"])
        .await;
    let event = |n: usize| json!({"id": format!("e{n}"), "channel": "rate", "type": "t"});
    for n in 0..5 {
        assert_eq!(
            api.publish(&noisy, &event(n)).await.status,
            200,
            "within the burst"
        );
    }
    let limited = api
        .send(api.post("/v1/events").bearer_auth(&noisy).json(&event(5)))
        .await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1);
    // Another identity has its own bucket; a batch beyond the burst is refused at once.
    assert_eq!(api.publish(&quiet, &event(100)).await.status, 200);
    let batch: Vec<Value> = (200..206).map(event).collect();
    let too_big = api.publish(&quiet, &Value::Array(batch)).await;
    assert_eq!(too_big.status, 429, "{}", too_big.body);
    bus.stop().await;
}

#[tokio::test]
async fn an_identity_holds_a_bounded_number_of_connections() {
    use eventbus_testkit::ws::{Closed, Ws};
    let mut cluster = eventbus_testkit::Cluster::start().await;
    let ws_url = cluster
        .add_gateway_with(|c| c.settings.max_connections_per_identity = 2)
        .await;
    let service = cluster.endpoints.service_token().await;
    let alice = cluster
        .endpoints
        .auth
        .client_token(&service, "alice", &["a"], &[])
        .await;
    let bob = cluster
        .endpoints
        .auth
        .client_token(&service, "bob", &["a"], &[])
        .await;
    let (first, _) = Ws::hello(&ws_url, &alice).await;
    let (_second, _) = Ws::hello(&ws_url, &alice).await;
    let mut third = Ws::connect(&ws_url).await;
    third.send(json!({"op": "hello", "token": alice})).await;
    assert_eq!(third.recv().await["code"], "too_many_connections");
    assert_eq!(third.closed().await, Closed::Code(4029));
    // SSE streams count too.
    let sse = ws_url
        .replace("ws://", "http://")
        .replace("/v1/ws", "/v1/sse");
    let refused = reqwest::get(format!("{sse}?channel=a&token={alice}"))
        .await
        .expect("sse");
    assert_eq!(refused.status(), 429);
    // Another identity is not affected; a closed connection frees its place.
    let (_bob, _) = Ws::hello(&ws_url, &bob).await;
    first.close().await;
    eventually("alice's place to be freed", || {
        let (url, alice) = (ws_url.clone(), alice.clone());
        async move {
            let mut again = Ws::connect(&url).await;
            again.send(json!({"op": "hello", "token": alice})).await;
            (again.recv().await["op"] == "welcome").then_some(())
        }
    })
    .await;
    cluster.stop().await;
}

#[tokio::test]
async fn channel_creation_counts_against_a_quota_per_publisher() {
    let cluster =
        eventbus_testkit::Cluster::start_tuned(None, |c| c.settings.max_channels_per_source = 3)
            .await;
    let api = cluster.endpoints.api.clone();
    let service = cluster.endpoints.service_token().await;
    for n in 0..3 {
        let answer = api
            .publish(&service, &json!({"channel": format!("q.{n}"), "type": "t"}))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let refused = api
        .publish(&service, &json!({"channel": "q.3", "type": "t"}))
        .await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.body["outcome"], "not-stored");
    let existing = api
        .publish(&service, &json!({"channel": "q.0", "type": "t"}))
        .await;
    assert_eq!(existing.status, 200, "publishing to its channels goes on");
    cluster.stop().await;
}

/// The cap counts upgraded WebSockets too (the permit travels with the socket), so a client
/// cannot exhaust the file limit by upgrading everything it opens.
#[tokio::test]
async fn websockets_count_against_the_connection_cap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = AllInOne::start_with(dir, false, |c| c.http.max_connections = 20).await;
    let token = bus.endpoints.service_token().await;
    let url = format!("{}?token={token}", bus.endpoints.ws);
    // Upgrade connections until one is refused: without WebSockets counting, all 30 would open.
    let mut sockets = Vec::new();
    for _ in 0..30 {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((socket, _)) => sockets.push(socket),
            Err(_) => break,
        }
    }
    assert!(
        (15..20).contains(&sockets.len()),
        "{} WebSockets opened under a cap of 20 (the test's HTTP client holds the rest)",
        sockets.len()
    );
    let mut extra = half_sent(addr_of(&bus), 1).await;
    assert!(
        closed_within(&mut extra[0], std::time::Duration::from_secs(2)).await,
        "a connection past the cap was kept while WebSockets held it"
    );
    drop(sockets);
    until_served(&bus, "room again once the WebSockets close").await;
    bus.stop().await;
}
