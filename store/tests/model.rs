//! Property test: random sequences of appends (with repeated ids), reads, compacted reads and
//! restarts give the same answers from the log as from a plain in-memory model of the contract.

use std::collections::HashMap;

use bytes::Bytes;
use eventbus_store::log::{Entry, Log, LogError, Options};
use proptest::prelude::*;

const CHANNELS: [&str; 3] = ["a", "b.c", "d"];

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
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0..CHANNELS.len(), 0u8..40, prop::option::of(0u8..4), any::<bool>()), 1..6).prop_map(Op::Append),
        3 => (0..CHANNELS.len(), -3i64..3, 1usize..8, any::<bool>())
            .prop_map(|(channel, after_offset, limit, compact)| Op::Read { channel, after_offset, limit, compact }),
        1 => Just(Op::Restart),
    ]
}

/// One modelled event: id, key, deleted.
type ModelEvent = (String, Option<String>, bool);

/// The contract, as plainly as it can be written.
#[derive(Default)]
struct Model {
    /// Per channel, the events in seq order.
    channels: HashMap<&'static str, Vec<ModelEvent>>,
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

    fn read(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
        compact: bool,
    ) -> Result<Vec<(u64, String)>, u64> {
        let events = self.channels.get(channel).map(Vec::as_slice).unwrap_or(&[]);
        let head = events.len() as u64;
        if after > head {
            return Err(head);
        }
        let numbered = events.iter().enumerate().map(|(i, e)| (i as u64 + 1, e));
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
        dir: dir.to_owned(),
        // Small segments, so that runs cross segment boundaries.
        segment_bytes: 2048,
    })
    .expect("open log");
    log
}

async fn check(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = open(dir.path());
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append(batch) => {
                let mut entries = Vec::new();
                let mut expected = Vec::new();
                for (channel, id, key, deleted) in batch {
                    let channel = CHANNELS[channel];
                    let id = format!("id-{id}");
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
                        prop_assert_eq!(got, want)
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
            }
        }
    }
    log.close();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_log_behaves_like_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(check(ops))?;
    }
}
