//! Presence: which identities are connected to which gateway and subscribed to which channels.
//!
//! Gateways publish their joins and leaves on the backbone as they happen, and everything they
//! hold at least every third of their ttl; every auth replica listens and folds the same reports
//! into the same registry, so any of them answers `GET /v1/presence/{channel}`. Reports are
//! numbered per gateway: a replica that misses one, or starts late, asks that gateway (or all) for
//! a full report. A gateway that stops reporting (it died) is forgotten once its ttl has passed.
//!
//! Channels that match `EVENTBUS_PRESENCE_EVENTS` also get `eventbus.presence.joined` / `left`
//! events, keyed by identity, on `presence.<channel>`: a compacted read of it lists who is there
//! now. They are written once, not once per replica: by the holder of a lease kept in the store
//! ([`LEASE`]). A replica that takes the lease over first makes the log agree with its registry
//! (what happened while nobody held it), then writes each change that alters what the log shows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use eventbus_auth_client::presence::{decode_report, resync_request};
use eventbus_model::names::{presence_of, presence_subject};
use eventbus_proto::presence::{self as pb, REPORTS_TOPIC, RESYNC_TOPIC};
use eventbus_router::Backbone;
use eventbus_router::pattern::matches;
use eventbus_runtime::Shutdown;
use eventbus_store_client::lease::{self, Lease, now_ms};
use eventbus_store_client::{StoreClient, StoreError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The lease of the replica that writes presence events.
pub const LEASE: &str = "_bus.presence.lease";
/// A replica asks one gateway for a full report at most this often.
const RESYNC_EVERY: Duration = Duration::from_secs(1);

/// An identity's first connection joined a channel, or its last one left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub channel: String,
    pub identity: String,
    pub joined: bool,
}

/// A report that does not follow the gateway's previous one: some were missed.
#[derive(Debug, PartialEq, Eq)]
pub struct Missed;

struct Gateway {
    expires: Instant,
    /// The number of the last report applied.
    last: u64,
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

/// The registry each auth replica keeps; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    state: Arc<Mutex<State>>,
    /// Where transitions of channels with presence events go (None: nobody wants them).
    events: Option<mpsc::UnboundedSender<Transition>>,
    patterns: Arc<[String]>,
}

impl Registry {
    /// An empty registry; transitions of channels matching `patterns` go to `events`.
    fn new(events: Option<mpsc::UnboundedSender<Transition>>, patterns: Vec<String>) -> Self {
        Registry {
            state: Arc::default(),
            events,
            patterns: patterns.into(),
        }
    }

    /// Starts the registry of this replica (`me`): it follows the gateways' reports on `backbone`
    /// and, with a store and `patterns`, writes presence events of matching channels while it
    /// holds the lease. Its tasks end at `shutdown` (the lease is given up then).
    pub fn start(
        backbone: Arc<dyn Backbone>,
        store: Option<StoreClient>,
        patterns: Vec<String>,
        me: String,
        shutdown: Shutdown,
    ) -> Self {
        let (registry, events) = match store {
            Some(store) if !patterns.is_empty() => {
                let (tx, rx) = mpsc::unbounded_channel();
                let registry = Registry::new(Some(tx), patterns);
                let writer = Writer {
                    store,
                    registry: registry.clone(),
                    lease: Lease::new(me, LEASE),
                    written: HashMap::new(),
                    holding: false,
                    dirty: false,
                };
                (registry, Some((writer, rx)))
            }
            _ => (Registry::new(None, patterns), None),
        };
        tokio::spawn(follow_reports(backbone, registry.clone(), shutdown.clone()));
        tokio::spawn(expire_loop(
            Arc::downgrade(&registry.state),
            registry.events.clone(),
            registry.patterns.clone(),
        ));
        if let Some((writer, rx)) = events {
            tokio::spawn(writer.run(rx, shutdown));
        }
        registry
    }

