//! Presence: which identities are connected to which gateway and subscribed to which channels.
//!
//! Gateways report joins and leaves as they happen, and everything they hold at least every
//! third of their ttl; the registry forgets a gateway that stops reporting (it died) once that ttl
//! has passed, and rebuilds itself from the full reports after a restart of auth. Channels that
//! match `EVENTBUS_PRESENCE_EVENTS` also get `eventbus.presence.joined` / `left` events, keyed by
//! identity, on `presence.<channel>`: a compacted read of it lists who is there now.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use eventbus_model::Limits;
use eventbus_model::names::presence_of;
use eventbus_proto::auth as pb;
use eventbus_router::pattern::matches;
use eventbus_store::StoreClient;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

/// The source of the events the bus writes itself.
const SOURCE: &str = "eventbus";

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

/// An identity's first connection joined a channel, or its last one left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub channel: String,
    pub identity: String,
    pub joined: bool,
}

struct Gateway {
    expires: Instant,
    /// (connection, channel) → identity.
    entries: HashMap<(String, String), String>,
}

#[derive(Default)]
struct State {
    gateways: HashMap<String, Gateway>,
    /// channel → identity → connections.
    channels: HashMap<String, BTreeMap<String, u32>>,
}

impl State {
    fn add(&mut self, identity: &str, channel: &str, out: &mut Vec<Transition>) {
        let count = self
            .channels
            .entry(channel.to_owned())
            .or_default()
            .entry(identity.to_owned())
            .or_insert(0);
        *count += 1;
        if *count == 1 {
            out.push(Transition {
                channel: channel.to_owned(),
                identity: identity.to_owned(),
                joined: true,
            });
        }
    }

    fn remove(&mut self, identity: &str, channel: &str, out: &mut Vec<Transition>) {
        let Some(identities) = self.channels.get_mut(channel) else {
            return;
        };
        let Some(count) = identities.get_mut(identity) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            identities.remove(identity);
            if identities.is_empty() {
                self.channels.remove(channel);
            }
            out.push(Transition {
                channel: channel.to_owned(),
                identity: identity.to_owned(),
                joined: false,
            });
        }
    }
}

/// The registry auth keeps; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    state: Arc<Mutex<State>>,
    /// Where transitions of channels with presence events go (None: nobody wants them).
    events: Option<mpsc::UnboundedSender<Transition>>,
    patterns: Arc<[String]>,
}

impl Registry {
    /// A registry; with a store and `patterns`, it writes join/leave events of matching channels.
    pub fn new(store: Option<StoreClient>, patterns: Vec<String>) -> Self {
        let events = match store {
            Some(store) if !patterns.is_empty() => {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(write_events(store, rx));
                Some(tx)
            }
            _ => None,
        };
        let registry = Registry {
            state: Arc::default(),
            events,
            patterns: patterns.into(),
        };
        tokio::spawn(expire_loop(
            Arc::downgrade(&registry.state),
            registry.clone_sender(),
        ));
        registry
    }

    fn clone_sender(&self) -> Sender {
        Sender {
            events: self.events.clone(),
            patterns: self.patterns.clone(),
        }
    }

    /// Applies one gateway's report; returns the transitions it caused.
    pub fn apply(&self, report: pb::PresenceReport) -> Vec<Transition> {
        let ttl = Duration::from_secs(u64::from(report.ttl_s.max(1)));
        let mut out = Vec::new();
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut gateway = state.gateways.remove(&report.gateway).unwrap_or(Gateway {
                expires: Instant::now(),
                entries: HashMap::new(),
            });
            gateway.expires = Instant::now() + ttl;
            if report.full {
                let fresh: HashMap<(String, String), String> = report
                    .joined
                    .into_iter()
                    .map(|e| ((e.connection, e.channel), e.identity))
                    .collect();
                for ((connection, channel), identity) in &gateway.entries {
                    if !fresh.contains_key(&(connection.clone(), channel.clone())) {
                        state.remove(identity, channel, &mut out);
                    }
                }
                for ((connection, channel), identity) in &fresh {
                    if !gateway
                        .entries
                        .contains_key(&(connection.clone(), channel.clone()))
                    {
                        state.add(identity, channel, &mut out);
                    }
                }
                gateway.entries = fresh;
            } else {
                for e in report.joined {
                    if let std::collections::hash_map::Entry::Vacant(slot) =
                        gateway.entries.entry((e.connection, e.channel.clone()))
                    {
                        state.add(&e.identity, &e.channel, &mut out);
                        slot.insert(e.identity);
                    }
                }
                for e in report.left {
                    if let Some(identity) =
                        gateway.entries.remove(&(e.connection, e.channel.clone()))
                    {
                        state.remove(&identity, &e.channel, &mut out);
                    }
                }
            }
            if !gateway.entries.is_empty() {
                state.gateways.insert(report.gateway, gateway);
            }
        }
        self.clone_sender().send(&out);
        out
    }

    /// Per gateway: its id, its connections with at least one channel subscription, and those
    /// subscriptions; and how many channels have anyone in them.
    pub fn overview(&self) -> (Vec<(String, usize, usize)>, usize) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut gateways: Vec<(String, usize, usize)> = state
            .gateways
            .iter()
            .map(|(id, g)| {
                let connections: std::collections::HashSet<&String> =
                    g.entries.keys().map(|(c, _)| c).collect();
                (id.clone(), connections.len(), g.entries.len())
            })
            .collect();
        gateways.sort();
        (gateways, state.channels.len())
    }

    /// Who is in `channel`: identity → connections, in identity order.
    pub fn members(&self, channel: &str) -> Vec<(String, u32)> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .channels
            .get(channel)
            .map(|m| m.iter().map(|(i, n)| (i.clone(), *n)).collect())
            .unwrap_or_default()
    }
}

