//! The writer of one store replica: every append waiting, in one transaction (group commit).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use eventbus_model::StoredEvent;
use eventbus_model::stored::with_seq;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;
use tracing::warn;

use super::{as_i64, as_u64, unavailable};
use crate::log::{Appended, Clock, Entry, LogError};

/// Most events committed in one transaction; the rest wait for the next.
const MAX_BATCH_EVENTS: usize = 10_000;

pub struct Job {
    pub entries: Vec<Entry>,
    pub reply: oneshot::Sender<Result<Vec<Appended>, LogError>>,
}

pub struct Writer {
    pub database: super::Database,
    pub client: Option<Client>,
    pub max_channels_per_source: u64,
    pub dedupe_window_ms: u64,
    pub clock: Clock,
    pub reachable: Arc<AtomicBool>,
    pub committed: mpsc::Sender<Vec<StoredEvent>>,
}

/// Where each event of each job went: its seq and whether it was a duplicate.
type Outcome = Result<Vec<(u64, bool)>, LogError>;

impl Writer {
    pub async fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        while let Some(first) = jobs.recv().await {
            let mut events = first.entries.len();
            let mut group = vec![first];
            while events < MAX_BATCH_EVENTS {
                match jobs.try_recv() {
                    Ok(job) => {
                        events += job.entries.len();
                        group.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group).await;
        }
    }

    async fn commit_group(&mut self, group: Vec<Job>) {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            match self.database.connect().await {
                Ok(client) => self.client = Some(client),
                Err(err) => {
                    self.reachable.store(false, Ordering::Release);
                    warn!(cause = %err, "cannot reach PostgreSQL; appends are refused until it answers");
                    let cause = unavailable(err).to_string();
                    for job in group {
                        let _ = job.reply.send(Err(LogError::Unavailable(cause.clone())));
                    }
                    return;
                }
            }
        }
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let time_ms = self.clock.now();
        match commit(
            client,
            &group,
            time_ms,
            self.max_channels_per_source,
            self.dedupe_window_ms,
        )
        .await
        {
            Ok(outcomes) => {
                self.reachable.store(true, Ordering::Release);
                self.answer(group, outcomes, time_ms);
            }
            Err(err) => {
                if err.is_closed() || err.code().is_none() {
                    self.reachable.store(false, Ordering::Release);
                    self.client = None;
                }
                warn!(cause = %err, jobs = group.len(), "append transaction failed; its callers are told to retry");
                let cause = unavailable(err).to_string();
                for job in group {
                    let _ = job.reply.send(Err(LogError::Unavailable(cause.clone())));
                }
            }
        }
    }

    fn answer(&self, group: Vec<Job>, outcomes: Vec<Outcome>, time_ms: u64) {
        let mut committed = Vec::new();
        for (job, outcome) in group.into_iter().zip(outcomes) {
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(refused) => {
                    let _ = job.reply.send(Err(refused));
                    continue;
                }
            };
            let mut results = Vec::with_capacity(job.entries.len());
            for (entry, (seq, duplicate)) in job.entries.into_iter().zip(outcome) {
                if !duplicate {
                    committed.push(StoredEvent {
                        channel: entry.channel.clone(),
                        seq,
                        json: with_seq(&entry.body, seq),
                        committed_ms: time_ms,
                    });
                }
                results.push(Appended {
                    channel: entry.channel,
                    id: entry.id,
                    seq,
                    duplicate,
                });
            }
            let _ = job.reply.send(Ok(results));
        }
        if !committed.is_empty() {
            let m = eventbus_runtime::metrics::metrics();
            m.store_appended.inc_by(committed.len() as u64);
            m.store_batch_events.observe(committed.len() as f64);
            let events = committed.len() as u64;
            if let Err(mpsc::error::TrySendError::Full(_)) = self.committed.try_send(committed) {
                m.store_backbone_dropped.inc_by(events);
            }
        }
    }
}

