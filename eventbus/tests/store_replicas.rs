//! The store on PostgreSQL, as several replicas of one log: both append to the same channels at
//! once (seqs contiguous, nothing twice, a retry sent to the other replica answered as a
//! duplicate); each publishes what it committed, so NATS carries one channel's events out of
//! order, and subscribers still get every event once, in order; a replica killed with -9 under
//! load loses nothing acknowledged; and the database failing over to its synchronous standby
//! loses nothing acknowledged either, while publishes in between are refused (503, only that)
//! and succeed when retried with the same id. A durable group is served through either replica,
//! and when the replica serving it is killed the other takes over from its saved state: every
//! event done, none saved as done handed out again; and across the database failing over to its
//! standby, the group goes on and every event is done.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use eventbus_model::{Accepted, Limits, parse_event};
use eventbus_runtime::internal::Credential;
use eventbus_store_client::StoreClient;
use eventbus_testkit::cluster::INTERNAL_TOKEN;
use eventbus_testkit::load::{self, publisher, retained};
use eventbus_testkit::postgres::Postgres;
use eventbus_testkit::process::Process;
use eventbus_testkit::ws::Ws;
use eventbus_testkit::{Cluster, NatsServer, eventually, free_port};
use serde_json::json;

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");

fn client(url: &str) -> StoreClient {
    StoreClient::new(
        url,
        Credential::new(INTERNAL_TOKEN).expect("credential"),
        &Default::default(),
    )
    .expect("store client")
}

fn event(channel: &str, id: &str) -> Accepted {
    parse_event(
        json!({"id": id, "channel": channel, "type": "t"})
            .to_string()
            .as_bytes(),
        "svc",
        &Limits::default(),
    )
    .expect("valid event")
}

