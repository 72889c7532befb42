//! The log against a model of its contract, under faults: random histories of appends (with
//! retried ids), reads, compacted reads, snapshots, retention passes by count, bytes and age, clock
//! jumps, segment rolls and checkpoints (small segments, small checkpoint intervals), clean
//! restarts and crashes — a crash in the middle of a write (a prefix of the unsynced bytes reaches
//! the file), in the middle of a retention pass (any subset of its deletions done), or between
//! operations (no clean-stop checkpoint, half-written temporary files left behind).
//!
//! After every reopen, and after every retention pass, the invariants are checked:
//! - the log opens;
//! - every acknowledged event that retention still covers is there, at its acknowledged seq, once;
//!   reads below the first retained seq are refused as truncated;
//! - the first retained seq of a channel never moves back, and moves exactly as its rule says
//!   (count, bytes) or no further than its rule allows (age, which goes by whole segments);
//! - no seq is given out twice: the next append continues from the acknowledged head;
//! - a retry of an acknowledged id is answered as a duplicate with its first seq, whether or not
//!   retention has let the event go.
//!
//! `FAULT_MODEL_CASES` sets the number of cases (2,000 by default; docs/testing.md has the long
//! run). A failing case prints its seed and its shrunk history.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use proptest::prelude::*;

use super::record::{self, Record};
use super::{Clock, Entry, Log, LogError, Options, Rule};

const CHANNELS: [&str; 5] = ["a", "b.c", "d", "t.x", "age"];
const D_KEEPS: u64 = 5;
const TX_BYTES: u64 = 700;
const AGE_MS: u64 = 10_000;
const START_MS: u64 = 1_700_000_000_000;

fn rules() -> Vec<Rule> {
    [
        format!("d:max_events={D_KEEPS}"),
        format!("t.x:max_bytes={TX_BYTES}"),
        format!("age:max_age_s={}", AGE_MS / 1000),
    ]
    .iter()
    .map(|r| r.parse().expect("rule"))
    .collect()
}

/// One event of a batch: channel, id number, key, deleted, padding, publisher.
type Spec = (usize, u8, Option<u8>, bool, u8, bool);

/// Two publishers using the same ids: idempotency is per (channel, source, id).
fn source_of(second: bool) -> &'static str {
    if second { "svc-b" } else { "svc-a" }
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Spec>),
    /// An append during which the process dies: `cut` bytes of its write reach the file.
    TornAppend(Vec<Spec>, u16),
    Read {
        channel: usize,
        after_offset: i64,
        limit: usize,
        compact: bool,
    },
    Restart,
    /// Dies between operations, leaving half-written temporary files when `litter`.
    Crash {
        litter: bool,
    },
    Retention,
    /// A retention pass during which the process dies, with the deletions in `mask` done.
    RetentionCrash(u64),
    Tick(u64),
    PutSnapshot {
        channel: usize,
        seq_offset: i64,
    },
    GetSnapshot {
        channel: usize,
    },
}

fn batch() -> impl Strategy<Value = Vec<Spec>> {
    prop::collection::vec(
        (
            0..CHANNELS.len(),
            0u8..30,
            prop::option::of(0u8..4),
            any::<bool>(),
            0u8..120,
            prop::bool::weighted(0.2),
        ),
        1..6,
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => batch().prop_map(Op::Append),
        1 => (batch(), 0u16..1200).prop_map(|(b, cut)| Op::TornAppend(b, cut)),
        3 => (0..CHANNELS.len(), -9i64..3, 1usize..8, any::<bool>())
            .prop_map(|(channel, after_offset, limit, compact)| Op::Read { channel, after_offset, limit, compact }),
        1 => Just(Op::Restart),
        2 => any::<bool>().prop_map(|litter| Op::Crash { litter }),
        2 => Just(Op::Retention),
        1 => any::<u64>().prop_map(Op::RetentionCrash),
        2 => (0u64..8_000).prop_map(Op::Tick),
        1 => (0..CHANNELS.len(), -3i64..2).prop_map(|(channel, seq_offset)| Op::PutSnapshot { channel, seq_offset }),
        1 => (0..CHANNELS.len()).prop_map(|channel| Op::GetSnapshot { channel }),
    ]
}

