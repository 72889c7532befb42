//! One durable group's state, without I/O: which events of which channels are done, which are
//! held by which member until when, and which wait. The dispatcher ([`super::Groups`]) feeds it
//! events read from the log and persists what [`Group::saved`] returns.
//!
//! The rules (docs/protocol.md, "Durable queue groups"):
//! - every event of every channel the group's pattern matches goes to one member at a time, until
//!   a member says it is done with it (at least once);
//! - a member holds at most `prefetch` events; an event it holds past `visibility_ms`, or holds
//!   when it leaves, goes back to waiting, keeping its delivery count;
//! - after `max_deliveries` deliveries that all timed out, an event is dead: it is handed back
//!   once (to be written to the dead-letter channel) and counts as done;
//! - events with the same `key` in one channel are held by at most one member at a time, in seq
//!   order: a later one waits while an earlier one is held or waiting;
//! - per channel, `position` is the last seq up to which every event is done; it only grows
//!   (but by a reset).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// How a group delivers; a request may change them, the last one sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub visibility_ms: u64,
    pub max_deliveries: u32,
    pub prefetch: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            visibility_ms: 30_000,
            max_deliveries: 5,
            prefetch: 100,
        }
    }
}

/// Events read ahead of dispatch, per channel, at most.
pub const READ_AHEAD: usize = 2_000;

/// An event read from the log, not done and not held.
#[derive(Debug, Clone)]
struct Waiting {
    key: Option<String>,
    json: Bytes,
    deliveries: u32,
}

#[derive(Debug, Clone)]
struct Held {
    member: String,
    deadline_ms: u64,
    key: Option<String>,
    json: Bytes,
    deliveries: u32,
}

impl From<Held> for Waiting {
    fn from(h: Held) -> Waiting {
        Waiting {
            key: h.key,
            json: h.json,
            deliveries: h.deliveries,
        }
    }
}

/// One channel of the group.
#[derive(Debug, Clone, Default)]
struct Lane {
    position: u64,
    /// Done seqs above `position` (acknowledged out of order).
    done_above: BTreeSet<u64>,
    /// The last seq read from the log (or known done).
    cursor: u64,
    /// The last seq the log holds, as last seen.
    head: u64,
    waiting: BTreeMap<u64, Waiting>,
    held: BTreeMap<u64, Held>,
    /// Delivery counts of events not read yet (restored after a restart).
    attempts: BTreeMap<u64, u32>,
}

impl Lane {
    fn at(position: u64) -> Lane {
        Lane {
            position,
            cursor: position,
            head: position,
            ..Lane::default()
        }
    }

    fn is_done(&self, seq: u64) -> bool {
        seq <= self.position || self.done_above.contains(&seq)
    }

    fn mark_done(&mut self, seq: u64) {
        if self.is_done(seq) {
            return;
        }
        self.done_above.insert(seq);
        while self.done_above.remove(&(self.position + 1)) {
            self.position += 1;
        }
        self.attempts.remove(&seq);
    }

    /// Events not done: up to the last seq known (a restored lane knows its dones above the
    /// position before it has seen the log's head again).
    fn backlog(&self) -> u64 {
        let top = self
            .head
            .max(self.cursor)
            .max(self.done_above.last().copied().unwrap_or(0));
        top.saturating_sub(self.position)
            .saturating_sub(self.done_above.len() as u64)
    }
}

/// An event handed to a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub channel: String,
    pub seq: u64,
    pub json: Bytes,
    /// 1 the first time.
    pub deliveries: u32,
}

/// An event that reached `max_deliveries` without being done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dead {
    pub channel: String,
    pub seq: u64,
    pub json: Bytes,
    pub deliveries: u32,
}

/// A channel's read-ahead to fill: events after `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refill {
    pub channel: String,
    pub after: u64,
}

/// What a group keeps across restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Saved {
    pub pattern: String,
    pub settings: Option<Settings>,
    pub lanes: BTreeMap<String, SavedLane>,
    #[serde(default)]
    pub dead: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedLane {
    pub position: u64,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub done_above: BTreeSet<u64>,
    /// Deliveries of events not done yet.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attempts: BTreeMap<u64, u32>,
}