/// Hands transitions of opted-in channels to the event writer.
struct Sender {
    events: Option<mpsc::UnboundedSender<Transition>>,
    patterns: Arc<[String]>,
}

impl Sender {
    fn send(&self, transitions: &[Transition]) {
        let Some(events) = &self.events else { return };
        for t in transitions {
            if self.patterns.iter().any(|p| matches(p, &t.channel)) {
                let _ = events.send(t.clone());
            }
        }
    }
}

fn expire(state: &Mutex<State>, now: Instant) -> Vec<Transition> {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let dead: Vec<String> = state
        .gateways
        .iter()
        .filter(|(_, g)| g.expires <= now)
        .map(|(id, _)| id.clone())
        .collect();
    let mut out = Vec::new();
    for id in dead {
        if let Some(gateway) = state.gateways.remove(&id) {
            warn!(gateway = %id, entries = gateway.entries.len(), "gateway stopped reporting presence, its entries expire");
            for ((_, channel), identity) in gateway.entries {
                state.remove(&identity, &channel, &mut out);
            }
        }
    }
    out
}

async fn expire_loop(state: Weak<Mutex<State>>, sender: Sender) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        sender.send(&expire(&state, Instant::now()));
    }
}

/// Appends presence events in the order the transitions happened. Best effort: an event the store
/// refuses three times is dropped with a warning (the registry itself stays right).
async fn write_events(store: StoreClient, mut rx: mpsc::UnboundedReceiver<Transition>) {
    let limits = Limits::default();
    while let Some(t) = rx.recv().await {
        let Some(channel) = presence_of(&t.channel) else {
            continue;
        };
        let event = json!({
            "channel": channel,
            "type": if t.joined { "eventbus.presence.joined" } else { "eventbus.presence.left" },
            "key": t.identity,
            "deleted": !t.joined,
            "data": {"channel": t.channel, "identity": t.identity},
        });
        let accepted =
            match eventbus_model::parse_event(event.to_string().as_bytes(), SOURCE, &limits) {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "presence event refused by the event model");
                    continue;
                }
            };
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=3 {
            match store.append(vec![accepted.clone()]).await {
                Ok(_) => {
                    debug!(channel = %t.channel, identity = %t.identity, joined = t.joined, "presence event written");
                    break;
                }
                Err(err) if attempt == 3 => {
                    warn!(%err, channel = %t.channel, "presence event dropped: the store refused it three times");
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
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

    fn report(
        gateway: &str,
        full: bool,
        joined: Vec<pb::PresenceEntry>,
        left: Vec<pb::PresenceEntry>,
    ) -> pb::PresenceReport {
        pb::PresenceReport {
            gateway: gateway.into(),
            ttl_s: 30,
            full,
            joined,
            left,
        }
    }

    #[tokio::test]
    async fn joins_and_leaves_count_connections_per_identity() {
        let registry = Registry::new(None, Vec::new());
        let t = registry.apply(report(
            "a",
            false,
            vec![entry("c1", "alice", "chat"), entry("c2", "alice", "chat")],
            vec![],
        ));
        assert_eq!(t.len(), 1, "only the first connection of alice joins");
        registry.apply(report("b", false, vec![entry("c3", "bob", "chat")], vec![]));
        assert_eq!(
            registry.members("chat"),
            vec![("alice".into(), 2), ("bob".into(), 1)]
        );
        let t = registry.apply(report(
            "a",
            false,
            vec![],
            vec![entry("c1", "alice", "chat")],
        ));
        assert!(t.is_empty(), "alice still has a connection");
        let t = registry.apply(report(
            "a",
            false,
            vec![],
            vec![entry("c2", "alice", "chat")],
        ));
        assert_eq!(
            t,
            vec![Transition {
                channel: "chat".into(),
                identity: "alice".into(),
                joined: false
            }]
        );
        // A leave reported twice changes nothing.
        assert!(
            registry
                .apply(report(
                    "a",
                    false,
                    vec![],
                    vec![entry("c2", "alice", "chat")]
                ))
                .is_empty()
        );
        assert_eq!(registry.members("chat"), vec![("bob".into(), 1)]);
    }

    #[tokio::test]
    async fn a_full_report_replaces_what_the_gateway_said() {
        let registry = Registry::new(None, Vec::new());
        registry.apply(report(
            "a",
            false,
            vec![entry("c1", "alice", "chat"), entry("c2", "carol", "chat")],
            vec![],
        ));
        let t = registry.apply(report(
            "a",
            true,
            vec![entry("c2", "carol", "chat"), entry("c4", "dave", "chat")],
            vec![],
        ));
        assert_eq!(t.len(), 2, "alice left, dave joined: {t:?}");
        assert_eq!(
            registry.members("chat"),
            vec![("carol".into(), 1), ("dave".into(), 1)]
        );
    }

    #[tokio::test]
    async fn a_silent_gateway_expires() {
        let registry = Registry::new(None, Vec::new());
        let mut r = report("a", false, vec![entry("c1", "alice", "chat")], vec![]);
        r.ttl_s = 1;
        registry.apply(r);
        registry.apply(report("b", false, vec![entry("c2", "bob", "chat")], vec![]));
        let later = Instant::now() + Duration::from_secs(2);
        let t = expire(&registry.state, later);
        assert_eq!(
            t,
            vec![Transition {
                channel: "chat".into(),
                identity: "alice".into(),
                joined: false
            }]
        );
        assert_eq!(registry.members("chat"), vec![("bob".into(), 1)]);
    }
}
