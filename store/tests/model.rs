//! Property test: random sequences of appends (with repeated ids), reads, compacted reads and
//! restarts give the same answers from the log as from a plain in-memory model of the contract.

use std::collections::HashMap;

use bytes::Bytes;
use eventbus_store::log::{Entry, Log, LogError, Options, Rule};
use proptest::prelude::*;

const CHANNELS: [&str; 3] = ["a", "b.c", "d"];
/// Channel `d` keeps only its newest events.
const D_KEEPS: u64 = 5;

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(usize, u8, Option<u8>, bool)>),
    Read {
        channel: usize,
        after_offset: i64,
        limit: usize,
        compact: bool,
    },
    Restart,
    EnforceRetention,
    PutSnapshot {
        channel: usize,
        seq_offset: i64,
    },
    GetSnapshot {
        channel: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0..CHANNELS.len(), 0u8..40, prop::option::of(0u8..4), any::<bool>()), 1..6).prop_map(Op::Append),
        3 => (0..CHANNELS.len(), -9i64..3, 1usize..8, any::<bool>())
            .prop_map(|(channel, after_offset, limit, compact)| Op::Read { channel, after_offset, limit, compact }),
        1 => Just(Op::Restart),
        1 => Just(Op::EnforceRetention),
        1 => (0..CHANNELS.len(), -3i64..2).prop_map(|(channel, seq_offset)| Op::PutSnapshot { channel, seq_offset }),
        1 => (0..CHANNELS.len()).prop_map(|channel| Op::GetSnapshot { channel }),
    ]
}

#[derive(Debug, PartialEq)]
enum Refusal {
    BeyondHead(u64),
    Truncated(u64),
}

/// One modelled event: id, key, deleted.
type ModelEvent = (String, Option<String>, bool);

/// The contract, as plainly as it can be written.
#[derive(Default)]
struct Model {
    /// Per channel, the events in seq order.
    channels: HashMap<&'static str, Vec<ModelEvent>>,
    /// Per channel, the first retained seq (absent: 1).
    first: HashMap<&'static str, u64>,
    /// Per channel, the latest snapshot: seq and data.
    snapshots: HashMap<&'static str, (u64, String)>,
}

impl Model {
    fn append(
        &mut self,
        channel: &'static str,
        id: &str,
        key: Option<String>,
        deleted: bool,
    ) -> (u64, bool) {
        let events = self.channels.entry(channel).or_default();
        if let Some(i) = events.iter().position(|(known, _, _)| known == id) {
            return (i as u64 + 1, true);
        }
        events.push((id.to_owned(), key, deleted));
        (events.len() as u64, false)
    }

    fn enforce_retention(&mut self) {
        let head = self.channels.get("d").map_or(0, Vec::len) as u64;
        if head > 0 {
            let first = self.first.entry("d").or_insert(1);
            *first = (*first).max(head.saturating_sub(D_KEEPS) + 1);
        }
    }

    fn read(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
        compact: bool,
    ) -> Result<Vec<(u64, String)>, Refusal> {
        let events = self.channels.get(channel).map(Vec::as_slice).unwrap_or(&[]);
        let head = events.len() as u64;
        if after > head {
            return Err(Refusal::BeyondHead(head));
        }
        let first = self.first.get(channel).copied().unwrap_or(1);
        if after + 1 < first {
            return Err(Refusal::Truncated(first));
        }
        let numbered = events
            .iter()
            .enumerate()
            .map(|(i, e)| (i as u64 + 1, e))
            .filter(move |(seq, _)| *seq >= first);
        let kept: Vec<(u64, String)> = numbered
            .clone()
            .filter(|(seq, _)| *seq > after)
            .filter(|(seq, (_, key, deleted))| {
                if !compact {
                    return true;
                }
                match key {
                    None => true,
                    Some(key) => {
                        let newest = numbered
                            .clone()
                            .filter(|(_, (_, k, _))| k.as_ref() == Some(key))
                            .map(|(s, _)| s)
                            .max();
                        newest == Some(*seq) && !deleted
                    }
                }
            })
            .map(|(seq, (id, _, _))| (seq, id.clone()))
            .take(limit)
            .collect();
        Ok(kept)
    }
}

fn open(dir: &std::path::Path) -> Log {
    let (log, _committed) = Log::open(Options {
        segment_bytes: 2048,
        retention: vec![
            format!("d:max_events={D_KEEPS}")
                .parse::<Rule>()
                .expect("rule"),
        ],
        ..Options::new(dir.to_owned())
    })
    .expect("open log");
    log
}

