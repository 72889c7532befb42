//! Durable queue groups over WebSocket: members on two gateways share a group's events; a member
//! whose connection dies (the worker killed) gives back what it held at once, a gateway killed
//! with -9 leaves its members' events to come back after the visibility timeout. Every event is
//! handled, and only events a dead worker held can be handled twice. The store (which dispatches)
//! killed with -9 under load: members ride it out, nothing acknowledged is left unhandled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_testkit::process::Process;
use eventbus_testkit::ws::Ws;
use eventbus_testkit::{Cluster, eventually, free_port};
use serde_json::{Value, json};

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");
const EVENTS: u64 = 600;

#[derive(Default)]
struct Worker {
    /// The events (their data) received, in order.
    received: Vec<u64>,
    acked: BTreeSet<u64>,
}

type Shared = Arc<Mutex<Worker>>;

/// A worker: joins the group, handles each event (records it) and says done, every `batch`
/// events (the ones in between are held unacknowledged), until its connection ends.
async fn worker(url: String, token: String, batch: usize, shared: Shared) {
    let (mut ws, _) = Ws::hello(&url, &token).await;
    ws.subscribe(json!({"channel": "tasks.*", "group": "crunch", "durable": true, "visibility_ms": 1000, "prefetch": 20}))
        .await;
    let mut pending: Vec<(String, u64, u64)> = Vec::new();
    loop {
        let frame = match ws.next().await {
            Ok(frame) => frame,
            Err(eventbus_testkit::ws::Closed::TimedOut) => continue,
            Err(_) => return,
        };
        if frame["op"] != "event" {
            continue;
        }
        assert_eq!(frame["group"], "crunch", "{frame}");
        assert!(frame["delivery"].as_u64().expect("delivery") >= 1);
        let event = &frame["event"];
        let n = event["data"].as_u64().expect("n");
        shared.lock().expect("lock").received.push(n);
        pending.push((
            event["channel"].as_str().expect("channel").to_owned(),
            event["seq"].as_u64().expect("seq"),
            n,
        ));
        if pending.len() >= batch {
            for (channel, seq, n) in pending.drain(..) {
                ws.send(json!({"op": "done", "group": "crunch", "channel": channel, "seq": seq}))
                    .await;
                shared.lock().expect("lock").acked.insert(n);
            }
        }
    }
}

