//! What the store needs of whatever keeps its log: the embedded log on this machine's disk
//! ([`crate::log::Log`], the default) or PostgreSQL ([`crate::postgres::Postgres`], for stores
//! that outlive a machine and run as several replicas). The gRPC service, the durable groups and
//! the backbone publisher see only this, so every semantic is stated once, here, and checked by
//! the same tests on both.

use async_trait::async_trait;
use bytes::Bytes;
use eventbus_model::StoredEvent;

pub use crate::log::snapshots::Snapshot;
pub use crate::log::{Appended, Entry, LogError, ReadResult};

#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Appends a batch; resolves once every event in it is durable (or was already stored: an
    /// `(channel, source, id)` seen within the idempotency window is answered with its first
    /// seq and `duplicate`). Seqs are contiguous per channel from 1.
    async fn append(&self, entries: Vec<Entry>) -> Result<Vec<Appended>, LogError>;

    /// Up to `limit` events of `channel` with seq > `after`, in order; with `compact`, only the
    /// newest event of each key that is not a tombstone, and every event without a key.
    /// `after` beyond the head is [`LogError::AfterBeyondHead`]; before the first retained seq,
    /// [`LogError::Truncated`].
    async fn read(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
        compact: bool,
    ) -> Result<ReadResult, LogError>;

    /// Up to `limit` channels whose name starts with `prefix` and sorts after `after`, in name
    /// order, with their heads.
    async fn channels(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, LogError>;

    /// The first retained seq and the head of `channel`; `(1, 0)` for one never written.
    async fn bounds(&self, channel: &str) -> Result<(u64, u64), LogError>;

    /// The heads of `channels`, in their order (0 for one never written).
    async fn heads(&self, channels: &[String]) -> Result<Vec<u64>, LogError>;

    /// A number that changes whenever a channel is added, before that channel's first append
    /// is acknowledged: whoever keeps a list of channels knows when to list them again.
    async fn channels_added(&self) -> Result<u64, LogError>;

    /// Stores `data` (JSON text) as the state of `channel` as of `seq` (1..=head), replacing an
    /// older snapshot; never a newer one. Durable when it returns.
    async fn put_snapshot(&self, channel: &str, seq: u64, data: Bytes) -> Result<(), LogError>;

    /// The latest snapshot of `channel`, if any.
    async fn snapshot(&self, channel: &str) -> Result<Option<Snapshot>, LogError>;

    /// The newest event of every channel, published again at start so that an event committed
    /// just before a crash (and so perhaps never published) reaches live subscribers.
    async fn tails(&self) -> Result<Vec<StoredEvent>, LogError>;

    /// Applies the retention rules as of `now_ms` (and forgets ids older than the idempotency
    /// window where the engine keeps them apart). Returns (events let go, files deleted).
    async fn enforce_retention(&self, now_ms: u64) -> Result<(u64, usize), LogError>;

    /// False once the engine cannot go on without a restart (the embedded log after a failed
    /// write): the process exits so that its supervisor restarts it.
    fn is_healthy(&self) -> bool;

    /// Whether appends would be taken right now.
    fn is_ready(&self) -> bool;

    /// Bytes the log takes, for the metrics (0 where another process keeps it).
    fn log_bytes(&self) -> u64;

    /// A short name for logs and metrics: `embedded` or `postgres`.
    fn name(&self) -> &'static str;
}

#[async_trait]
impl Engine for crate::log::Log {
    async fn append(&self, entries: Vec<Entry>) -> Result<Vec<Appended>, LogError> {
        crate::log::Log::append(self, entries).await
    }

    async fn read(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
        compact: bool,
    ) -> Result<ReadResult, LogError> {
        crate::log::Log::read(self, channel, after, limit, compact).await
    }

    async fn channels(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, LogError> {
        Ok(crate::log::Log::channels(self, prefix, after, limit))
    }

    async fn bounds(&self, channel: &str) -> Result<(u64, u64), LogError> {
        Ok(crate::log::Log::bounds(self, channel))
    }

    async fn heads(&self, channels: &[String]) -> Result<Vec<u64>, LogError> {
        Ok(channels.iter().map(|c| self.head(c)).collect())
    }

    async fn channels_added(&self) -> Result<u64, LogError> {
        Ok(crate::log::Log::channels_added(self))
    }

    async fn put_snapshot(&self, channel: &str, seq: u64, data: Bytes) -> Result<(), LogError> {
        crate::log::Log::put_snapshot(self, channel, seq, data).await
    }

    async fn snapshot(&self, channel: &str) -> Result<Option<Snapshot>, LogError> {
        crate::log::Log::snapshot(self, channel).await
    }

    async fn tails(&self) -> Result<Vec<StoredEvent>, LogError> {
        crate::log::Log::tails(self)
    }

    async fn enforce_retention(&self, now_ms: u64) -> Result<(u64, usize), LogError> {
        // Deleting files and fsyncing the directory: off the async workers where there are others.
        let pass = || crate::log::Log::enforce_retention(self, now_ms);
        match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(pass),
            _ => pass(),
        }
    }

    fn is_healthy(&self) -> bool {
        crate::log::Log::is_healthy(self)
    }

    fn is_ready(&self) -> bool {
        crate::log::Log::is_healthy(self) && !self.is_low_on_space()
    }

    fn log_bytes(&self) -> u64 {
        crate::log::Log::log_bytes(self)
    }

    fn name(&self) -> &'static str {
        "embedded"
    }
}
