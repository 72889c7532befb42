//! TLS on the bus itself: https and wss on one port (HTTP/2 by ALPN), a certificate replaced on
//! disk is served to new connections while open ones carry on; and the services reach each
//! other, and NATS, over TLS with a CA the operator names.

use std::net::SocketAddr;
use std::path::PathBuf;

use eventbus_runtime::Shutdown;
use eventbus_testkit::cluster::{API_KEY_NAME, API_KEY_SECRET};
use eventbus_testkit::http::Http;
use eventbus_testkit::tls::TestCa;
use eventbus_testkit::ws::Ws;
use eventbus_testkit::{eventually, free_port};
use serde_json::json;

struct Files {
    cert: PathBuf,
    key: PathBuf,
}

fn files(dir: &std::path::Path) -> Files {
    Files {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    }
}

async fn wss_hello(url: &str, ca: &TestCa, token: &str) -> Ws {
    let mut ws = Ws::connect_tls(url, ca.client_config()).await;
    ws.send(json!({"op": "hello", "token": token})).await;
    assert_eq!(ws.recv().await["op"], "welcome");
    ws
}

/// The all-in-one bus serving https/wss with the certificate in `pem`.
struct Bus {
    addr: SocketAddr,
    https: Http,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Bus {
    async fn start(dir: &std::path::Path, ca: &TestCa, pem: &Files) -> Bus {
        Self::start_with(dir, ca, pem, |_| {}).await
    }

    async fn start_with(
        dir: &std::path::Path,
        ca: &TestCa,
        pem: &Files,
        tune: impl FnOnce(&mut eventbus::serve::Config),
    ) -> Bus {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = eventbus::serve::Config::new(dir.join("data"));
        config.api_keys = vec![
            format!("{API_KEY_NAME}:{API_KEY_SECRET}")
                .parse()
                .expect("api key"),
        ];
        config.tls.tls_cert = Some(pem.cert.clone());
        config.tls.tls_key = Some(pem.key.clone());
        tune(&mut config);
        let shutdown = Shutdown::new();
        let task = tokio::spawn(eventbus::serve::run(config, listener, shutdown.clone()));
        let https = Http::with_client(
            &format!("https://localhost:{}", addr.port()),
            ca.http_client(),
        );
        eventually("the bus to answer over https", || {
            let request = https.get("/healthz").send();
            async move { request.await.ok().filter(|r| r.status() == 200) }
        })
        .await;
        Bus {
            addr,
            https,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.expect("join").expect("bus");
    }
}

#[tokio::test]
async fn https_and_wss_on_one_port_and_a_replaced_certificate_is_picked_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new();
    let pem = files(dir.path());
    let first = ca.write_server_pair(&pem.cert, &pem.key);
    let bus = Bus::start(dir.path(), &ca, &pem).await;
    let (addr, https) = (bus.addr, bus.https.clone());
    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::get(format!("http://{addr}/healthz")).await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| r.status() != 200),
        "plain HTTP served on a TLS port"
    );
    // HTTP/2 is offered by ALPN, HTTP/1.1 kept for WebSockets.
    let (cert, alpn) = ca
        .handshake(addr, &[b"h2", b"http/1.1"])
        .await
        .expect("TLS");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(cert, first);
    let (_, alpn) = ca.handshake(addr, &[b"http/1.1"]).await.expect("TLS");
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    // A container's healthcheck probes the TLS port on 127.0.0.1, where the name never matches.
    let probed = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args([
            "probe",
            &format!("https://127.0.0.1:{}/readyz", addr.port()),
        ])
        .output()
        .await
        .expect("run eventbus probe");
    assert!(
        probed.status.success(),
        "{}",
        String::from_utf8_lossy(&probed.stderr)
    );

    let service = https.token(Some(API_KEY_SECRET), json!({})).await;
    let wss = format!("wss://localhost:{}/v1/ws", addr.port());
    let mut subscriber = wss_hello(&wss, &ca, &service).await;
    subscriber
        .subscribe(json!({"channel": "secure", "after": 0}))
        .await;
    let publish = async |n: u64| {
        let event = json!({"channel": "secure", "type": "t", "data": {"n": n}});
        https.publish(&service, &event).await
    };
    assert_eq!(publish(1).await.status, 200);
    assert_eq!(subscriber.events(1).await[0]["data"]["n"], 1);

    // The certificate is replaced on disk (a renewal): new connections get the new one...
    let second = ca.write_server_pair(&pem.cert, &pem.key);
    assert_ne!(first, second);
    eventually("new connections to see the new certificate", || async {
        let (cert, _) = ca.handshake(addr, &[b"http/1.1"]).await.ok()?;
        (cert == second).then_some(())
    })
    .await;
    // ...while the subscriber connected before goes on receiving, and a new one works too.
    assert_eq!(publish(2).await.status, 200);
    assert_eq!(subscriber.events(1).await[0]["data"]["n"], 2);
    let mut late = wss_hello(&wss, &ca, &service).await;
    late.subscribe(json!({"channel": "secure", "after": 0}))
        .await;
    let seen: Vec<_> = late
        .events(2)
        .await
        .iter()
        .map(|e| e["seq"].clone())
        .collect();
    assert_eq!(seen, vec![json!(1), json!(2)]);

    // A pair that does not match (a key written before its certificate) is not taken up: the
    // certificate in service stays.
    std::fs::write(
        &pem.key,
        rcgen::KeyPair::generate().expect("key").serialize_pem(),
    )
    .expect("write key");
    tokio::time::sleep(eventbus_runtime::tls::RELOAD_EVERY * 2).await;
    let (cert, _) = ca.handshake(addr, &[b"http/1.1"]).await.expect("TLS");
    assert_eq!(cert, second, "a mismatched pair replaced the certificate");
    bus.stop().await;
}

