//! Publishers that retry until acknowledged, and a reader of a channel's whole retained history:
//! the two halves of every "nothing acknowledged is lost" test under faults.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::Endpoints;
use crate::http::Http;

/// What the publishers of a test have seen so far.
#[derive(Debug, Default)]
pub struct Progress {
    pub acked: usize,
    /// Answers other than 200, by status.
    pub refused: BTreeMap<u16, usize>,
    /// Requests that got no answer.
    pub unanswered: usize,
}

pub type Shared = Arc<Mutex<Progress>>;

/// How many are acknowledged so far.
pub fn acked(progress: &Shared) -> usize {
    progress.lock().expect("lock").acked
}

/// Publishes `count` events with ids `<name>-<i>` to `channel`, retrying each (same id) until it
/// is acknowledged, noting what it sees in `progress`; returns the (id, seq) pairs. Any answer
/// but 200 means "not stored, retry".
pub async fn publisher(
    api: Http,
    token: String,
    name: String,
    channel: String,
    count: usize,
    progress: Shared,
) -> Vec<(String, u64)> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let id = format!("{name}-{i}");
        let event = json!({"id": id, "channel": channel, "type": "tick", "data": i});
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let answer = send(
                api.post("/v1/events")
                    .bearer_auth(&token)
                    .json(&event)
                    .timeout(Duration::from_secs(10)),
            )
            .await;
            match answer {
                Some((200, body)) => {
                    out.push((id.clone(), body["events"][0]["seq"].as_u64().expect("seq")));
                    progress.lock().expect("lock").acked += 1;
                    break;
                }
                Some((status, _)) => {
                    *progress
                        .lock()
                        .expect("lock")
                        .refused
                        .entry(status)
                        .or_default() += 1
                }
                None => progress.lock().expect("lock").unanswered += 1,
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} was never acknowledged"
            );
            // Back off briefly while whatever failed comes back.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    out
}

async fn send(request: reqwest::RequestBuilder) -> Option<(u16, Value)> {
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    Some((status, body))
}

/// Every event of `channel` from its first retained seq: (first, seq → id). Asserts that the
/// retained seqs have no gaps and end at the head.
pub async fn retained(bus: &Endpoints, token: &str, channel: &str) -> (u64, BTreeMap<u64, String>) {
    let bounds = bus.api.history(token, channel, "after=0&limit=1").await;
    let first = match bounds.status.as_u16() {
        200 => 1,
        410 => bounds.body["first_seq"].as_u64().expect("first_seq"),
        other => panic!("{channel}: {other} {}", bounds.body),
    };
    let mut after = first - 1;
    let mut events = BTreeMap::new();
    loop {
        let page = bus
            .api
            .history(token, channel, &format!("after={after}&limit=1000"))
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        let list = page.body["events"].as_array().expect("events").clone();
        for event in &list {
            let seq = event["seq"].as_u64().expect("seq");
            assert_eq!(seq, after + 1, "{channel}: retained seqs have no gaps");
            after = seq;
            events.insert(seq, event["id"].as_str().expect("id").to_owned());
        }
        if list.is_empty() {
            assert_eq!(
                page.body["head"], after,
                "{channel}: history ends at the head"
            );
            return (first, events);
        }
    }
}
