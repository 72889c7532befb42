//! The log on PostgreSQL: the store's engine when the log must outlive one machine, and when
//! several store replicas serve one log at once.
//!
//! - **Seqs.** An append locks its channels' rows (`eventbus_channels`, in name order, so two
//!   replicas never deadlock), reads their heads, and writes the events and the new heads in the
//!   same transaction: seqs stay contiguous whichever replica appends.
//! - **Idempotency.** `(channel, source, id)` is looked up after the channel's row is locked, so
//!   a retry sent to another replica while the first append commits is answered as a duplicate.
//! - **Group commit.** One writer task per replica takes every append waiting and commits them in
//!   one transaction, as the embedded writer does with one fsync.
//! - **Durability.** An append is answered after `COMMIT` returns: with `synchronous_commit = on`
//!   (PostgreSQL's default) that is after the WAL is flushed, and with a synchronous standby,
//!   after the standby has it too (docs/operations.md).
//! - **Failover.** A connection that fails is dropped and made again from the URL, which may list
//!   several hosts with `target_session_attrs=read-write`: the new primary is found by itself.
//!   Appends meanwhile are refused ([`LogError::Unavailable`], 503), safe to retry with the same
//!   ids.

mod leader;
mod schema;
mod writer;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use eventbus_model::StoredEvent;
use eventbus_runtime::tls::Trust;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

use crate::engine::{Engine, Snapshot};
use crate::log::{Appended, Clock, Committed, Entry, LogError, MAX_READ_LIMIT, ReadResult, Rule};

pub use leader::Election;
pub use schema::{MIGRATIONS, SchemaError};

/// What the PostgreSQL engine needs to know.
#[derive(Debug, Clone)]
pub struct Options {
    /// A libpq URL (`postgres://user:password@host1:5432,host2:5432/db?target_session_attrs=read-write`).
    pub url: String,
    pub dedupe_window_ms: u64,
    pub retention: Vec<Rule>,
    pub max_channels_per_source: u64,
    pub clock: Clock,
    /// Batches held for the backbone publisher before the newest are dropped.
    pub backbone_queue: usize,
    /// Connections for reads (the writer has its own).
    pub pool_size: usize,
    /// Whom to trust when the URL asks for TLS (besides its `sslrootcert`).
    pub trust: Trust,
}

impl Options {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            dedupe_window_ms: 24 * 3600 * 1000,
            retention: Vec::new(),
            max_channels_per_source: 0,
            clock: Clock::system(),
            backbone_queue: 4096,
            pool_size: 8,
            trust: Trust::default(),
        }
    }
}

/// Advisory lock held (for its transaction) by the replica running a retention pass.
const RETENTION_LOCK: i64 = 0x6576_656e_7472_6574;

pub struct Postgres {
    pool: Pool,
    jobs: mpsc::Sender<writer::Job>,
    options: Options,
    /// Whether the last attempt to reach the database worked.
    reachable: Arc<AtomicBool>,
}

/// Any error of the database as the store's: the append's outcome is unknown, a retry is safe.
/// With its causes: tokio-postgres says "error performing TLS handshake" and keeps the why
/// (an unknown issuer, a name mismatch) in its source.
pub(crate) fn unavailable(err: impl std::error::Error) -> LogError {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    LogError::Unavailable(text)
}

/// How to reach the database: the URL's settings, and TLS as its `sslmode` asks.
#[derive(Clone)]
pub struct Database {
    pub config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config's Debug leaves the password out.
        f.debug_struct("Database")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// `sslmode` and `sslrootcert` taken out of a libpq URL or key=value string (tokio-postgres
/// knows neither `verify-full` nor `sslrootcert`): (the rest, sslmode, sslrootcert).
fn take_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    let mut keep = |pair: &str| match pair.split_once('=') {
        Some(("sslmode", value)) => {
            mode = Some(value.to_owned());
            false
        }
        Some(("sslrootcert", value)) => {
            root = Some(value.to_owned());
            false
        }
        _ => true,
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query.split('&').filter(|p| keep(p)).collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_owned(),
        }
    } else {
        let kept: Vec<&str> = url.split_whitespace().filter(|p| keep(p)).collect();
        kept.join(" ")
    };
    (rest, mode, root)
}

