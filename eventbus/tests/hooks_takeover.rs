//! Webhooks without a single replica: two `eventbus hooks` processes share registrations and
//! positions kept in the store; one delivers under a lease. Killed with -9 mid-stream, it is
//! replaced by the other, and the receiver gets every event, in seq order per channel (a delivery
//! the dead one made but had not saved may come twice: at least once), none skipped. The same for a
//! WebSub subscription, which is delivered by the same machinery.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use eventbus_testkit::process::Process;
use eventbus_testkit::{Cluster, eventually, free_port};
use serde_json::{Value, json};

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");
const SECRET: &str = "webhook-secret-0123456789";

type Seen = Arc<Mutex<Vec<(String, u64)>>>;

/// A receiver on loopback recording (channel, seq) of what it is sent.
async fn receiver(seen: Seen) -> String {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                if let Ok(event) = serde_json::from_slice::<Value>(&body) {
                    let channel = event["channel"].as_str().unwrap_or("").to_owned();
                    let seq = event["seq"].as_u64().unwrap_or(0);
                    seen.lock().expect("lock").push((channel, seq));
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(axum::serve(listener, app).into_future());
    format!("http://{addr}/hook")
}

async fn hooks(cluster: &Cluster, id: &str, port: u16) -> Process {
    let listen = format!("127.0.0.1:{port}");
    Process::start(
        EVENTBUS,
        &["hooks"],
        &[
            ("EVENTBUS_HOOKS_LISTEN", &listen),
            ("EVENTBUS_HOOKS_ID", id),
            ("EVENTBUS_STORE_URL", &cluster.store_url),
            ("EVENTBUS_AUTH_URL", &cluster.auth_url),
            ("EVENTBUS_WEBHOOK_ALLOW_NETWORKS", "127.0.0.0/8"),
            ("EVENTBUS_WEBHOOK_POLL_MS", "20"),
            ("EVENTBUS_WEBSUB_CHANNELS", "orders.>"),
        ],
        port,
    )
    .await
}

/// Every (channel, seq) of `seen` in order, none skipped up to `per_channel` each, and at most
/// `twice` repeated (deliveries the killed replica made but had not saved).
fn at_least_once_in_order(seen: &[(String, u64)], per_channel: u64, twice: usize) {
    let mut by_channel: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (channel, seq) in seen {
        by_channel.entry(channel.clone()).or_default().push(*seq);
    }
    let mut distinct = 0;
    for (channel, seqs) in &by_channel {
        let mut next = 1;
        for &seq in seqs {
            // In order; a step back only to redeliver what may not have been saved.
            assert!(
                seq <= next,
                "{channel}: {seq} skipped ahead of {next}: {seqs:?}"
            );
            if seq == next {
                next += 1;
            }
        }
        assert_eq!(
            next - 1,
            per_channel,
            "{channel}: every event once at least: {seqs:?}"
        );
        distinct += per_channel as usize;
    }
    let redelivered = seen.len() - distinct;
    assert!(
        redelivered <= twice,
        "at most the in-flight events twice: {redelivered}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_takes_delivery_over_when_the_active_replica_is_killed() {
    let cluster = Cluster::start().await;
    let seen: Seen = Arc::default();
    let url = receiver(seen.clone()).await;
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = hooks(&cluster, "hooks-a", port_a).await;
    let api_a = eventbus_testkit::http::Http::new(&format!("http://127.0.0.1:{port_a}"));
    let service = cluster.endpoints.service_token().await;
    let registered = api_a
        .send(
            api_a
                .post("/v1/webhooks")
                .bearer_auth(&service)
                .json(&json!({"url": url, "channels": ["orders.*"], "secret": SECRET})),
        )
        .await;
    assert_eq!(registered.status, 201, "{}", registered.body);
    let id = registered.body["id"].as_str().expect("id").to_owned();

    // a delivers first (it has held the lease since it started), then b stands by.
    let publish = |api: eventbus_testkit::http::Http, service: String| async move {
        let events: Vec<Value> = (0..10)
            .map(|i| json!({"channel": format!("orders.{}", i % 2), "type": "placed", "data": i}))
            .collect();
        assert_eq!(
            api.publish(&service, &Value::Array(events)).await.status,
            200
        );
    };
    publish(cluster.endpoints.api.clone(), service.clone()).await;
    eventually("a to deliver", || async {
        (seen.lock().expect("lock").len() >= 10).then_some(())
    })
    .await;
    let b = hooks(&cluster, "hooks-b", port_b).await;
    // The registration is visible on b: the state is in the store, not in a's memory.
    let api_b = eventbus_testkit::http::Http::new(&format!("http://127.0.0.1:{port_b}"));
    let shown = api_b
        .send(
            api_b
                .get(&format!("/v1/webhooks/{id}"))
                .bearer_auth(&service),
        )
        .await;
    assert_eq!(shown.status, 200, "{}", shown.body);

    // Mid-stream: events keep coming while a is killed.
    let stream = tokio::spawn({
        let (api, service) = (cluster.endpoints.api.clone(), service.clone());
        async move {
            for _ in 0..20 {
                publish(api.clone(), service.clone()).await;
                // Paced, so that the kill lands while events are still coming.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    });
    eventually("a to be in the middle of the stream", || async {
        (seen.lock().expect("lock").len() >= 60).then_some(())
    })
    .await;
    a.kill();
    stream.await.expect("publisher");

    // b takes over within the lease's length and delivers the rest.
    let total = 210;
    eventually("every event to arrive after the takeover", || async {
        let seen = seen.lock().expect("lock");
        let distinct: std::collections::BTreeSet<_> = seen.iter().cloned().collect();
        (distinct.len() >= total).then_some(())
    })
    .await;
    let seen = seen.lock().expect("lock").clone();
    at_least_once_in_order(&seen, 105, 2);
    drop(b);
    cluster.stop().await;
}

/// A WebSub subscriber on loopback: it confirms every intent and records (channel, seq).
async fn websub_subscriber(seen: Seen) -> String {
    let app = axum::Router::new().route(
        "/cb",
        axum::routing::get(
            |axum::extract::Query(q): axum::extract::Query<
                std::collections::HashMap<String, String>,
            >| async move { q.get("hub.challenge").cloned().unwrap_or_default() },
        )
        .post(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                if let Ok(event) = serde_json::from_slice::<Value>(&body) {
                    let channel = event["channel"].as_str().unwrap_or("").to_owned();
                    seen.lock()
                        .expect("lock")
                        .push((channel, event["seq"].as_u64().unwrap_or(0)));
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(axum::serve(listener, app).into_future());
    format!("http://{addr}/cb")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websub_subscription_outlives_a_kill_of_the_replica_delivering_it() {
    let cluster = Cluster::start().await;
    let seen: Seen = Arc::default();
    let callback = websub_subscriber(seen.clone()).await;
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = hooks(&cluster, "hooks-a", port_a).await;
    let b = hooks(&cluster, "hooks-b", port_b).await;
    let api = cluster.endpoints.api.clone();
    let service = cluster.endpoints.service_token().await;
    let publish = {
        let (api, service) = (api.clone(), service.clone());
        move |n: u64| {
            let (api, service) = (api.clone(), service.clone());
            async move {
                let events: Vec<Value> = (0..n)
                    .map(|i| json!({"channel": "orders.web", "type": "placed", "data": i}))
                    .collect();
                assert_eq!(
                    api.publish(&service, &Value::Array(events)).await.status,
                    200
                );
            }
        }
    };
    // Verified through a (which holds the delivery lease: it started first).
    let form = format!(
        "hub.mode=subscribe&hub.topic=http%3A%2F%2Fbus%2Fv1%2Fchannels%2Forders.web%2Fevents&hub.callback={}",
        callback.replace(':', "%3A").replace('/', "%2F")
    );
    let hub = eventbus_testkit::http::Http::new(&format!("http://127.0.0.1:{port_a}"));
    let answer = hub
        .send(
            hub.post("/v1/websub")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form),
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    // The subscription starts at the head of its verification: from the first event published
    // after it (seq 1 here, as nothing came before), which is awaited.
    eventually("the first delivery", || async {
        if seen.lock().expect("lock").is_empty() {
            publish(1).await;
            return None;
        }
        Some(())
    })
    .await;
    let first = seen.lock().expect("lock")[0].1;

    // Mid-stream, a is killed; b takes the lease over and goes on from the saved position.
    let stream = tokio::spawn({
        let publish = publish.clone();
        async move {
            for _ in 0..20 {
                publish(5).await;
                // Paced, so that the kill lands while events are still coming.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    });
    eventually("a to be in the middle of the stream", || async {
        (seen.lock().expect("lock").len() >= 30).then_some(())
    })
    .await;
    a.kill();
    stream.await.expect("publisher");
    let head = api
        .history(&service, "orders.web", "after=0&limit=1")
        .await
        .body["head"]
        .as_u64()
        .expect("head");
    eventually("every event after the takeover", || async {
        let seen = seen.lock().expect("lock");
        (seen.iter().map(|(_, seq)| *seq).max() == Some(head)).then_some(())
    })
    .await;
    // Seqs before `first` were published before the subscription started: never owed.
    let seen: Vec<(String, u64)> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|(c, seq)| (c.clone(), seq - first + 1))
        .collect();
    at_least_once_in_order(&seen, head - first + 1, 2);
    drop(b);
    cluster.stop().await;
}