async fn until_serving(store: &StoreClient) {
    eventually("the store replica to serve", || async {
        store.head("orders").await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn two_replicas_append_to_one_channel_and_subscribers_get_each_event_once_in_order() {
    let mut cluster = Cluster::start_on_postgres().await;
    let second = cluster.add_store().await;
    let (a, b) = (client(&cluster.store_url), client(&second));
    until_serving(&a).await;
    until_serving(&b).await;
    let token = cluster.endpoints.service_token().await;
    let (mut ws, _) = Ws::hello(&cluster.endpoints.ws, &token).await;
    ws.subscribe(json!({"channel": "orders", "after": 0})).await;

    // Both replicas append to the same channel at once, single events and batches.
    let appender = |store: StoreClient, name: &'static str| async move {
        let mut seqs = Vec::new();
        for i in 0..60 {
            let batch: Vec<Accepted> = (0..1 + i % 3)
                .map(|j| event("orders", &format!("{name}-{i}-{j}")))
                .collect();
            for appended in store.append(batch).await.expect("append") {
                assert!(!appended.duplicate);
                seqs.push(appended.seq);
            }
        }
        seqs
    };
    let (from_a, from_b) = tokio::join!(appender(a.clone(), "a"), appender(b.clone(), "b"));
    let mut all: Vec<u64> = from_a.iter().chain(&from_b).copied().collect();
    all.sort_unstable();
    let n = all.len() as u64;
    assert_eq!(all, (1..=n).collect::<Vec<_>>(), "contiguous, none twice");

    // A retry sent to the other replica is the same event.
    let first = a
        .append(vec![event("orders", "retried")])
        .await
        .expect("append");
    let again = b
        .append(vec![event("orders", "retried")])
        .await
        .expect("append");
    assert_eq!((again[0].seq, again[0].duplicate), (first[0].seq, true));
    // The same id sent to both at the same moment is stored once.
    for i in 0..20 {
        let id = format!("both-{i}");
        let (x, y) = tokio::join!(
            a.append(vec![event("orders", &id)]),
            b.append(vec![event("orders", &id)])
        );
        let (x, y) = (&x.expect("append")[0], &y.expect("append")[0]);
        assert_eq!(x.seq, y.seq, "{id}");
        assert!(
            x.duplicate != y.duplicate,
            "{id}: one stored, one duplicate"
        );
    }
    let head = n + 21;
    assert_eq!(a.head("orders").await.expect("head"), head);

    // Two replicas published one channel's events to NATS in whatever order they committed:
    // the subscriber still gets 1..head, once each, in order.
    let events = ws.events(head as usize).await;
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>());
    cluster.stop().await;
}

async fn store_process(port: u16, nats: &NatsServer, data: &Path, url: &str) -> Process {
    let listen = format!("127.0.0.1:{port}");
    Process::start(
        EVENTBUS,
        &["store"],
        &[
            ("EVENTBUS_STORE_LISTEN", &listen),
            ("EVENTBUS_NATS_URL", &nats.url()),
            ("EVENTBUS_STORE_DATA", data.to_str().expect("path")),
            ("EVENTBUS_STORE_POSTGRES", url),
        ],
        port,
    )
    .await
}

/// Every acknowledged (id, seq) is stored once at its seq, and nothing else is stored.
async fn every_acknowledged_event_once(
    cluster: &Cluster,
    token: &str,
    channels: &[String],
    acknowledged: &BTreeMap<String, u64>,
    channel_of: impl Fn(&str) -> String,
) {
    let mut stored: HashMap<String, u64> = HashMap::new();
    for channel in channels {
        let (first, events) = retained(&cluster.endpoints, token, channel).await;
        assert_eq!(first, 1, "{channel}: nothing retention could explain");
        for (seq, id) in events {
            assert!(
                stored.insert(id.clone(), seq).is_none(),
                "{id} stored twice"
            );
        }
    }
    for (id, seq) in acknowledged {
        assert_eq!(
            stored.get(id),
            Some(seq),
            "{id} acknowledged at {seq} in {}",
            channel_of(id)
        );
    }
    assert_eq!(
        stored.len(),
        acknowledged.len(),
        "nothing unacknowledged stored"
    );
}

#[tokio::test]
async fn a_replica_killed_under_load_loses_nothing_acknowledged() {
    let postgres = Postgres::primary().await;
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (port_a, port_b) = (free_port(), free_port());
    let mut replica_a = store_process(port_a, &nats, &dir.path().join("a"), &postgres.url()).await;
    let _replica_b = store_process(port_b, &nats, &dir.path().join("b"), &postgres.url()).await;
    let cluster = Cluster::start_with_store(Some(format!("http://127.0.0.1:{port_a}"))).await;
    let token = cluster.endpoints.service_token().await;

    // Publishers through ingest (to replica a, which is killed) and straight to replica b, on
    // the same two channels.
    let progress = load::Shared::default();
    let mut publishers = Vec::new();
    for p in 0..4 {
        publishers.push(tokio::spawn(publisher(
            cluster.endpoints.api.clone(),
            token.clone(),
            format!("p{p}"),
            format!("load.c{}", p % 2),
            150,
            progress.clone(),
        )));
    }
    let direct = client(&format!("http://127.0.0.1:{port_b}"));
    let beside = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..200 {
            let id = format!("q-{i}");
            let appended = direct
                .append(vec![event(&format!("load.c{}", i % 2), &id)])
                .await
                .expect("replica b stays up");
            acked.push((id, appended[0].seq));
        }
        acked
    });
    for cycle in 1..=3 {
        let target = cycle * 600 / 4;
        eventually("publishers to make progress", || {
            let count = load::acked(&progress);
            async move { (count >= target).then_some(()) }
        })
        .await;
        replica_a.restart().await;
    }
    let mut acknowledged = BTreeMap::new();
    for publisher in publishers {
        for (id, seq) in publisher.await.expect("publisher") {
            assert!(acknowledged.insert(id, seq).is_none());
        }
    }
    for (id, seq) in beside.await.expect("direct appends") {
        assert!(acknowledged.insert(id, seq).is_none());
    }
    let channels: Vec<String> = (0..2).map(|c| format!("load.c{c}")).collect();
    every_acknowledged_event_once(&cluster, &token, &channels, &acknowledged, |id| {
        id.to_owned()
    })
    .await;
    cluster.stop().await;
}

