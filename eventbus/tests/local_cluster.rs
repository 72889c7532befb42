//! The compose topology as plain processes (`deploy/local-cluster.sh`, which takes each service's
//! environment from deploy/compose.yaml): an event published through ingest reaches subscribers on
//! both gateways, and presence (configured by deploy/.env.example) sees them, from either auth.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventbus_testkit::http::Http;
use eventbus_testkit::ws::Ws;
use eventbus_testkit::{eventually, free_port};
use serde_json::json;

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");
/// The API key deploy/.env.example configures.
const API_KEY: &str = "change-me-to-a-long-random-secret";

struct Topology(Child);

impl Drop for Topology {
    fn drop(&mut self) {
        // SIGTERM: the script stops every process it started.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_compose_topology_runs_as_processes_end_to_end() {
    let data = tempfile::tempdir().expect("temp dir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local-cluster.sh");
    let mut child = Command::new("bash")
        .arg(script)
        .env("EVENTBUS_BIN", EVENTBUS)
        .env("EVENTBUS_LOCAL_DATA", data.path())
        .env("NATS_PORT", free_port().to_string())
        .env("EVENTBUS_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start deploy/local-cluster.sh");
    let stdout = child.stdout.take().expect("stdout");
    let topology = Topology(child);
    // Read its output on a thread for the whole test (a closed pipe would kill the script at its
    // next line), and wait for the banner, bounded by the script's own readiness timeouts.
    let (banner, up) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut banner = Some(banner);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("eventbus is up")
                && let Some(banner) = banner.take()
            {
                let _ = banner.send(());
            }
        }
    });
    let up = tokio::time::timeout(Duration::from_secs(120), up)
        .await
        .expect("the topology took over 120 s to start")
        .is_ok();
    assert!(
        up,
        "deploy/local-cluster.sh ended before the topology was up"
    );

    let auth = Http::new("http://127.0.0.1:7002");
    let ingest = Http::new("http://127.0.0.1:7003");
    let service = auth.token(Some(API_KEY), json!({})).await;
    let client = auth
        .client_token(&service, "tester", &["rooms.hall"], &[])
        .await;
    let (mut a, _) = Ws::hello("ws://127.0.0.1:7004/v1/ws", &client).await;
    let (mut b, _) = Ws::hello("ws://127.0.0.1:7005/v1/ws", &client).await;
    a.subscribe(json!({"channel": "rooms.hall"})).await;
    b.subscribe(json!({"channel": "rooms.hall"})).await;
    let published = ingest
        .publish(
            &service,
            &json!({"channel": "rooms.hall", "type": "greeting", "data": {"text": "hello"}}),
        )
        .await;
    assert_eq!(published.status, 200, "{:?}", published.body);
    for ws in [&mut a, &mut b] {
        let events = ws.events(1).await;
        assert_eq!(events[0]["data"]["text"], "hello");
    }
    // Presence events are on (EVENTBUS_PRESENCE_EVENTS in .env.example): the join was logged.
    eventually("the presence join event", || async {
        let history = ingest
            .history(&service, "presence.rooms.hall", "compact=true")
            .await;
        (history.status == 200 && history.body["events"][0]["key"] == "tester").then_some(())
    })
    .await;
    // Both auth replicas know who is there: the gateways' reports reach each over NATS.
    for auth in [&auth, &Http::new("http://127.0.0.1:7008")] {
        eventually("both auth replicas to see the tester", || async {
            let answer = auth
                .send(auth.get("/v1/presence/rooms.hall").bearer_auth(&service))
                .await;
            (answer.status == 200 && answer.body["count"] == 1).then_some(())
        })
        .await;
    }
    a.close().await;
    b.close().await;
    drop(topology);
}
