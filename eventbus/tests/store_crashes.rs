//! The store as its own process, killed with SIGKILL: under concurrent publishers (with and
//! without retention deleting segments between the kills), and at the exact point where retention
//! has deleted the middle of the log. Nothing acknowledged is lost, nothing is stored twice, and
//! the store always starts again.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use eventbus_testkit::http::Http;
use eventbus_testkit::load::{self, publisher, retained};
use eventbus_testkit::process::Process;
use eventbus_testkit::{Cluster, NatsServer, eventually, free_port};
use serde_json::{Value, json};

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");

async fn store(port: u16, nats: &NatsServer, data: &Path, envs: &[(&str, &str)]) -> Process {
    let listen = format!("127.0.0.1:{port}");
    let nats_url = nats.url();
    let mut all: Vec<(&str, &str)> = vec![
        ("EVENTBUS_STORE_LISTEN", &listen),
        ("EVENTBUS_NATS_URL", &nats_url),
        ("EVENTBUS_STORE_DATA", data.to_str().expect("path")),
    ];
    all.extend_from_slice(envs);
    Process::start(EVENTBUS, &["store"], &all, port).await
}

/// `publishers` on two channels (a retry loop each), the store killed `cycles` times.
async fn kill_the_store_under_load(
    channel_prefix: &str,
    publishers: usize,
    tuning: &[(&str, &str)],
) {
    let cycles: usize = std::env::var("EVENTBUS_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(20);
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store_port = free_port();
    let data = dir.path().join("store");
    let mut store = store(store_port, &nats, &data, tuning).await;
    let cluster = Cluster::start_with_store(Some(format!("http://127.0.0.1:{store_port}"))).await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;
    // A channel without retention in the first segment: that segment outlives the ones after it.
    let keep = bus
        .api
        .publish(
            &token,
            &json!({"id": "keep-1", "channel": "keep", "type": "kept"}),
        )
        .await;
    assert_eq!(keep.status, 200, "{}", keep.body);

    let acked = load::Shared::default();
    let per_publisher = 160 * cycles.max(1) / publishers;
    let combined_before = eventbus_runtime::metrics::metrics()
        .store_combined_appends
        .get();
    let mut running = Vec::new();
    for p in 0..publishers {
        running.push(tokio::spawn(publisher(
            bus.api.clone(),
            token.clone(),
            format!("p{p}"),
            format!("{channel_prefix}.c{}", p % 2),
            per_publisher,
            acked.clone(),
        )));
    }
    for cycle in 0..cycles {
        let target = (cycle + 1) * per_publisher * publishers / (cycles + 1);
        let progress = acked.clone();
        eventually("publishers to make progress", || {
            let count = load::acked(&progress);
            async move { (count >= target).then_some(()) }
        })
        .await;
        store.restart().await;
    }
    let mut acknowledged: BTreeMap<String, u64> = BTreeMap::new();
    for publisher in running {
        for (id, seq) in publisher.await.expect("publisher") {
            assert!(acknowledged.insert(id, seq).is_none());
        }
    }
    assert_eq!(acknowledged.len(), publishers * per_publisher);
    let combined = eventbus_runtime::metrics::metrics()
        .store_combined_appends
        .get()
        - combined_before;
    // More publishers than calls the client keeps in flight (4): their appends were combined, so
    // kills landed in the middle of combined calls, whose callers were all told the outcome is
    // unknown and retried.
    if publishers > 4 {
        assert!(combined > 100, "only {combined} appends went out combined");
    }
    let channel_of = |id: &str| {
        let number = id[1..].split('-').next().expect("publisher name");
        let publisher: usize = number.parse().expect("publisher number");
        format!("{channel_prefix}.c{}", publisher % 2)
    };

    // A retry of an acknowledged id, after the store restarted, is the same event: same seq,
    // nothing new stored, whether or not retention has let the event go since.
    for (i, (id, seq)) in acknowledged.iter().enumerate().filter(|(i, _)| i % 5 == 0) {
        let answer = bus
            .api
            .publish(
                &token,
                &json!({"id": id, "channel": channel_of(id), "type": "tick", "data": i}),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body["events"][0]["seq"], *seq, "retry of {id}");
        assert_eq!(answer.body["events"][0]["duplicate"], true, "retry of {id}");
    }

    // Every acknowledged event that retention still keeps is stored once, at the seq it was
    // acknowledged with; every seq up to the head was handed out once, to an acknowledged event.
    let mut stored: HashMap<String, u64> = HashMap::new();
    let mut firsts = Vec::new();
    for c in 0..2 {
        let channel = format!("{channel_prefix}.c{c}");
        let (first, events) = retained(&bus, &token, &channel).await;
        let in_channel = acknowledged
            .keys()
            .filter(|id| channel_of(id) == channel)
            .count() as u64;
        let head = events.keys().last().copied().unwrap_or(0);
        assert_eq!(
            head, in_channel,
            "{channel}: one seq per acknowledged event"
        );
        firsts.push(first);
        for (seq, id) in events {
            assert!(
                stored.insert(id.clone(), seq).is_none(),
                "{id} is stored twice"
            );
        }
    }
    for (id, seq) in &acknowledged {
        let first = firsts[if channel_of(id).ends_with("c0") { 0 } else { 1 }];
        if *seq >= first {
            assert_eq!(
                stored.get(id),
                Some(seq),
                "acknowledged event {id} is missing or moved"
            );
        }
    }
    let (_, keep) = retained(&bus, &token, "keep").await;
    assert_eq!(keep.into_values().collect::<Vec<_>>(), ["keep-1"]);
    cluster.stop().await;
}

#[tokio::test]
async fn a_store_killed_under_load_loses_nothing_acknowledged() {
    kill_the_store_under_load(
        "durable",
        // Checkpoint the index every few KiB and roll segments often, so restarts load
        // checkpoints that a kill left behind the log and scan the tail after them.
        4,
        &[
            ("EVENTBUS_STORE_CHECKPOINT_BYTES", "8192"),
            ("EVENTBUS_STORE_SEGMENT_BYTES", "65536"),
        ],
    )
    .await;
}

/// Ingest combines concurrent small appends into one gRPC call: a kill in the middle of such a
/// call leaves every caller in it with an unknown outcome, and their retries (same ids) must store
/// each event once, at one seq, whatever part of the call was durable.
#[tokio::test]
async fn a_store_killed_during_combined_appends_stores_each_event_once() {
    kill_the_store_under_load("combined", 32, &[]).await;
}

#[tokio::test]
async fn a_store_killed_while_retention_deletes_segments_loses_nothing_it_keeps() {
    kill_the_store_under_load(
        "tmp",
        4,
        // Small segments, a pass every second keeping 60 events a channel: segments die between
        // most kills, while the first one stays for `keep`'s event. No checkpoint (kills leave
        // none), so every start scans the whole log across the holes retention left.
        &[
            ("EVENTBUS_STORE_SEGMENT_BYTES", "8192"),
            ("EVENTBUS_STORE_RETENTION", "tmp.>:max_events=60"),
            ("EVENTBUS_STORE_RETENTION_INTERVAL_S", "1"),
        ],
    )
    .await;
}

fn segments(data: &Path) -> Vec<u32> {
    let mut found: Vec<u32> = std::fs::read_dir(data)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    found.sort_unstable();
    found
}

/// Issue 11's reproduction: one event to `keep` and five to `tmp.x` share the first segment;
/// `tmp.x` then fills several segments alone, retention deletes them (the first stays for `keep`),
/// and the store is killed. It used to refuse to start ("channel tmp.x jumps from seq 5 to …"),
/// or to cut every acknowledged record after the jump when it fell in the newest segment.
#[tokio::test]
async fn a_store_killed_after_retention_deleted_the_middle_of_the_log_starts_with_everything() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let data = dir.path().join("store");
    let mut store = store(
        port,
        &nats,
        &data,
        &[
            ("EVENTBUS_STORE_SEGMENT_BYTES", "65536"),
            ("EVENTBUS_STORE_RETENTION", "tmp.>:max_events=1"),
            ("EVENTBUS_STORE_RETENTION_INTERVAL_S", "1"),
        ],
    )
    .await;
    let cluster = Cluster::start_with_store(Some(format!("http://127.0.0.1:{port}"))).await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;
    let publish = |body: Value| {
        let bus = bus.clone();
        let token = token.clone();
        async move {
            let answer = bus.api.publish(&token, &body).await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            answer.body
        }
    };
    publish(json!({"id": "keep-0", "channel": "keep", "type": "t"})).await;
    for i in 0..5 {
        publish(json!({"id": format!("x-{i}"), "channel": "tmp.x", "type": "t"})).await;
    }
    let big = "x".repeat(2000);
    for batch in 0..15 {
        let events: Vec<Value> = (0..20)
            .map(|i| {
                let n = 5 + batch * 20 + i;
                json!({"id": format!("x-{n}"), "channel": "tmp.x", "type": "t", "data": big})
            })
            .collect();
        publish(Value::Array(events)).await;
    }
    for i in 1..=20 {
        publish(json!({"id": format!("keep-{i}"), "channel": "keep", "type": "t"})).await;
    }
    // Retention may already be deleting them (a pass a second): count what was made, not what
    // is left.
    let before = segments(&data);
    assert!(
        before.last().is_some_and(|last| *last >= 8),
        "tmp.x filled several segments: {before:?}"
    );
    eventually("retention to delete the middle segments", || {
        let now = segments(&data);
        async move { (now.first() == Some(&0) && !now.contains(&1)).then_some(()) }
    })
    .await;

    // kill -9, and the store must come back: Process::restart waits for /healthz.
    store.restart().await;
    let (first, events) = retained(&bus, &token, "tmp.x").await;
    assert_eq!(events.keys().last(), Some(&305), "tmp.x keeps its head");
    assert!(
        first > 5,
        "tmp.x's let-go history stays let go (first {first})"
    );
    let (keep_first, keep) = retained(&bus, &token, "keep").await;
    assert_eq!(keep_first, 1);
    assert_eq!(
        keep.values().cloned().collect::<Vec<_>>(),
        (0..=20).map(|i| format!("keep-{i}")).collect::<Vec<_>>(),
        "every event of keep is there, in order"
    );
    // Nothing is handed out twice: new events continue both channels, and a retry of an event
    // that retention let go is still a duplicate.
    let next = publish(json!({"id": "x-new", "channel": "tmp.x", "type": "t"})).await;
    assert_eq!(next["events"][0]["seq"], 306);
    let next = publish(json!({"id": "keep-new", "channel": "keep", "type": "t"})).await;
    assert_eq!(next["events"][0]["seq"], 22);
    let retry = publish(json!({"id": "x-7", "channel": "tmp.x", "type": "t"})).await;
    assert_eq!(retry["events"][0]["seq"], 8);
    assert_eq!(retry["events"][0]["duplicate"], true);
    cluster.stop().await;
}