/// Figures for operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub channels: usize,
    /// Events not done yet (waiting, held, or not read yet).
    pub backlog: u64,
    pub in_flight: u64,
    pub dead: u64,
    pub members: usize,
}

#[derive(Debug, Clone)]
pub struct Group {
    pattern: String,
    pub settings: Settings,
    lanes: BTreeMap<String, Lane>,
    /// Events held per member.
    members: HashMap<String, u32>,
    dead: u64,
    /// Waiting events delivered `max_deliveries` times already (their member left, or the store
    /// restarted): they die at the next [`Group::expire`] rather than go out again.
    doomed: Vec<(String, u64)>,
    /// Where the next dispatch starts, so that no channel starves the others.
    turn: usize,
}

impl Group {
    /// A new group over `channels` (name, head) that exist now: it starts at their heads.
    pub fn new(pattern: &str, settings: Settings, channels: &[(String, u64)]) -> Group {
        Group {
            pattern: pattern.to_owned(),
            settings,
            lanes: channels
                .iter()
                .map(|(channel, head)| (channel.clone(), Lane::at(*head)))
                .collect(),
            members: HashMap::new(),
            dead: 0,
            doomed: Vec::new(),
            turn: 0,
        }
    }

    /// The group as it was saved; channels it did not know yet start at their beginning.
    pub fn restore(saved: Saved) -> Group {
        Group {
            pattern: saved.pattern,
            settings: saved.settings.unwrap_or_default(),
            lanes: saved
                .lanes
                .into_iter()
                .map(|(channel, lane)| {
                    let mut restored = Lane::at(lane.position);
                    restored.attempts = lane.attempts;
                    for seq in lane.done_above {
                        restored.mark_done(seq);
                    }
                    (channel, restored)
                })
                .collect(),
            members: HashMap::new(),
            dead: saved.dead,
            doomed: Vec::new(),
            turn: 0,
        }
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    pub fn saved(&self) -> Saved {
        Saved {
            pattern: self.pattern.clone(),
            settings: Some(self.settings),
            lanes: self
                .lanes
                .iter()
                .map(|(channel, lane)| {
                    let mut attempts = lane.attempts.clone();
                    for (seq, w) in &lane.waiting {
                        if w.deliveries > 0 {
                            attempts.insert(*seq, w.deliveries);
                        }
                    }
                    for (seq, h) in &lane.held {
                        attempts.insert(*seq, h.deliveries);
                    }
                    (
                        channel.clone(),
                        SavedLane {
                            position: lane.position,
                            done_above: lane.done_above.clone(),
                            attempts,
                        },
                    )
                })
                .collect(),
            dead: self.dead,
        }
    }

    /// The log's head of `channel` is `head` (a channel the group has not seen starts at 0).
    pub fn saw_head(&mut self, channel: &str, head: u64) {
        let lane = self
            .lanes
            .entry(channel.to_owned())
            .or_insert_with(|| Lane::at(0));
        lane.head = lane.head.max(head);
    }

    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.lanes.keys().map(String::as_str)
    }

    /// The channels whose read-ahead is short and the log has more.
    pub fn refills(&self) -> Vec<Refill> {
        self.lanes
            .iter()
            .filter(|(_, lane)| lane.cursor < lane.head && lane.waiting.len() < READ_AHEAD / 2)
            .map(|(channel, lane)| Refill {
                channel: channel.clone(),
                after: lane.cursor,
            })
            .collect()
    }

    /// Events of `channel` read from the log after `after`: (seq, key, json) in seq order.
    /// Ignored if the read-ahead moved meanwhile.
    pub fn fill(&mut self, channel: &str, after: u64, events: Vec<(u64, Option<String>, Bytes)>) {
        let Some(lane) = self.lanes.get_mut(channel) else {
            return;
        };
        if lane.cursor != after {
            return;
        }
        for (seq, key, json) in events {
            if seq <= lane.cursor {
                continue;
            }
            lane.cursor = seq;
            lane.head = lane.head.max(seq);
            if lane.is_done(seq) {
                continue;
            }
            let deliveries = lane.attempts.remove(&seq).unwrap_or(0);
            if deliveries >= self.settings.max_deliveries.max(1) {
                self.doomed.push((channel.to_owned(), seq));
            }
            lane.waiting.insert(
                seq,
                Waiting {
                    key,
                    json,
                    deliveries,
                },
            );
        }
    }