/// The connection settings of `url`, and its `sslrootcert`: checks the URL without reading
/// anything.
pub fn parse_url(url: &str) -> Result<(tokio_postgres::Config, Option<String>), LogError> {
    let invalid = |what: String| LogError::Invalid(format!("the PostgreSQL URL: {what}"));
    let (rest, mode, root) = take_tls_params(url);
    let mut config =
        tokio_postgres::Config::from_str(&rest).map_err(|err| invalid(err.to_string()))?;
    let mode = match mode.as_deref() {
        None | Some("disable") => SslMode::Disable,
        Some("allow" | "prefer") => SslMode::Prefer,
        Some("require" | "verify-ca" | "verify-full") => SslMode::Require,
        Some(other) => return Err(invalid(format!("unknown sslmode {other:?}"))),
    };
    config.ssl_mode(mode);
    Ok((config, root))
}

impl Database {
    /// `url` parsed, with a connect timeout when it names none (so a failover is noticed in
    /// seconds, not at the TCP timeout). TLS: none without `sslmode` or with `disable` (as
    /// before, and what a database on a private network runs); with `prefer`, `require`,
    /// `verify-ca` or `verify-full` the server's certificate is always verified, name included,
    /// against `trust` (the system's roots and `--ca-file`) plus `sslrootcert`: stricter than
    /// libpq's `require`, which encrypts without knowing whom to.
    pub fn parse(url: &str, trust: &Trust) -> Result<Database, LogError> {
        let invalid = |what: String| LogError::Invalid(format!("the PostgreSQL URL: {what}"));
        let (mut config, root) = parse_url(url)?;
        let mut extra = Vec::new();
        if let Some(path) = &root {
            use rustls::pki_types::pem::PemObject;
            extra = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|err| invalid(format!("sslrootcert {path}: {err}")))?;
            if extra.is_empty() {
                return Err(invalid(format!("sslrootcert {path}: no certificate in it")));
            }
        }
        // Without TLS never used, but built all the same: a bad `--ca-file` fails the start
        // whatever the URL says.
        let client = trust.client_config_with(extra).map_err(invalid)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.keepalives_idle(Duration::from_secs(10));
        if config.get_application_name().is_none() {
            config.application_name("eventbus-store");
        }
        // Every query here walks a primary key in order (a page of a channel, an id probe). On a
        // young or fast-growing table, whose statistics say it is small, the planner takes a
        // bitmap scan instead: every event of the channel fetched and sorted for one page of 1000
        // (seen: 157 ms a page at 300k events, against under 1 ms in key order).
        let options = match config.get_options() {
            Some(given) => format!("{given} -c enable_bitmapscan=off"),
            None => "-c enable_bitmapscan=off".to_owned(),
        };
        config.options(&options);
        Ok(Database {
            config,
            tls: MakeRustlsConnect::new(client),
        })
    }

    /// A new connection, its driver spawned.
    pub(crate) async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                warn!(cause = %err, "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }
}

