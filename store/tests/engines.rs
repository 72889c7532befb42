//! Conformance of the log's engines: the same random histories — appends with retried ids from
//! two publishers, reads and compacted reads at any position, retention by count, snapshots,
//! channel listings, restarts — run against the embedded log and against PostgreSQL, each
//! checked after every step against one in-memory model of the contract (crate::engine::Engine):
//! - seqs are contiguous per channel from 1, whatever was retried;
//! - a retry of `(channel, source, id)` is answered as a duplicate with its first seq, even after
//!   retention let the event go and after a restart;
//! - a read returns exactly the model's events; after the head it is refused as beyond the head,
//!   before the first retained seq as truncated with that seq;
//! - the compacted read is the newest event of each key that is not a tombstone, and every event
//!   without a key;
//! - snapshots only move forward, within the head; listings are in byte order, after `after`;
//! - the events an append committed (not its duplicates) are handed to the backbone, in order.
//!
//! `ENGINE_MODEL_CASES` sets the number of cases per engine (24 by default; docs/testing.md).
//! The crash faults of the embedded log have their own model (store/src/log/fault_model.rs);
//! the crashes of PostgreSQL are PostgreSQL's, exercised by the failover tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use eventbus_model::with_seq;
use eventbus_store::Engine;
use eventbus_store::log::{Clock, Committed, Entry, Log, LogError, Options, Rule};
use eventbus_testkit::postgres::Postgres;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const CHANNELS: [&str; 4] = ["r.a", "k.b", "k.c", "p"];
/// `r.*` keeps its newest three events.
const R_KEEPS: u64 = 3;

fn rules() -> Vec<Rule> {
    vec![format!("r.*:max_events={R_KEEPS}").parse().expect("rule")]
}

/// One event of a batch: channel, id number, second publisher, key, tombstone.
type Spec = (usize, u8, bool, Option<u8>, bool);

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Spec>),
    Read {
        channel: usize,
        after: u8,
        limit: usize,
        compact: bool,
    },
    Retention,
    PutSnapshot {
        channel: usize,
        seq: u8,
    },
    GetSnapshot(usize),
    Channels {
        prefix: usize,
        after_first: bool,
        limit: usize,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let spec = (
        0..CHANNELS.len(),
        0u8..6,
        any::<bool>(),
        prop::option::of(0u8..3),
        prop::bool::weighted(0.2),
    );
    prop_oneof![
        6 => prop::collection::vec(spec, 1..5).prop_map(Op::Append),
        4 => (0..CHANNELS.len(), any::<u8>(), 1usize..6, any::<bool>())
            .prop_map(|(channel, after, limit, compact)| Op::Read { channel, after, limit, compact }),
        1 => Just(Op::Retention),
        1 => (0..CHANNELS.len(), any::<u8>()).prop_map(|(channel, seq)| Op::PutSnapshot { channel, seq }),
        1 => (0..CHANNELS.len()).prop_map(Op::GetSnapshot),
        1 => (0..4usize, any::<bool>(), 1usize..4)
            .prop_map(|(prefix, after_first, limit)| Op::Channels { prefix, after_first, limit }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone)]
struct Stored {
    key: Option<String>,
    deleted: bool,
    json: Bytes,
}

/// A read's events (seq, JSON), head and first retained seq.
type Page = (Vec<(u64, Bytes)>, u64, u64);

#[derive(Default)]
struct Model {
    /// channel → (first retained seq, every event ever appended, index = seq - 1).
    channels: BTreeMap<String, (u64, Vec<Stored>)>,
    ids: HashMap<(String, String, String), u64>,
    snapshots: HashMap<String, (u64, Bytes)>,
    counter: u64,
}

impl Model {
    fn head(&self, channel: &str) -> u64 {
        self.channels.get(channel).map_or(0, |c| c.1.len() as u64)
    }

    fn retain(&mut self) {
        for (name, (first, events)) in &mut self.channels {
            if name.starts_with("r.") {
                let head = events.len() as u64;
                *first = (*first).max(head.saturating_sub(R_KEEPS) + 1).min(head);
            }
        }
    }

    fn read(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
        compact: bool,
    ) -> Result<Page, &'static str> {
        let Some((first, events)) = self.channels.get(channel) else {
            return if after == 0 {
                Ok((Vec::new(), 0, 1))
            } else {
                Err("beyond")
            };
        };
        let head = events.len() as u64;
        if after > head {
            return Err("beyond");
        }
        if after + 1 < *first {
            return Err("truncated");
        }
        let newest_of = |key: &str| {
            events
                .iter()
                .rposition(|e| e.key.as_deref() == Some(key))
                .map(|i| i as u64 + 1)
        };
        let out = (after.max(first - 1) + 1..=head)
            .filter(|seq| {
                let event = &events[*seq as usize - 1];
                !compact
                    || match &event.key {
                        None => true,
                        Some(key) => !event.deleted && newest_of(key) == Some(*seq),
                    }
            })
            .take(limit)
            .map(|seq| (seq, events[seq as usize - 1].json.clone()))
            .collect();
        Ok((out, head, *first))
    }
}