    /// The log no longer holds `channel`'s events before `first` (retention): they are skipped.
    pub fn truncated(&mut self, channel: &str, first: u64) {
        if let Some(lane) = self.lanes.get_mut(channel) {
            let skipped = first.saturating_sub(1);
            if lane.position < skipped {
                lane.position = skipped;
                lane.done_above = lane.done_above.split_off(&(skipped + 1));
                while lane.done_above.remove(&(lane.position + 1)) {
                    lane.position += 1;
                }
                lane.cursor = lane.cursor.max(skipped);
                lane.waiting = lane.waiting.split_off(&first);
                let held: Vec<u64> = lane.held.range(..first).map(|(s, _)| *s).collect();
                for seq in held {
                    if let Some(h) = lane.held.remove(&seq) {
                        release(&mut self.members, &h.member);
                    }
                }
            }
        }
    }

    /// Events held past their deadline go back to waiting, or die after `max_deliveries`.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Dead> {
        let mut dead = Vec::new();
        let max = self.settings.max_deliveries.max(1);
        for (channel, seq) in std::mem::take(&mut self.doomed) {
            let Some(lane) = self.lanes.get_mut(&channel) else {
                continue;
            };
            if let Some(w) = lane.waiting.remove(&seq) {
                lane.mark_done(seq);
                self.dead += 1;
                dead.push(Dead {
                    channel,
                    seq,
                    json: w.json,
                    deliveries: w.deliveries,
                });
            }
        }
        for (channel, lane) in &mut self.lanes {
            let expired: Vec<u64> = lane
                .held
                .iter()
                .filter(|(_, h)| h.deadline_ms <= now_ms)
                .map(|(seq, _)| *seq)
                .collect();
            for seq in expired {
                let Some(h) = lane.held.remove(&seq) else {
                    continue;
                };
                release(&mut self.members, &h.member);
                if h.deliveries >= max {
                    lane.mark_done(seq);
                    self.dead += 1;
                    dead.push(Dead {
                        channel: channel.clone(),
                        seq,
                        json: h.json,
                        deliveries: h.deliveries,
                    });
                } else {
                    lane.waiting.insert(seq, h.into());
                }
            }
        }
        dead
    }

    /// Hands `member` up to `max` events (no more than its prefetch allows), oldest first in each
    /// channel, taking channels in turn.
    pub fn take(&mut self, member: &str, max: usize, now_ms: u64) -> Vec<Delivery> {
        let held = self.members.get(member).copied().unwrap_or(0);
        let room = (self.settings.prefetch.max(1).saturating_sub(held) as usize).min(max);
        let mut out = Vec::new();
        if room == 0 || self.lanes.is_empty() {
            return out;
        }
        let deadline_ms = now_ms + self.settings.visibility_ms;
        let max_deliveries = self.settings.max_deliveries.max(1);
        let names: Vec<String> = self.lanes.keys().cloned().collect();
        let start = self.turn % names.len();
        for i in 0..names.len() {
            if out.len() == room {
                break;
            }
            let channel = &names[(start + i) % names.len()];
            let Some(lane) = self.lanes.get_mut(channel) else {
                continue;
            };
            // Keys held, or passed over in this scan: later events of them wait.
            let mut busy: HashSet<String> =
                lane.held.values().filter_map(|h| h.key.clone()).collect();
            let mut taken = Vec::new();
            for (seq, w) in &lane.waiting {
                if out.len() + taken.len() == room {
                    break;
                }
                // Doomed: it dies at the next expiry, and its key waits until then.
                if w.deliveries >= max_deliveries {
                    if let Some(key) = &w.key {
                        busy.insert(key.clone());
                    }
                    continue;
                }
                if let Some(key) = &w.key
                    && !busy.insert(key.clone())
                {
                    continue;
                }
                taken.push(*seq);
            }
            for seq in taken {
                let Some(w) = lane.waiting.remove(&seq) else {
                    continue;
                };
                let deliveries = w.deliveries + 1;
                out.push(Delivery {
                    channel: channel.clone(),
                    seq,
                    json: w.json.clone(),
                    deliveries,
                });
                lane.held.insert(
                    seq,
                    Held {
                        member: member.to_owned(),
                        deadline_ms,
                        key: w.key,
                        json: w.json,
                        deliveries,
                    },
                );
            }
        }
        self.turn = self.turn.wrapping_add(1);
        if !out.is_empty() {
            *self.members.entry(member.to_owned()).or_insert(0) += out.len() as u32;
        }
        out
    }

    /// A member is done with `channel`'s `seq`; whether anything changed. An event done after it
    /// was given to someone else counts as done all the same (it was handled).
    pub fn done(&mut self, channel: &str, seq: u64) -> bool {
        let Some(lane) = self.lanes.get_mut(channel) else {
            return false;
        };
        if seq > lane.cursor || lane.is_done(seq) {
            return false;
        }
        if let Some(h) = lane.held.remove(&seq) {
            release(&mut self.members, &h.member);
        }
        lane.waiting.remove(&seq);
        lane.mark_done(seq);
        true
    }

    /// `member` is gone: what it held waits for another.
    pub fn leave(&mut self, member: &str) {
        let max = self.settings.max_deliveries.max(1);
        for (channel, lane) in &mut self.lanes {
            let held: Vec<u64> = lane
                .held
                .iter()
                .filter(|(_, h)| h.member == member)
                .map(|(seq, _)| *seq)
                .collect();
            for seq in held {
                if let Some(h) = lane.held.remove(&seq) {
                    if h.deliveries >= max {
                        self.doomed.push((channel.clone(), seq));
                    }
                    lane.waiting.insert(seq, h.into());
                }
            }
        }
        self.members.remove(member);
    }

    /// Moves `channel`'s position (every channel's, when `None`) to `to`: its head when `to` is
    /// `None`. What was held or waiting is forgotten; later events are delivered again.
    pub fn reset(&mut self, channel: Option<&str>, to: Option<u64>) {
        for (name, lane) in &mut self.lanes {
            if channel.is_some_and(|c| c != name) {
                continue;
            }
            let position = to
                .unwrap_or(lane.head.max(lane.cursor))
                .min(lane.head.max(lane.cursor));
            for h in lane.held.values() {
                release(&mut self.members, &h.member);
            }
            let head = lane.head.max(lane.cursor);
            *lane = Lane::at(position);
            lane.head = head;
        }
    }

    /// What `member` holds, and how many more it may take under its prefetch.
    pub fn room(&self, member: &str) -> (usize, usize) {
        let held = self.members.get(member).copied().unwrap_or(0);
        (
            held as usize,
            self.settings.prefetch.max(1).saturating_sub(held) as usize,
        )
    }

    /// Whether events wait to die at the next [`Group::expire`].
    pub fn has_doomed(&self) -> bool {
        !self.doomed.is_empty()
    }

    /// The earliest deadline of a held event.
    pub fn next_deadline(&self) -> Option<u64> {
        self.lanes
            .values()
            .flat_map(|lane| lane.held.values().map(|h| h.deadline_ms))
            .min()
    }

    pub fn positions(&self) -> Vec<(String, u64, u64)> {
        self.lanes
            .iter()
            .map(|(channel, lane)| (channel.clone(), lane.position, lane.head.max(lane.cursor)))
            .collect()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            channels: self.lanes.len(),
            backlog: self.lanes.values().map(Lane::backlog).sum(),
            in_flight: self.lanes.values().map(|l| l.held.len() as u64).sum(),
            dead: self.dead,
            members: self.members.len(),
        }
    }
}

fn release(members: &mut HashMap<String, u32>, member: &str) {
    if let Some(count) = members.get_mut(member) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            members.remove(member);
        }
    }
}
