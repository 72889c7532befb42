//! The backbone carries committed events from the store to the gateways. It is at-most-once and
//! never the source of truth: a gateway repairs what it loses from the store, so a full queue here
//! drops a message rather than slowing the publisher.
//!
//! It also carries the services' messages to one another (presence reports), on topics apart from
//! every channel: on NATS, `<prefix>-internal.<topic>`, which no channel pattern matches. These are
//! at-most-once too; their users number them and ask again for what they missed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use eventbus_model::{StoredEvent, seq_of};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::pattern::matches;
use crate::subject;

#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error("cannot connect to nats at {url}: {cause}")]
    Connect { url: String, cause: String },
    #[error("backbone publish failed: {0}")]
    Publish(String),
    #[error("backbone subscribe failed: {0}")]
    Subscribe(String),
}

/// A committed event as the backbone carries it: the stored event itself.
pub type BackboneMessage = StoredEvent;

/// A live feed of events matching one pattern; dropping it ends the interest.
pub struct Subscription {
    stream: Pin<Box<dyn Stream<Item = BackboneMessage> + Send>>,
}

impl Subscription {
    pub async fn next(&mut self) -> Option<BackboneMessage> {
        self.stream.next().await
    }
}

/// The messages sent to one topic from the moment of listening; dropping it ends the interest.
pub struct Messages {
    stream: Pin<Box<dyn Stream<Item = bytes::Bytes> + Send>>,
}

impl Messages {
    pub async fn next(&mut self) -> Option<bytes::Bytes> {
        self.stream.next().await
    }
}

#[async_trait]
pub trait Backbone: Send + Sync + 'static {
    /// Hands one committed event to the backbone; events of one channel must be given in `seq` order.
    async fn publish(&self, event: &StoredEvent) -> Result<(), BackboneError>;
    /// Live events of every channel that `pattern` matches; with `group`, each event goes to one
    /// member of the group only.
    async fn subscribe(
        &self,
        pattern: &str,
        group: Option<&str>,
    ) -> Result<Subscription, BackboneError>;
    /// Whether the backbone is usable now (for readiness).
    fn is_connected(&self) -> bool;
    /// Sends `payload` to every listener of `topic` (a message between services, not an event);
    /// `Ok` once it has left this process.
    async fn send(&self, topic: &str, payload: bytes::Bytes) -> Result<(), BackboneError>;
    /// Every message sent to `topic` from now on.
    async fn listen(&self, topic: &str) -> Result<Messages, BackboneError>;
}

/// Depth of each in-process subscription's queue: past it, messages are dropped like on NATS.
const IN_PROCESS_QUEUE: usize = 8192;

struct Member {
    pattern: String,
    group: Option<String>,
    tx: mpsc::Sender<BackboneMessage>,
}

/// A listener of one topic.
type Listener = (String, mpsc::Sender<bytes::Bytes>);

/// The backbone of the all-in-one mode: an in-process fan-out with NATS's semantics (subject
/// patterns, queue groups, at-most-once).
#[derive(Clone, Default)]
pub struct InProcessBackbone {
    members: Arc<std::sync::Mutex<Vec<Member>>>,
    next_pick: Arc<AtomicUsize>,
    listeners: Arc<std::sync::Mutex<Vec<Listener>>>,
}