#[tokio::test]
async fn failover_to_the_synchronous_standby_loses_nothing_acknowledged() {
    let mut primary = Postgres::primary().await;
    let standby = Postgres::standby(&primary, true).await;
    let url = format!(
        "postgres://{}@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write&connect_timeout=2",
        eventbus_testkit::postgres::USER,
        primary.port,
        standby.port
    );
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let _store = store_process(port, &nats, &dir.path().join("store"), &url).await;
    let cluster = Cluster::start_with_store(Some(format!("http://127.0.0.1:{port}"))).await;
    let token = cluster.endpoints.service_token().await;

    let progress = load::Shared::default();
    let mut publishers = Vec::new();
    for p in 0..4 {
        publishers.push(tokio::spawn(publisher(
            cluster.endpoints.api.clone(),
            token.clone(),
            format!("p{p}"),
            format!("ha.c{}", p % 2),
            200,
            progress.clone(),
        )));
    }
    eventually("publishers to make progress", || {
        let count = load::acked(&progress);
        async move { (count >= 300).then_some(()) }
    })
    .await;
    // The primary dies mid-load; the operator (or the operator's operator) promotes the standby.
    primary.kill();
    let acked_at_kill = load::acked(&progress);
    standby.promote().await;
    let mut acknowledged = BTreeMap::new();
    for publisher in publishers {
        for (id, seq) in publisher.await.expect("publisher") {
            assert!(acknowledged.insert(id, seq).is_none());
        }
    }
    assert_eq!(acknowledged.len(), 800);
    let channels: Vec<String> = (0..2).map(|c| format!("ha.c{c}")).collect();
    every_acknowledged_event_once(&cluster, &token, &channels, &acknowledged, |id| {
        id.to_owned()
    })
    .await;
    let seen = std::mem::take(&mut *progress.lock().expect("lock"));
    // Events were acknowledged after the kill: by the promoted standby, the old primary being
    // dead. Whether a publish met the switch (503) depends on timing: when the promotion is
    // quicker than the next append, none does.
    assert!(acked_at_kill < 800, "the kill happened under load");
    assert!(
        seen.refused.keys().all(|status| *status == 503),
        "only 503 while the database switches: {seen:?}"
    );
    cluster.stop().await;
}

/// One worker of a durable group, fetching and finishing events through `stores` (its
/// preferred replica first, the other when that one is away) until `all` are done; what it was
/// handed, in order.
async fn group_worker(
    stores: [StoreClient; 2],
    name: String,
    done_by_all: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<(String, u64)>>>,
    all: usize,
) -> Vec<(String, u64)> {
    use eventbus_store_client::GroupSettings;
    let settings = GroupSettings {
        visibility_ms: Some(5_000),
        ..Default::default()
    };
    let mut handed = Vec::new();
    let mut turn = 0usize;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let finished = done_by_all.lock().expect("lock").len();
        if finished == all {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: events left undone: {finished} of {all} done"
        );
        let store = &stores[turn % 2];
        let fetched = store
            .group_fetch(
                "work",
                "jobs.*",
                &name,
                10,
                std::time::Duration::from_millis(500),
                settings,
            )
            .await;
        let events = match fetched {
            Ok(events) => events,
            // The replica is away or the groups' leadership is moving: the other, or later.
            Err(_) => {
                turn += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let positions: Vec<(String, u64)> =
            events.iter().map(|e| (e.channel.clone(), e.seq)).collect();
        if positions.is_empty() {
            continue;
        }
        handed.extend(positions.iter().cloned());
        // Done through whichever replica answers, until one does: a done the killed leader
        // saved before its answer was lost is never handed out again, so it must be retried
        // (done is idempotent) rather than waited for.
        while stores[turn % 2]
            .group_done("work", Some("jobs.*"), &positions)
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: no replica takes a done"
            );
            turn += 1;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        done_by_all.lock().expect("lock").extend(positions);
    }
    handed
}

