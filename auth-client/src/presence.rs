//! A gateway's side of presence: connections tell the [`Reporter`] what they join and leave; it
//! publishes the changes, and everything it holds every third of its ttl, on the backbone's
//! presence topic, numbered and in chunks; every auth replica folds them into the same registry.
//! A replica that misses a number (the backbone is at-most-once) or starts late asks for a full
//! report on the resync topic, and the gateway sends one at once. [`decode_report`] is the rule a
//! listener applies to what it receives.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use eventbus_proto::presence::{self as pb, REPORTS_TOPIC, RESYNC_TOPIC};
use eventbus_router::{Backbone, Messages};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// One connection subscribed to one channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    pub connection: String,
    pub identity: String,
    pub channel: String,
}

impl From<pb::PresenceEntry> for Entry {
    fn from(e: pb::PresenceEntry) -> Self {
        Entry {
            connection: e.connection,
            identity: e.identity,
            channel: e.channel,
        }
    }
}

impl From<Entry> for pb::PresenceEntry {
    fn from(e: Entry) -> Self {
        pb::PresenceEntry {
            connection: e.connection,
            identity: e.identity,
            channel: e.channel,
        }
    }
}

enum Change {
    Joined(Entry),
    Left(Entry),
    Flush(oneshot::Sender<()>),
}

/// A gateway's side: connections tell it what they join and leave; it reports on the backbone.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<Change>,
}

/// Held while a connection is subscribed to a channel; dropping it reports the leave.
pub struct Membership {
    tx: mpsc::UnboundedSender<Change>,
    entry: Option<Entry>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            let _ = self.tx.send(Change::Left(entry));
        }
    }
}

impl Reporter {
    /// Starts reporting for gateway `gateway` on `backbone`; entries expire `ttl` after the last
    /// report unless renewed.
    pub fn start(backbone: Arc<dyn Backbone>, gateway: String, ttl: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(report_loop(backbone, gateway, ttl, rx));
        Reporter { tx }
    }

    /// Reports that `entry` joined; the leave is reported when the result is dropped.
    pub fn join(&self, entry: Entry) -> Membership {
        let _ = self.tx.send(Change::Joined(entry.clone()));
        Membership {
            tx: self.tx.clone(),
            entry: Some(entry),
        }
    }

    /// Sends what is pending now, and waits (at most `wait`) until it has left on the backbone.
    pub async fn flush(&self, wait: Duration) {
        let (done, acked) = oneshot::channel();
        if self.tx.send(Change::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(wait, acked).await;
        }
    }
}

/// Entries per report at most, and bytes: a report stays well under NATS's default message limit
/// (1 MiB) and under what a listener accepts ([`MAX_REPORT_ENTRIES`]) whatever the gateway holds.
const CHUNK_ENTRIES: usize = 10_000;
const CHUNK_BYTES: usize = 256 * 1024;
/// Most entries a listener takes in one report.
pub const MAX_REPORT_ENTRIES: usize = 20_000;
/// The ttl a report may ask for, in seconds.
pub const REPORT_TTL_S: std::ops::RangeInclusive<u32> = 1..=3600;

/// The next chunk of `entries`: as many as fit the limits (at least one).
fn take_chunk(
    entries: &mut Vec<pb::PresenceEntry>,
    room: &mut usize,
    bytes: &mut usize,
) -> Vec<pb::PresenceEntry> {
    let mut n = 0;
    while n < entries.len() && *room > 0 {
        let size = entries[n].encoded_len() + 4;
        if *bytes + size > CHUNK_BYTES && (*bytes > 0 || n > 0) {
            *room = 0;
            break;
        }
        *bytes += size;
        *room -= 1;
        n += 1;
    }
    entries.drain(..n).collect()
}

