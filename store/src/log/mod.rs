//! The log engine: segment files of checksummed records, an in-memory index, and one writer thread
//! that group-commits every pending append with a single write and a single `fdatasync`.
//!
//! Readers only ever see committed records: the index is updated after the data is durable.

mod checkpoint;
mod codec;
mod dedupe;
#[cfg(test)]
mod fault_model;
#[cfg(test)]
mod faults;
mod format;
mod index;
mod record;
pub mod retention;
mod retired;
mod segments;
pub mod snapshots;
mod space;
mod writer;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use eventbus_model::{StoredEvent, with_seq};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use dedupe::Dedupe;
use index::{Index, Location};
pub use retention::Rule;

/// Most events one read returns.
pub const MAX_READ_LIMIT: usize = 1000;

#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    /// A segment is sealed and a new one begun once it reaches this size.
    pub segment_bytes: u64,
    /// How long an `id` is remembered per channel for idempotency.
    pub dedupe_window_ms: u64,
    /// At most this many ids are remembered (the oldest are forgotten first).
    pub dedupe_max_ids: usize,
    /// How much history each channel keeps.
    pub retention: Vec<Rule>,
    /// The index is checkpointed after this many bytes of log (and at every clean close), which
    /// bounds how much a restart after a crash scans.
    pub checkpoint_bytes: u64,
    /// Where commit times and retention ages come from: the system clock but in tests.
    pub clock: Clock,
    /// Committed batches waiting for the backbone, at most; past it new ones are dropped.
    pub backbone_queue: usize,
    /// Appends are refused while the log's file system has less free than this (0: never).
    pub min_free_bytes: u64,
    /// Channels one publisher (`source`) may create (0: no limit).
    pub max_channels_per_source: u64,
}

/// Whether the log can hold `entry` (field sizes, the event's size): the same refusals whatever
/// the engine, so that no engine acknowledges what another could not read back.
pub(crate) fn check_entry(entry: &Entry) -> Result<(), String> {
    // PostgreSQL's text cannot hold NUL: refused on every engine, before it could fail a batch.
    for (name, value) in [
        ("channel", Some(entry.channel.as_str())),
        ("id", Some(entry.id.as_str())),
        ("source", Some(entry.source.as_str())),
        ("key", entry.key.as_deref()),
    ] {
        if value.is_some_and(|v| v.contains('\0')) {
            return Err(format!("{name} holds a NUL character"));
        }
    }
    record::check(
        &entry.channel,
        &entry.id,
        entry.key.as_deref(),
        Some(&entry.source),
        &entry.body,
    )
}

/// A source of "now" in Unix milliseconds.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Clock(Arc::new(now_ms))
    }

    pub fn new(now: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now))
    }

    pub fn now(&self) -> u64 {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

impl Options {
    /// Defaults: 128 MiB segments, a 24 h idempotency window of at most 2M ids, keep everything.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            segment_bytes: 128 * 1024 * 1024,
            dedupe_window_ms: 24 * 3600 * 1000,
            dedupe_max_ids: 2_000_000,
            retention: Vec::new(),
            checkpoint_bytes: 1024 * 1024 * 1024,
            clock: Clock::system(),
            backbone_queue: 4096,
            min_free_bytes: 64 * 1024 * 1024,
            max_channels_per_source: 0,
        }
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("log segment {path} is corrupt at byte {offset}: {cause}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        cause: String,
    },
    #[error("the log writer has stopped after a write failure; restart the store")]
    Failed,
    #[error(
        "not stored: the disk holding the log has {free} bytes free, and the store keeps {min} free (EVENTBUS_STORE_MIN_FREE_BYTES); appends resume by themselves once space is freed"
    )]
    LowSpace { free: u64, min: u64 },
    #[error("after={after} is beyond the head of the channel ({head})")]
    AfterBeyondHead { after: u64, head: u64 },
    #[error("truncated: events before seq {first} are no longer retained (resume from after={})", first - 1)]
    Truncated { first: u64 },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The database behind the log (PostgreSQL) could not be reached or did not commit; an
    /// append may or may not have been stored, and a retry with the same ids is safe.
    #[error("the log's database is unavailable (retry with the same ids): {0}")]
    Unavailable(String),
    #[error(
        "not stored: {publisher} has created {max} channels, as many as a publisher may (EVENTBUS_STORE_MAX_CHANNELS_PER_SOURCE); publish to existing channels"
    )]
    Quota { publisher: String, max: u64 },
}