/// The events group `work`'s saved state counts done.
fn saved_done(postgres: &Postgres) -> std::collections::BTreeSet<(String, u64)> {
    let text =
        postgres.sql("SELECT convert_from(state, 'UTF8') FROM eventbus_groups WHERE name = 'work'");
    let mut done = std::collections::BTreeSet::new();
    if text.trim().is_empty() {
        return done;
    }
    let saved: serde_json::Value = serde_json::from_str(text.trim()).expect("saved state");
    for (channel, lane) in saved["lanes"].as_object().expect("lanes") {
        let position = lane["position"].as_u64().expect("position");
        done.extend((1..=position).map(|seq| (channel.clone(), seq)));
        for seq in lane["done_above"].as_array().into_iter().flatten() {
            done.insert((channel.clone(), seq.as_u64().expect("seq")));
        }
    }
    done
}

#[tokio::test]
async fn a_durable_group_is_served_across_replicas_and_survives_its_leader_killed() {
    let postgres = Postgres::primary().await;
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = [free_port(), free_port()];
    let mut replicas = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        replicas.push(
            store_process(
                *port,
                &nats,
                &dir.path().join(format!("{i}")),
                &postgres.url(),
            )
            .await,
        );
    }
    let urls = ports.map(|port| format!("http://127.0.0.1:{port}"));
    let clients = [client(&urls[0]), client(&urls[1])];
    let leader = || {
        let address = postgres.sql("SELECT address FROM eventbus_leaders WHERE role = 'groups'");
        urls.iter().position(|url| *url == address.trim())
    };
    let first_leader = eventually("a replica to lead the groups", || async { leader() }).await;
    // The group starts before the events, through the replica that does not lead it.
    eventually("the follower to pass group calls on", || {
        let follower = clients[1 - first_leader].clone();
        async move {
            follower
                .group_fetch(
                    "work",
                    "jobs.*",
                    "joiner",
                    0,
                    Default::default(),
                    Default::default(),
                )
                .await
                .ok()
        }
    })
    .await;

    let appended = |store: StoreClient, from: usize, to: usize| async move {
        let mut positions = Vec::new();
        for i in from..to {
            let stored = store
                .append(vec![event(&format!("jobs.c{}", i % 3), &format!("e{i}"))])
                .await
                .expect("append");
            positions.push((format!("jobs.c{}", i % 3), stored[0].seq));
        }
        positions
    };
    let (x, y) = tokio::join!(
        appended(clients[0].clone(), 0, 150),
        appended(clients[1].clone(), 150, 300)
    );
    let mut expected: Vec<(String, u64)> = x.into_iter().chain(y).collect();

    let done = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let total = 450;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let stores = [clients[w % 2].clone(), clients[1 - w % 2].clone()];
            tokio::spawn(group_worker(stores, format!("w{w}"), done.clone(), total))
        })
        .collect();
    eventually("the leader to have saved work done", || {
        let saved = saved_done(&postgres).len();
        async move { (saved >= 60).then_some(()) }
    })
    .await;
    // kill -9 the replica leading the groups, mid-work: the other takes over, and the killed
    // one comes back as a follower.
    replicas[first_leader].kill();
    // What the killed leader had saved: none of it may be handed out again.
    let saved_at_kill = saved_done(&postgres);
    eventually("the other replica to take the groups over", || async {
        leader().filter(|l| *l != first_leader)
    })
    .await;
    replicas[first_leader].start_again().await;
    // More events after the takeover, through the replica that was killed.
    expected.extend(appended(clients[first_leader].clone(), 300, 450).await);
    let mut handed = Vec::new();
    for worker in workers {
        handed.extend(worker.await.expect("worker"));
    }

    // Every event done, none was left out; only what the old leader held or had not yet
    // saved is handed out again.
    let done = done.lock().expect("lock").clone();
    let expected: std::collections::BTreeSet<_> = expected.into_iter().collect();
    assert_eq!(done, expected);
    let mut counts: HashMap<&(String, u64), usize> = HashMap::new();
    for position in &handed {
        *counts.entry(position).or_default() += 1;
    }
    for (position, count) in counts {
        assert!(
            count == 1 || !saved_at_kill.contains(position),
            "{position:?}, saved as done before the kill, handed out {count} times"
        );
    }
    for store in &clients {
        let groups = store.groups().await.expect("list groups");
        let work = groups.iter().find(|g| g.name == "work").expect("the group");
        assert_eq!((work.backlog, work.in_flight), (0, 0), "{work:?}");
    }
}