enum Opened {
    Embedded(Arc<Log>),
    Postgres(Arc<eventbus_store::postgres::Postgres>),
}

impl Opened {
    fn engine(&self) -> Arc<dyn Engine> {
        match self {
            Opened::Embedded(log) => log.clone(),
            Opened::Postgres(pg) => pg.clone(),
        }
    }
}

/// Where a case keeps its log: a temp dir, or a fresh database on the test's server.
enum Place {
    Embedded(tempfile::TempDir),
    Postgres(String),
}

struct Harness {
    place: Place,
    clock: Arc<AtomicU64>,
    opened: Option<Opened>,
    committed: Option<Committed>,
    model: Model,
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

impl Harness {
    async fn open(&mut self) -> Result<(), TestCaseError> {
        let now = self.clock.clone();
        let clock = Clock::new(move || now.load(Ordering::Relaxed));
        let (opened, committed) = match &self.place {
            Place::Embedded(dir) => {
                let (log, committed) = Log::open(Options {
                    segment_bytes: 2048,
                    retention: rules(),
                    clock,
                    ..Options::new(dir.path().to_owned())
                })
                .map_err(fail)?;
                (Opened::Embedded(Arc::new(log)), committed)
            }
            Place::Postgres(url) => {
                let (pg, committed) =
                    eventbus_store::postgres::Postgres::open(eventbus_store::postgres::Options {
                        retention: rules(),
                        clock,
                        pool_size: 2,
                        ..eventbus_store::postgres::Options::new(url.clone())
                    })
                    .await
                    .map_err(fail)?;
                (Opened::Postgres(Arc::new(pg)), committed)
            }
        };
        self.opened = Some(opened);
        self.committed = Some(committed);
        // Both engines start with retention enforced.
        self.model.retain();
        Ok(())
    }

    fn engine(&self) -> Arc<dyn Engine> {
        self.opened.as_ref().expect("open").engine()
    }

    async fn close(&mut self) {
        self.committed = None;
        match self.opened.take() {
            Some(Opened::Embedded(log)) => {
                let log = Arc::try_unwrap(log).unwrap_or_else(|_| panic!("log still held"));
                log.close();
            }
            Some(Opened::Postgres(pg)) => drop(pg),
            None => {}
        }
    }

