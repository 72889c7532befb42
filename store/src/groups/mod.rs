//! Durable queue groups, kept by the store next to the log: each event of the channels a group's
//! pattern matches goes to one member at a time until a member says it is done (see
//! [`state`] for the rules). The store is where the truth is: events are read from the log in
//! process, and each group's positions are a file in `<data>/groups`, written (atomically, with
//! fsync) within [`FLUSH_EVERY`] of a change, so a restart repeats at most what was done in the
//! last moments before a crash (at least once). Dead events are written to `dead.<group>`.
//!
//! Gateways (for members on WebSocket) and ingest (for HTTP pull) call [`Groups::fetch`] and
//! [`Groups::done`] through the store's gRPC; a fetch long-polls until there is something to do.

pub mod route;
pub mod saving;
pub mod state;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use eventbus_model::StoredEvent;
use eventbus_router::pattern::matches;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::engine::Engine;
use crate::log::{Entry, LogError, now_ms};
pub use state::{Delivery, Settings, Stats};
use state::{Group, Saved};

/// A change to a group reaches its file within this.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// How often a waiting fetch looks again without being woken.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// The longest a fetch may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Most events one fetch returns.
pub const MAX_FETCH: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("{0}")]
    Invalid(String),
    #[error("group {group:?} follows {pattern:?}; leave the pattern out or give that one")]
    Mismatch { group: String, pattern: String },
    #[error("no group {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Settings a request may change (None: keep the group's).
#[derive(Debug, Clone, Copy, Default)]
pub struct Changes {
    pub visibility_ms: Option<u64>,
    pub max_deliveries: Option<u32>,
    pub prefetch: Option<u32>,
}

/// What an operator sees of a group.
#[derive(Debug, Clone)]
pub struct Info {
    pub name: String,
    pub pattern: String,
    pub settings: Settings,
    pub stats: Stats,
    /// Per channel: position and head.
    pub positions: Vec<(String, u64, u64)>,
}

/// What [`Groups::look`] found, applied to the group under the lock.
struct Look {
    heads: Vec<(String, u64)>,
    added: u64,
    /// The channels under the group's pattern's prefix, when some were added since it last looked.
    listed: Vec<(String, u64)>,
}

impl Look {
    fn apply(self, name: &str, slot: &mut Slot) {
        for (channel, head) in self.heads {
            slot.group.saw_head(&channel, head);
        }
        if slot.discovered != Some(self.added) {
            slot.discovered = Some(self.added);
            let pattern = slot.group.pattern().to_owned();
            for (channel, head) in self.listed {
                if follows(name, &pattern, &channel) {
                    slot.group.saw_head(&channel, head);
                }
            }
        }
    }
}

struct Slot {
    group: Group,
    notify: Arc<Notify>,
    dirty: bool,
    /// The engine's [`Engine::channels_added`] when the group last listed its channels: a channel
    /// added since is listed by the next look, so a fetch sees every event acknowledged before it.
    discovered: Option<u64>,
}

pub struct Groups {
    log: Arc<dyn Engine>,
    saving: Arc<dyn saving::Saving>,
    slots: Mutex<HashMap<String, Slot>>,
    /// Ends waiting fetches, so that the store stops at once.
    shutdown: eventbus_runtime::Shutdown,
    /// Dead events whose letters could not be written yet (the log refused): retried first.
    unwritten: Mutex<Vec<(String, Vec<state::Dead>)>>,
}

/// A group's name: it also names its dead-letter channel.
pub fn validate_name(name: &str) -> Result<(), GroupError> {
    eventbus_model::names::validate_group(name)
        .map_err(|err| GroupError::Invalid(format!("a group's name {err}")))
}

/// Whether a group of `name` over `pattern` takes events of `channel`: never the bus's own
/// channels, nor its own dead letters.
fn follows(name: &str, pattern: &str, channel: &str) -> bool {
    matches(pattern, channel)
        && !eventbus_model::names::is_system(channel)
        && channel.strip_prefix(eventbus_model::names::DEAD_PREFIX) != Some(name)
}

/// The literal start of a pattern: where to list its channels from.
fn literal_prefix(pattern: &str) -> &str {
    let end = pattern.find(['*', '>']).unwrap_or(pattern.len());
    &pattern[..end]
}

#[derive(Deserialize)]
struct KeyOnly {
    key: Option<String>,
}