/// The command-line client speaks https and wss, trusting the CA it is given.
#[tokio::test]
async fn the_cli_publishes_and_tails_over_https_and_wss() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new();
    let ca_file = ca.write(dir.path());
    let pem = files(dir.path());
    ca.write_server_pair(&pem.cert, &pem.key);
    let bus = Bus::start(dir.path(), &ca, &pem).await;
    let url = format!("https://localhost:{}", bus.addr.port());
    let cli = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventbus"));
        command
            .args(args)
            .env("EVENTBUS_URL", &url)
            .env("EVENTBUS_API_KEY", API_KEY_SECRET)
            .env("SSL_CERT_FILE", &ca_file)
            .env_remove("EVENTBUS_TOKEN");
        command
    };
    let published = cli(&["pub", "cli.tls", "greeting", r#"{"hello":"tls"}"#])
        .output()
        .await
        .expect("run eventbus pub");
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    let tailed = cli(&["tail", "cli.tls", "--after", "0", "--count", "1"])
        .output()
        .await
        .expect("run eventbus tail");
    let out = String::from_utf8_lossy(&tailed.stdout);
    assert!(
        tailed.status.success(),
        "{}",
        String::from_utf8_lossy(&tailed.stderr)
    );
    assert!(out.contains(r#""hello":"tls""#), "{out}");

    // Without the CA the bus is not trusted: the CLI says so and exits 69 (unavailable).
    let untrusted = cli(&["pub", "cli.tls", "greeting", "1"])
        .env_remove("SSL_CERT_FILE")
        .output()
        .await
        .expect("run eventbus pub");
    assert_eq!(
        untrusted.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
    bus.stop().await;
}

/// A hostile client against the TLS port: connections that never finish their handshake hold no
/// place for good (the header timeout bounds the handshake too), and an honest https request is
/// answered meanwhile.
#[tokio::test]
async fn unfinished_tls_handshakes_are_bounded_like_half_sent_requests() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new();
    let pem = files(dir.path());
    ca.write_server_pair(&pem.cert, &pem.key);
    let bus = Bus::start_with(dir.path(), &ca, &pem, |c| {
        c.http.header_timeout_s = 2;
        c.http.max_connections = 64;
    })
    .await;
    // Half the cap in connections that open TCP and never send a ClientHello.
    let mut silent = Vec::new();
    for _ in 0..32 {
        silent.push(
            tokio::net::TcpStream::connect(bus.addr)
                .await
                .expect("connect"),
        );
    }
    let answer = bus.https.send(bus.https.get("/healthz")).await;
    assert_eq!(
        answer.status, 200,
        "an honest request behind silent handshakes"
    );
    for (i, stream) in silent.iter_mut().enumerate() {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 16];
        let closed =
            tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
                .await
                .is_ok_and(|read| matches!(read, Ok(0) | Err(_)));
        assert!(closed, "silent handshake {i} was never closed");
    }
    bus.stop().await;
}

#[tokio::test]
async fn a_certificate_that_cannot_be_used_stops_the_start_with_its_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pem = files(dir.path());
    std::fs::write(&pem.cert, "not a certificate").expect("write");
    std::fs::write(&pem.key, "not a key").expect("write");
    let mut config = eventbus::serve::Config::new(dir.path().join("data"));
    config.tls.tls_cert = Some(pem.cert.clone());
    config.tls.tls_key = Some(pem.key.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = eventbus::serve::run(config, listener, Shutdown::new())
        .await
        .expect_err("a bad certificate");
    assert!(err.to_string().contains("tls.crt"), "{err}");
}

/// Store and auth serve gRPC over TLS, NATS speaks `tls://`: ingest and the gateway reach all
/// three with the operator's CA, and an event goes through end to end.
#[tokio::test]
async fn services_reach_the_store_auth_and_nats_over_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new();
    let ca_file = ca.write(dir.path());
    let pem = files(dir.path());
    ca.write_server_pair(&pem.cert, &pem.key);
    let tls = eventbus_runtime::tls::Args {
        tls_cert: Some(pem.cert.clone()),
        tls_key: Some(pem.key.clone()),
    };
    let trust = eventbus_runtime::tls::Trust::with_ca_file(Some(ca_file));
    let nats = eventbus_testkit::NatsServer::start_tls(&pem.cert, &pem.key).await;
    let nats_url = nats.url().replace("nats://127.0.0.1", "tls://localhost");
    let backbone = eventbus_runtime::backbone::Args {
        nats_url,
        subject_prefix: eventbus_router::subject::DEFAULT_PREFIX.to_owned(),
        nats_user: None,
        nats_password: None,
        nats_password_file: None,
    };
    let shutdown = Shutdown::new();
    let bind = || async {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        (
            eventbus_runtime::bind(addr).await.expect("bind"),
            format!("https://localhost:{port}"),
        )
    };

    let (listener, store_url) = bind().await;
    let mut store = eventbus_store::Config::with_data(dir.path().join("store"));
    store.internal = eventbus_testkit::cluster::internal();
    store.tls = tls.clone();
    let store_backbone = backbone
        .connect(&trust)
        .await
        .expect("store to NATS over TLS");
    tokio::spawn(eventbus_store::run(
        store,
        listener,
        store_backbone,
        shutdown.clone(),
    ));

    let (listener, auth_url) = bind().await;
    let mut auth = eventbus_auth::Config::with_keys_dir(dir.path().join("auth"));
    auth.internal = eventbus_testkit::cluster::internal();
    auth.tls = tls.clone();
    auth.api_keys = vec![
        format!("{API_KEY_NAME}:{API_KEY_SECRET}")
            .parse()
            .expect("api key"),
    ];
    let auth_backbone = backbone.connect(&trust).await.expect("auth to NATS");
    tokio::spawn(eventbus_auth::run(
        auth,
        listener,
        auth_backbone,
        shutdown.clone(),
    ));

    let (listener, ingest_url) = bind().await;
    let mut ingest = eventbus_ingest::Config::new(store_url.clone(), auth_url.clone());
    ingest.upstream.internal = eventbus_testkit::cluster::internal();
    ingest.upstream.trust = trust.clone();
    tokio::spawn(eventbus_ingest::run(ingest, listener, shutdown.clone()));

    let (listener, gateway_url) = bind().await;
    let mut gateway = eventbus_gateway::Config::new(store_url, auth_url.clone());
    gateway.upstream.internal = eventbus_testkit::cluster::internal();
    gateway.upstream.trust = trust.clone();
    let gateway_backbone = backbone.connect(&trust).await.expect("gateway to NATS");
    tokio::spawn(eventbus_gateway::run(
        gateway,
        listener,
        gateway_backbone,
        shutdown.clone(),
    ));

    // Everything over plain HTTP from the test's side: TLS here is between the services.
    let plain = |url: &str| url.replace("https://localhost", "http://127.0.0.1");
    let ingest = Http::new(&plain(&ingest_url));
    let auth = Http::with_client(&auth_url, ca.http_client());
    eventually("ingest to be ready (store reached over TLS)", || {
        let request = ingest.get("/readyz").send();
        async move { request.await.ok().filter(|r| r.status() == 200) }
    })
    .await;
    let token = auth.token(Some(API_KEY_SECRET), json!({})).await;
    let gateway = Http::new(&plain(&gateway_url));
    eventually("the gateway to be ready (NATS and store over TLS)", || {
        let request = gateway.get("/readyz").send();
        async move { request.await.ok().filter(|r| r.status() == 200) }
    })
    .await;
    let ws_url = format!("{}/v1/ws", plain(&gateway_url).replace("http", "ws"));
    let (mut ws, _) = Ws::hello(&ws_url, &token).await;
    ws.subscribe(json!({"channel": "tls.e2e"})).await;
    let answer = ingest
        .publish(
            &token,
            &json!({"channel": "tls.e2e", "type": "t", "data": 1}),
        )
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(ws.events(1).await[0]["seq"], 1);
    shutdown.trigger();
}
