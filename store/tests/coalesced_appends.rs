//! A client of a store over the network combines appends made at the same time into one call.
//! Each caller must still get exactly its own answer: its own seqs, a retry answered as a
//! duplicate, and its own refusal only — an append over its publisher's channel quota, or an
//! invalid one, must not take the others of its call down with it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use eventbus_model::{Accepted, Limits, parse_event};
use eventbus_router::InProcessBackbone;
use eventbus_runtime::Shutdown;
use eventbus_runtime::internal::Credential;
use eventbus_store::Config;
use eventbus_store_client::{StoreClient, StoreError};

fn event(channel: &str, source: &str, id: &str) -> Accepted {
    parse_event(
        format!(r#"{{"id":"{id}","channel":"{channel}","type":"t","data":1}}"#).as_bytes(),
        source,
        &Limits::default(),
    )
    .expect("valid event")
}

enum Sent {
    Good { channel: String, id: String },
    Greedy,
    Invalid,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_gets_its_own_answer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = Shutdown::new();
    let mut config = Config::with_data(dir.path().to_owned());
    let secret = "internal-credential-of-this-test";
    config.internal.token = Some(secret.to_owned());
    config.settings.max_channels_per_source = 4;
    let server = tokio::spawn(eventbus_store::run(
        config,
        listener,
        Arc::new(InProcessBackbone::new()),
        shutdown.clone(),
    ));
    let store = StoreClient::new(
        &url,
        Credential::new(secret).expect("credential"),
        &Default::default(),
    )
    .expect("client");
    for _ in 0..200 {
        if store.head("orders").await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }

    // Rounds of 300 appends at once: good ones over 4 channels (every tenth a retry of an id
    // already sent), a greedy publisher creating a channel per append (over its quota of 4 after
    // the first few), and invalid bodies.
    let mut good: BTreeMap<(String, String), BTreeSet<u64>> = BTreeMap::new();
    let (mut greedy_refused, mut greedy_taken) = (0, 0);
    for round in 0..5 {
        let mut calls = tokio::task::JoinSet::new();
        for n in 0..300 {
            let store = store.clone();
            let (sent, events) = match n % 10 {
                0 => (
                    Sent::Greedy,
                    vec![event(&format!("greedy.{round}.{n}"), "greedy", "g")],
                ),
                1 => {
                    let mut bad = event("orders.0", "good", &format!("bad-{round}-{n}"));
                    bad.body = b"not json".to_vec();
                    (Sent::Invalid, vec![bad])
                }
                _ => {
                    // Every tenth sends again what its neighbour sent in the round before: a retry.
                    let (m, id_round) = if n % 10 == 9 && round > 0 {
                        (n - 1, round - 1)
                    } else {
                        (n, round)
                    };
                    let channel = format!("orders.{}", m % 4);
                    let id = format!("e-{id_round}-{m}");
                    let events = vec![event(&channel, "good", &id)];
                    (Sent::Good { channel, id }, events)
                }
            };
            calls.spawn(async move { (sent, store.append(events).await) });
        }
        while let Some(done) = calls.join_next().await {
            let (sent, answer) = done.expect("task");
            match (sent, answer) {
                (Sent::Good { channel, id }, Ok(appended)) => {
                    assert_eq!(appended.len(), 1);
                    assert_eq!((&appended[0].channel, &appended[0].id), (&channel, &id));
                    good.entry((channel, id))
                        .or_default()
                        .insert(appended[0].seq);
                }
                (Sent::Good { channel, id }, Err(err)) => {
                    panic!("a good append ({channel}, {id}) was refused: {err}")
                }
                (Sent::Greedy, Ok(_)) => greedy_taken += 1,
                (Sent::Greedy, Err(StoreError::Quota(_))) => greedy_refused += 1,
                (Sent::Greedy, Err(err)) => panic!("greedy: expected a quota refusal, got {err}"),
                (Sent::Invalid, Err(StoreError::Invalid(_))) => {}
                (Sent::Invalid, other) => panic!("an invalid body: got {other:?}"),
            }
        }
    }
    assert_eq!(greedy_taken, 4, "the greedy publisher's quota");
    assert_eq!(greedy_refused, 5 * 30 - 4);

    // Each id has one seq, however often it was sent; each channel's seqs are 1..=n, once each.
    let mut per_channel: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for ((channel, id), seqs) in &good {
        assert_eq!(seqs.len(), 1, "{channel} {id}: answered {seqs:?}");
        per_channel
            .entry(channel)
            .or_default()
            .extend(seqs.iter().copied());
    }
    for (channel, mut seqs) in per_channel {
        seqs.sort_unstable();
        let head = store.head(channel).await.expect("head");
        assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "{channel}");
    }

    shutdown.trigger();
    server.await.expect("task").expect("store");
}