impl Groups {
    /// The groups `saving` holds, over `log`.
    pub async fn open(
        log: Arc<dyn Engine>,
        saving: Arc<dyn saving::Saving>,
        shutdown: eventbus_runtime::Shutdown,
    ) -> Result<Groups, LogError> {
        let mut slots = HashMap::new();
        for (name, saved) in saving.load().await? {
            slots.insert(
                name,
                Slot {
                    group: Group::restore(saved),
                    notify: Arc::new(Notify::new()),
                    dirty: false,
                    discovered: None,
                },
            );
        }
        Ok(Groups {
            log,
            saving,
            slots: Mutex::new(slots),
            shutdown,
            unwritten: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events committed to the log: groups that follow their channels learn the new heads.
    pub fn committed(&self, batch: &[StoredEvent]) {
        let mut slots = self.lock();
        for (name, slot) in slots.iter_mut() {
            let mut woke = false;
            for event in batch {
                if follows(name, slot.group.pattern(), &event.channel) {
                    slot.group.saw_head(&event.channel, event.seq);
                    woke = true;
                }
            }
            if woke {
                slot.notify.notify_waiters();
            }
        }
    }

    /// Makes group `name` over `pattern` if it is new (from the channels' heads now), or checks
    /// that it follows `pattern`; applies `changes`. Takes nothing.
    pub async fn join(
        &self,
        name: &str,
        pattern: &str,
        changes: Changes,
    ) -> Result<(), GroupError> {
        validate_name(name)?;
        self.open_group(name, pattern, changes).await
    }

    /// Up to `max` events for `member` of group `name` (created over `pattern` if new, from the
    /// channels' heads now), waiting up to `wait` for some.
    pub async fn fetch(
        &self,
        name: &str,
        pattern: &str,
        member: &str,
        max: usize,
        wait: Duration,
        changes: Changes,
    ) -> Result<Vec<Delivery>, GroupError> {
        validate_name(name)?;
        if member.is_empty() || member.len() > 128 {
            return Err(GroupError::Invalid("member: 1-128 characters".into()));
        }
        let max = max.clamp(1, MAX_FETCH);
        let until = Instant::now() + wait.min(MAX_WAIT);
        self.open_group(name, pattern, changes).await?;
        loop {
            let refills = self.look_around(name).await?;
            for refill in refills {
                self.refill(name, &refill.channel, refill.after).await?;
            }
            let notify = self.notify_of(name)?;
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = now_ms();
            let (delivered, next_deadline) = {
                let mut slots = self.lock();
                let slot = slots
                    .get_mut(name)
                    .ok_or_else(|| GroupError::NotFound(name.to_owned()))?;
                // Expiry is the sweeper's (see [`Groups::maintain`]): it writes dead letters
                // before the state that counts them done is saved.
                // A member that holds events and has little room waits for more room while it
                // may: under load, a few large hand-outs rather than one per done.
                let (held, room) = slot.group.room(member);
                let wanted = max.min(slot.group.settings.prefetch as usize);
                let batching = held > 0 && room < wanted.div_ceil(4) && Instant::now() < until;
                let delivered = if batching {
                    Vec::new()
                } else {
                    slot.group.take(member, max, now)
                };
                if !delivered.is_empty() {
                    slot.dirty = true;
                }
                (delivered, slot.group.next_deadline())
            };
            if !delivered.is_empty() {
                return Ok(delivered);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            let mut nap = left.min(LOOK_EVERY);
            // A deadline passed already: the sweeper expires it within FLUSH_EVERY and wakes us.
            if let Some(deadline) = next_deadline.filter(|d| *d > now) {
                nap = nap.min(Duration::from_millis(deadline - now + 1));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(nap) => {}
                _ = self.shutdown.wait() => return Ok(Vec::new()),
            }
        }
    }

    fn notify_of(&self, name: &str) -> Result<Arc<Notify>, GroupError> {
        self.lock()
            .get(name)
            .map(|slot| slot.notify.clone())
            .ok_or_else(|| GroupError::NotFound(name.to_owned()))
    }

    /// Creates group `name` over `pattern` if it does not exist (saved at once, so a restart
    /// does not move its start), or checks the pattern; applies `changes`.
    async fn open_group(
        &self,
        name: &str,
        pattern: &str,
        changes: Changes,
    ) -> Result<(), GroupError> {
        // A new group starts at its channels' heads now: listed before the lock is taken (the
        // engine may be a database). A group made meanwhile by another fetch is kept.
        let exists = self.lock().contains_key(name);
        let start = if exists {
            None
        } else {
            eventbus_router::validate_pattern(pattern)
                .map_err(|err| GroupError::Invalid(format!("pattern {pattern:?}: {err}")))?;
            let added = self.log.channels_added().await?;
            let channels: Vec<(String, u64)> = self
                .log
                .channels(literal_prefix(pattern), "", usize::MAX)
                .await?
                .into_iter()
                .filter(|(channel, _)| follows(name, pattern, channel))
                .collect();
            Some((added, channels))
        };
        let created = {
            let mut slots = self.lock();
            match slots.get_mut(name) {
                Some(slot) => {
                    if !pattern.is_empty() && slot.group.pattern() != pattern {
                        return Err(GroupError::Mismatch {
                            group: name.to_owned(),
                            pattern: slot.group.pattern().to_owned(),
                        });
                    }
                    let before = slot.group.settings;
                    apply(&mut slot.group.settings, changes);
                    if slot.group.settings != before {
                        slot.dirty = true;
                    }
                    None
                }
                None => {
                    let Some((added, channels)) = start else {
                        // Deleted between the look and the lock: as if never made.
                        return Err(GroupError::NotFound(name.to_owned()));
                    };
                    let mut settings = Settings::default();
                    apply(&mut settings, changes);
                    let group = Group::new(pattern, settings, &channels);
                    let saved = group.saved();
                    slots.insert(
                        name.to_owned(),
                        Slot {
                            group,
                            notify: Arc::new(Notify::new()),
                            dirty: false,
                            discovered: Some(added),
                        },
                    );
                    Some(saved)
                }
            }
        };
        if let Some(saved) = created {
            self.saving.save(vec![(name.to_owned(), saved)]).await?;
            debug!(group = %name, %pattern, "durable group created");
        }
        Ok(())
    }

    /// Brings the group's heads up to date; what to read.
    async fn look_around(&self, name: &str) -> Result<Vec<state::Refill>, GroupError> {
        let look = self.look(name).await?;
        let mut slots = self.lock();
        let slot = slots
            .get_mut(name)
            .ok_or_else(|| GroupError::NotFound(name.to_owned()))?;
        look.apply(name, slot);
        Ok(slot.group.refills())
    }

    /// The log's heads now of the group's channels, and its channels added since it last looked:
    /// what it shows and hands out then covers every event acknowledged so far, whether or not
    /// the writer's hand-off ([`Groups::committed`]) has arrived.
    async fn look(&self, name: &str) -> Result<Look, GroupError> {
        let (channels, discovered, pattern) = {
            let slots = self.lock();
            let slot = slots
                .get(name)
                .ok_or_else(|| GroupError::NotFound(name.to_owned()))?;
            let channels: Vec<String> = slot.group.channels().map(str::to_owned).collect();
            (channels, slot.discovered, slot.group.pattern().to_owned())
        };
        let heads = self.log.heads(&channels).await?;
        let added = self.log.channels_added().await?;
        let listed = if discovered == Some(added) {
            Vec::new()
        } else {
            self.log
                .channels(literal_prefix(&pattern), "", usize::MAX)
                .await?
        };
        Ok(Look {
            heads: channels.into_iter().zip(heads).collect(),
            added,
            listed,
        })
    }

    /// Reads `channel` after `after` into the group's read-ahead.
    async fn refill(&self, name: &str, channel: &str, after: u64) -> Result<(), GroupError> {
        match self.log.read(channel, after, 1000, false).await {
            Ok(read) => {
                let events = read
                    .events
                    .into_iter()
                    .map(|e| {
                        let key = serde_json::from_slice::<KeyOnly>(&e.json)
                            .ok()
                            .and_then(|k| k.key);
                        (e.seq, key, e.json)
                    })
                    .collect();
                if let Some(slot) = self.lock().get_mut(name) {
                    slot.group.fill(channel, after, events);
                }
                Ok(())
            }
            Err(LogError::Truncated { first }) => {
                warn!(group = %name, %channel, first, "events the group had not handled are no longer retained; it goes on from the first retained");
                if let Some(slot) = self.lock().get_mut(name) {
                    slot.group.truncated(channel, first);
                    slot.dirty = true;
                }
                Ok(())
            }
            // A channel retention emptied and recovery restarted: nothing to read now.
            Err(LogError::AfterBeyondHead { .. }) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// Writes dead events to `dead.<group>`, each once (its id is its channel and seq).
    async fn write_dead(&self, name: &str, dead: &[state::Dead]) -> Result<(), LogError> {
        let channel = eventbus_model::names::dead_letters_of(name);
        let limits = eventbus_model::Limits {
            max_event_bytes: 2 * 1024 * 1024,
        };
        let mut entries = Vec::with_capacity(dead.len());
        for d in dead {
            debug!(group = %name, channel = %d.channel, seq = d.seq, deliveries = d.deliveries, "event dead after its last delivery timed out");
            let original = String::from_utf8_lossy(&d.json).into_owned();
            let event = match serde_json::value::RawValue::from_string(original) {
                Ok(raw) => serde_json::json!({
                    "channel": channel,
                    "id": format!("{}/{}", d.channel, d.seq),
                    "type": "eventbus.dead_letter",
                    "data": {
                        "group": name,
                        "channel": d.channel,
                        "seq": d.seq,
                        "deliveries": d.deliveries,
                        "reason": "max_deliveries",
                        "event": raw,
                    },
                }),
                Err(_) => continue,
            };
            match eventbus_model::parse_event(event.to_string().as_bytes(), "eventbus", &limits) {
                Ok(accepted) => entries.push(Entry {
                    channel: accepted.channel,
                    id: accepted.id,
                    source: accepted.source,
                    key: accepted.key,
                    deleted: accepted.deleted,
                    body: Bytes::from(accepted.body),
                }),
                Err(err) => warn!(%err, "dead letter refused by the event model"),
            }
        }
        if entries.is_empty() {
            return Ok(());
        }
        self.log.append(entries).await.map(|_| ())
    }

    /// A member of group `name` is done with these events; how many were not done before. With
    /// a `pattern`, the group must follow it: a caller allowed that pattern only acts on groups of
    /// it (a narrower service cannot mark another's group done).
    pub fn done(
        &self,
        name: &str,
        pattern: Option<&str>,
        events: &[(String, u64)],
    ) -> Result<usize, GroupError> {
        let mut slots = self.lock();
        let slot = slots
            .get_mut(name)
            .ok_or_else(|| GroupError::NotFound(name.to_owned()))?;
        if let Some(pattern) = pattern
            && slot.group.pattern() != pattern
        {
            return Err(GroupError::Mismatch {
                group: name.to_owned(),
                pattern: slot.group.pattern().to_owned(),
            });
        }
        let changed = events
            .iter()
            .filter(|(channel, seq)| slot.group.done(channel, *seq))
            .count();
        if changed > 0 {
            slot.dirty = true;
            // Keys and prefetch room were freed: waiting members may take more.
            slot.notify.notify_waiters();
        }
        Ok(changed)
    }

    /// `member` of group `name` is gone: what it held goes to the others at once.
    pub fn leave(&self, name: &str, member: &str) {
        if let Some(slot) = self.lock().get_mut(name) {
            slot.group.leave(member);
            slot.notify.notify_waiters();
        }
    }

    pub async fn list(&self) -> Result<Vec<Info>, GroupError> {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        let mut looks = Vec::with_capacity(names.len());
        for name in names {
            let look = self.look(&name).await;
            looks.push((name, look));
        }
        let mut slots = self.lock();
        for (name, look) in looks {
            match (look, slots.get_mut(&name)) {
                (Ok(look), Some(slot)) => look.apply(&name, slot),
                (Err(GroupError::NotFound(_)), _) | (_, None) => {}
                (Err(err), _) => return Err(err),
            }
        }
        let mut all: Vec<Info> = slots
            .iter()
            .map(|(name, slot)| Info {
                name: name.clone(),
                pattern: slot.group.pattern().to_owned(),
                settings: slot.group.settings,
                stats: slot.group.stats(),
                positions: slot.group.positions(),
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Moves group `name`'s position (see [`Group::reset`]) and saves it at once.
    pub async fn reset(
        &self,
        name: &str,
        channel: Option<&str>,
        to: Option<u64>,
    ) -> Result<(), GroupError> {
        let saved = {
            let mut slots = self.lock();
            let slot = slots
                .get_mut(name)
                .ok_or_else(|| GroupError::NotFound(name.to_owned()))?;
            slot.group.reset(channel, to);
            slot.dirty = false;
            slot.notify.notify_waiters();
            slot.group.saved()
        };
        self.saving.save(vec![(name.to_owned(), saved)]).await?;
        Ok(())
    }

    /// Forgets group `name`.
    pub async fn delete(&self, name: &str) -> Result<(), GroupError> {
        let slot = self
            .lock()
            .remove(name)
            .ok_or_else(|| GroupError::NotFound(name.to_owned()))?;
        slot.notify.notify_waiters();
        let metrics = eventbus_runtime::metrics::metrics();
        let labels = vec![("group".to_owned(), name.to_owned())];
        metrics.group_backlog.remove(&labels);
        metrics.group_in_flight.remove(&labels);
        metrics.group_dead.remove(&labels);
        self.saving.remove(name).await?;
        Ok(())
    }

    /// Writes every changed group to its file; returns once done.
    pub async fn flush(&self) -> Result<(), LogError> {
        let changed: Vec<(String, Saved)> = {
            let mut slots = self.lock();
            slots
                .iter_mut()
                .filter(|(_, slot)| slot.dirty)
                .map(|(name, slot)| {
                    slot.dirty = false;
                    (name.clone(), slot.group.saved())
                })
                .collect()
        };
        if changed.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = changed.iter().map(|(name, _)| name.clone()).collect();
        let written = self.saving.save(changed).await;
        if written.is_err() {
            // Saved next time.
            let mut slots = self.lock();
            for name in names {
                if let Some(slot) = slots.get_mut(&name) {
                    slot.dirty = true;
                }
            }
        }
        written
    }

    /// Events held past their deadline, in every group: back to waiting (waking fetches), or to
    /// the dead letters, even while no member asks for more.
    /// Whether every dead letter is written (until then, nothing is saved: the events they
    /// belong to must not be saved as done).
    async fn sweep(&self) -> bool {
        let now = now_ms();
        let mut dead =
            std::mem::take(&mut *self.unwritten.lock().unwrap_or_else(|p| p.into_inner()));
        {
            let mut slots = self.lock();
            for (name, slot) in slots.iter_mut() {
                if slot.group.next_deadline().is_some_and(|d| d <= now) || slot.group.has_doomed() {
                    let expired = slot.group.expire(now);
                    slot.dirty = true;
                    slot.notify.notify_waiters();
                    if !expired.is_empty() {
                        dead.push((name.clone(), expired));
                    }
                }
            }
        }
        let mut unwritten = Vec::new();
        for (name, expired) in dead {
            match self.write_dead(&name, &expired).await {
                Ok(()) => {
                    for d in &expired {
                        warn!(group = %name, channel = %d.channel, seq = d.seq, deliveries = d.deliveries, "event dead after its last delivery, written to the dead letters");
                    }
                }
                Err(err) => {
                    warn!(group = %name, %err, "cannot write dead letters now; trying again before saving the group");
                    unwritten.push((name, expired));
                }
            }
        }
        let all_written = unwritten.is_empty();
        *self.unwritten.lock().unwrap_or_else(|p| p.into_inner()) = unwritten;
        all_written
    }

    /// Each group's figures, for `/metrics`.
    fn measure(&self) {
        let metrics = eventbus_runtime::metrics::metrics();
        for (name, slot) in self.lock().iter() {
            let stats = slot.group.stats();
            let labels = vec![("group".to_owned(), name.clone())];
            metrics
                .group_backlog
                .get_or_create(&labels)
                .set(stats.backlog as i64);
            metrics
                .group_in_flight
                .get_or_create(&labels)
                .set(stats.in_flight as i64);
            metrics
                .group_dead
                .get_or_create(&labels)
                .set(stats.dead as i64);
        }
    }

    /// Until shutdown: every [`FLUSH_EVERY`], expires what is due (writing dead letters first)
    /// and then saves what changed; saves once more at the end. The one place that expires: an
    /// event counted done because it died is never saved before its dead letter is durable.
    pub async fn maintain(&self) {
        let shutdown = self.shutdown.clone();
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tick.tick() => {}
            }
            let saveable = self.sweep().await;
            self.measure();
            if !saveable {
                continue;
            }
            if let Err(err) = self.flush().await {
                warn!(%err, "cannot save group positions; trying again");
            }
        }
        let unwritten = !self
            .unwritten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if unwritten {
            warn!(
                "dead letters not written at shutdown: the group positions are not saved, those events come back after the restart"
            );
        } else if let Err(err) = self.flush().await {
            warn!(%err, "cannot save group positions at shutdown");
        }
    }
}

fn apply(settings: &mut Settings, changes: Changes) {
    if let Some(v) = changes.visibility_ms {
        settings.visibility_ms = v.clamp(100, 12 * 3600 * 1000);
    }
    if let Some(v) = changes.max_deliveries {
        settings.max_deliveries = v.clamp(1, 1000);
    }
    if let Some(v) = changes.prefetch {
        settings.prefetch = v.clamp(1, MAX_FETCH as u32);
    }
}