    async fn append(&mut self, batch: &[Spec]) -> Result<(), TestCaseError> {
        let mut entries = Vec::new();
        let mut want = Vec::new();
        for (channel, id, second, key, deleted) in batch {
            let channel = CHANNELS[*channel];
            let source = if *second { "svc-b" } else { "svc-a" };
            let id = format!("id{id}");
            self.model.counter += 1;
            let key = key.map(|k| format!("key{k}"));
            let body = Bytes::from(format!(
                r#"{{"id":"{id}","channel":"{channel}","n":{}}}"#,
                self.model.counter
            ));
            let dedupe = (channel.to_owned(), source.to_owned(), id.clone());
            let outcome = match self.model.ids.get(&dedupe) {
                Some(seq) => (*seq, true),
                None => {
                    let (_, events) = self
                        .model
                        .channels
                        .entry(channel.to_owned())
                        .or_insert((1, Vec::new()));
                    let seq = events.len() as u64 + 1;
                    events.push(Stored {
                        key: key.clone(),
                        deleted: *deleted,
                        json: with_seq(&body, seq),
                    });
                    self.model.ids.insert(dedupe, seq);
                    (seq, false)
                }
            };
            want.push((channel, outcome));
            entries.push(Entry {
                channel: channel.to_owned(),
                id,
                source: source.to_owned(),
                key,
                deleted: *deleted,
                body,
            });
        }
        let got = self.engine().append(entries).await.map_err(fail)?;
        let got: Vec<(&str, (u64, bool))> = got
            .iter()
            .zip(&want)
            .map(|(a, (channel, _))| (*channel, (a.seq, a.duplicate)))
            .collect();
        prop_assert_eq!(&got, &want, "append outcomes");
        // What the append committed reaches the backbone's queue, in order, duplicates not.
        let fresh: Vec<(String, u64)> = want
            .iter()
            .filter(|(_, (_, duplicate))| !duplicate)
            .map(|(channel, (seq, _))| ((*channel).to_owned(), *seq))
            .collect();
        if !fresh.is_empty() {
            let committed = self.committed.as_mut().expect("open");
            let batch = committed.recv().await.ok_or_else(|| fail("no hand-off"))?;
            let handed: Vec<(String, u64)> =
                batch.iter().map(|e| (e.channel.clone(), e.seq)).collect();
            prop_assert_eq!(handed, fresh, "handed to the backbone");
        }
        Ok(())
    }

    async fn read(
        &mut self,
        channel: &str,
        after: u64,
        limit: usize,
        compact: bool,
    ) -> Result<(), TestCaseError> {
        let want = self.model.read(channel, after, limit, compact);
        let got = self.engine().read(channel, after, limit, compact).await;
        match (got, want) {
            (Ok(got), Ok((events, head, first))) => {
                let got_events: Vec<(u64, Bytes)> =
                    got.events.iter().map(|e| (e.seq, e.json.clone())).collect();
                prop_assert_eq!(
                    got_events,
                    events,
                    "read {} after {} compact {}",
                    channel,
                    after,
                    compact
                );
                prop_assert_eq!(
                    (got.head, got.first),
                    (head, first),
                    "bounds of {}",
                    channel
                );
            }
            (Err(LogError::AfterBeyondHead { .. }), Err("beyond")) => {}
            (Err(LogError::Truncated { first }), Err("truncated")) => {
                prop_assert_eq!(first, self.model.channels[channel].0);
            }
            (got, want) => {
                return Err(fail(format!(
                    "read {channel} after {after}: got {got:?}, the model says {want:?}"
                )));
            }
        }
        Ok(())
    }

    async fn check_all(&mut self) -> Result<(), TestCaseError> {
        for channel in CHANNELS {
            let (first, head) = self.engine().bounds(channel).await.map_err(fail)?;
            let want = self
                .model
                .channels
                .get(channel)
                .map_or((1, 0), |c| (c.0, c.1.len() as u64));
            prop_assert_eq!((first, head), want, "bounds of {}", channel);
            self.read(channel, first.saturating_sub(1), 1000, false)
                .await?;
            self.read(channel, first.saturating_sub(1), 1000, true)
                .await?;
        }
        Ok(())
    }

