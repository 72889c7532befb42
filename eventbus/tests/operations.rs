//! What operators rely on: `/metrics` moves with real traffic, and `/readyz` follows the
//! dependencies (the store for ingest; the store and NATS for a gateway).

use std::time::Duration;

use eventbus_testkit::process::Process;
use eventbus_testkit::ws::Ws;
use eventbus_testkit::{Cluster, NatsServer, eventually, free_port};
use serde_json::{Value, json};

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");

/// The value of one sample line (`name value`) of an OpenMetrics page.
fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{page}"))
}

async fn metrics(base: &str) -> String {
    let response = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    response.text().await.expect("body")
}

#[tokio::test]
async fn metrics_follow_real_traffic() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let base = bus.api.base.clone();
    let before = metrics(&base).await;
    let service = bus.service_token().await;
    let token = bus
        .auth
        .client_token(&service, "watcher", &["metered"], &[])
        .await;
    let (mut ws, _) = Ws::hello(&bus.ws, &token).await;
    ws.subscribe(json!({"channel": "metered"})).await;
    let batch: Vec<Value> = (0..3)
        .map(|i| json!({"channel": "metered", "type": "tick", "id": format!("m-{i}"), "data": i}))
        .collect();
    assert_eq!(
        bus.api
            .publish(&service, &Value::Array(batch.clone()))
            .await
            .status,
        200
    );
    assert_eq!(ws.events(3).await.len(), 3);
    // The same ids again: answered as duplicates, nothing new stored.
    assert_eq!(
        bus.api.publish(&service, &Value::Array(batch)).await.status,
        200
    );

    let after = metrics(&base).await;
    let delta = |name: &str| sample(&after, name) - sample(&before, name);
    // Other tests of this binary share the process's figures: at least ours must show.
    assert!(delta("eventbus_events_in_total") >= 3.0, "{after}");
    assert!(
        delta("eventbus_duplicate_publishes_total") >= 3.0,
        "{after}"
    );
    assert!(delta("eventbus_events_out_total") >= 3.0, "{after}");
    assert!(
        delta("eventbus_store_appended_events_total") >= 3.0,
        "{after}"
    );
    assert!(
        delta("eventbus_store_fsync_seconds_count") >= 1.0,
        "{after}"
    );
    assert!(delta("eventbus_publish_seconds_count") >= 2.0, "{after}");
    // The commit time travelled in a NATS header to the gateway.
    assert!(
        delta("eventbus_delivery_lag_seconds_count") >= 3.0,
        "{after}"
    );
    assert!(
        sample(&after, "eventbus_gateway_connections") >= 1.0,
        "{after}"
    );
    assert!(
        sample(&after, "eventbus_gateway_subscriptions") >= 1.0,
        "{after}"
    );
    assert!(
        sample(&after, "eventbus_gateway_backbone_topics") >= 1.0,
        "{after}"
    );
    ws.close().await;
    cluster.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_store_and_nats() {
    let mut nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (store_port, ingest_port, gateway_port) = (free_port(), free_port(), free_port());
    let store_url = format!("http://127.0.0.1:{store_port}");
    let data = dir.path().join("store");
    let nats_url = nats.url();
    let common = [
        ("EVENTBUS_NATS_URL", nats_url.as_str()),
        ("EVENTBUS_STORE_URL", store_url.as_str()),
        // Nobody needs auth here: readiness does not depend on it.
        ("EVENTBUS_AUTH_URL", "http://127.0.0.1:9"),
    ];
    let store_listen = format!("127.0.0.1:{store_port}");
    let mut store = Process::start(
        EVENTBUS,
        &["store"],
        &[
            &common[..],
            &[
                ("EVENTBUS_STORE_LISTEN", store_listen.as_str()),
                ("EVENTBUS_STORE_DATA", data.to_str().expect("path")),
            ],
        ]
        .concat(),
        store_port,
    )
    .await;
    let ingest_listen = format!("127.0.0.1:{ingest_port}");
    let _ingest = Process::start(
        EVENTBUS,
        &["ingest"],
        &[
            &common[..],
            &[("EVENTBUS_INGEST_LISTEN", ingest_listen.as_str())],
        ]
        .concat(),
        ingest_port,
    )
    .await;
    let gateway_listen = format!("127.0.0.1:{gateway_port}");
    let _gateway = Process::start(
        EVENTBUS,
        &["gateway"],
        &[
            &common[..],
            &[("EVENTBUS_GATEWAY_LISTEN", gateway_listen.as_str())],
        ]
        .concat(),
        gateway_port,
    )
    .await;
    let client = reqwest::Client::new();
    let ready = |port: u16, want: u16| {
        let client = client.clone();
        async move {
            let status = client
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            (status == want).then_some(())
        }
    };
    for port in [ingest_port, gateway_port] {
        eventually("ready with every dependency up", || ready(port, 200)).await;
    }

    store.kill();
    for port in [ingest_port, gateway_port] {
        eventually("not ready without the store", || ready(port, 503)).await;
        // Alive all the same: a supervisor must not restart it for its dependency's sake.
        let alive = client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(alive.status(), 200);
    }
    store.restart().await;
    for port in [ingest_port, gateway_port] {
        eventually("ready again with the store back", || ready(port, 200)).await;
    }

    nats.kill();
    eventually("gateway not ready without NATS", || {
        ready(gateway_port, 503)
    })
    .await;
    eventually("ingest does not need NATS", || ready(ingest_port, 200)).await;
}