impl LogError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        LogError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// One event to append; `body` is its JSON object without `seq`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub channel: String,
    pub id: String,
    /// The authenticated publisher: idempotency is per (channel, source, id).
    pub source: String,
    pub key: Option<String>,
    pub deleted: bool,
    pub body: Bytes,
}

pub use eventbus_model::Appended;

#[derive(Debug, Clone)]
pub struct ReadResult {
    pub events: Vec<StoredEvent>,
    pub head: u64,
    /// The first retained seq of the channel.
    pub first: u64,
}

/// Events committed by the writer, in commit order, for the backbone. Bounded: when whoever
/// publishes them falls behind, the writer drops batches (and counts them) rather than wait or grow;
/// gateways repair what the backbone never carried from the log.
pub type Committed = mpsc::Receiver<Vec<StoredEvent>>;

struct Shared {
    dir: PathBuf,
    index: RwLock<Index>,
    /// The idempotency window. The writer holds it while it assigns seqs; retention reads it to
    /// keep the entries of the events it lets go.
    dedupe: Mutex<Dedupe>,
    files: RwLock<HashMap<u32, Arc<File>>>,
    failed: AtomicBool,
    /// The segment being written: never deleted by retention.
    active: AtomicU32,
    retention: Vec<Rule>,
    /// One retention pass at a time: each writes the manifest its deletions rely on.
    retention_pass: Mutex<()>,
    space: space::Watch,
    clock: Clock,
    #[cfg(test)]
    faults: faults::Faults,
}

/// What a start had to do to recover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Whether an index checkpoint was loaded.
    pub from_checkpoint: bool,
    /// Records read from the segments (those the checkpoint did not cover).
    pub scanned_events: u64,
    /// Channels whose seqs jumped over segments retention had deleted.
    pub retired_jumps: u64,
}