    /// Applies one gateway's report; returns the transitions it caused, or [`Missed`] when it
    /// does not follow that gateway's last report (nothing is applied: a full report will be).
    pub fn apply(&self, report: pb::PresenceReport) -> Result<Vec<Transition>, Missed> {
        let ttl = Duration::from_secs(u64::from(report.ttl_s.max(1)));
        let mut out = Vec::new();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let follows = state
            .gateways
            .get(&report.gateway)
            .is_some_and(|g| g.last.checked_add(1) == Some(report.number));
        if !report.full && !follows {
            return Err(Missed);
        }
        let mut gateway = state.gateways.remove(&report.gateway).unwrap_or(Gateway {
            expires: Instant::now(),
            last: 0,
            entries: HashMap::new(),
        });
        gateway.expires = Instant::now() + ttl;
        gateway.last = report.number;
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
                if let Some(identity) = gateway.entries.remove(&(e.connection, e.channel.clone())) {
                    state.remove(&identity, &e.channel, &mut out);
                }
            }
        }
        // Kept while empty too: its next report must follow this one.
        state.gateways.insert(report.gateway, gateway);
        // Sent under the lock, so that the writer gets transitions in the order they happened.
        send(&self.events, &self.patterns, &out);
        Ok(out)
    }

    /// Per gateway with subscriptions: its id, its connections with at least one channel
    /// subscription, and those subscriptions; and how many channels have anyone in them.
    pub fn overview(&self) -> (Vec<(String, usize, usize)>, usize) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut gateways: Vec<(String, usize, usize)> = state
            .gateways
            .iter()
            .filter(|(_, g)| !g.entries.is_empty())
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

    /// The channels with anyone in them that presence events are written for.
    fn watched_channels(&self) -> Vec<String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .channels
            .keys()
            .filter(|channel| self.watches(channel))
            .cloned()
            .collect()
    }

    fn watches(&self, channel: &str) -> bool {
        self.patterns.iter().any(|p| matches(p, channel))
    }
}

/// Hands transitions of opted-in channels to the event writer.
fn send(
    events: &Option<mpsc::UnboundedSender<Transition>>,
    patterns: &[String],
    transitions: &[Transition],
) {
    let Some(events) = events else { return };
    for t in transitions {
        if patterns.iter().any(|p| matches(p, &t.channel)) {
            let _ = events.send(t.clone());
        }
    }
}

/// Applies every report on the backbone to `registry`; asks for a full report, at start from
/// every gateway and later from one whose reports it missed.
async fn follow_reports(backbone: Arc<dyn Backbone>, registry: Registry, shutdown: Shutdown) {
    let mut reports = loop {
        match backbone.listen(REPORTS_TOPIC).await {
            Ok(reports) => break reports,
            Err(err) => {
                warn!(%err, "cannot listen for presence reports; trying again");
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    // Listening first: the full reports this asks for are not missed.
    if let Err(err) = backbone.send(RESYNC_TOPIC, resync_request(None)).await {
        warn!(%err, "cannot ask the gateways for their presence; their next full reports will do");
    }
    let mut asked: HashMap<String, Instant> = HashMap::new();
    loop {
        let payload = tokio::select! {
            _ = shutdown.wait() => return,
            payload = reports.next() => match payload {
                Some(payload) => payload,
                None => return,
            },
        };
        let report = match decode_report(&payload) {
            Ok(report) => report,
            Err(why) => {
                warn!(%why, "presence report refused");
                continue;
            }
        };
        let gateway = report.gateway.clone();
        if registry.apply(report) == Err(Missed) {
            let now = Instant::now();
            asked.retain(|_, at| now.duration_since(*at) < RESYNC_EVERY);
            if !asked.contains_key(&gateway) {
                debug!(%gateway, "presence reports missed; asking the gateway for all it holds");
                asked.insert(gateway.clone(), now);
                let _ = backbone
                    .send(RESYNC_TOPIC, resync_request(Some(&gateway)))
                    .await;
            }
        }
    }
}

fn expire(
    state: &Mutex<State>,
    now: Instant,
    events: &Option<mpsc::UnboundedSender<Transition>>,
    patterns: &[String],
) -> Vec<Transition> {
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
            if !gateway.entries.is_empty() {
                warn!(gateway = %id, entries = gateway.entries.len(), "gateway stopped reporting presence, its entries expire");
            }
            for ((_, channel), identity) in gateway.entries {
                state.remove(&identity, &channel, &mut out);
            }
        }
    }
    send(events, patterns, &out);
    out
}

async fn expire_loop(
    state: Weak<Mutex<State>>,
    events: Option<mpsc::UnboundedSender<Transition>>,
    patterns: Arc<[String]>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        expire(&state, Instant::now(), &events, &patterns);
    }
}

/// Writes presence events while this replica holds the lease, so that each presence channel's
/// compacted view follows the registry.
struct Writer {
    store: StoreClient,
    registry: Registry,
    lease: Lease,
    /// While holding: per watched channel, the identities the log shows present.
    written: HashMap<String, BTreeSet<String>>,
    holding: bool,
    /// A write failed: the log is made to agree again at the next look.
    dirty: bool,
}