impl InProcessBackbone {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Backbone for InProcessBackbone {
    async fn publish(&self, event: &StoredEvent) -> Result<(), BackboneError> {
        let mut members = self
            .members
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        members.retain(|member| !member.tx.is_closed());
        let mut groups: Vec<(&str, Vec<&Member>)> = Vec::new();
        for member in members
            .iter()
            .filter(|m| matches(&m.pattern, &event.channel))
        {
            match &member.group {
                None => deliver(member, event),
                Some(group) => match groups.iter_mut().find(|(name, _)| name == group) {
                    Some((_, list)) => list.push(member),
                    None => groups.push((group, vec![member])),
                },
            }
        }
        for (_, list) in groups {
            let pick = self.next_pick.fetch_add(1, Ordering::Relaxed) % list.len();
            deliver(list[pick], event);
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        pattern: &str,
        group: Option<&str>,
    ) -> Result<Subscription, BackboneError> {
        let (tx, rx) = mpsc::channel(IN_PROCESS_QUEUE);
        self.members
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Member {
                pattern: pattern.to_owned(),
                group: group.map(str::to_owned),
                tx,
            });
        Ok(Subscription {
            stream: Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)),
        })
    }

    fn is_connected(&self) -> bool {
        true
    }

    async fn send(&self, topic: &str, payload: bytes::Bytes) -> Result<(), BackboneError> {
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        listeners.retain(|(_, tx)| !tx.is_closed());
        for (_, tx) in listeners.iter().filter(|(t, _)| t == topic) {
            if tx.try_send(payload.clone()).is_err() {
                debug!(topic, "in-process listener behind, message dropped");
            }
        }
        Ok(())
    }

    async fn listen(&self, topic: &str) -> Result<Messages, BackboneError> {
        let (tx, rx) = mpsc::channel(IN_PROCESS_QUEUE);
        self.listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((topic.to_owned(), tx));
        Ok(Messages {
            stream: Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)),
        })
    }
}

fn deliver(member: &Member, event: &StoredEvent) {
    if member.tx.try_send(event.clone()).is_err() {
        debug!(channel = %event.channel, seq = event.seq, "in-process subscriber behind, message dropped");
    }
}

/// NATS header with the store's commit time (Unix ms), so gateways can report delivery lag.
const COMMITTED_HEADER: &str = "Eventbus-Committed-Ms";

fn committed_header(committed_ms: u64) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    if committed_ms > 0 {
        headers.insert(COMMITTED_HEADER, committed_ms.to_string().as_str());
    }
    headers
}

/// The production backbone: NATS core subjects, one per channel.
#[derive(Clone)]
pub struct NatsBackbone {
    client: async_nats::Client,
    prefix: String,
}

impl NatsBackbone {
    /// Connects to NATS; keeps reconnecting in the background if the connection is lost later.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, BackboneError> {
        Self::connect_with(url, prefix, None, None, Arc::new(|| {})).await
    }

    /// As [`NatsBackbone::connect`], with a user and password for NATS when given, the TLS
    /// configuration for `tls://` URLs (whom to trust), and a callback for every reconnection.
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        credentials: Option<(String, String)>,
        tls: Option<rustls::ClientConfig>,
        on_reconnect: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Self, BackboneError> {
        let connected_before = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let options = match credentials {
            Some((user, password)) => {
                async_nats::ConnectOptions::with_user_and_password(user, password)
            }
            None => async_nats::ConnectOptions::new(),
        };
        let options = match tls {
            Some(tls) => options.tls_client_config(tls),
            None => options,
        };
        let client = options
            .name("eventbus")
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let (on_reconnect, connected_before) =
                    (on_reconnect.clone(), connected_before.clone());
                async move {
                    match event {
                        async_nats::Event::Disconnected => warn!("nats disconnected"),
                        async_nats::Event::Connected => {
                            if connected_before.swap(true, Ordering::Relaxed) {
                                warn!("nats connected again");
                                on_reconnect();
                            } else {
                                debug!("nats connected");
                            }
                        }
                        other => debug!(event = %other, "nats event"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|err| BackboneError::Connect {
                url: url.to_owned(),
                cause: err.to_string(),
            })?;
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
        })
    }
}

#[async_trait]
impl Backbone for NatsBackbone {
    async fn publish(&self, event: &StoredEvent) -> Result<(), BackboneError> {
        self.client
            .publish_with_headers(
                subject::for_channel(&self.prefix, &event.channel),
                committed_header(event.committed_ms),
                event.json.clone(),
            )
            .await
            .map_err(|err| BackboneError::Publish(err.to_string()))
    }

