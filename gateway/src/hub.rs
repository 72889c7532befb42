//! Interest-based fan-out. The hub subscribes on the backbone to a channel (or pattern, or queue
//! group) only while a local connection wants it, and hands each event to every interested
//! connection as one shared, already-encoded frame. It never waits on a connection: a full queue
//! marks that connection slow and moves on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::ws::Utf8Bytes;
use eventbus_model::event_frame;
use eventbus_router::pattern::is_pattern;
use eventbus_router::{Backbone, BackboneError};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::mailbox::{Mailbox, Offered};

/// One event as every connection receives it: encoded once, shared by all.
#[derive(Debug)]
pub struct Delivery {
    pub channel: String,
    pub seq: u64,
    pub frame: Utf8Bytes,
}

/// What the hub puts in a connection's queue.
#[derive(Debug)]
pub struct Live {
    pub subscription: u64,
    pub delivery: Arc<Delivery>,
}

#[derive(Clone)]
struct Member {
    /// Unique in the hub (subscription ids are only unique within a connection).
    id: u64,
    subscription: u64,
    mailbox: Mailbox,
}

impl Member {
    /// Offers a delivery without waiting; false when the member's queue is full or gone.
    fn offer(&self, delivery: &Arc<Delivery>) -> bool {
        self.mailbox.offer(Live {
            subscription: self.subscription,
            delivery: delivery.clone(),
        }) == Offered::Queued
    }
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct TopicKey {
    pattern: String,
    group: Option<String>,
}

/// A topic's members. Fan-out takes a snapshot (an `Arc` clone) and offers outside the lock;
/// joins and leaves change the list in place unless a snapshot is out at that moment (then
/// `Arc::make_mut` copies it once), so a storm of joins is not a copy of the list per join
/// (10k joins to one channel were O(n²) with a copy each: 5-7 s).
type Members = Arc<RwLock<Arc<Vec<Member>>>>;

struct Topic {
    members: Members,
    /// Highest seq this gateway has offered on this topic (channel topics only).
    last_seq: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

struct Inner {
    backbone: Arc<dyn Backbone>,
    /// For the tail check: channel heads and the events a lost backbone message stranded.
    store: Option<eventbus_store_client::StoreClient>,
    topics: Mutex<HashMap<TopicKey, Topic>>,
    next_member: AtomicU64,
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// Interest in one topic; dropping it removes the interest (and the backbone subscription with the
/// last one).
pub struct Interest {
    inner: Arc<Inner>,
    key: TopicKey,
    member: u64,
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut topics = self.inner.topics.lock().unwrap_or_else(|p| p.into_inner());
        let Some(topic) = topics.get(&self.key) else {
            return;
        };
        let empty = {
            let mut members = topic.members.write().unwrap_or_else(|p| p.into_inner());
            let list = Arc::make_mut(&mut members);
            if let Some(at) = list.iter().position(|m| m.id == self.member) {
                list.swap_remove(at);
            }
            list.is_empty()
        };
        if empty && let Some(topic) = topics.remove(&self.key) {
            topic.task.abort();
            eventbus_runtime::metrics::metrics().backbone_topics.dec();
            debug!(pattern = %self.key.pattern, "last local subscriber left, backbone interest dropped");
        }
    }
}

impl Hub {
    pub fn new(backbone: Arc<dyn Backbone>) -> Self {
        Self::build(backbone, None)
    }

    /// A hub that, every `interval`, compares the head of each channel it carries with what it has
    /// offered, and delivers from the store what the backbone never brought. Without it, an event
    /// whose backbone message was lost waits for the next event of its channel to reveal the gap.
    pub fn with_tail_check(
        backbone: Arc<dyn Backbone>,
        store: eventbus_store_client::StoreClient,
        interval: std::time::Duration,
    ) -> Self {
        let hub = Self::build(backbone, Some(store));
        tokio::spawn(tail_check(Arc::downgrade(&hub.inner), interval));
        hub
    }