fn handled(workers: &[&Shared]) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for w in workers {
        for n in &w.lock().expect("lock").received {
            *counts.entry(*n).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_on_two_gateways_share_the_work_across_a_killed_worker_and_a_killed_gateway() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let nats = cluster.nats.url();
    let mut second = Process::start(
        EVENTBUS,
        &["gateway"],
        &[
            ("EVENTBUS_GATEWAY_LISTEN", listen.as_str()),
            ("EVENTBUS_NATS_URL", nats.as_str()),
            ("EVENTBUS_STORE_URL", cluster.store_url.as_str()),
            ("EVENTBUS_AUTH_URL", cluster.auth_url.as_str()),
            (
                "EVENTBUS_INTERNAL_TOKEN",
                eventbus_testkit::cluster::INTERNAL_TOKEN,
            ),
        ],
        port,
    )
    .await;
    let second_ws = format!("ws://{listen}/v1/ws");
    let (a, b, c, d): (Shared, Shared, Shared, Shared) = Default::default();
    // a and b on the first gateway; c on the second (killed -9 later); d on the first, killed.
    let tasks = [
        tokio::spawn(worker(bus.ws.clone(), token.clone(), 1, a.clone())),
        tokio::spawn(worker(bus.ws.clone(), token.clone(), 1, b.clone())),
        tokio::spawn(worker(second_ws, token.clone(), 1, c.clone())),
    ];
    let d_task = tokio::spawn(worker(bus.ws.clone(), token.clone(), 10, d.clone()));
    // The members have joined once each of them holds the group's interest: publish after.
    eventually("the group to exist", || async {
        let shown = bus
            .api
            .send(bus.api.get("/v1/groups/crunch").bearer_auth(&token))
            .await;
        (shown.status == 200).then_some(())
    })
    .await;

    let publisher = tokio::spawn({
        let (api, token) = (bus.api.clone(), token.clone());
        async move {
            for chunk in 0..EVENTS / 20 {
                let events: Vec<Value> = (0..20)
                    .map(|i| {
                        let n = chunk * 20 + i;
                        json!({"channel": format!("tasks.{}", n % 4), "type": "task", "data": n})
                    })
                    .collect();
                assert_eq!(api.publish(&token, &Value::Array(events)).await.status, 200);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    eventually("d to be in the middle of its work", || async {
        (d.lock().expect("lock").received.len() >= 25).then_some(())
    })
    .await;
    // The worker killed: its connection drops with events held and not done.
    d_task.abort();
    let _ = d_task.await;
    eventually("c to be in the middle of its work", || async {
        (c.lock().expect("lock").received.len() >= 25).then_some(())
    })
    .await;
    second.kill();
    publisher.await.expect("publisher");

    let all = [&a, &b, &c, &d];
    eventually("every event handled", || async {
        (handled(&all).len() as u64 == EVENTS).then_some(())
    })
    .await;
    eventually("the group to drain", || async {
        let shown = bus
            .api
            .send(bus.api.get("/v1/groups/crunch").bearer_auth(&token))
            .await;
        (shown.body["backlog"] == 0 && shown.body["in_flight"] == 0).then_some(())
    })
    .await;
    // Twice only what a dead worker held: d's received and not done, anything c received (its
    // gateway died before passing on its dones, or before handing them to the store).
    let d_held: BTreeSet<u64> = {
        let d = d.lock().expect("lock");
        d.received
            .iter()
            .copied()
            .filter(|n| !d.acked.contains(n))
            .collect()
    };
    let c_received: BTreeSet<u64> = c.lock().expect("lock").received.iter().copied().collect();
    for (n, count) in handled(&all) {
        if count > 1 {
            assert!(
                d_held.contains(&n) || c_received.contains(&n),
                "event {n} handled {count} times, yet no dead worker held it"
            );
        }
    }
    for worker in [&a, &b] {
        let w = worker.lock().expect("lock");
        assert_eq!(
            w.received.len(),
            w.acked.len(),
            "a live worker finished all it got"
        );
    }
    for task in tasks {
        task.abort();
    }
    cluster.stop().await;
}

#[tokio::test]
async fn a_durable_subscription_says_what_is_wrong() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;
    let client = bus
        .auth
        .client_token(&token, "alice", &["tasks.*"], &[])
        .await;
    let (mut ws, _) = Ws::hello(&bus.ws, &client).await;
    ws.send(json!({"op": "subscribe", "channel": "tasks.a", "group": "g", "durable": true}))
        .await;
    assert_eq!(ws.recv_op("error").await["code"], "group_not_allowed");
    let (mut ws, _) = Ws::hello(&bus.ws, &token).await;
    for (frame, code) in [
        (
            json!({"op": "subscribe", "channel": "tasks.*", "durable": true}),
            "invalid_frame",
        ),
        (
            json!({"op": "subscribe", "channel": "tasks.*", "group": "g", "durable": true, "after": 3}),
            "invalid_frame",
        ),
        (
            json!({"op": "subscribe", "channel": "tasks.*", "group": "bad.name", "durable": true}),
            "invalid_frame",
        ),
        (
            json!({"op": "subscribe", "channel": "tasks.*", "group": "g", "durable": true, "prefetch": "ten"}),
            "invalid_frame",
        ),
        (
            json!({"op": "done", "channel": "tasks.a", "seq": 1}),
            "not_subscribed",
        ),
        (
            json!({"op": "done", "channel": "tasks.a", "seq": 1, "seqs": [2]}),
            "invalid_frame",
        ),
        (
            json!({"op": "done", "channel": "tasks.a", "seqs": []}),
            "invalid_frame",
        ),
    ] {
        ws.send(frame.clone()).await;
        let error = ws.recv_op("error").await;
        assert_eq!(error["code"], code, "{frame} → {error}");
    }
    let subscribed = ws
        .subscribe(json!({"channel": "tasks.*", "group": "g", "durable": true}))
        .await;
    assert_eq!(
        (
            subscribed["group"].as_str(),
            subscribed["durable"].as_bool()
        ),
        (Some("g"), Some(true))
    );
    // The same group over another pattern, from another connection.
    let (mut other, _) = Ws::hello(&bus.ws, &token).await;
    other
        .send(json!({"op": "subscribe", "channel": "jobs", "group": "g", "durable": true}))
        .await;
    assert_eq!(other.recv_op("error").await["code"], "group_mismatch");
    // A service whose grant covers one channel of the group: it can neither join over the
    // group's pattern nor over its own channel, nor say done for a channel beyond its grant.
    let narrow = bus
        .auth
        .token(
            Some(eventbus_testkit::cluster::API_KEY_SECRET),
            json!({"subscribe": ["tasks.a"], "publish": []}),
        )
        .await;
    let (mut narrow_ws, _) = Ws::hello(&bus.ws, &narrow).await;
    for (frame, code) in [
        (
            json!({"op": "subscribe", "channel": "tasks.*", "group": "g", "durable": true}),
            "forbidden",
        ),
        (
            json!({"op": "subscribe", "channel": "tasks.a", "group": "g", "durable": true}),
            "group_mismatch",
        ),
    ] {
        narrow_ws.send(frame.clone()).await;
        let error = narrow_ws.recv_op("error").await;
        assert_eq!(error["code"], code, "{frame} → {error}");
    }
    narrow_ws
        .subscribe(json!({"channel": "tasks.a", "group": "mine", "durable": true}))
        .await;
    narrow_ws
        .send(json!({"op": "done", "group": "mine", "channel": "tasks.b", "seq": 1}))
        .await;
    assert_eq!(narrow_ws.recv_op("error").await["code"], "forbidden");
    // An event and its done: the group is drained.
    let published = bus
        .api
        .publish(
            &token,
            &json!({"channel": "tasks.a", "type": "task", "data": 1}),
        )
        .await;
    assert_eq!(published.status, 200);
    let frame = ws.recv_op("event").await;
    assert_eq!(
        (frame["delivery"].as_u64(), frame["event"]["data"].as_u64()),
        (Some(1), Some(1))
    );
    let second = bus
        .api
        .publish(
            &token,
            &json!({"channel": "tasks.a", "type": "task", "data": 2}),
        )
        .await;
    assert_eq!(second.status, 200);
    let next = ws.recv_op("event").await;
    // Both at once.
    ws.send(json!({"op": "done", "channel": "tasks.a", "seqs": [frame["event"]["seq"], next["event"]["seq"]]}))
        .await;
    eventually("the done to count", || async {
        let shown = bus
            .api
            .send(bus.api.get("/v1/groups/g").bearer_auth(&token))
            .await;
        (shown.body["backlog"] == 0 && shown.body["in_flight"] == 0).then_some(())
    })
    .await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_members_ride_out_store_restarts_under_load() {
    let nats = eventbus_testkit::NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let nats_url = nats.url();
    let data = dir.path().join("store");
    let mut store = Process::start(
        EVENTBUS,
        &["store"],
        &[
            ("EVENTBUS_STORE_LISTEN", listen.as_str()),
            ("EVENTBUS_NATS_URL", nats_url.as_str()),
            ("EVENTBUS_STORE_DATA", data.to_str().expect("path")),
        ],
        port,
    )
    .await;
    let cluster = Cluster::start_with_store(Some(format!("http://{listen}"))).await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;
    let (a, b): (Shared, Shared) = Default::default();
    let workers = [
        tokio::spawn(worker(bus.ws.clone(), token.clone(), 1, a.clone())),
        tokio::spawn(worker(bus.ws.clone(), token.clone(), 1, b.clone())),
    ];
    eventually("the group to exist", || async {
        let shown = bus
            .api
            .send(bus.api.get("/v1/groups/crunch").bearer_auth(&token))
            .await;
        (shown.status == 200).then_some(())
    })
    .await;
    // Published one by one with retries (a 503 while the store is down is not an acknowledgement).
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let publisher = tokio::spawn({
        let (api, token, acked) = (bus.api.clone(), token.clone(), acked.clone());
        async move {
            for n in 0..300u64 {
                let event = json!({"id": format!("e{n}"), "channel": format!("tasks.{}", n % 3), "type": "task", "data": n});
                loop {
                    let sent = api
                        .post("/v1/events")
                        .bearer_auth(&token)
                        .json(&event)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    if sent.is_ok_and(|r| r.status() == 200) {
                        acked.lock().expect("lock").insert(n);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    for kill in 1..=2 {
        eventually("the workers to make progress", || async {
            (handled(&[&a, &b]).len() >= kill * 100).then_some(())
        })
        .await;
        store.restart().await;
    }
    publisher.await.expect("publisher");
    eventually("every acknowledged event handled", || async {
        let acked = acked.lock().expect("lock").clone();
        let handled: BTreeSet<u64> = handled(&[&a, &b]).into_keys().collect();
        (acked.len() == 300 && acked.is_subset(&handled)).then_some(())
    })
    .await;
    eventually("the group to drain", || async {
        let shown = bus
            .api
            .send(bus.api.get("/v1/groups/crunch").bearer_auth(&token))
            .await;
        (shown.status == 200 && shown.body["backlog"] == 0 && shown.body["in_flight"] == 0)
            .then_some(())
    })
    .await;
    for worker in workers {
        worker.abort();
    }
    cluster.stop().await;
}