#[derive(Debug, Clone)]
struct Event {
    source: &'static str,
    id: String,
    key: Option<String>,
    deleted: bool,
    time_ms: u64,
    /// Bytes on disk: what retention by bytes counts.
    size: u64,
}

/// The contract, as plainly as it can be written.
#[derive(Default)]
struct Model {
    /// Per channel, every acknowledged event in seq order (seq = index + 1), retained or not.
    events: HashMap<&'static str, Vec<Event>>,
    /// Every acknowledged (channel, source, id): its seq.
    ids: HashMap<(&'static str, &'static str, String), u64>,
    /// Per channel, the first retained seq last observed.
    first: HashMap<&'static str, u64>,
    snapshots: HashMap<&'static str, (u64, String)>,
}

impl Model {
    fn head(&self, channel: &str) -> u64 {
        self.events.get(channel).map_or(0, Vec::len) as u64
    }

    fn first(&self, channel: &str) -> u64 {
        self.first.get(channel).copied().unwrap_or(1)
    }

    /// Stores `event` unless its id is known: (seq, duplicate).
    fn append(&mut self, channel: &'static str, event: Event) -> (u64, bool) {
        let identity = (channel, event.source, event.id.clone());
        if let Some(seq) = self.ids.get(&identity) {
            return (*seq, true);
        }
        let events = self.events.entry(channel).or_default();
        self.ids.insert(identity, events.len() as u64 + 1);
        events.push(event);
        (events.len() as u64, false)
    }

    /// The first retained seq a retention pass at `now` leaves: `(least, most)`, equal for the
    /// rules that go by event (count, bytes); age goes by whole segments, so it may keep more.
    fn after_pass(&self, channel: &str, now: u64) -> (u64, u64) {
        let head = self.head(channel);
        let first = self.first(channel);
        if head == 0 {
            return (1, 1);
        }
        let events = &self.events[channel];
        let at = |seq: u64| &events[seq as usize - 1];
        match channel {
            "d" => {
                let f = first.max(head.saturating_sub(D_KEEPS) + 1).min(head);
                (f, f)
            }
            "t.x" => {
                let mut bytes: u64 = (first..=head).map(|s| at(s).size).sum();
                let mut seq = first;
                while seq < head && bytes > TX_BYTES {
                    bytes -= at(seq).size;
                    seq += 1;
                }
                (seq, seq)
            }
            "age" => {
                let horizon = now.saturating_sub(AGE_MS);
                let mut seq = first;
                while seq < head && at(seq).time_ms < horizon {
                    seq += 1;
                }
                (first, seq)
            }
            _ => (first, first),
        }
    }

    fn read(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
        compact: bool,
    ) -> Result<Vec<(u64, String)>, LogError> {
        let head = self.head(channel);
        if after > head {
            return Err(LogError::AfterBeyondHead { after, head });
        }
        let first = self.first(channel);
        if after + 1 < first {
            return Err(LogError::Truncated { first });
        }
        let events = self.events.get(channel).map(Vec::as_slice).unwrap_or(&[]);
        let retained: Vec<(u64, &Event)> = events
            .iter()
            .enumerate()
            .map(|(i, e)| (i as u64 + 1, e))
            .filter(|(seq, _)| *seq >= first)
            .collect();
        Ok(retained
            .iter()
            .filter(|(seq, _)| *seq > after)
            .filter(|(seq, event)| match (&event.key, compact) {
                (_, false) | (None, true) => true,
                (Some(key), true) => {
                    let newest = retained
                        .iter()
                        .filter(|(_, e)| e.key.as_ref() == Some(key))
                        .map(|(s, _)| *s)
                        .max();
                    newest == Some(*seq) && !event.deleted
                }
            })
            .map(|(seq, event)| (*seq, event.id.clone()))
            .take(limit)
            .collect())
    }
}