    fn build(
        backbone: Arc<dyn Backbone>,
        store: Option<eventbus_store_client::StoreClient>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                backbone,
                store,
                topics: Mutex::new(HashMap::new()),
                next_member: AtomicU64::new(1),
            }),
        }
    }

    pub fn backbone_connected(&self) -> bool {
        self.inner.backbone.is_connected()
    }

    /// Registers `subscription` of a connection for `pattern` (a channel or a pattern), optionally in
    /// a queue group. Live events start flowing into the mailbox before this returns.
    pub async fn join(
        &self,
        pattern: &str,
        group: Option<&str>,
        subscription: u64,
        mailbox: Mailbox,
    ) -> Result<Interest, BackboneError> {
        let key = TopicKey {
            pattern: pattern.to_owned(),
            group: group.map(str::to_owned),
        };
        let id = self.inner.next_member.fetch_add(1, Ordering::Relaxed);
        let member = Member {
            id,
            subscription,
            mailbox,
        };
        loop {
            {
                let topics = self.inner.topics.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(topic) = topics.get(&key) {
                    let mut members = topic.members.write().unwrap_or_else(|p| p.into_inner());
                    Arc::make_mut(&mut members).push(member);
                    return Ok(Interest {
                        inner: self.inner.clone(),
                        key,
                        member: id,
                    });
                }
            }
            // Subscribe outside the lock (it awaits), then install unless another join won the race.
            let feed = self.inner.backbone.subscribe(pattern, group).await?;
            // Where the tail check starts: the head once the backbone feed is in place, since
            // anything committed later either comes live or is found by the check. If the store
            // cannot say, from the start: connections drop what they already have.
            let baseline = match (&self.inner.store, group.is_none() && !is_pattern(pattern)) {
                (Some(store), true) => store.head(pattern).await.unwrap_or(0),
                _ => 0,
            };
            let mut topics = self.inner.topics.lock().unwrap_or_else(|p| p.into_inner());
            if topics.contains_key(&key) {
                continue;
            }
            let members: Members = Arc::new(RwLock::new(Arc::new(vec![member.clone()])));
            let last_seq = Arc::new(AtomicU64::new(baseline));
            let task = tokio::spawn(fan_out(
                feed,
                members.clone(),
                group.is_some(),
                last_seq.clone(),
            ));
            eventbus_runtime::metrics::metrics().backbone_topics.inc();
            topics.insert(
                key.clone(),
                Topic {
                    members,
                    last_seq,
                    task,
                },
            );
            return Ok(Interest {
                inner: self.inner.clone(),
                key,
                member: id,
            });
        }
    }

    /// How many backbone subscriptions this gateway holds.
    pub fn topics(&self) -> usize {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// One event as every connection receives it, or `None` when it is no event (malformed: it would
/// reach clients as a broken frame) or cannot be a text frame.
fn delivery_of(event: eventbus_model::StoredEvent) -> Option<Arc<Delivery>> {
    if serde_json::from_slice::<serde::de::IgnoredAny>(&event.json).is_err() {
        eventbus_runtime::metrics::metrics()
            .backbone_malformed
            .inc();
        debug!(channel = %event.channel, seq = event.seq, "backbone message is not a JSON event, dropped");
        return None;
    }
    match Utf8Bytes::try_from(event_frame(&event.json)) {
        Ok(frame) => Some(Arc::new(Delivery {
            channel: event.channel,
            seq: event.seq,
            frame,
        })),
        Err(_) => {
            warn!(channel = %event.channel, seq = event.seq, "event is not UTF-8, dropped");
            None
        }
    }
}

fn offer_all(members: &Members, delivery: &Arc<Delivery>) {
    let snapshot = members.read().unwrap_or_else(|p| p.into_inner()).clone();
    for member in snapshot.iter() {
        member.offer(delivery);
    }
}

async fn fan_out(
    mut feed: eventbus_router::Subscription,
    members: Members,
    is_group: bool,
    last_seq: Arc<AtomicU64>,
) {
    let next_pick = AtomicUsize::new(0);
    let mut delivered = 0u64;
    while let Some(event) = feed.next().await {
        let seq = event.seq;
        if event.committed_ms > 0 {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            eventbus_runtime::metrics::metrics()
                .delivery_lag_seconds
                .observe(now_ms.saturating_sub(event.committed_ms) as f64 / 1000.0);
        }
        let Some(delivery) = delivery_of(event) else {
            continue;
        };
        if is_group {
            // One member of the group: the next in turn whose queue has room.
            let snapshot = members.read().unwrap_or_else(|p| p.into_inner()).clone();
            let start = next_pick.fetch_add(1, Ordering::Relaxed);
            for i in 0..snapshot.len() {
                if snapshot[(start + i) % snapshot.len()].offer(&delivery) {
                    break;
                }
            }
        } else {
            offer_all(&members, &delivery);
        }
        last_seq.fetch_max(seq, Ordering::Relaxed);
        delivered += 1;
    }
    debug!(events = delivered, "backbone feed ended");
}

/// The periodic tail check of [`Hub::with_tail_check`]. Connections drop what they already have, so
/// offering an event twice (live and from here) is harmless.
async fn tail_check(hub: std::sync::Weak<Inner>, interval: std::time::Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let (store, targets) = {
            let Some(inner) = hub.upgrade() else {
                return;
            };
            let Some(store) = inner.store.clone() else {
                return;
            };
            let topics = inner.topics.lock().unwrap_or_else(|p| p.into_inner());
            let targets: Vec<(String, Members, Arc<AtomicU64>)> = topics
                .iter()
                .filter(|(key, _)| key.group.is_none() && !is_pattern(&key.pattern))
                .map(|(key, topic)| {
                    (
                        key.pattern.clone(),
                        topic.members.clone(),
                        topic.last_seq.clone(),
                    )
                })
                .collect();
            (store, targets)
        };
        // One call for every channel's head (the store answers in chunks of its limit), not one
        // per channel: a gateway with 15k private inboxes would otherwise ask 3k times a second.
        let channels: Vec<String> = targets.iter().map(|(c, _, _)| c.clone()).collect();
        let heads = match store.heads(&channels).await {
            Ok(heads) => heads,
            Err(err) => {
                debug!(error = %err, "tail check: the store did not answer with heads");
                continue;
            }
        };
        for ((channel, members, last_seq), head) in targets.into_iter().zip(heads) {
            let mut after = last_seq.load(Ordering::Relaxed);
            if head > after {
                debug!(channel = %channel, from = after, to = head, "delivering a stranded tail from the store");
            }
            while after < head {
                let Ok(page) = store
                    .read(&channel, after, (head - after).min(1000) as u32, false)
                    .await
                else {
                    break;
                };
                let Some(last) = page.events.last().map(|e| e.seq) else {
                    break;
                };
                for event in page.events {
                    if let Some(delivery) = delivery_of(event) {
                        eventbus_runtime::metrics::metrics().tail_refills.inc();
                        offer_all(&members, &delivery);
                    }
                }
                after = last;
                last_seq.fetch_max(last, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::Inbox;
    use eventbus_model::StoredEvent;
    use eventbus_router::InProcessBackbone;

    fn mailbox() -> (Mailbox, Inbox) {
        crate::mailbox::mailbox(16)
    }

    #[tokio::test]
    async fn interest_follows_local_subscribers() {
        let backbone = InProcessBackbone::new();
        let hub = Hub::new(Arc::new(backbone.clone()));
        let (box_a, mut rx_a) = mailbox();
        let (box_b, mut rx_b) = mailbox();
        let a = hub.join("orders", None, 1, box_a).await.unwrap();
        let b = hub.join("orders", None, 1, box_b).await.unwrap();
        assert_eq!(
            hub.topics(),
            1,
            "one backbone subscription per channel, however many subscribers"
        );

        let event = StoredEvent {
            channel: "orders".into(),
            seq: 1,
            json: eventbus_model::with_seq(br#"{"id":"x"}"#, 1),
            committed_ms: 0,
        };
        backbone.publish(&event).await.unwrap();
        let (got_a, got_b) = (rx_a.recv().await, rx_b.recv().await);
        assert!(
            Arc::ptr_eq(&got_a.delivery, &got_b.delivery),
            "the frame is encoded once and shared"
        );
        assert_eq!(
            got_a.delivery.frame.as_str(),
            r#"{"op":"event","event":{"seq":1,"id":"x"}}"#
        );

        drop(a);
        assert_eq!(hub.topics(), 1, "b still wants it");
        backbone
            .publish(&StoredEvent {
                seq: 2,
                ..event.clone()
            })
            .await
            .unwrap();
        assert_eq!(
            rx_b.recv().await.delivery.seq,
            2,
            "b is still served after a left"
        );
        drop(b);
        assert_eq!(
            hub.topics(),
            0,
            "the last one out drops the backbone subscription"
        );
    }

    /// Joins and leaves in a random order between events: each event reaches exactly the members
    /// of that moment, once (members are changed in place, or copied while fan-out holds them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_event_reaches_exactly_the_members_of_its_moment() {
        let backbone = InProcessBackbone::new();
        let hub = Hub::new(Arc::new(backbone.clone()));
        let mut present: Vec<(Interest, Inbox)> = Vec::new();
        let mut gone: Vec<Inbox> = Vec::new();
        let mut random = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |below: usize| {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            (random % below as u64) as usize
        };
        for seq in 1..=300u64 {
            for _ in 0..next(4) {
                let (mailbox, rx) = mailbox();
                let interest = hub.join("storm", None, seq, mailbox).await.unwrap();
                present.push((interest, rx));
            }
            for _ in 0..next(3) {
                if present.len() > 1 {
                    let (interest, rx) = present.swap_remove(next(present.len()));
                    drop(interest);
                    gone.push(rx);
                }
            }
            let event = StoredEvent {
                channel: "storm".into(),
                seq,
                json: eventbus_model::with_seq(br#"{"id":"x"}"#, seq),
                committed_ms: 0,
            };
            backbone.publish(&event).await.unwrap();
            for (_, rx) in &mut present {
                let live = rx.recv().await;
                assert_eq!(
                    live.delivery.seq, seq,
                    "a member misses or repeats an event"
                );
            }
            // Fan-out offers in one pass: it is over, so a member that left would have it by now.
            for rx in &mut gone {
                assert!(
                    rx.try_recv().is_none(),
                    "a member that left got event {seq}"
                );
            }
        }
    }
}