async fn check(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = open(dir.path());
    let mut model = Model::default();
    let mut fresh = 0u64;
    for op in ops {
        match op {
            Op::Append(batch) => {
                let mut entries = Vec::new();
                let mut expected = Vec::new();
                for (channel, id, key, deleted) in batch {
                    let channel = CHANNELS[channel];
                    // Retention may forget `d`'s old ids with its old segments: idempotency holds
                    // within what is retained, so `d` never repeats an id.
                    let id = if channel == "d" {
                        fresh += 1;
                        format!("fresh-{fresh}")
                    } else {
                        format!("id-{id}")
                    };
                    let key = key.map(|k| format!("k{k}"));
                    let deleted = deleted && key.is_some();
                    expected.push(model.append(channel, &id, key.clone(), deleted));
                    entries.push(Entry {
                        channel: channel.into(),
                        body: Bytes::from(format!(r#"{{"id":"{id}"}}"#)),
                        id,
                        key,
                        deleted,
                    });
                }
                let appended = log.append(entries).await.expect("append");
                let got: Vec<(u64, bool)> = appended.iter().map(|a| (a.seq, a.duplicate)).collect();
                prop_assert_eq!(got, expected);
            }
            Op::Read {
                channel,
                after_offset,
                limit,
                compact,
            } => {
                let channel = CHANNELS[channel];
                let head = model.channels.get(channel).map_or(0, Vec::len) as i64;
                let after = (head + after_offset).max(0) as u64;
                let want = model.read(channel, after, limit, compact);
                match (log.read(channel, after, limit, compact).await, want) {
                    (Ok(result), Ok(want)) => {
                        let got: Vec<(u64, String)> = result
                            .events
                            .iter()
                            .map(|e| {
                                let value: serde_json::Value =
                                    serde_json::from_slice(&e.json).expect("stored json");
                                prop_assert_eq!(value["seq"].as_u64(), Some(e.seq));
                                Ok((e.seq, value["id"].as_str().unwrap_or_default().to_owned()))
                            })
                            .collect::<Result<_, TestCaseError>>()?;
                        prop_assert_eq!(got, want);
                        prop_assert_eq!(result.head, head as u64);
                    }
                    (Err(LogError::AfterBeyondHead { head: got, .. }), Err(want)) => {
                        prop_assert_eq!(Refusal::BeyondHead(got), want)
                    }
                    (Err(LogError::Truncated { first }), Err(want)) => {
                        prop_assert_eq!(Refusal::Truncated(first), want)
                    }
                    (got, want) => prop_assert!(
                        false,
                        "log answered {:?}, model {:?}",
                        got.map(|r| r.events.len()),
                        want
                    ),
                }
            }
            Op::Restart => {
                log.close();
                log = open(dir.path());
                model.enforce_retention();
            }
            Op::PutSnapshot {
                channel,
                seq_offset,
            } => {
                let channel = CHANNELS[channel];
                let head = model.channels.get(channel).map_or(0, Vec::len) as i64;
                let seq = (head + seq_offset).max(0) as u64;
                let data = format!(r#"{{"state":{seq}}}"#);
                let current = model.snapshots.get(channel).map_or(0, |(s, _)| *s);
                let valid = seq >= 1 && seq as i64 <= head && seq >= current;
                let result = log
                    .put_snapshot(channel, seq, Bytes::from(data.clone()))
                    .await;
                prop_assert_eq!(
                    result.is_ok(),
                    valid,
                    "snapshot of {} at {}: {:?}",
                    channel,
                    seq,
                    result
                );
                if valid {
                    model.snapshots.insert(channel, (seq, data));
                }
            }
            Op::GetSnapshot { channel } => {
                let channel = CHANNELS[channel];
                let got = log.snapshot(channel).await.expect("snapshot");
                let got = got.map(|s| (s.seq, String::from_utf8_lossy(&s.data).into_owned()));
                prop_assert_eq!(got.as_ref(), model.snapshots.get(channel));
            }
            Op::EnforceRetention => {
                log.enforce_retention(eventbus_store::log::now_ms())
                    .expect("retention");
                model.enforce_retention();
            }
        }
    }
    log.close();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_log_behaves_like_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(check(ops))?;
    }
}