    async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.clock.fetch_add(10, Ordering::Relaxed);
        match op {
            Op::Append(batch) => self.append(batch).await?,
            Op::Read {
                channel,
                after,
                limit,
                compact,
            } => {
                let channel = CHANNELS[*channel];
                let after = u64::from(*after) % (self.model.head(channel) + 2);
                self.read(channel, after, *limit, *compact).await?;
            }
            Op::Retention => {
                self.engine()
                    .enforce_retention(self.clock.load(Ordering::Relaxed))
                    .await
                    .map_err(fail)?;
                self.model.retain();
                self.check_all().await?;
            }
            Op::PutSnapshot { channel, seq } => {
                let channel = CHANNELS[*channel];
                let head = self.model.head(channel);
                let seq = u64::from(*seq) % (head + 2);
                let data = Bytes::from(format!(r#"{{"at":{seq}}}"#));
                let got = self.engine().put_snapshot(channel, seq, data.clone()).await;
                let newer = self.model.snapshots.get(channel).is_some_and(|s| s.0 > seq);
                if seq == 0 || seq > head || newer {
                    prop_assert!(matches!(got, Err(LogError::Invalid(_))), "{:?}", got);
                } else {
                    got.map_err(fail)?;
                    self.model.snapshots.insert(channel.to_owned(), (seq, data));
                }
            }
            Op::GetSnapshot(channel) => {
                let channel = CHANNELS[*channel];
                let got = self.engine().snapshot(channel).await.map_err(fail)?;
                prop_assert_eq!(
                    got.map(|s| (s.seq, s.data)),
                    self.model.snapshots.get(channel).cloned()
                );
            }
            Op::Channels {
                prefix,
                after_first,
                limit,
            } => {
                let prefix = ["", "k.", "r", "x"][*prefix];
                let listed: Vec<(String, u64)> = self
                    .model
                    .channels
                    .iter()
                    .filter(|(name, _)| name.starts_with(prefix))
                    .map(|(name, c)| (name.clone(), c.1.len() as u64))
                    .collect();
                let after = match (after_first, listed.first()) {
                    (true, Some((name, _))) => name.clone(),
                    _ => String::new(),
                };
                let want: Vec<(String, u64)> = listed
                    .into_iter()
                    .filter(|(name, _)| *name > after)
                    .take(*limit)
                    .collect();
                let got = self
                    .engine()
                    .channels(prefix, &after, *limit)
                    .await
                    .map_err(fail)?;
                prop_assert_eq!(got, want, "channels under {:?} after {:?}", prefix, after);
            }
            Op::Reopen => {
                self.close().await;
                self.open().await?;
                self.check_all().await?;
            }
        }
        Ok(())
    }
}

fn cases() -> u32 {
    std::env::var("ENGINE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

/// Runs the model on the engine each case's `place` makes.
fn conform(place: impl Fn(u32) -> Place) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });
    let case = AtomicU64::new(0);
    let outcome = runner.run(&prop::collection::vec(op(), 1..40), |ops| {
        let place = place(case.fetch_add(1, Ordering::Relaxed) as u32 + 1);
        runtime.block_on(async {
            let mut harness = Harness {
                place,
                clock: Arc::new(AtomicU64::new(1_700_000_000_000)),
                opened: None,
                committed: None,
                model: Model::default(),
            };
            harness.open().await?;
            for op in &ops {
                harness.step(op).await?;
            }
            harness.check_all().await?;
            harness.close().await;
            Ok(())
        })
    });
    if let Err(err) = outcome {
        panic!("{err}");
    }
}

#[test]
fn the_embedded_log_keeps_the_contract() {
    conform(|_| Place::Embedded(tempfile::tempdir().expect("temp dir")));
}

#[test]
fn postgres_keeps_the_contract() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = runtime.block_on(Postgres::primary());
    conform(|case| {
        // A database of its own per case (and per shrinking step).
        let name = format!("case{case}");
        server.sql(&format!("CREATE DATABASE {name}"));
        Place::Postgres(server.url().replace("/postgres", &format!("/{name}")))
    });
    drop(server);
}
