//! Each service as its own process, as deployed: the end-to-end scenarios across process
//! boundaries, and a store killed with SIGKILL under load that loses nothing acknowledged.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::scenarios;
use eventbus_testkit::cluster::{API_KEY_NAME, API_KEY_SECRET, Endpoints};
use eventbus_testkit::http::Http;
use eventbus_testkit::process::Process;
use eventbus_testkit::{Cluster, NatsServer, eventually, free_port};
use serde_json::{Value, json};

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");

async fn service(name: &str, port: u16, envs: &[(&str, &str)]) -> Process {
    let listen = format!("127.0.0.1:{port}");
    let mut all: Vec<(&str, &str)> = envs.to_vec();
    let variable = format!("EVENTBUS_{}_LISTEN", name.to_uppercase());
    all.push((&variable, &listen));
    Process::start(EVENTBUS, &[name], &all, port).await
}

#[tokio::test]
async fn every_service_in_its_own_process() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (store_port, auth_port, ingest_port, gateway_port) =
        (free_port(), free_port(), free_port(), free_port());
    let store_url = format!("http://127.0.0.1:{store_port}");
    let auth_url = format!("http://127.0.0.1:{auth_port}");
    let data = dir.path().join("store");
    let keys = dir.path().join("auth");
    let api_keys = format!("{API_KEY_NAME}:{API_KEY_SECRET}");
    let nats_url = nats.url();
    let common = [
        ("EVENTBUS_NATS_URL", nats_url.as_str()),
        ("EVENTBUS_STORE_URL", store_url.as_str()),
        ("EVENTBUS_AUTH_URL", auth_url.as_str()),
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
            ("EVENTBUS_API_KEYS", &api_keys),
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

/// Publishes `count` events with ids `<name>-<i>`, retrying each until it is acknowledged; returns
/// the acknowledged (id, seq) pairs.
async fn publisher(
    api: Http,
    token: String,
    name: String,
    channel: String,
    count: usize,
    acked: Arc<Mutex<usize>>,
) -> Vec<(String, u64)> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let id = format!("{name}-{i}");
        let event = json!({"id": id, "channel": channel, "type": "tick", "data": i});
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let answer = api
                .post("/v1/events")
                .bearer_auth(&token)
                .json(&event)
                .timeout(Duration::from_secs(10))
                .await_ok()
                .await;
            if let Some(answer) = answer.filter(|a| a.0 == 200) {
                out.push((
                    id.clone(),
                    answer.1["events"][0]["seq"].as_u64().expect("seq"),
                ));
                *acked.lock().expect("lock") += 1;
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} was never acknowledged"
            );
            // Any non-200 means "not stored, retry": back off briefly while the store restarts.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    out
}

trait AwaitOk {
    async fn await_ok(self) -> Option<(u16, Value)>;
}

impl AwaitOk for reqwest::RequestBuilder {
    async fn await_ok(self) -> Option<(u16, Value)> {
        let response = self.send().await.ok()?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Some((status, body))
    }
}

#[tokio::test]
async fn a_store_killed_under_load_loses_nothing_acknowledged() {
    let cycles: usize = std::env::var("EVENTBUS_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(20);
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store_port = free_port();
    let data = dir.path().join("store");
    let mut store = service(
        "store",
        store_port,
        &[
            ("EVENTBUS_NATS_URL", &nats.url()),
            ("EVENTBUS_STORE_DATA", data.to_str().expect("path")),
            // Checkpoint the index every few KiB and roll segments often, so restarts load
            // checkpoints that a kill left behind the log and scan the tail after them.
            ("EVENTBUS_STORE_CHECKPOINT_BYTES", "8192"),
            ("EVENTBUS_STORE_SEGMENT_BYTES", "65536"),
        ],
    )
    .await;
    let cluster = Cluster::start_with_store(Some(format!("http://127.0.0.1:{store_port}"))).await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;

    let acked = Arc::new(Mutex::new(0usize));
    let per_publisher = 40 * cycles.max(1);
    let mut publishers = Vec::new();
    for p in 0..4 {
        publishers.push(tokio::spawn(publisher(
            bus.api.clone(),
            token.clone(),
            format!("p{p}"),
            format!("durable.c{}", p % 2),
            per_publisher,
            acked.clone(),
        )));
    }
    for cycle in 0..cycles {
        let target = (cycle + 1) * per_publisher * 4 / (cycles + 1);
        let progress = acked.clone();
        eventually("publishers to make progress", || {
            let count = *progress.lock().expect("lock");
            async move { (count >= target).then_some(()) }
        })
        .await;
        store.restart().await;
    }
    let mut acknowledged: BTreeMap<String, u64> = BTreeMap::new();
    for publisher in publishers {
        for (id, seq) in publisher.await.expect("publisher") {
            assert!(acknowledged.insert(id, seq).is_none());
        }
    }
    assert_eq!(acknowledged.len(), 4 * per_publisher);

    // A retry of an acknowledged id, after the store restarted, is the same event: same seq,
    // nothing new stored.
    for (i, (id, seq)) in acknowledged.iter().enumerate().filter(|(i, _)| i % 5 == 0) {
        let channel = format!(
            "durable.c{}",
            id[1..2].parse::<usize>().expect("publisher number") % 2
        );
        let answer = bus
            .api
            .publish(
                &token,
                &json!({"id": id, "channel": channel, "type": "tick", "data": i}),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body["events"][0]["seq"], *seq, "retry of {id}");
        assert_eq!(answer.body["events"][0]["duplicate"], true, "retry of {id}");
    }

    // Every acknowledged event is stored once, at the seq it was acknowledged with, and the
    // channel's seqs run from 1 without a gap.
    let mut stored: HashMap<String, u64> = HashMap::new();
    for channel in ["durable.c0", "durable.c1"] {
        let mut after = 0;
        loop {
            let page = bus
                .api
                .history(&token, channel, &format!("after={after}&limit=1000"))
                .await;
            assert_eq!(page.status, 200, "{}", page.body);
            let events = page.body["events"].as_array().expect("events").clone();
            for event in &events {
                let seq = event["seq"].as_u64().expect("seq");
                assert_eq!(seq, after + 1, "{channel}: seqs have no gaps");
                after = seq;
                let id = event["id"].as_str().expect("id").to_owned();
                assert!(
                    stored.insert(id.clone(), seq).is_none(),
                    "{id} is stored twice"
                );
            }
            if events.is_empty() {
                assert_eq!(page.body["head"], after);
                break;
            }
        }
    }
    for (id, seq) in &acknowledged {
        assert_eq!(
            stored.get(id),
            Some(seq),
            "acknowledged event {id} is missing or moved"
        );
    }
    assert_eq!(
        stored.len(),
        acknowledged.len(),
        "nothing unacknowledged was left behind either"
    );
    cluster.stop().await;
}