struct Harness {
    dir: tempfile::TempDir,
    options: Options,
    now: Arc<AtomicU64>,
    log: Option<Log>,
    model: Model,
}

fn same_refusal(got: &LogError, want: &LogError) -> bool {
    match (got, want) {
        (LogError::AfterBeyondHead { head: a, .. }, LogError::AfterBeyondHead { head: b, .. }) => {
            a == b
        }
        (LogError::Truncated { first: a }, LogError::Truncated { first: b }) => a == b,
        _ => false,
    }
}

impl Harness {
    fn new(segment_bytes: u64, checkpoint_bytes: u64) -> Self {
        // tmpfs where there is one: a crash is simulated above the file system, so fsync there
        // costs nothing and the cases run fast.
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::tempdir_in("/dev/shm")
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir");
        let now = Arc::new(AtomicU64::new(START_MS));
        let clock_now = now.clone();
        let options = Options {
            segment_bytes,
            checkpoint_bytes,
            retention: rules(),
            clock: Clock::new(move || clock_now.load(Ordering::Relaxed)),
            min_free_bytes: 0,
            ..Options::new(dir.path().to_owned())
        };
        let mut harness = Harness {
            dir,
            options,
            now,
            log: None,
            model: Model::default(),
        };
        harness.log = Some(harness.open().expect("a new log opens"));
        harness
    }

    fn open(&self) -> Result<Log, TestCaseError> {
        Log::open(self.options.clone())
            .map(|(log, _)| log)
            .map_err(|err| TestCaseError::fail(format!("the log does not open: {err}")))
    }

    fn log(&self) -> &Log {
        self.log.as_ref().expect("log open")
    }