/// A store that stops answering after it received an append (SIGSTOP: a stalled machine, its
/// sockets open): ingest answers 503 saying the outcome is unknown, and once the store goes on
/// (SIGCONT) a retry with the same id is answered as a duplicate. The event is stored once.
#[tokio::test]
async fn a_store_paused_past_the_timeout_makes_the_outcome_unknown_and_a_retry_safe() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (store_port, auth_port, ingest_port) = (free_port(), free_port(), free_port());
    let store_url = format!("http://127.0.0.1:{store_port}");
    let auth_url = format!("http://127.0.0.1:{auth_port}");
    let store = store(store_port, &nats, &dir.path().join("store"), &[]).await;
    let api_keys = format!(
        "{}:{}",
        eventbus_testkit::cluster::API_KEY_NAME,
        eventbus_testkit::cluster::API_KEY_SECRET
    );
    let auth_listen = format!("127.0.0.1:{auth_port}");
    let _auth = Process::start(
        EVENTBUS,
        &["auth"],
        &[
            ("EVENTBUS_AUTH_LISTEN", &auth_listen),
            (
                "EVENTBUS_AUTH_KEYS_DIR",
                dir.path().join("auth").to_str().expect("path"),
            ),
            ("EVENTBUS_API_KEYS", &api_keys),
        ],
        auth_port,
    )
    .await;
    let ingest_listen = format!("127.0.0.1:{ingest_port}");
    let _ingest = Process::start(
        EVENTBUS,
        &["ingest"],
        &[
            ("EVENTBUS_INGEST_LISTEN", &ingest_listen),
            ("EVENTBUS_STORE_URL", &store_url),
            ("EVENTBUS_AUTH_URL", &auth_url),
            ("EVENTBUS_STORE_TIMEOUT_MS", "1000"),
        ],
        ingest_port,
    )
    .await;
    let api = Http::new(&format!("http://127.0.0.1:{ingest_port}"));
    let token = Http::new(&auth_url)
        .token(Some(eventbus_testkit::cluster::API_KEY_SECRET), json!({}))
        .await;
    let event = |id: &str| json!({"id": id, "channel": "paused", "type": "t"});
    assert_eq!(api.publish(&token, &event("before")).await.status, 200);

    store.signal("STOP");
    let answer = api.publish(&token, &event("in-doubt")).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.body["outcome"], "unknown", "{}", answer.body);
    let detail = answer.body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("same ids"),
        "the problem says to retry with the same id: {detail}"
    );
    store.signal("CONT");

    // The append the store received before it froze goes through once it runs again.
    eventually("the paused append to land", || {
        let (api, token) = (api.clone(), token.clone());
        async move {
            let page = api.history(&token, "paused", "after=0").await;
            (page.body["head"] == 2).then_some(())
        }
    })
    .await;
    let retry = api.publish(&token, &event("in-doubt")).await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.body["events"][0]["seq"], 2);
    assert_eq!(retry.body["events"][0]["duplicate"], true);
    let page = api.history(&token, "paused", "after=0").await;
    let ids: Vec<&str> = page.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["before", "in-doubt"], "stored once");
}