impl Writer {
    async fn run(
        mut self,
        mut transitions: mpsc::UnboundedReceiver<Transition>,
        shutdown: Shutdown,
    ) {
        let mut look = tokio::time::interval(lease::LOOK_EVERY);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                _ = look.tick() => self.look().await,
                t = transitions.recv() => match t {
                    Some(t) => self.write(t).await,
                    None => break,
                },
            }
        }
        if self.holding
            && let Err(err) = self.lease.release(&self.store).await
        {
            debug!(%err, "cannot give the presence lease up; it runs out by itself");
        }
    }

    async fn look(&mut self) {
        let holds = match self.lease.look(&self.store).await {
            Ok(holds) => holds,
            Err(err) => {
                debug!(%err, "cannot look at the presence lease now");
                self.lease.holds(now_ms())
            }
        };
        if !holds {
            if self.holding {
                info!("another replica writes presence events now");
            }
            self.holding = false;
            self.written.clear();
            return;
        }
        if !self.holding || self.dirty {
            match self.reconcile().await {
                Ok(()) => {
                    if !self.holding {
                        info!("this replica writes presence events now");
                    }
                    self.holding = true;
                    self.dirty = false;
                }
                Err(err) => {
                    warn!(%err, "cannot bring the presence events up to date; trying again");
                    self.holding = false;
                    self.written.clear();
                }
            }
        }
    }

    /// Makes every watched presence channel in the log show who the registry says is there.
    async fn reconcile(&mut self) -> Result<(), StoreError> {
        let mut channels: BTreeSet<String> = self.registry.watched_channels().into_iter().collect();
        let mut after = String::new();
        loop {
            let page = self
                .store
                .channels(eventbus_model::names::PRESENCE_PREFIX, &after, 1000)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            channels.extend(
                page.iter()
                    .filter_map(|(name, _)| presence_subject(name))
                    .filter(|channel| self.registry.watches(channel))
                    .map(str::to_owned),
            );
            if page.len() < 1000 {
                break;
            }
        }
        self.written.clear();
        for channel in channels {
            let Some(events_channel) = presence_of(&channel) else {
                continue;
            };
            let shown = present_in_log(&self.store, &events_channel).await?;
            let wanted: BTreeSet<String> = self
                .registry
                .members(&channel)
                .into_iter()
                .map(|(identity, _)| identity)
                .collect();
            for identity in wanted.difference(&shown) {
                append(&self.store, &channel, identity, true).await?;
            }
            for identity in shown.difference(&wanted) {
                append(&self.store, &channel, identity, false).await?;
            }
            if !wanted.is_empty() {
                self.written.insert(channel, wanted);
            }
        }
        Ok(())
    }

    /// Writes `t` if it changes what the log shows (another replica's takeover may have written it).
    async fn write(&mut self, t: Transition) {
        if !self.holding || self.dirty || !self.lease.holds(now_ms()) {
            return;
        }
        let shown = self
            .written
            .get(&t.channel)
            .is_some_and(|s| s.contains(&t.identity));
        if shown == t.joined {
            return;
        }
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=3 {
            match append(&self.store, &t.channel, &t.identity, t.joined).await {
                Ok(()) => {
                    let identities = self.written.entry(t.channel.clone()).or_default();
                    if t.joined {
                        identities.insert(t.identity);
                    } else {
                        identities.remove(&t.identity);
                        if identities.is_empty() {
                            self.written.remove(&t.channel);
                        }
                    }
                    return;
                }
                Err(err) if attempt == 3 => {
                    warn!(%err, channel = %t.channel, "cannot write a presence event; the log is brought up to date once the store takes it");
                    self.dirty = true;
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }
}

/// The identities the compacted view of `events_channel` shows present.
async fn present_in_log(
    store: &StoreClient,
    events_channel: &str,
) -> Result<BTreeSet<String>, StoreError> {
    let mut present = BTreeSet::new();
    let mut after = 0;
    loop {
        let page = match store.read(events_channel, after, 1000, true).await {
            Ok(page) => page,
            Err(StoreError::OutOfRange(_)) => return Ok(present),
            Err(err) => return Err(err),
        };
        for event in &page.events {
            after = event.seq;
            if let Some(key) = serde_json::from_slice::<serde_json::Value>(&event.json)
                .ok()
                .and_then(|v| v["key"].as_str().map(str::to_owned))
            {
                present.insert(key);
            }
        }
        if page.events.len() < 1000 {
            return Ok(present);
        }
    }
}

/// Appends `identity` joining or leaving `channel` to its presence channel.
async fn append(
    store: &StoreClient,
    channel: &str,
    identity: &str,
    joined: bool,
) -> Result<(), StoreError> {
    let Some(events_channel) = presence_of(channel) else {
        return Ok(());
    };
    let kind = if joined {
        "eventbus.presence.joined"
    } else {
        "eventbus.presence.left"
    };
    store
        .append_own(
            &events_channel,
            kind,
            Some(identity),
            serde_json::json!({"channel": channel, "identity": identity}),
            !joined,
        )
        .await?;
    debug!(%channel, %identity, joined, "presence event written");
    Ok(())
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
        number: u64,
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
            number,
        }
    }

    fn registry() -> Registry {
        Registry::new(None, Vec::new())
    }

    #[test]
    fn joins_and_leaves_count_connections_per_identity() {
        let registry = registry();
        let t = registry
            .apply(report(
                "a",
                1,
                true,
                vec![entry("c1", "alice", "chat"), entry("c2", "alice", "chat")],
                vec![],
            ))
            .unwrap();
        assert_eq!(t.len(), 1, "only the first connection of alice joins");
        registry
            .apply(report(
                "b",
                7,
                true,
                vec![entry("c3", "bob", "chat")],
                vec![],
            ))
            .unwrap();
        assert_eq!(
            registry.members("chat"),
            vec![("alice".into(), 2), ("bob".into(), 1)]
        );
        let t = registry
            .apply(report(
                "a",
                2,
                false,
                vec![],
                vec![entry("c1", "alice", "chat")],
            ))
            .unwrap();
        assert!(t.is_empty(), "alice still has a connection");
        let t = registry
            .apply(report(
                "a",
                3,
                false,
                vec![],
                vec![entry("c2", "alice", "chat")],
            ))
            .unwrap();
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
                    4,
                    false,
                    vec![],
                    vec![entry("c2", "alice", "chat")]
                ))
                .unwrap()
                .is_empty()
        );
        assert_eq!(registry.members("chat"), vec![("bob".into(), 1)]);
    }

    #[test]
    fn a_full_report_replaces_what_the_gateway_said() {
        let registry = registry();
        registry
            .apply(report(
                "a",
                1,
                true,
                vec![entry("c1", "alice", "chat"), entry("c2", "carol", "chat")],
                vec![],
            ))
            .unwrap();
        let t = registry
            .apply(report(
                "a",
                9,
                true,
                vec![entry("c2", "carol", "chat"), entry("c4", "dave", "chat")],
                vec![],
            ))
            .unwrap();
        assert_eq!(t.len(), 2, "alice left, dave joined: {t:?}");
        assert_eq!(
            registry.members("chat"),
            vec![("carol".into(), 1), ("dave".into(), 1)]
        );
    }

    #[test]
    fn a_report_that_does_not_follow_the_last_is_missed_until_a_full_one() {
        let registry = registry();
        // Changes from a gateway never heard in full (this replica started late).
        assert_eq!(
            registry.apply(report(
                "a",
                5,
                false,
                vec![entry("c1", "alice", "chat")],
                vec![]
            )),
            Err(Missed)
        );
        assert!(registry.members("chat").is_empty());
        registry
            .apply(report(
                "a",
                6,
                true,
                vec![entry("c1", "alice", "chat")],
                vec![],
            ))
            .unwrap();
        // Report 7 was lost on the way: 8 is not applied, bob is not half-known.
        assert_eq!(
            registry.apply(report(
                "a",
                8,
                false,
                vec![entry("c2", "bob", "chat")],
                vec![]
            )),
            Err(Missed)
        );
        assert_eq!(registry.members("chat"), vec![("alice".into(), 1)]);
        // The full report asked for puts it right.
        registry
            .apply(report(
                "a",
                9,
                true,
                vec![entry("c1", "alice", "chat"), entry("c2", "bob", "chat")],
                vec![],
            ))
            .unwrap();
        registry
            .apply(report(
                "a",
                10,
                false,
                vec![],
                vec![entry("c1", "alice", "chat")],
            ))
            .unwrap();
        assert_eq!(registry.members("chat"), vec![("bob".into(), 1)]);
    }

    #[test]
    fn a_silent_gateway_expires() {
        let registry = registry();
        let mut r = report("a", 1, true, vec![entry("c1", "alice", "chat")], vec![]);
        r.ttl_s = 1;
        registry.apply(r).unwrap();
        registry
            .apply(report(
                "b",
                1,
                true,
                vec![entry("c2", "bob", "chat")],
                vec![],
            ))
            .unwrap();
        let later = Instant::now() + Duration::from_secs(2);
        let t = expire(&registry.state, later, &None, &[]);
        assert_eq!(
            t,
            vec![Transition {
                channel: "chat".into(),
                identity: "alice".into(),
                joined: false
            }]
        );
        assert_eq!(registry.members("chat"), vec![("bob".into(), 1)]);
        assert_eq!(
            registry.apply(report("a", 2, false, vec![], vec![])),
            Err(Missed),
            "an expired gateway is heard again from its next full report"
        );
    }
}
