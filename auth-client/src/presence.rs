//! A gateway's side of presence: connections tell the [`Reporter`] what they join and leave; it
//! reports the changes, and everything it holds every third of its ttl, to auth over gRPC (in
//! chunks under the message limit). [`check_report`] is the rule auth applies to what it receives.

use std::collections::HashMap;
use std::time::Duration;

use eventbus_proto::auth as pb;
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

/// A gateway's side: connections tell it what they join and leave; it reports to auth.
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
    /// Starts reporting for gateway `gateway` to the auth service at `auth_url`.
    pub fn start(
        auth_url: &str,
        credential: eventbus_runtime::internal::Credential,
        trust: &eventbus_runtime::tls::Trust,
        gateway: String,
        ttl: Duration,
    ) -> Result<Self, String> {
        let endpoint = eventbus_runtime::tls::grpc_endpoint(auth_url, trust)
            .map_err(|err| format!("auth URL {auth_url:?}: {err}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5));
        let client =
            pb::auth_client::AuthClient::with_interceptor(endpoint.connect_lazy(), credential);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(report_loop(client, gateway, ttl, rx));
        Ok(Reporter { tx })
    }

    /// Reports that `entry` joined; the leave is reported when the result is dropped.
    pub fn join(&self, entry: Entry) -> Membership {
        let _ = self.tx.send(Change::Joined(entry.clone()));
        Membership {
            tx: self.tx.clone(),
            entry: Some(entry),
        }
    }

    /// Sends what is pending now, and waits (at most `wait`) until auth has it.
    pub async fn flush(&self, wait: Duration) {
        let (done, acked) = oneshot::channel();
        if self.tx.send(Change::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(wait, acked).await;
        }
    }
}

/// Entries per report: a report stays well under the gRPC message limit (4 MiB) and under what
/// auth accepts ([`MAX_REPORT_ENTRIES`]) whatever the gateway holds.
const CHUNK_ENTRIES: usize = 10_000;
/// Most entries auth takes in one report.
pub const MAX_REPORT_ENTRIES: usize = 20_000;
/// The ttl a report may ask for, in seconds.
pub const REPORT_TTL_S: std::ops::RangeInclusive<u32> = 1..=3600;

/// Sends one report as several: the first replaces (when `full`), the rest add to it.
async fn send_in_chunks(
    client: &mut pb::auth_client::AuthClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            eventbus_runtime::internal::Credential,
        >,
    >,
    gateway: &str,
    ttl_s: u32,
    full: bool,
    mut joined: Vec<pb::PresenceEntry>,
    mut left: Vec<pb::PresenceEntry>,
) -> Result<(), tonic::Status> {
    let mut first = true;
    loop {
        let take_joined = joined.len().min(CHUNK_ENTRIES);
        let take_left = left.len().min(CHUNK_ENTRIES - take_joined);
        let report = pb::PresenceReport {
            gateway: gateway.to_owned(),
            ttl_s,
            full: full && first,
            joined: joined.drain(..take_joined).collect(),
            left: left.drain(..take_left).collect(),
        };
        client.report_presence(report).await?;
        first = false;
        if joined.is_empty() && left.is_empty() {
            return Ok(());
        }
    }
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

async fn report_loop(
    mut client: pb::auth_client::AuthClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            eventbus_runtime::internal::Credential,
        >,
    >,
    gateway: String,
    ttl: Duration,
    mut rx: mpsc::UnboundedReceiver<Change>,
) {
    let ttl_s = ttl.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
    let mut current: HashMap<(String, String), Entry> = HashMap::new();
    let (mut joined, mut left): (Vec<Entry>, Vec<Entry>) = (Vec::new(), Vec::new());
    let mut full = true;
    let mut failing = false;
    let mut keepalive = tokio::time::interval(ttl / 3);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        tokio::select! {
            change = rx.recv() => {
                let Some(change) = change else { return };
                let mut next = Some(change);
                // Take everything already queued: one report carries a burst of joins.
                while let Some(change) = next {
                    match change {
                        Change::Joined(e) => {
                            current.insert((e.connection.clone(), e.channel.clone()), e.clone());
                            // Left and joined again before a report: auth's view stays right.
                            match left.iter().position(|l| *l == e) {
                                Some(i) => { left.swap_remove(i); }
                                None => joined.push(e),
                            }
                        }
                        Change::Left(e) => {
                            current.remove(&(e.connection.clone(), e.channel.clone()));
                            // A join not yet reported cancels out.
                            match joined.iter().position(|j| *j == e) {
                                Some(i) => { joined.swap_remove(i); }
                                None => left.push(e),
                            }
                        }
                        Change::Flush(done) => waiting.push(done),
                    }
                    next = rx.try_recv().ok();
                }
            }
            _ = keepalive.tick() => full = true,
        }
        if !full && joined.is_empty() && left.is_empty() {
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
            continue;
        }
        let (all_joined, all_left): (Vec<pb::PresenceEntry>, Vec<pb::PresenceEntry>) = if full {
            (
                current.values().cloned().map(Into::into).collect(),
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
        match send_in_chunks(&mut client, &gateway, ttl_s, full, all_joined, all_left).await {
            Ok(_) => {
                if failing {
                    debug!("presence reports reach auth again");
                }
                full = false;
                failing = false;
                for done in waiting.drain(..) {
                    let _ = done.send(());
                }
            }
            Err(status) => {
                if !failing {
                    warn!(error = %status.message(), "cannot report presence to auth; will send everything once it answers");
                }
                failing = true;
                // What was lost is resent as a whole next time.
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