/// A subscription reading a long history in pages while the store (its own process) is killed
/// between two pages: the connection says so with close 1013 (the log is unreachable during
/// catch-up) after the events it had, in order; once the store is back, a resume with `after`
/// gives the rest, each once, in order.
#[tokio::test]
async fn a_store_killed_between_two_catch_up_pages_ends_in_1013_and_a_resume_gets_the_rest() {
    const BATCHES: u64 = 20;
    const PER_BATCH: u64 = 1000;
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store_port = free_port();
    let data = dir.path().join("store");
    let mut store = store(store_port, &nats, &data, &[]).await;
    let cluster = Cluster::start_with_store(Some(format!("http://127.0.0.1:{store_port}"))).await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;
    // 20 pages of history, 1 KiB each event: far more than the socket buffers hold, so that the
    // connection is still reading pages from the store while the client has seen only the first.
    let pad = "x".repeat(1024);
    for batch in 0..BATCHES {
        let events: Vec<Value> = (0..PER_BATCH)
            .map(|i| json!({"id": format!("e{batch}-{i}"), "channel": "pages", "type": "t", "data": {"pad": pad}}))
            .collect();
        let answer = bus.api.publish(&token, &Value::Array(events)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }

    let (mut ws, _) = eventbus_testkit::ws::Ws::hello(&bus.ws, &token).await;
    ws.subscribe(json!({"channel": "pages", "after": 0})).await;
    let first = ws.recv_op("event").await;
    assert_eq!(first["event"]["seq"], 1);
    // The client has read one event: the connection is blocked writing an early page.
    store.kill();
    let mut seqs = vec![1];
    let ending = loop {
        match ws.next().await {
            Ok(frame) if frame["op"] == "event" => {
                seqs.push(frame["event"]["seq"].as_u64().expect("seq"));
            }
            Ok(_) => {}
            Err(closed) => break closed,
        }
    };
    assert_eq!(
        ending,
        eventbus_testkit::ws::Closed::Code(1013),
        "after {} events",
        seqs.len()
    );
    let last = *seqs.last().expect("one at least");
    assert!(
        last < BATCHES * PER_BATCH,
        "the kill landed before the last page"
    );
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "in order, each once, up to the close"
    );

    // The store back: a resume from the last seq seen gives exactly the rest.
    store.restart().await;
    let rest = eventually("a resume once the store is back", || {
        let bus = bus.clone();
        let token = token.clone();
        async move {
            let (mut ws, _) = eventbus_testkit::ws::Ws::hello(&bus.ws, &token).await;
            ws.send(json!({"op": "subscribe", "channel": "pages", "after": last}))
                .await;
            let answer = ws.recv().await;
            (answer["op"] == "subscribed").then_some(ws)
        }
    })
    .await;
    let mut ws = rest;
    let events = ws.events((BATCHES * PER_BATCH - last) as usize).await;
    let resumed: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        resumed,
        (last + 1..=BATCHES * PER_BATCH).collect::<Vec<_>>()
    );
    cluster.stop().await;
}