/// Sends one report as several, numbered from `number + 1`: the first replaces (when `full`),
/// the rest add to it. Returns the last number used.
async fn send_in_chunks(
    backbone: &dyn Backbone,
    gateway: &str,
    ttl_s: u32,
    full: bool,
    mut number: u64,
    mut joined: Vec<pb::PresenceEntry>,
    mut left: Vec<pb::PresenceEntry>,
) -> Result<u64, eventbus_router::BackboneError> {
    let mut first = true;
    loop {
        let (mut room, mut bytes) = (CHUNK_ENTRIES, 0);
        let joined_now = take_chunk(&mut joined, &mut room, &mut bytes);
        let left_now = take_chunk(&mut left, &mut room, &mut bytes);
        number += 1;
        let report = pb::PresenceReport {
            gateway: gateway.to_owned(),
            ttl_s,
            full: full && first,
            joined: joined_now,
            left: left_now,
            number,
        };
        backbone
            .send(REPORTS_TOPIC, report.encode_to_vec().into())
            .await?;
        first = false;
        if joined.is_empty() && left.is_empty() {
            return Ok(number);
        }
    }
}

/// A request for a full report from `gateway`, or from every gateway when `None`.
pub fn resync_request(gateway: Option<&str>) -> bytes::Bytes {
    pb::PresenceResync {
        gateway: gateway.unwrap_or_default().to_owned(),
    }
    .encode_to_vec()
    .into()
}

/// A report as received: decoded, and one a gateway could have sent (bounded ttl and size, names
/// that are identities and channels). Anything else is refused whole.
pub fn decode_report(payload: &[u8]) -> Result<pb::PresenceReport, String> {
    let report = pb::PresenceReport::decode(payload).map_err(|err| err.to_string())?;
    check_report(&report)?;
    Ok(report)
}

/// Whether a report is one a gateway could have sent: bounded ttl and size, names that are
/// identities and channels. Anything else is refused whole.
pub fn check_report(report: &pb::PresenceReport) -> Result<(), String> {
    if report.gateway.is_empty() || report.gateway.len() > 128 {
        return Err("gateway: 1-128 characters".into());
    }
    if !REPORT_TTL_S.contains(&report.ttl_s) {
        return Err(format!(
            "ttl_s: {}-{} seconds",
            REPORT_TTL_S.start(),
            REPORT_TTL_S.end()
        ));
    }
    if report.joined.len() + report.left.len() > MAX_REPORT_ENTRIES {
        return Err(format!(
            "at most {MAX_REPORT_ENTRIES} entries a report; send it in chunks"
        ));
    }
    for entry in report.joined.iter().chain(&report.left) {
        if entry.connection.is_empty() || entry.connection.len() > 128 {
            return Err("connection: 1-128 characters".into());
        }
        eventbus_model::validate_identity(&entry.identity)
            .map_err(|err| format!("identity {err}"))?;
        eventbus_model::validate_channel(&entry.channel).map_err(|err| format!("channel {err}"))?;
    }
    Ok(())
}

/// Whether a resync request asks `gateway` for a full report.
fn asks(payload: &[u8], gateway: &str) -> bool {
    pb::PresenceResync::decode(payload)
        .is_ok_and(|request| request.gateway.is_empty() || request.gateway == gateway)
}