impl Postgres {
    /// Connects, migrates the schema, and starts the writer.
    pub async fn open(options: Options) -> Result<(Postgres, Committed), LogError> {
        let database = Database::parse(&options.url, &options.trust)?;
        let mut client = database.connect().await.map_err(unavailable)?;
        let version = schema::migrate(&mut client)
            .await
            .map_err(|err| match err {
                SchemaError::Newer { .. } => LogError::Invalid(err.to_string()),
                SchemaError::Database(err) => unavailable(err),
            })?;
        drop(client);
        let manager = Manager::from_config(
            database.config.clone(),
            database.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(5)))
            .wait_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|err| LogError::Invalid(format!("PostgreSQL pool: {err}")))?;
        let reachable = Arc::new(AtomicBool::new(true));
        let (jobs, job_rx) = mpsc::channel(4096);
        let (committed_tx, committed_rx) = mpsc::channel(options.backbone_queue.max(1));
        tokio::spawn(
            writer::Writer {
                database,
                client: None,
                max_channels_per_source: options.max_channels_per_source,
                dedupe_window_ms: options.dedupe_window_ms,
                clock: options.clock.clone(),
                reachable: reachable.clone(),
                committed: committed_tx,
            }
            .run(job_rx),
        );
        info!(version, "log on PostgreSQL");
        let pg = Postgres {
            pool,
            jobs,
            options,
            reachable,
        };
        // As the embedded log does: what the rules let go is gone before anyone reads.
        pg.enforce_retention(pg.options.clock.now()).await?;
        Ok((pg, committed_rx))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, LogError> {
        match self.pool.get().await {
            Ok(client) => Ok(client),
            Err(err) => {
                self.reachable.store(false, Ordering::Release);
                Err(unavailable(err))
            }
        }
    }

    /// The outcome of a database call, noting whether the database was reachable.
    fn noted<T>(&self, result: Result<T, tokio_postgres::Error>) -> Result<T, LogError> {
        match result {
            Ok(value) => {
                self.reachable.store(true, Ordering::Release);
                Ok(value)
            }
            Err(err) => {
                if err.is_closed() || err.code().is_none() {
                    self.reachable.store(false, Ordering::Release);
                }
                Err(unavailable(err))
            }
        }
    }
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn as_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[async_trait]
impl Engine for Postgres {
    async fn append(&self, entries: Vec<Entry>) -> Result<Vec<Appended>, LogError> {
        for (i, entry) in entries.iter().enumerate() {
            crate::log::check_entry(entry)
                .map_err(|cause| LogError::Invalid(format!("event {i}: {cause}")))?;
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(writer::Job { entries, reply })
            .await
            .map_err(|_| LogError::Failed)?;
        answer.await.map_err(|_| LogError::Failed)?
    }

    async fn read(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
        compact: bool,
    ) -> Result<ReadResult, LogError> {
        let limit = limit.clamp(1, MAX_READ_LIMIT) as i64;
        let client = self.client().await?;
        // One statement, one snapshot: the head and the events agree.
        let sql = if compact {
            "WITH c AS (SELECT head, first FROM eventbus_channels WHERE name = $1)
             SELECT c.head, c.first, e.seq, e.json FROM c LEFT JOIN LATERAL (
                SELECT seq, json FROM eventbus_events e
                WHERE e.channel = $1 AND e.seq > $2 AND e.seq <= c.head
                  AND (e.key IS NULL OR (NOT e.deleted AND NOT EXISTS (
                      SELECT 1 FROM eventbus_events n
                      WHERE n.channel = $1 AND n.key = e.key AND n.seq > e.seq)))
                ORDER BY e.seq LIMIT $3) e ON true"
        } else {
            "WITH c AS (SELECT head, first FROM eventbus_channels WHERE name = $1)
             SELECT c.head, c.first, e.seq, e.json FROM c LEFT JOIN LATERAL (
                SELECT seq, json FROM eventbus_events
                WHERE channel = $1 AND seq > $2 AND seq <= c.head
                ORDER BY seq LIMIT $3) e ON true"
        };
        let statement = self.noted(client.prepare_cached(sql).await)?;
        let rows = self.noted(
            client
                .query(&statement, &[&channel, &as_i64(after), &limit])
                .await,
        )?;
        let Some(top) = rows.first() else {
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
        let head = as_u64(top.get(0));
        let first = as_u64(top.get(1));
        if after > head {
            return Err(LogError::AfterBeyondHead { after, head });
        }
        if after + 1 < first {
            return Err(LogError::Truncated { first });
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(seq) = row.get::<_, Option<i64>>(2) else {
                continue;
            };
            let json: Vec<u8> = row.get(3);
            events.push(StoredEvent {
                channel: channel.to_owned(),
                seq: as_u64(seq),
                json: Bytes::from(json),
                committed_ms: 0,
            });
        }
        Ok(ReadResult {
            events,
            head,
            first,
        })
    }

    async fn channels(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, LogError> {
        let client = self.client().await?;
        let statement = self.noted(
            client
                .prepare_cached(
                    "SELECT name, head FROM eventbus_channels
                     WHERE name >= $1 AND starts_with(name, $1) AND name > $2
                     ORDER BY name LIMIT $3",
                )
                .await,
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.noted(client.query(&statement, &[&prefix, &after, &limit]).await)?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, String>(0), as_u64(row.get(1))))
            .collect())
    }

    async fn bounds(&self, channel: &str) -> Result<(u64, u64), LogError> {
        let client = self.client().await?;
        let statement = self.noted(
            client
                .prepare_cached("SELECT first, head FROM eventbus_channels WHERE name = $1")
                .await,
        )?;
        let row = self.noted(client.query_opt(&statement, &[&channel]).await)?;
        Ok(row.map_or((1, 0), |row| (as_u64(row.get(0)), as_u64(row.get(1)))))
    }

    async fn heads(&self, channels: &[String]) -> Result<Vec<u64>, LogError> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let statement = self.noted(
            client
                .prepare_cached("SELECT name, head FROM eventbus_channels WHERE name = ANY($1)")
                .await,
        )?;
        let rows = self.noted(client.query(&statement, &[&channels]).await)?;
        let known: std::collections::HashMap<String, u64> = rows
            .iter()
            .map(|row| (row.get::<_, String>(0), as_u64(row.get(1))))
            .collect();
        Ok(channels
            .iter()
            .map(|c| known.get(c).copied().unwrap_or(0))
            .collect())
    }