#[tokio::test]
async fn a_durable_group_rides_out_the_database_failing_over() {
    let mut primary = Postgres::primary().await;
    let standby = Postgres::standby(&primary, true).await;
    let url = format!(
        "postgres://{}@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write&connect_timeout=2",
        eventbus_testkit::postgres::USER,
        primary.port,
        standby.port
    );
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let _store = store_process(port, &nats, &dir.path().join("store"), &url).await;
    let store = client(&format!("http://127.0.0.1:{port}"));
    store
        .group_fetch(
            "work",
            "jobs.*",
            "joiner",
            0,
            Default::default(),
            Default::default(),
        )
        .await
        .expect("join");
    let mut expected = std::collections::BTreeSet::new();
    for i in 0..1000 {
        let channel = format!("jobs.c{}", i % 3);
        let stored = store
            .append(vec![event(&channel, &format!("e{i}"))])
            .await
            .expect("append");
        expected.insert((channel, stored[0].seq));
    }
    let done = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let stores = [store.clone(), store.clone()];
            tokio::spawn(group_worker(stores, format!("w{w}"), done.clone(), 1000))
        })
        .collect();
    eventually("the group's state to be saved with work done", || {
        let saved = Postgres::sql_at(
            &primary.url(),
            "SELECT count(*) FROM eventbus_groups WHERE name = 'work'",
        );
        let finished = done.lock().expect("lock").len();
        async move { (saved.trim() == "1" && finished >= 100).then_some(()) }
    })
    .await;
    // The database's primary dies mid-work; the standby is promoted. The group's leadership
    // (a session lock) and its saved state move with the database.
    primary.kill();
    let at_kill = done.lock().expect("lock").len();
    assert!(at_kill < 1000, "the database failed over mid-work");
    standby.promote().await;
    for worker in workers {
        worker.await.expect("worker");
    }
    assert_eq!(*done.lock().expect("lock"), expected);
    // Dones the old primary took after the group's last save there come back (at least once):
    // a worker drains them, and then nothing is left, nothing outside what was appended.
    eventually("the group to drain", || {
        let store = store.clone();
        let expected = expected.clone();
        async move {
            let again = store
                .group_fetch(
                    "work",
                    "jobs.*",
                    "drainer",
                    100,
                    std::time::Duration::from_millis(200),
                    Default::default(),
                )
                .await
                .ok()?;
            let positions: Vec<(String, u64)> =
                again.iter().map(|e| (e.channel.clone(), e.seq)).collect();
            assert!(
                positions.iter().all(|p| expected.contains(p)),
                "{positions:?}"
            );
            store
                .group_done("work", Some("jobs.*"), &positions)
                .await
                .ok()?;
            let groups = store.groups().await.ok()?;
            let work = groups.into_iter().find(|g| g.name == "work")?;
            (again.is_empty() && work.backlog == 0 && work.in_flight == 0).then_some(())
        }
    })
    .await;
}