async fn report_loop(
    backbone: Arc<dyn Backbone>,
    gateway: String,
    ttl: Duration,
    mut rx: mpsc::UnboundedReceiver<Change>,
) {
    let ttl_s = ttl.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
    // Each membership joins and leaves with the same entry, so the entry is its own key (keyed
    // apart, connection and channel were stored twice: 15k subscribers' worth of strings).
    let mut current: HashSet<Entry> = HashSet::new();
    // Sets, not lists: a join cancels a pending leave of the same entry and the other way round,
    // and a storm of 10k joins in one burst would scan a list 10k times.
    let (mut joined, mut left): (HashSet<Entry>, HashSet<Entry>) = (HashSet::new(), HashSet::new());
    let mut full = true;
    let mut failing = false;
    let mut number = 0;
    let mut keepalive = tokio::time::interval(ttl / 3);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut resync: Option<Messages> = None;
    loop {
        if resync.is_none() {
            match backbone.listen(RESYNC_TOPIC).await {
                Ok(messages) => resync = Some(messages),
                Err(err) => debug!(%err, "cannot listen for presence resync requests yet"),
            }
        }
        tokio::select! {
            change = rx.recv() => {
                let Some(change) = change else { return };
                let mut next = Some(change);
                // Take everything already queued: one report carries a burst of joins.
                while let Some(change) = next {
                    match change {
                        Change::Joined(e) => {
                            current.insert(e.clone());
                            // Left and joined again before a report: the listeners' view stays right.
                            if !left.remove(&e) {
                                joined.insert(e);
                            }
                        }
                        Change::Left(e) => {
                            current.remove(&e);
                            // A join not yet reported cancels out.
                            if !joined.remove(&e) {
                                left.insert(e);
                            }
                        }
                        Change::Flush(done) => waiting.push(done),
                    }
                    next = rx.try_recv().ok();
                }
            }
            _ = keepalive.tick() => full = true,
            request = async { resync.as_mut()?.next().await }, if resync.is_some() => match request {
                Some(payload) => {
                    if asks(&payload, &gateway) {
                        debug!("a presence listener asked for a full report");
                        full = true;
                    }
                }
                None => resync = None,
            },
        }
        if !full && joined.is_empty() && left.is_empty() {
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
            continue;
        }
        let (all_joined, all_left): (Vec<pb::PresenceEntry>, Vec<pb::PresenceEntry>) = if full {
            (
                current.iter().cloned().map(Into::into).collect(),
                Vec::new(),
            )
        } else {
            (
                joined.iter().cloned().map(Into::into).collect(),
                left.iter().cloned().map(Into::into).collect(),
            )
        };
        joined.clear();
        left.clear();
        match send_in_chunks(
            &*backbone, &gateway, ttl_s, full, number, all_joined, all_left,
        )
        .await
        {
            Ok(last) => {
                if failing {
                    debug!("presence reports leave on the backbone again");
                }
                number = last;
                full = false;
                failing = false;
                for done in waiting.drain(..) {
                    let _ = done.send(());
                }
            }
            Err(err) => {
                if !failing {
                    warn!(%err, "cannot report presence on the backbone; will send everything once it takes messages");
                }
                failing = true;
                // What was lost is resent as a whole next time (a full report may take any number).
                full = true;
                waiting.clear();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(connection: &str, identity: &str, channel: &str) -> pb::PresenceEntry {
        pb::PresenceEntry {
            connection: connection.into(),
            identity: identity.into(),
            channel: channel.into(),
        }
    }
    #[test]
    fn reports_a_gateway_could_not_have_sent_are_refused() {
        let good = pb::PresenceReport {
            gateway: "g1".into(),
            ttl_s: 30,
            full: false,
            joined: vec![entry("c1", "alice", "room.a")],
            left: vec![],
            number: 1,
        };
        assert!(check_report(&good).is_ok());
        let bad = |change: &dyn Fn(&mut pb::PresenceReport)| {
            let mut report = good.clone();
            change(&mut report);
            check_report(&report).is_err()
        };
        assert!(bad(&|r| r.ttl_s = 0));
        assert!(
            bad(&|r| r.ttl_s = 1_000_000),
            "a ttl that keeps forged entries for ever"
        );
        assert!(bad(&|r| r.gateway.clear()));
        assert!(bad(&|r| r.joined[0].identity = "not an identity".into()));
        assert!(bad(&|r| r.joined[0].channel = "a..b".into()));
        assert!(bad(&|r| r.joined[0].connection = "x".repeat(200)));
        assert!(bad(
            &|r| r.joined = vec![entry("c", "a", "b"); MAX_REPORT_ENTRIES + 1]
        ));
    }
}
