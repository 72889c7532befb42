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
use eventbus_store_client::StoreClient;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

/// The source of the events the bus writes itself.
const SOURCE: &str = "eventbus";

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