pub struct Log {
    recovery: Recovery,
    shared: Arc<Shared>,
    snapshot_lock: tokio::sync::Mutex<()>,
    jobs: mpsc::Sender<writer::Job>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Log {
    /// Opens (or creates) the log in `options.dir`, recovering from whatever a crash left.
    pub fn open(options: Options) -> Result<(Log, Committed), LogError> {
        let dir = options.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|err| LogError::io(&dir, err))?;
        format::check_and_mark(&dir)?;
        let started = std::time::Instant::now();
        let mut list = segments::list(&dir)?;
        if list.is_empty() {
            drop(segments::open_write(&dir, 0)?);
            list.push(0);
        }
        let mut dedupe = Dedupe::new(options.dedupe_window_ms, options.dedupe_max_ids);
        // What retention let go: written before it deleted anything, so it explains every gap a
        // deletion left, crash or not.
        let retired = retired::read(&dir).unwrap_or_else(|err| {
            warn!(cause = %err, "the retention manifest cannot be read; gaps in channels will be taken as retention's");
            Default::default()
        }).unwrap_or_default();
        dedupe.reserve(retired.window.len());
        for (time, key, seq) in retired.window {
            dedupe.restore(time, key, seq);
        }
        let present: HashSet<u32> = list.iter().copied().collect();
        // A checkpoint spares scanning what it covers; anything odd about it and we rebuild.
        let loaded = checkpoint::read(&dir).filter(|loaded| {
            let covered = loaded.covered;
            // The newest covered segment is where damage happens in practice (recent writes, a
            // disk that lied about a flush): its covered part is checked record by record.
            let usable = present.contains(&covered.segment)
                && std::fs::metadata(segments::path_of(&dir, covered.segment)).is_ok_and(|m| m.len() >= covered.offset)
                && segments::verify_prefix(&dir, covered.segment, covered.offset).unwrap_or(false);
            if !usable {
                warn!("the index checkpoint does not match the segments; rebuilding the index from them");
            }
            usable
        });
        if loaded.is_none() && checkpoint::path_of(&dir).exists() {
            warn!(
                "the index checkpoint is missing or damaged; rebuilding the index from the segments"
            );
        }
        let from_checkpoint = loaded.is_some();
        let (mut index, start) = match loaded {
            Some(loaded) => {
                dedupe.reserve(loaded.window.len());
                for (time, key, seq) in loaded.window {
                    dedupe.restore(time, key, seq);
                }
                let mut index = loaded.index;
                // Segments that retention deleted after the checkpoint was written are gone, and
                // with them every seq up to the newest one they held.
                index.segments.retain(|number, _| present.contains(number));
                for channel in index.channels.values_mut() {
                    if let Some(gone) = channel
                        .locations
                        .iter()
                        .rposition(|l| !present.contains(&l.segment))
                    {
                        channel.truncate_below(channel.first + gone as u64 + 1);
                    }
                }
                (index, loaded.covered)
            }
            None => (
                Index::default(),
                checkpoint::Position {
                    segment: 0,
                    offset: 0,
                },
            ),
        };
        let mut files = HashMap::new();
        let mut active_len = 0;
        let mut events = 0u64;
        let mut retired_jumps = 0u64;
        for (i, &segment) in list.iter().enumerate() {
            let is_last = i + 1 == list.len();
            files.insert(segment, Arc::new(segments::open_read(&dir, segment)?));
            if segment < start.segment {
                continue;
            }
            let from = if segment == start.segment {
                start.offset
            } else {
                0
            };
            let len = segments::scan(&dir, segment, from, is_last, |record, offset, len| {
                if let Some(head) = index.channels.get(record.channel).map(|c| c.head()) {
                    if record.seq <= head {
                        return Err(LogError::Invalid(format!(
                            "channel {} goes back from seq {head} to {}",
                            record.channel, record.seq
                        )));
                    }
                    if record.seq > head + 1 {
                        // Only retention removes records, and only whole segments of records it
                        // let go: everything before this seq is history no longer kept.
                        let explained = retired
                            .firsts
                            .get(record.channel)
                            .is_some_and(|first| record.seq <= *first);
                        if !explained {
                            warn!(
                                channel = record.channel,
                                from = head,
                                to = record.seq,
                                segment,
                                "a channel jumps over seqs the retention manifest does not account for; the history before it is treated as let go"
                            );
                        }
                        retired_jumps += 1;
                        index.restart_channel(record.channel, record.seq);
                    }
                }
                let location = Location {
                    segment,
                    offset,
                    len,
                };
                index.add(
                    record.channel,
                    record.seq,
                    location,
                    record.key,
                    record.deleted,
                    record.time_ms,
                );
                let source = record.source_or_from_body();
                dedupe.insert(
                    record.channel,
                    &source,
                    record.id,
                    record.seq,
                    record.time_ms,
                );
                events += 1;
                Ok(())
            })?;
            if is_last {
                active_len = len;
            }
        }
        for (channel, first) in &retired.firsts {
            if let Some(index) = index.channels.get_mut(channel) {
                index.truncate_below(*first);
            }
        }
        dedupe.expire(options.clock.now());
        let active = *list.last().unwrap_or(&0);
        info!(
            dir = %dir.display(),
            segments = list.len(),
            channels = index.channels.len(),
            scanned_events = events,
            from_checkpoint,
            retired_jumps,
            remembered_ids = dedupe.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "log recovered"
        );
        let heads = index
            .channels
            .iter()
            .map(|(c, ch)| (c.clone(), ch.head()))
            .collect();
        // Who created each channel, for the quota: the publisher of its first retained event.
        let mut created: HashMap<String, u64> = HashMap::new();
        if options.max_channels_per_source > 0 {
            for channel in index.channels.values() {
                if let Some(location) = channel.locations.front() {
                    let source = record_source(&dir, *location)?;
                    *created.entry(source).or_default() += 1;
                }
            }
        }
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            index: RwLock::new(index),
            dedupe: Mutex::new(dedupe),
            files: RwLock::new(files),
            failed: AtomicBool::new(false),
            active: AtomicU32::new(active),
            retention: options.retention.clone(),
            retention_pass: Mutex::new(()),
            space: space::Watch::new(dir.clone(), options.min_free_bytes),
            clock: options.clock.clone(),
            #[cfg(test)]
            faults: Default::default(),
        });
        let (jobs_tx, jobs_rx) = mpsc::channel(4096);
        let (committed_tx, committed_rx) = mpsc::channel(options.backbone_queue.max(1));
        let file = segments::open_write(&dir, active)?;
        let state = writer::Writer {
            shared: shared.clone(),
            segment_bytes: options.segment_bytes,
            checkpoint_bytes: options.checkpoint_bytes,
            since_checkpoint: 0,
            active,
            active_len,
            // Recovery cut the segment to its last record.
            zeroed_to: active_len,
            zeros_failed: false,
            file,
            heads,
            created,
            max_channels_per_source: options.max_channels_per_source,
            committed: committed_tx,
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || state.run(jobs_rx))
            .map_err(|err| LogError::io(&dir, err))?;
        let log = Log {
            recovery: Recovery {
                from_checkpoint,
                scanned_events: events,
                retired_jumps,
            },
            shared,
            snapshot_lock: tokio::sync::Mutex::new(()),
            jobs: jobs_tx,
            writer: Mutex::new(Some(handle)),
        };
        // What retention let go before the restart stays gone, before anyone reads.
        log.enforce_retention(options.clock.now())?;
        Ok((log, committed_rx))
    }

    /// Appends a batch; resolves once every event in it is durable (or was already stored).
    pub async fn append(&self, entries: Vec<Entry>) -> Result<Vec<Appended>, LogError> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(LogError::Failed);
        }
        let mut bytes = 0;
        for (i, entry) in entries.iter().enumerate() {
            check_entry(entry).map_err(|cause| LogError::Invalid(format!("event {i}: {cause}")))?;
            bytes +=
                (record::HEADER_LEN + 64 + entry.channel.len() + entry.id.len() + entry.body.len())
                    as u64;
        }
        self.shared.space.admit(bytes)?;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(writer::Job { entries, reply })
            .await
            .map_err(|_| LogError::Failed)?;
        answer.await.map_err(|_| LogError::Failed)?
    }

    /// Up to `limit` events of `channel` with seq > `after`, in order.
    pub async fn read(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
        compact: bool,
    ) -> Result<ReadResult, LogError> {
        let limit = limit.clamp(1, MAX_READ_LIMIT);
        let (head, first, wanted) = {
            let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
            let Some(ch) = index.channels.get(channel) else {
                return if after == 0 {
                    Ok(ReadResult {
                        events: Vec::new(),
                        head: 0,
                        first: 1,
                    })
                } else {
                    Err(LogError::AfterBeyondHead { after, head: 0 })
                };
            };
            let head = ch.head();
            if after > head {
                return Err(LogError::AfterBeyondHead { after, head });
            }
            // Never skip silently: a reader behind the retained history is told so.
            if after + 1 < ch.first {
                return Err(LogError::Truncated { first: ch.first });
            }
            let wanted = if compact {
                ch.compacted_range(after, limit)
            } else {
                ch.range(after, limit)
            };
            (head, ch.first, wanted)
        };
        if wanted.is_empty() {
            return Ok(ReadResult {
                events: Vec::new(),
                head,
                first,
            });
        }
        let shared = self.shared.clone();
        let channel = channel.to_owned();
        let events = tokio::task::spawn_blocking(move || shared.fetch(&channel, &wanted))
            .await
            .map_err(|_| LogError::Failed)??;
        Ok(ReadResult {
            events,
            head,
            first,
        })
    }

    /// Up to `limit` channels whose name starts with `prefix` and sorts after `after`, in name
    /// order, with their heads.
    pub fn channels(&self, prefix: &str, after: &str, limit: usize) -> Vec<(String, u64)> {
        let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
        index.list(prefix, after, limit)
    }

    /// Changes whenever a channel is added (before its first append is acknowledged).
    pub fn channels_added(&self) -> u64 {
        self.shared
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .added
    }

    pub fn head(&self, channel: &str) -> u64 {
        self.shared
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .head(channel)
    }

    /// The newest event of every channel. Published again on start, so that an event committed just
    /// before a crash (and so perhaps never published) reaches live subscribers without waiting.
    pub fn tails(&self) -> Result<Vec<StoredEvent>, LogError> {
        let wanted: Vec<(String, u64, Location)> = {
            let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
            index
                .channels
                .iter()
                .filter_map(|(name, ch)| {
                    ch.locations
                        .back()
                        .map(|loc| (name.clone(), ch.head(), *loc))
                })
                .collect()
        };
        let mut out = Vec::with_capacity(wanted.len());
        for (channel, seq, location) in wanted {
            out.extend(self.shared.fetch(&channel, &[(seq, location)])?);
        }
        Ok(out)
    }

    /// Applies the retention rules as of `now_ms`, and deletes the segments nothing retained lives
    /// in any more. Returns (events let go, segments deleted).
    ///
    /// Before the first deletion, the retention manifest (every channel's first retained seq, and
    /// the idempotency entries of the events let go) is made durable: a crash at any point after
    /// it leaves gaps that the next start can explain, and ids it still recognises.
    pub fn enforce_retention(&self, now_ms: u64) -> Result<(u64, usize), LogError> {
        let _one_pass = self
            .shared
            .retention_pass
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (dropped, dead, firsts) = {
            let mut index = self.shared.index.write().unwrap_or_else(|p| p.into_inner());
            let active = self.shared.active.load(Ordering::Acquire);
            let dropped = retention::apply(&mut index, &self.shared.retention, now_ms, active);
            let dead = index.dead_segments(active);
            let firsts: HashMap<String, u64> = if dead.is_empty() {
                HashMap::new()
            } else {
                index
                    .channels
                    .iter()
                    .filter(|(_, channel)| channel.first > 1)
                    .map(|(name, channel)| (name.clone(), channel.first))
                    .collect()
            };
            (dropped, dead, firsts)
        };
        if dead.is_empty() {
            return Ok((dropped, 0));
        }
        let window = self
            .shared
            .dedupe
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries_below(&firsts);
        retired::write(&self.shared.dir, &retired::Retired { firsts, window })?;
        {
            let mut index = self.shared.index.write().unwrap_or_else(|p| p.into_inner());
            for segment in &dead {
                index.segments.remove(segment);
            }
        }
        {
            let mut files = self.shared.files.write().unwrap_or_else(|p| p.into_inner());
            for segment in &dead {
                files.remove(segment);
            }
        }
        // A test may crash this pass with only some deletions done (or made durable).
        #[cfg(test)]
        let crash_after = self.shared.faults.take_delete_mask();
        #[cfg(not(test))]
        let crash_after: Option<u64> = None;
        for (i, segment) in dead.iter().enumerate() {
            if crash_after.is_some_and(|mask| mask & (1 << (i % 64)) == 0) {
                continue;
            }
            let path = segments::path_of(&self.shared.dir, *segment);
            std::fs::remove_file(&path).map_err(|err| LogError::io(&path, err))?;
        }
        if crash_after.is_some() {
            return Err(LogError::Failed);
        }
        segments::sync_dir(&self.shared.dir)?;
        info!(
            segments = dead.len(),
            events = dropped,
            "retention deleted old segments"
        );
        Ok((dropped, dead.len()))
    }

    /// Stores `data` (JSON text) as the state of `channel` as of `seq`, replacing an older
    /// snapshot. Durable when it returns.
    pub async fn put_snapshot(&self, channel: &str, seq: u64, data: Bytes) -> Result<(), LogError> {
        let head = self.head(channel);
        if seq == 0 || seq > head {
            return Err(LogError::Invalid(format!(
                "a snapshot's seq must be 1-{head} (the channel's head)"
            )));
        }
        let dir = snapshots::dir_of(&self.shared.dir);
        let channel = channel.to_owned();
        let _one_writer = self.snapshot_lock.lock().await;
        tokio::task::spawn_blocking(move || {
            if let Some(current) = snapshots::read(&dir, &channel)?
                && current.seq > seq
            {
                return Err(LogError::Invalid(format!(
                    "a newer snapshot exists (seq {}); snapshots only move forward",
                    current.seq
                )));
            }
            snapshots::write(&dir, &channel, &snapshots::Snapshot { seq, data })
        })
        .await
        .map_err(|_| LogError::Failed)?
    }

    /// The latest snapshot of `channel`, if any.
    pub async fn snapshot(&self, channel: &str) -> Result<Option<snapshots::Snapshot>, LogError> {
        let dir = snapshots::dir_of(&self.shared.dir);
        let channel = channel.to_owned();
        tokio::task::spawn_blocking(move || snapshots::read(&dir, &channel))
            .await
            .map_err(|_| LogError::Failed)?
    }

    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// The first retained seq and the head of a channel.
    pub fn bounds(&self, channel: &str) -> (u64, u64) {
        let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
        index
            .channels
            .get(channel)
            .map_or((1, 0), |c| (c.first, c.head()))
    }

    /// False once a write or fsync failed: the store must be restarted (and recovers then).
    pub fn is_healthy(&self) -> bool {
        !self.shared.failed.load(Ordering::Acquire)
    }

    /// Bytes of log segments (what retention bounds).
    pub fn log_bytes(&self) -> u64 {
        std::fs::read_dir(&self.shared.dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Whether appends are refused for want of disk space right now.
    pub fn is_low_on_space(&self) -> bool {
        self.shared.space.is_low()
    }

    /// Waits for the writer to finish what it was given, then stops it.
    pub fn close(self) {
        let Log { jobs, writer, .. } = self;
        drop(jobs);
        if let Some(handle) = writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }

    /// Stops as a crash would: no checkpoint, nothing tidied; what reached the files stays.
    #[cfg(test)]
    pub(crate) fn crash(self) {
        self.shared.faults.crashed.store(true, Ordering::Release);
        let Log { jobs, writer, .. } = self;
        drop(jobs);
        if let Some(handle) = writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

/// The publisher of the record at `location` (read once per channel at start, for the quota).
fn record_source(dir: &Path, location: Location) -> Result<String, LogError> {
    use std::os::unix::fs::FileExt;
    let path = segments::path_of(dir, location.segment);
    let file = File::open(&path).map_err(|err| LogError::io(&path, err))?;
    let mut buf = vec![0; location.len as usize];
    file.read_exact_at(&mut buf, location.offset)
        .map_err(|err| LogError::io(&path, err))?;
    let (record, _) = record::decode(&buf).map_err(|err| LogError::Corrupt {
        path: path.clone(),
        offset: location.offset,
        cause: err.to_string(),
    })?;
    Ok(record.source_or_from_body().into_owned())
}

impl Shared {
    /// Reads the given records from disk, one `pread` per run of adjacent records.
    fn fetch(
        &self,
        channel: &str,
        wanted: &[(u64, Location)],
    ) -> Result<Vec<StoredEvent>, LogError> {
        use std::os::unix::fs::FileExt;
        let mut out = Vec::with_capacity(wanted.len());
        let mut i = 0;
        let mut buf = Vec::new();
        while i < wanted.len() {
            let first = wanted[i].1;
            let mut end = i + 1;
            let mut run_len = first.len as u64;
            while end < wanted.len()
                && wanted[end].1.segment == first.segment
                && wanted[end].1.offset == first.offset + run_len
                && run_len < 4 * 1024 * 1024
            {
                run_len += wanted[end].1.len as u64;
                end += 1;
            }
            let file = self
                .files
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&first.segment)
                .cloned()
                .ok_or_else(|| {
                    LogError::Invalid(format!("segment {} is not open", first.segment))
                })?;
            buf.resize(run_len as usize, 0);
            let path = segments::path_of(&self.dir, first.segment);
            file.read_exact_at(&mut buf, first.offset)
                .map_err(|err| LogError::io(&path, err))?;
            let mut pos = 0;
            for &(seq, location) in &wanted[i..end] {
                let (record, len) =
                    record::decode(&buf[pos..]).map_err(|err| LogError::Corrupt {
                        path: path.clone(),
                        offset: location.offset,
                        cause: err.to_string(),
                    })?;
                if record.seq != seq || record.channel != channel {
                    return Err(LogError::Corrupt {
                        path: path.clone(),
                        offset: location.offset,
                        cause: format!(
                            "expected {channel}#{seq}, found {}#{}",
                            record.channel, record.seq
                        ),
                    });
                }
                out.push(StoredEvent {
                    channel: channel.to_owned(),
                    seq,
                    json: with_seq(record.body, seq),
                    committed_ms: 0,
                });
                pos += len;
            }
            i = end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;

/// The decoders of what the store reads back from a disk that may be damaged, for the fuzz tests
/// (`fuzz/`): each says whether the bytes were accepted. Not an API.
#[doc(hidden)]
pub mod decoders {
    /// Every record of a segment's bytes, as recovery reads them: how many decode.
    pub fn segment(bytes: &[u8]) -> usize {
        let (mut offset, mut count) = (0, 0);
        while let Ok((_, len)) = super::record::decode(&bytes[offset..]) {
            offset += len;
            count += 1;
        }
        count
    }

    pub fn checkpoint(bytes: &[u8]) -> bool {
        super::checkpoint::decode(bytes).is_some()
    }

    pub fn manifest(bytes: &[u8]) -> bool {
        super::retired::decode(bytes).is_ok()
    }

    /// Encodes a record and decodes it again: whether it comes back the same. (One argument per
    /// field of the record, as the fuzzer draws them.)
    #[allow(clippy::too_many_arguments)]
    pub fn record_round_trip(
        seq: u64,
        time_ms: u64,
        channel: &str,
        id: &str,
        key: Option<&str>,
        source: Option<&str>,
        deleted: bool,
        body: &[u8],
    ) -> bool {
        use super::record::{self, Record};
        if record::check(channel, id, key, source, body).is_err() {
            return true;
        }
        let original = Record {
            seq,
            time_ms,
            channel,
            id,
            key,
            deleted,
            source,
            body,
        };
        let mut buf = Vec::new();
        let len = record::encode(&original, &mut buf);
        record::decode(&buf).is_ok_and(|(decoded, used)| decoded == original && used == len)
    }
}