    async fn subscribe(
        &self,
        pattern: &str,
        group: Option<&str>,
    ) -> Result<Subscription, BackboneError> {
        let subject = subject::for_channel(&self.prefix, pattern);
        let subscriber = match group {
            None => self.client.subscribe(subject).await,
            Some(group) => self.client.queue_subscribe(subject, group.to_owned()).await,
        }
        .map_err(|err| BackboneError::Subscribe(err.to_string()))?;
        let prefix = self.prefix.clone();
        let stream = subscriber.filter_map(move |message| {
            let decoded = subject::channel_of(&prefix, message.subject.as_str()).and_then(|channel| {
                seq_of(&message.payload).map(|seq| StoredEvent {
                    channel: channel.to_owned(),
                    seq,
                    json: message.payload.clone(),
                    committed_ms: message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(COMMITTED_HEADER))
                        .and_then(|v| v.as_str().parse().ok())
                        .unwrap_or(0),
                })
            });
            if decoded.is_none() {
                warn!(subject = %message.subject, "message on the backbone is not an eventbus event, dropped");
            }
            std::future::ready(decoded)
        });
        Ok(Subscription {
            stream: Box::pin(stream),
        })
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn send(&self, topic: &str, payload: bytes::Bytes) -> Result<(), BackboneError> {
        self.client
            .publish(subject::internal(&self.prefix, topic), payload)
            .await
            .map_err(|err| BackboneError::Publish(err.to_string()))?;
        // Out of the client's buffer before `Ok`: a service that stops right after (a gateway
        // reporting its last leaves) does not take the message with it.
        self.client
            .flush()
            .await
            .map_err(|err| BackboneError::Publish(err.to_string()))
    }

    async fn listen(&self, topic: &str) -> Result<Messages, BackboneError> {
        let subscriber = self
            .client
            .subscribe(subject::internal(&self.prefix, topic))
            .await
            .map_err(|err| BackboneError::Subscribe(err.to_string()))?;
        Ok(Messages {
            stream: Box::pin(subscriber.map(|message| message.payload)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(channel: &str, seq: u64) -> StoredEvent {
        StoredEvent {
            channel: channel.into(),
            seq,
            json: eventbus_model::with_seq(b"{}", seq),
            committed_ms: 0,
        }
    }

    #[tokio::test]
    async fn in_process_patterns_and_groups() {
        let bus = InProcessBackbone::new();
        let mut exact = bus.subscribe("orders.eu", None).await.unwrap();
        let mut wildcard = bus.subscribe("orders.>", None).await.unwrap();
        let mut g1 = bus.subscribe("orders.*", Some("billing")).await.unwrap();
        let mut g2 = bus.subscribe("orders.*", Some("billing")).await.unwrap();
        for seq in 1..=4 {
            bus.publish(&event("orders.eu", seq)).await.unwrap();
        }
        bus.publish(&event("payments", 1)).await.unwrap();
        for seq in 1..=4 {
            assert_eq!(exact.next().await.unwrap().seq, seq);
            assert_eq!(wildcard.next().await.unwrap().seq, seq);
        }
        // Dropping the bus ends every feed, so these loops end once the queues are drained.
        drop(bus);
        let mut group_total = 0;
        while g1.next().await.is_some() {
            group_total += 1;
        }
        while g2.next().await.is_some() {
            group_total += 1;
        }
        assert_eq!(
            group_total, 4,
            "each event reaches exactly one group member"
        );
    }

    #[tokio::test]
    async fn in_process_messages_reach_every_listener_of_their_topic_only() {
        let bus = InProcessBackbone::new();
        let mut first = bus.listen("presence.reports").await.unwrap();
        let mut second = bus.listen("presence.reports").await.unwrap();
        let mut other = bus.listen("presence.resync").await.unwrap();
        let mut events = bus.subscribe(">", None).await.unwrap();
        bus.send("presence.reports", bytes::Bytes::from_static(b"r1"))
            .await
            .unwrap();
        bus.send("presence.resync", bytes::Bytes::from_static(b"s1"))
            .await
            .unwrap();
        assert_eq!(first.next().await.unwrap(), "r1");
        assert_eq!(second.next().await.unwrap(), "r1");
        assert_eq!(other.next().await.unwrap(), "s1");
        drop(bus);
        assert!(first.next().await.is_none());
        assert!(events.next().await.is_none(), "no message is an event");
    }
}
