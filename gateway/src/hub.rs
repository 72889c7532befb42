//! Interest-based fan-out. The hub subscribes on the backbone to a channel (or pattern, or queue
//! group) only while a local connection wants it, and hands each event to every interested
//! connection as one shared, already-encoded frame. It never waits on a connection: a full queue
//! marks that connection slow and moves on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::ws::Utf8Bytes;
use eventbus_model::event_frame;
use eventbus_router::{Backbone, BackboneError};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

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

/// A connection's end of the hub: its queue and its slow-consumer alarm.
#[derive(Clone)]
pub struct Mailbox {
    pub tx: mpsc::Sender<Live>,
    pub slow: Arc<Notify>,
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
        match self.mailbox.tx.try_send(Live {
            subscription: self.subscription,
            delivery: delivery.clone(),
        }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.mailbox.slow.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct TopicKey {
    pattern: String,
    group: Option<String>,
}

struct Topic {
    members: Arc<RwLock<Arc<[Member]>>>,
    task: JoinHandle<()>,
}

struct Inner {
    backbone: Arc<dyn Backbone>,
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
        let remaining: Arc<[Member]> = {
            let mut members = topic.members.write().unwrap_or_else(|p| p.into_inner());
            let kept: Arc<[Member]> = members
                .iter()
                .filter(|m| m.id != self.member)
                .cloned()
                .collect();
            *members = kept.clone();
            kept
        };
        if remaining.is_empty()
            && let Some(topic) = topics.remove(&self.key)
        {
            topic.task.abort();
            debug!(pattern = %self.key.pattern, "last local subscriber left, backbone interest dropped");
        }
    }
}

impl Hub {
    pub fn new(backbone: Arc<dyn Backbone>) -> Self {
        Self {
            inner: Arc::new(Inner {
                backbone,
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
                    let mut list: Vec<Member> = members.iter().cloned().collect();
                    list.push(member);
                    *members = list.into();
                    return Ok(Interest {
                        inner: self.inner.clone(),
                        key,
                        member: id,
                    });
                }
            }
            // Subscribe outside the lock (it awaits), then install unless another join won the race.
            let feed = self.inner.backbone.subscribe(pattern, group).await?;
            let mut topics = self.inner.topics.lock().unwrap_or_else(|p| p.into_inner());
            if topics.contains_key(&key) {
                continue;
            }
            let members: Arc<RwLock<Arc<[Member]>>> =
                Arc::new(RwLock::new(Arc::from(vec![member.clone()])));
            let task = tokio::spawn(fan_out(feed, members.clone(), group.is_some()));
            topics.insert(key.clone(), Topic { members, task });
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

async fn fan_out(
    mut feed: eventbus_router::Subscription,
    members: Arc<RwLock<Arc<[Member]>>>,
    is_group: bool,
) {
    let next_pick = AtomicUsize::new(0);
    let delivered = AtomicU64::new(0);
    while let Some(event) = feed.next().await {
        let Ok(frame) = Utf8Bytes::try_from(event_frame(&event.json)) else {
            warn!(channel = %event.channel, seq = event.seq, "event is not UTF-8, dropped");
            continue;
        };
        let delivery = Arc::new(Delivery {
            channel: event.channel,
            seq: event.seq,
            frame,
        });
        let snapshot = members.read().unwrap_or_else(|p| p.into_inner()).clone();
        if is_group {
            // One member of the group: the next in turn whose queue has room.
            let start = next_pick.fetch_add(1, Ordering::Relaxed);
            for i in 0..snapshot.len() {
                if snapshot[(start + i) % snapshot.len()].offer(&delivery) {
                    break;
                }
            }
        } else {
            for member in snapshot.iter() {
                member.offer(&delivery);
            }
        }
        delivered.fetch_add(1, Ordering::Relaxed);
    }
    debug!(
        events = delivered.load(Ordering::Relaxed),
        "backbone feed ended"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_model::StoredEvent;
    use eventbus_router::InProcessBackbone;

    fn mailbox() -> (Mailbox, mpsc::Receiver<Live>) {
        let (tx, rx) = mpsc::channel(16);
        (
            Mailbox {
                tx,
                slow: Arc::new(Notify::new()),
            },
            rx,
        )
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
        };
        backbone.publish(&event).await.unwrap();
        let (got_a, got_b) = (rx_a.recv().await.unwrap(), rx_b.recv().await.unwrap());
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
            rx_b.recv().await.unwrap().delivery.seq,
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
}