    async fn channels_added(&self) -> Result<u64, LogError> {
        let client = self.client().await?;
        let statement = self.noted(
            client
                .prepare_cached("SELECT coalesce(max(number), 0) FROM eventbus_channels")
                .await,
        )?;
        let row = self.noted(client.query_one(&statement, &[]).await)?;
        Ok(as_u64(row.get(0)))
    }

    async fn put_snapshot(&self, channel: &str, seq: u64, data: Bytes) -> Result<(), LogError> {
        let (_, head) = self.bounds(channel).await?;
        if seq == 0 || seq > head {
            return Err(LogError::Invalid(format!(
                "a snapshot's seq must be 1-{head} (the channel's head)"
            )));
        }
        let client = self.client().await?;
        let statement = self.noted(
            client
                .prepare_cached(
                    "INSERT INTO eventbus_snapshots (channel, seq, data) VALUES ($1, $2, $3)
                     ON CONFLICT (channel) DO UPDATE SET seq = EXCLUDED.seq, data = EXCLUDED.data
                     WHERE eventbus_snapshots.seq <= EXCLUDED.seq
                     RETURNING seq",
                )
                .await,
        )?;
        let stored = self.noted(
            client
                .query_opt(&statement, &[&channel, &as_i64(seq), &data.as_ref()])
                .await,
        )?;
        if stored.is_none() {
            let current = self.snapshot(channel).await?.map_or(0, |s| s.seq);
            return Err(LogError::Invalid(format!(
                "a newer snapshot exists (seq {current}); snapshots only move forward"
            )));
        }
        Ok(())
    }

    async fn snapshot(&self, channel: &str) -> Result<Option<Snapshot>, LogError> {
        let client = self.client().await?;
        let statement = self.noted(
            client
                .prepare_cached("SELECT seq, data FROM eventbus_snapshots WHERE channel = $1")
                .await,
        )?;
        let row = self.noted(client.query_opt(&statement, &[&channel]).await)?;
        Ok(row.map(|row| Snapshot {
            seq: as_u64(row.get(0)),
            data: Bytes::from(row.get::<_, Vec<u8>>(1)),
        }))
    }