    fn entries(&self, batch: &[Spec]) -> Vec<(&'static str, Event, Entry)> {
        batch
            .iter()
            .map(|&(channel, id, key, deleted, pad, second)| {
                let channel = CHANNELS[channel];
                let source = source_of(second);
                let id = format!("id-{id}");
                let key = key.map(|k| format!("k{k}"));
                let deleted = deleted && key.is_some();
                let body = format!(r#"{{"id":"{id}","pad":"{}"}}"#, "x".repeat(pad as usize));
                let mut encoded = Vec::new();
                let size = record::encode(
                    &Record {
                        seq: 0,
                        time_ms: 0,
                        channel,
                        id: &id,
                        key: key.as_deref(),
                        deleted,
                        source: Some(source),
                        body: body.as_bytes(),
                    },
                    &mut encoded,
                ) as u64;
                let event = Event {
                    source,
                    id: id.clone(),
                    key: key.clone(),
                    deleted,
                    time_ms: self.now.load(Ordering::Relaxed),
                    size,
                };
                let entry = Entry {
                    channel: channel.to_owned(),
                    source: source.to_owned(),
                    id,
                    key,
                    deleted,
                    body: Bytes::from(body),
                };
                (channel, event, entry)
            })
            .collect()
    }

    async fn append(&mut self, batch: &[Spec]) -> Result<(), TestCaseError> {
        let specs = self.entries(batch);
        let mut expected = Vec::new();
        let mut entries = Vec::new();
        for (channel, event, entry) in specs {
            expected.push(self.model.append(channel, event));
            entries.push(entry);
        }
        let appended = self.log().append(entries).await;
        let got: Vec<(u64, bool)> = appended
            .map_err(|err| TestCaseError::fail(format!("append failed: {err}")))?
            .iter()
            .map(|a| (a.seq, a.duplicate))
            .collect();
        prop_assert_eq!(got, expected, "seqs and duplicates of an append");
        Ok(())
    }

    /// An append that dies mid-write, then the restart: the records wholly written before the
    /// cut are there (never acknowledged, but readable now), the rest is gone.
    async fn torn_append(&mut self, batch: &[Spec], cut: u16) -> Result<(), TestCaseError> {
        let specs = self.entries(batch);
        // What the writer would store, in its order: the new ids, first occurrence only.
        let mut pending: Vec<(&'static str, Event)> = Vec::new();
        let mut entries = Vec::new();
        for (channel, event, entry) in specs {
            let known = self
                .model
                .ids
                .contains_key(&(channel, event.source, event.id.clone()))
                || pending
                    .iter()
                    .any(|(c, e)| *c == channel && e.source == event.source && e.id == event.id);
            if !known {
                pending.push((channel, event));
            }
            entries.push(entry);
        }
        *self.log().shared.faults.torn_write.lock().expect("faults") = Some(cut as usize);
        let result = self.log().append(entries).await;
        if pending.is_empty() {
            // Nothing to write: answered from the window, the fault never fired.
            prop_assert!(result.is_ok(), "an all-duplicate append failed");
            self.log().shared.faults.take_torn_write();
            return Ok(());
        }
        prop_assert!(result.is_err(), "a torn write was acknowledged");
        self.crash(false)?;
        // Find how many of the pending records made it: a prefix, by the heads.
        let heads: HashMap<&str, u64> = CHANNELS
            .iter()
            .map(|c| (*c, self.log().bounds(c).1))
            .collect();
        let mut adopted = None;
        for k in 0..=pending.len() {
            let matches = CHANNELS.iter().all(|c| {
                self.model.head(c) + pending[..k].iter().filter(|(p, _)| p == c).count() as u64
                    == heads[c]
            });
            if matches {
                adopted = Some(k);
                break;
            }
        }
        let Some(k) = adopted else {
            return Err(TestCaseError::fail(format!(
                "after a torn write the heads {heads:?} are no prefix of what was being written"
            )));
        };
        for (channel, event) in pending.into_iter().take(k) {
            self.model.append(channel, event);
        }
        self.check_all(true).await
    }

    fn crash(&mut self, litter: bool) -> Result<(), TestCaseError> {
        if let Some(log) = self.log.take() {
            log.crash();
        }
        if litter {
            // A crash in the middle of writing a checkpoint or a manifest.
            for tmp in [
                ".index.ckpt.tmp",
                ".retired.manifest.tmp",
                ".store.format.tmp",
            ] {
                std::fs::write(self.dir.path().join(tmp), b"EBCKPT01 half").expect("litter");
            }
        }
        self.log = Some(self.open()?);
        Ok(())
    }

    /// Every channel: bounds as the rules allow, and every retained event at its seq.
    async fn check_all(&mut self, after_pass: bool) -> Result<(), TestCaseError> {
        let now = self.now.load(Ordering::Relaxed);
        for channel in CHANNELS {
            let (first, head) = self.log().bounds(channel);
            prop_assert_eq!(head, self.model.head(channel), "head of {}", channel);
            let before = self.model.first(channel);
            prop_assert!(
                first >= before,
                "first retained seq of {} moved back from {} to {}",
                channel,
                before,
                first
            );
            let (least, most) = self.model.after_pass(channel, now);
            prop_assert!(
                first <= most.max(before),
                "{} lets go of more than its rule: first {} > {}",
                channel,
                first,
                most
            );
            if after_pass {
                prop_assert!(
                    first >= least,
                    "{} keeps more than its rule after a pass: first {} < {}",
                    channel,
                    first,
                    least
                );
            }
            self.model.first.insert(channel, first.max(1));
            let mut after = first.saturating_sub(1);
            let mut got = Vec::new();
            loop {
                let page = self
                    .log()
                    .read(channel, after, 1000, false)
                    .await
                    .map_err(|err| TestCaseError::fail(format!("read of {channel}: {err}")))?;
                if page.events.is_empty() {
                    break;
                }
                after = page.events.last().map_or(after, |e| e.seq);
                got.extend(page.events.iter().map(id_of).collect::<Vec<_>>());
            }
            let want = self
                .model
                .read(channel, first.saturating_sub(1), usize::MAX, false)
                .map_err(|err| TestCaseError::fail(format!("model read: {err}")))?;
            prop_assert_eq!(got, want, "retained events of {}", channel);
        }
        Ok(())
    }
}

fn id_of(event: &eventbus_model::StoredEvent) -> (u64, String) {
    let value: serde_json::Value = serde_json::from_slice(&event.json).expect("stored json");
    assert_eq!(
        value["seq"].as_u64(),
        Some(event.seq),
        "seq inside the json"
    );
    (
        event.seq,
        value["id"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn run(segment_bytes: u64, checkpoint_bytes: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut h = Harness::new(segment_bytes, checkpoint_bytes);
    for op in ops {
        match op {
            Op::Append(batch) => h.append(&batch).await?,
            Op::TornAppend(batch, cut) => h.torn_append(&batch, cut).await?,
            Op::Read {
                channel,
                after_offset,
                limit,
                compact,
            } => {
                let channel = CHANNELS[channel];
                let head = h.model.head(channel) as i64;
                let after = (head + after_offset).max(0) as u64;
                let want = h.model.read(channel, after, limit, compact);
                match (h.log().read(channel, after, limit, compact).await, want) {
                    (Ok(result), Ok(want)) => {
                        let got: Vec<(u64, String)> = result.events.iter().map(id_of).collect();
                        prop_assert_eq!(got, want, "read of {} after {}", channel, after);
                        prop_assert_eq!(result.head, head as u64);
                    }
                    (Err(got), Err(want)) => prop_assert!(
                        same_refusal(&got, &want),
                        "log refused with {}, model with {}",
                        got,
                        want
                    ),
                    (got, want) => prop_assert!(
                        false,
                        "log answered {:?}, model {:?}",
                        got.map(|r| r.events.len()),
                        want.map(|w| w.len())
                    ),
                }
            }
            Op::Restart => {
                if let Some(log) = h.log.take() {
                    log.close();
                }
                h.log = Some(h.open()?);
                h.check_all(true).await?;
            }
            Op::Crash { litter } => {
                h.crash(litter)?;
                h.check_all(true).await?;
            }
            Op::Retention => {
                let now = h.now.load(Ordering::Relaxed);
                h.log()
                    .enforce_retention(now)
                    .map_err(|err| TestCaseError::fail(format!("retention: {err}")))?;
                h.check_all(true).await?;
            }
            Op::RetentionCrash(mask) => {
                let now = h.now.load(Ordering::Relaxed);
                *h.log().shared.faults.delete_mask.lock().expect("faults") = Some(mask);
                let crashed = h.log().enforce_retention(now).is_err();
                h.log().shared.faults.take_delete_mask();
                if crashed {
                    h.crash(false)?;
                }
                h.check_all(true).await?;
            }
            Op::Tick(ms) => {
                h.now.fetch_add(ms, Ordering::Relaxed);
            }
            Op::PutSnapshot {
                channel,
                seq_offset,
            } => {
                let channel = CHANNELS[channel];
                let head = h.model.head(channel) as i64;
                let seq = (head + seq_offset).max(0) as u64;
                let data = format!(r#"{{"state":{seq}}}"#);
                let current = h.model.snapshots.get(channel).map_or(0, |(s, _)| *s);
                let valid = seq >= 1 && seq as i64 <= head && seq >= current;
                let result = h
                    .log()
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
                    h.model.snapshots.insert(channel, (seq, data));
                }
            }
            Op::GetSnapshot { channel } => {
                let channel = CHANNELS[channel];
                let got = h
                    .log()
                    .snapshot(channel)
                    .await
                    .map_err(|err| TestCaseError::fail(format!("snapshot: {err}")))?
                    .map(|s| (s.seq, String::from_utf8_lossy(&s.data).into_owned()));
                prop_assert_eq!(got.as_ref(), h.model.snapshots.get(channel));
            }
        }
    }
    // Whatever happened, one more crash and everything acknowledged is still there.
    h.crash(true)?;
    h.check_all(true).await?;
    if let Some(log) = h.log.take() {
        log.close();
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("FAULT_MODEL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_log_keeps_its_promises_under_faults(
        segment_bytes in 300u64..3_000,
        checkpoint_bytes in 200u64..6_000,
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(run(segment_bytes, checkpoint_bytes, ops))?;
    }
}
