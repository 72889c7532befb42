//! Each service as its own process, as deployed: the end-to-end scenarios across process
//! boundaries. (Stores killed under load: `store_crashes.rs`.)

mod common;

use common::scenarios;
use eventbus_testkit::cluster::{API_KEY_NAME, API_KEY_SECRET, Endpoints};
use eventbus_testkit::http::Http;
use eventbus_testkit::process::Process;
use eventbus_testkit::{NatsServer, free_port};

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");

async fn service(name: &str, port: u16, envs: &[(&str, &str)]) -> Process {
    let listen = format!("127.0.0.1:{port}");
    let mut all: Vec<(&str, &str)> = envs.to_vec();
    let variable = format!("EVENTBUS_{}_LISTEN", name.to_uppercase());
    all.push((&variable, &listen));
    Process::start(EVENTBUS, &[name], &all, port).await
}

/// As deployed on Kubernetes: secrets (API keys, the NATS password) come from files.
#[tokio::test]
async fn every_service_in_its_own_process() {
    let nats = NatsServer::start_with_user("bus", "nats-password-of-the-test").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = |name: &str, value: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{value}\n")).expect("write secret");
        path.to_str().expect("path").to_owned()
    };
    let nats_password_file = secret("nats-password", "nats-password-of-the-test");
    let api_keys_file = secret(
        "api-keys",
        &format!(
            "# the services' keys\n{API_KEY_NAME}:{API_KEY_SECRET}\nother:another-secret-0123456789"
        ),
    );
    let (store_port, auth_port, ingest_port, gateway_port) =
        (free_port(), free_port(), free_port(), free_port());
    let store_url = format!("http://127.0.0.1:{store_port}");
    let auth_url = format!("http://127.0.0.1:{auth_port}");
    let data = dir.path().join("store");
    let keys = dir.path().join("auth");
    let nats_url = nats.url();
    let common = [
        ("EVENTBUS_NATS_URL", nats_url.as_str()),
        ("EVENTBUS_STORE_URL", store_url.as_str()),
        ("EVENTBUS_AUTH_URL", auth_url.as_str()),
        ("EVENTBUS_NATS_USER", "bus"),
        ("EVENTBUS_NATS_PASSWORD_FILE", nats_password_file.as_str()),
    ];

    let _store = service(
        "store",
        store_port,
        &[
            &common[..],
            &[("EVENTBUS_STORE_DATA", data.to_str().expect("path"))],
        ]
        .concat(),
    )
    .await;
    let _auth = service(
        "auth",
        auth_port,
        &[
            ("EVENTBUS_AUTH_KEYS_DIR", keys.to_str().expect("path")),
            ("EVENTBUS_API_KEYS_FILE", &api_keys_file),
        ],
    )
    .await;
    let _ingest = service("ingest", ingest_port, &common).await;
    let _gateway = service("gateway", gateway_port, &common).await;

    let bus = Endpoints {
        api: Http::new(&format!("http://127.0.0.1:{ingest_port}")),
        auth: Http::new(&auth_url),
        ws: format!("ws://127.0.0.1:{gateway_port}/v1/ws"),
    };
    scenarios::publish_over_http_reaches_websocket(&bus).await;
    scenarios::resume_gets_exactly_what_was_missed(&bus).await;
}