    async fn tails(&self) -> Result<Vec<StoredEvent>, LogError> {
        let client = self.client().await?;
        let rows = self.noted(
            client
                .query(
                    "SELECT e.channel, e.seq, e.json FROM eventbus_channels c
                     JOIN eventbus_events e ON e.channel = c.name AND e.seq = c.head",
                    &[],
                )
                .await,
        )?;
        Ok(rows
            .iter()
            .map(|row| StoredEvent {
                channel: row.get(0),
                seq: as_u64(row.get(1)),
                json: Bytes::from(row.get::<_, Vec<u8>>(2)),
                committed_ms: 0,
            })
            .collect())
    }

    async fn enforce_retention(&self, now_ms: u64) -> Result<(u64, usize), LogError> {
        let mut client = self.client().await?;
        let tx = self.noted(client.transaction().await)?;
        // One replica's pass at a time; the others have nothing to add.
        let ours: bool = self
            .noted(
                tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RETENTION_LOCK])
                    .await,
            )?
            .get(0);
        if !ours {
            return Ok((0, 0));
        }
        let horizon = as_i64(now_ms.saturating_sub(self.options.dedupe_window_ms));
        self.noted(
            tx.execute("DELETE FROM eventbus_ids WHERE time_ms < $1", &[&horizon])
                .await,
        )?;
        let mut dropped = 0;
        if !self.options.retention.is_empty() {
            let channels = self.noted(
                tx.query("SELECT name, head, first FROM eventbus_channels", &[])
                    .await,
            )?;
            for row in channels {
                let name: String = row.get(0);
                let (head, current): (i64, i64) = (row.get(1), row.get(2));
                let Some(rule) = self
                    .options
                    .retention
                    .iter()
                    .find(|rule| eventbus_router::matches(&rule.pattern, &name))
                else {
                    continue;
                };
                let mut first = current;
                if let Some(max) = rule.max_events {
                    first = first.max(head - as_i64(max) + 1);
                }
                if let Some(max) = rule.max_bytes {
                    let kept: Option<i64> = self
                        .noted(
                            tx.query_one(
                                "SELECT min(seq) FROM (
                                    SELECT seq, sum(octet_length(json)) OVER (ORDER BY seq DESC) AS tail
                                    FROM eventbus_events WHERE channel = $1) t
                                 WHERE tail <= $2",
                                &[&name, &as_i64(max)],
                            )
                            .await,
                        )?
                        .get(0);
                    first = first.max(kept.unwrap_or(head));
                }
                if let Some(max_age) = rule.max_age_ms {
                    let horizon = as_i64(now_ms.saturating_sub(max_age));
                    let kept: Option<i64> = self
                        .noted(
                            tx.query_one(
                                "SELECT min(seq) FROM eventbus_events
                                 WHERE channel = $1 AND time_ms >= $2",
                                &[&name, &horizon],
                            )
                            .await,
                        )?
                        .get(0);
                    first = first.max(kept.unwrap_or(head));
                }
                // The newest event stays, so the head stays known.
                let first = first.min(head);
                if first > current {
                    self.noted(
                        tx.execute(
                            "UPDATE eventbus_channels SET first = $2 WHERE name = $1 AND first < $2",
                            &[&name, &first],
                        )
                        .await,
                    )?;
                    self.noted(
                        tx.execute(
                            "DELETE FROM eventbus_events WHERE channel = $1 AND seq < $2",
                            &[&name, &first],
                        )
                        .await,
                    )?;
                    dropped += as_u64(first - current);
                }
            }
        }
        self.noted(tx.commit().await)?;
        Ok((dropped, 0))
    }

    fn is_healthy(&self) -> bool {
        // A database away is waited for (and reported by readiness), never a reason to restart.
        !self.jobs.is_closed()
    }

    fn is_ready(&self) -> bool {
        self.reachable.load(Ordering::Acquire)
    }

    fn log_bytes(&self) -> u64 {
        0
    }

    fn name(&self) -> &'static str {
        "postgres"
    }
}