/// One transaction for every job of `group`; per job, its outcome (a job refused by the channel
/// quota is refused whole and takes nothing).
async fn commit(
    client: &mut Client,
    group: &[Job],
    time_ms: u64,
    max_channels_per_source: u64,
    dedupe_window_ms: u64,
) -> Result<Vec<Outcome>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut refused: Vec<Option<LogError>> = group.iter().map(|_| None).collect();
    if max_channels_per_source > 0 {
        quota(&tx, group, max_channels_per_source, &mut refused).await?;
    }
    // Every channel touched, with the publisher that would create it, in name order: rows are
    // locked in that order by every replica, so two appends never wait on each other in a cycle.
    let mut touched: BTreeMap<&str, &str> = BTreeMap::new();
    for (job, _) in group.iter().zip(&refused).filter(|(_, r)| r.is_none()) {
        for entry in &job.entries {
            touched
                .entry(entry.channel.as_str())
                .or_insert(entry.source.as_str());
        }
    }
    let names: Vec<&str> = touched.keys().copied().collect();
    let creators: Vec<&str> = touched.values().copied().collect();
    // Insert what is new, lock what exists (the no-op update takes the row lock), in one pass.
    let locked = tx
        .query(
            "INSERT INTO eventbus_channels AS c (name, head, first, creator)
             SELECT n, 0, 1, s FROM unnest($1::text[], $2::text[]) AS t(n, s) ORDER BY n
             ON CONFLICT (name) DO UPDATE SET head = c.head
             RETURNING name, head",
            &[&names, &creators],
        )
        .await?;
    let mut heads: HashMap<String, u64> = locked
        .iter()
        .map(|row| (row.get::<_, String>(0), as_u64(row.get(1))))
        .collect();

    // The ids already stored (within the window), now that nobody else can append to these
    // channels until we commit.
    let (mut id_channels, mut id_sources, mut id_ids) = (Vec::new(), Vec::new(), Vec::new());
    for (job, _) in group.iter().zip(&refused).filter(|(_, r)| r.is_none()) {
        for entry in &job.entries {
            id_channels.push(entry.channel.as_str());
            id_sources.push(entry.source.as_str());
            id_ids.push(entry.id.as_str());
        }
    }
    let horizon = as_i64(time_ms.saturating_sub(dedupe_window_ms));
    let known = tx
        .query(
            // One primary-key probe per id: as a plain join the planner hashes the whole
            // table (seen: a sequential scan of every remembered id for each commit, the
            // database's largest cost, growing with the window). LIMIT keeps the subquery
            // from being pulled up into such a join.
            "SELECT t.c, t.s, t.id, i.seq FROM unnest($1::text[], $2::text[], $3::text[]) AS t(c, s, id)
             CROSS JOIN LATERAL (
               SELECT seq FROM eventbus_ids
               WHERE channel = t.c AND source = t.s AND id = t.id AND time_ms >= $4
               LIMIT 1
             ) i",
            &[&id_channels, &id_sources, &id_ids, &horizon],
        )
        .await?;
    let mut seen: HashMap<(String, String, String), u64> = known
        .iter()
        .map(|row| {
            (
                (row.get(0), row.get(1), row.get(2)),
                as_u64(row.get::<_, i64>(3)),
            )
        })
        .collect();

    let mut outcomes = Vec::with_capacity(group.len());
    let mut rows = Rows::default();
    for (job, refusal) in group.iter().zip(refused) {
        if let Some(refusal) = refusal {
            outcomes.push(Err(refusal));
            continue;
        }
        let mut outcome = Vec::with_capacity(job.entries.len());
        for entry in &job.entries {
            let id_key = (
                entry.channel.clone(),
                entry.source.clone(),
                entry.id.clone(),
            );
            if let Some(seq) = seen.get(&id_key) {
                outcome.push((*seq, true));
                continue;
            }
            let head = heads.entry(entry.channel.clone()).or_insert(0);
            *head += 1;
            let seq = *head;
            seen.insert(id_key, seq);
            rows.push(entry, seq, time_ms);
            outcome.push((seq, false));
        }
        outcomes.push(Ok(outcome));
    }
    if !rows.seqs.is_empty() {
        tx.execute(
            "INSERT INTO eventbus_events (channel, seq, key, deleted, time_ms, json)
             SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::bool[], $5::int8[], $6::bytea[])",
            &[
                &rows.channels,
                &rows.seqs,
                &rows.keys,
                &rows.deleted,
                &rows.times,
                &rows.jsons,
            ],
        )
        .await?;
        tx.execute(
            "INSERT INTO eventbus_ids (channel, source, id, seq, time_ms)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[])
             ON CONFLICT (channel, source, id) DO UPDATE SET seq = EXCLUDED.seq, time_ms = EXCLUDED.time_ms",
            &[
                &rows.channels,
                &rows.sources,
                &rows.ids,
                &rows.seqs,
                &rows.times,
            ],
        )
        .await?;
        let (head_names, head_values): (Vec<&str>, Vec<i64>) = heads
            .iter()
            .filter(|(name, _)| touched.contains_key(name.as_str()))
            .map(|(name, head)| (name.as_str(), as_i64(*head)))
            .unzip();
        tx.execute(
            "UPDATE eventbus_channels c SET head = v.head
             FROM unnest($1::text[], $2::int8[]) AS v(name, head)
             WHERE c.name = v.name AND c.head < v.head",
            &[&head_names, &head_values],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Columns of the events to insert, one array each (one round trip for the whole batch).
#[derive(Default)]
struct Rows {
    channels: Vec<String>,
    seqs: Vec<i64>,
    keys: Vec<Option<String>>,
    deleted: Vec<bool>,
    times: Vec<i64>,
    jsons: Vec<Vec<u8>>,
    sources: Vec<String>,
    ids: Vec<String>,
}

impl Rows {
    fn push(&mut self, entry: &Entry, seq: u64, time_ms: u64) {
        self.channels.push(entry.channel.clone());
        self.seqs.push(as_i64(seq));
        self.keys.push(entry.key.clone());
        self.deleted.push(entry.deleted);
        self.times.push(as_i64(time_ms));
        self.jsons.push(with_seq(&entry.body, seq).to_vec());
        self.sources.push(entry.source.clone());
        self.ids.push(entry.id.clone());
    }
}

/// Refuses the jobs that would take a publisher past the channels it may create.
async fn quota(
    tx: &tokio_postgres::Transaction<'_>,
    group: &[Job],
    max: u64,
    refused: &mut [Option<LogError>],
) -> Result<(), tokio_postgres::Error> {
    let names: Vec<&str> = group
        .iter()
        .flat_map(|job| job.entries.iter().map(|e| e.channel.as_str()))
        .collect();
    let existing: std::collections::HashSet<String> = tx
        .query(
            "SELECT name FROM eventbus_channels WHERE name = ANY($1)",
            &[&names],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let sources: Vec<&str> = group
        .iter()
        .flat_map(|job| job.entries.iter().map(|e| e.source.as_str()))
        .collect();
    let mut made: HashMap<String, u64> = tx
        .query(
            "SELECT creator, count(*) FROM eventbus_channels WHERE creator = ANY($1) GROUP BY creator",
            &[&sources],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), as_u64(row.get(1))))
        .collect();
    let mut created: std::collections::HashSet<String> = std::collections::HashSet::new();
    for (job, refusal) in group.iter().zip(refused.iter_mut()) {
        let mut new: HashMap<&str, Vec<&str>> = HashMap::new();
        for entry in &job.entries {
            if existing.contains(&entry.channel) || created.contains(&entry.channel) {
                continue;
            }
            let channels = new.entry(entry.source.as_str()).or_default();
            if !channels.contains(&entry.channel.as_str()) {
                channels.push(&entry.channel);
            }
        }
        let over = new.iter().find(|(source, channels)| {
            made.get(**source).copied().unwrap_or(0) + channels.len() as u64 > max
        });
        if let Some((source, _)) = over {
            *refusal = Some(LogError::Quota {
                publisher: (*source).to_owned(),
                max,
            });
            continue;
        }
        for (source, channels) in new {
            *made.entry(source.to_owned()).or_default() += channels.len() as u64;
            created.extend(channels.iter().map(|c| (*c).to_owned()));
        }
    }
    Ok(())
}
