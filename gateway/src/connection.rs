//! One WebSocket connection: authentication, subscriptions with catch-up, live delivery in seq
//! order without gaps or doubles, publishing, and the close codes of docs/protocol.md §6.
//!
//! One task owns the connection. Live events arrive in a bounded queue fed by the hub; the task
//! writes everything queued, then flushes once, so a busy connection gets few large writes.
//! History a subscription asked for is read from the log a page per turn of that task, taking
//! turns with live events, so a long catch-up neither holds up the connection's other
//! subscriptions nor lets their queue overflow.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use eventbus_auth_client::Verified;
use eventbus_auth_client::app_hooks::{AppHooks, Refusal};
use eventbus_auth_client::claims::now_s;
use eventbus_model::{EventError, event_frame};
use eventbus_router::pattern::is_pattern;
use futures_util::SinkExt;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::Gateway;
use crate::follow::{self, Follow, Missed, Start, Step};
use crate::frames::{self, FrameError, Request};
use crate::hub::{Interest, Live};
use crate::mailbox::{Inbox, Mailbox};
use eventbus_runtime::metrics::metrics;

/// Close codes of the protocol.
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const PROTOCOL: u16 = 4000;
    pub const UNAUTHORIZED: u16 = 4001;
    /// The application's connect hook refused the connection (its reason is the close reason).
    pub const REFUSED: u16 = 4003;
    /// The identity already holds as many connections to this gateway as it may.
    pub const TOO_MANY_CONNECTIONS: u16 = 4029;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const TOO_LARGE: u16 = 4009;
}

/// The WebSocket subprotocol in which events arrive as bare CloudEvents (JSON format), `channel`
/// and `seq` being extension attributes, instead of `{"op":"event","event":…}`.
pub const CLOUDEVENTS_PROTOCOL: &str = "cloudevents.json";

/// Most live events written before one flush.
const MAX_WRITE_BATCH: usize = 256;
/// Most publishes of one connection waiting for the store at once.
const MAX_PUBLISHES_IN_FLIGHT: usize = 64;

/// One unit of a gauge for as long as it lives.
struct Counted(prometheus_client::metrics::gauge::Gauge);

impl Counted {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why a subscribe did not happen: a refusal the client is told in an error frame, or the end of
/// the connection.
enum NotSubscribed {
    Refused(FrameError),
    Ended(Ending),
}

impl From<Ending> for NotSubscribed {
    fn from(ending: Ending) -> Self {
        NotSubscribed::Ended(ending)
    }
}

/// How a connection ends.
enum Ending {
    /// Send this close frame, then stop.
    Close(u16, String),
    /// The peer is gone or the socket broke: nothing more can be sent.
    Gone,
}

fn closing(code: u16, reason: impl Into<String>) -> Ending {
    Ending::Close(code, reason.into())
}

fn slow_consumer() -> Ending {
    closing(
        close::SLOW_CONSUMER,
        "slow consumer: reconnect and resume with after",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One channel, gap-free from its `after` or head.
    Channel,
    /// A pattern: each channel gap-free from the first event seen of it.
    Pattern,
    /// A queue group: this member sees a share of the events, so gaps are expected, not refilled.
    Group,
    /// A durable queue group: the store hands this member its events (see [`crate::durable`]).
    Durable,
}

struct Sub {
    name: String,
    kind: Kind,
    /// Its position in each channel (one for a channel subscription; a pattern's or a group's
    /// grow as their channels appear).
    positions: Positions,
    /// Live events from the hub (none for a durable group: the store hands those out).
    _interest: Option<Interest>,
    /// Boxed: most subscriptions are not in a durable group, and the member's state is large.
    durable: Option<Box<crate::durable::Member>>,
    _counted: Counted,
    /// Channel subscriptions count in presence until they end.
    _presence: Option<eventbus_auth_client::presence::Membership>,
}

/// A subscription's position in each of its channels. A channel subscription, the common case
/// and every connection's inbox, has one: kept inline, without a map's first allocation (room for
/// four) and a second copy of the name (300 bytes of every idle connection's two).
enum Positions {
    /// The subscription's own channel (its name).
    One(Option<Follow>),
    Many(HashMap<String, Follow>),
}

impl Sub {
    fn position(&self, channel: &str) -> Option<Follow> {
        match &self.positions {
            Positions::One(position) => position.filter(|_| channel == self.name),
            Positions::Many(positions) => positions.get(channel).copied(),
        }
    }

    fn position_mut(&mut self, channel: &str) -> Option<&mut Follow> {
        match &mut self.positions {
            Positions::One(position) if channel == self.name => position.as_mut(),
            Positions::One(_) => None,
            Positions::Many(positions) => positions.get_mut(channel),
        }
    }

    fn set_position(&mut self, channel: &str, position: Follow) {
        match &mut self.positions {
            Positions::One(own) if channel == self.name => *own = Some(position),
            // Not expected (only a channel subscription starts with one), but kept right.
            Positions::One(own) => {
                let mut positions = HashMap::new();
                if let Some(own) = own {
                    positions.insert(self.name.clone(), *own);
                }
                positions.insert(channel.to_owned(), position);
                self.positions = Positions::Many(positions);
            }
            Positions::Many(positions) => {
                positions.insert(channel.to_owned(), position);
            }
        }
    }
}

/// A subscription reading what it misses of one channel from the log: a channel subscription's
/// history, one page per turn, or a gap before a live event, at once.
#[derive(Debug)]
struct CatchUp {
    sub: u64,
    channel: String,
    /// Read up to here: the head at subscribe, raised by live events that arrive meanwhile (they
    /// are dropped and come from the log instead, in order).
    upto: u64,
    /// The compacted phase's cursor (latest event per key up to the head), until that phase ends.
    compacted: Option<u64>,
}

/// What a catch-up page left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    More,
    Done,
}

struct Conn {
    gw: Arc<Gateway>,
    id: String,
    /// One task owns the socket whole: no split halves and their lock on every write.
    socket: WebSocket,
    verified: Option<Verified>,
    /// Boxed entries: a map's first allocation holds four of them, and every connection has at
    /// least its inbox subscription (with entries inline that was 2.8 KiB per idle connection).
    /// Found by name with a scan: at most EVENTBUS_GATEWAY_MAX_SUBSCRIPTIONS of them, and a map
    /// by name was 200 bytes of every idle connection.
    subs: HashMap<u64, Box<Sub>>,
    next_sub: u64,
    /// Catch-ups in progress, oldest first (empty, and unallocated, on most connections).
    catching: VecDeque<CatchUp>,
    mailbox: Mailbox,
    /// Acks of publishes, answered by their own tasks. Made at the first publish: most
    /// connections never publish, and a channel costs about 1 KiB.
    answers: Option<mpsc::UnboundedSender<String>>,
    answered: Option<mpsc::UnboundedReceiver<String>>,
    /// Publishes in flight, at most [`MAX_PUBLISHES_IN_FLIGHT`]. Made at the first publish too.
    publishes: Option<Arc<Semaphore>>,
    /// Events as bare CloudEvents (the `cloudevents.json` subprotocol).
    cloudevents: bool,
    /// This connection's place among its identity's connections (released when it ends).
    _slot: Option<crate::identities::Slot>,
    /// The allow-listed headers of the upgrade request, for the connect hook, until the hello.
    /// A thin pointer on purpose: a boxed slice would cost every idle connection 8 bytes more.
    #[allow(clippy::box_collection)]
    for_hook: Option<Box<Vec<(String, String)>>>,
}

#[allow(clippy::box_collection)] // See `Conn::for_hook`.
pub fn serve(
    gw: Arc<Gateway>,
    socket: WebSocket,
    pre_authenticated: Option<Verified>,
    for_hook: Option<Box<Vec<(String, String)>>>,
    cloudevents: bool,
) -> impl Future<Output = ()> + Send + 'static {
    let id = format!(
        "{}-{}",
        gw.id,
        gw.next_connection
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let (mailbox, live) = crate::mailbox::mailbox(gw.queue_len);
    let conn = Conn {
        gw,
        id,
        socket,
        verified: None,
        subs: HashMap::new(),
        next_sub: 1,
        catching: VecDeque::new(),
        mailbox,
        answers: None,
        answered: None,
        publishes: None,
        cloudevents,
        _slot: None,
        for_hook,
    };
    // Built here, not in an async fn, for the reason given at `run`.
    conn.run(live, pre_authenticated)
}

impl Conn {
    // Not an async fn: an async fn's arguments are copied into its body, and both copies stay in
    // its future; an async block uses what it captures in place (the connection's state is 688
    // bytes of every idle connection's task).
    #[allow(clippy::manual_async_fn)]
    fn run(
        mut self,
        mut live: Inbox,
        pre_authenticated: Option<Verified>,
    ) -> impl Future<Output = ()> + Send + 'static {
        async move {
            let conn = &mut self;
            let gw = conn.gw.clone();
            debug!(connection = %conn.id, "connection opened");
            let _open = Counted::new(&metrics().connections);
            let shutdown = gw.shutdown.wait();
            tokio::pin!(shutdown);

            let mut ending = match pre_authenticated {
                // Everything fed must be flushed before waiting: a read does not reliably push it out.
                Some(verified) => match Box::pin(conn.authenticate(verified, None)).await {
                    Ok(()) => conn.flush().await.err(),
                    Err(end) => Some(end),
                },
                None => None,
            };
            // One timer for the connection's life, for two deadlines: the hello's (then the token's
            // expiry), and the next heartbeat. A ping goes out every interval; a peer not heard from
            // for two intervals is gone (a dead network path never says so itself). The timer is
            // moved only when a deadline changes: a fresh one per wake-up would cost a timer-wheel
            // insert and removal for every event delivered.
            let mut expiry = Instant::now() + gw.hello_timeout;
            let mut expiry_for = None;
            let mut next_ping = Instant::now() + gw.ping_interval;
            let mut last_heard = Instant::now();
            let timer = tokio::time::sleep_until(expiry.min(next_ping));
            tokio::pin!(timer);
            // Whether a pending catch-up goes before live events this turn: they alternate, so that
            // neither a long history nor a busy channel starves the other.
            let mut catch_up_first = true;
            while ending.is_none() {
                let expires_at = conn.verified.as_ref().map(|v| v.expires_at);
                if expires_at != expiry_for {
                    expiry_for = expires_at;
                    if let Some(at) = expires_at {
                        expiry = Instant::now() + Duration::from_secs(at.saturating_sub(now_s()));
                    }
                }
                let due = expiry.min(next_ping);
                if timer.deadline() != due {
                    timer.as_mut().reset(due);
                }
                let step = tokio::select! {
                    biased;
                    _ = &mut shutdown => Err(closing(close::GOING_AWAY, "server shutting down, reconnect")),
                    _ = conn.mailbox.slow() => Err(slow_consumer()),
                    _ = &mut timer => {
                        let now = Instant::now();
                        if now >= expiry {
                            Err(Box::pin(conn.expired()).await)
                        } else if last_heard.elapsed() > 2 * gw.ping_interval {
                            debug!(connection = %conn.id, "peer silent for two ping intervals, dropped");
                            Err(Ending::Gone)
                        } else {
                            next_ping = now + gw.ping_interval;
                            conn.ping().await
                        }
                    }
                    message = conn.socket.recv() => {
                        last_heard = Instant::now();
                        // Boxed: handling a request awaits store and auth calls whose futures are
                        // large, and inline they would sit in every idle connection's task for its
                        // whole life.
                        Box::pin(conn.on_message(message)).await
                    }
                    _ = std::future::ready(()), if catch_up_first && !conn.catching.is_empty() => {
                        catch_up_first = false;
                        Box::pin(conn.catch_up_turn()).await
                    }
                    first = live.recv() => {
                        catch_up_first = true;
                        conn.on_live_batch(first, &mut live).await
                    }
                    Some(answer) = async {
                        match conn.answered.as_mut() {
                            Some(answered) => answered.recv().await,
                            None => std::future::pending().await,
                        }
                    } => conn.send_answers(answer).await,
                    _ = std::future::ready(()), if !conn.catching.is_empty() => {
                        catch_up_first = false;
                        Box::pin(conn.catch_up_turn()).await
                    }
                };
                let step = match step {
                    Ok(()) => conn.flush().await,
                    Err(end) => Err(end),
                };
                ending = step.err();
            }
            if let Some(Ending::Close(code, reason)) = ending {
                if code == close::SLOW_CONSUMER {
                    metrics().slow_consumer_closes.inc();
                }
                debug!(connection = %conn.id, code, reason = %reason, "closing connection");
                let frame = Message::Close(Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from(reason),
                }));
                // A stalled peer cannot take even the close frame: give up after a moment.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.socket.send(frame)).await;
            }
            debug!(connection = %conn.id, "connection ended");
        }
    }
}

impl Conn {
    // A write waits while the peer does not read; the slow-consumer alarm must cut that wait short,
    // or a stalled peer would hold its connection (and its queue) for ever.
    async fn send(&mut self, text: Utf8Bytes) -> Result<(), Ending> {
        tokio::select! {
            written = self.socket.feed(Message::Text(text)) => written.map_err(|_| Ending::Gone),
            _ = self.mailbox.slow() => Err(slow_consumer()),
        }
    }

    /// Writes an answer made by another task, and those queued behind it: one flush for a burst
    /// (a durable group's events come in batches).
    async fn send_answers(&mut self, first: String) -> Result<(), Ending> {
        self.send(first.into()).await?;
        for _ in 1..MAX_WRITE_BATCH {
            let Some(next) = self.answered.as_mut().and_then(|a| a.try_recv().ok()) else {
                break;
            };
            self.send(next.into()).await?;
        }
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), Ending> {
        tokio::select! {
            written = self.socket.feed(Message::Ping(bytes::Bytes::new())) => written.map_err(|_| Ending::Gone),
            _ = self.mailbox.slow() => Err(slow_consumer()),
        }
    }

    async fn flush(&mut self) -> Result<(), Ending> {
        tokio::select! {
            flushed = self.socket.flush() => flushed.map_err(|_| Ending::Gone),
            _ = self.mailbox.slow() => Err(slow_consumer()),
        }
    }

    async fn refuse(
        &mut self,
        err: FrameError,
        reference: Option<&RawValue>,
    ) -> Result<(), Ending> {
        self.send(frames::error(&err, reference).into()).await
    }

    async fn expired(&mut self) -> Ending {
        if self.verified.is_none() {
            return closing(close::UNAUTHORIZED, "no hello in time");
        }
        let _ = self
            .refuse(
                FrameError::new(
                    "token_expired",
                    "the token has expired; send refresh before it does",
                ),
                None,
            )
            .await;
        closing(close::UNAUTHORIZED, "token expired")
    }

    async fn on_message(
        &mut self,
        message: Option<Result<Message, axum::Error>>,
    ) -> Result<(), Ending> {
        match message {
            None | Some(Ok(Message::Close(_))) => Err(Ending::Gone),
            Some(Err(err)) => {
                let too_large = err
                    .into_inner()
                    .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
                    .is_some_and(|e| {
                        matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_))
                    });
                if too_large {
                    Err(closing(close::TOO_LARGE, "frame too large"))
                } else {
                    Err(Ending::Gone)
                }
            }
            Some(Ok(Message::Text(text))) => self.on_text(&text).await,
            Some(Ok(Message::Binary(_))) => {
                self.refuse(
                    FrameError::new(
                        "bad_frame",
                        "binary frames are not supported: send JSON text frames",
                    ),
                    None,
                )
                .await
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), Ending> {
        let frame = match frames::parse(text) {
            Ok(frame) => frame,
            Err((err, reference)) => {
                self.refuse(err, reference.as_deref()).await?;
                return if self.verified.is_none() {
                    Err(closing(close::PROTOCOL, "the first frame must be a hello"))
                } else {
                    Ok(())
                };
            }
        };
        let reference = frame.reference.as_deref();
        let Some(identity) = self.verified.as_ref().map(|v| v.grant.identity.clone()) else {
            return match frame.request {
                Request::Hello { token: None } => self.hello_by_hook(reference).await,
                Request::Hello { token: Some(token) } => {
                    self.for_hook = None;
                    match self.gw.verifier.verify(&token).await {
                        Ok(verified) => self.authenticate(verified, reference).await,
                        Err(err) => {
                            self.refuse(FrameError::new(err.code(), err.to_string()), reference)
                                .await?;
                            Err(closing(close::UNAUTHORIZED, "unauthorized"))
                        }
                    }
                }
                _ => {
                    self.refuse(
                        FrameError::new("unauthorized", "send hello with a token first"),
                        reference,
                    )
                    .await?;
                    Err(closing(close::PROTOCOL, "the first frame must be a hello"))
                }
            };
        };
        match frame.request {
            Request::Hello { .. } => {
                self.refuse(
                    FrameError::new(
                        "already_authenticated",
                        "this connection is already authenticated",
                    ),
                    reference,
                )
                .await
            }
            Request::Ping => {
                self.send(frames::with_ref(json!({"op": "pong"}), reference).into())
                    .await
            }
            Request::Subscribe {
                channel,
                after,
                compact,
                group,
                durable: Some(durable),
            } => match self
                .subscribe_durable(&channel, after, compact, group, durable, reference)
                .await
            {
                Ok(()) => Ok(()),
                Err(NotSubscribed::Ended(ending)) => Err(ending),
                Err(NotSubscribed::Refused(refused)) => self.refuse(refused, reference).await,
            },
            Request::Done {
                group,
                channel,
                seqs,
            } => self.on_done(group, channel, seqs, reference).await,
            Request::Subscribe {
                channel,
                after,
                compact,
                group,
                durable: None,
            } => match self
                .subscribe(&channel, after, compact, group.as_deref(), reference, true)
                .await
            {
                Ok(()) => Ok(()),
                Err(NotSubscribed::Ended(ending)) => Err(ending),
                Err(NotSubscribed::Refused(refused)) => self.refuse(refused, reference).await,
            },
            Request::Unsubscribe { channel } => match self.remove_named(&channel) {
                Some(_) => {
                    self.send(
                        frames::with_ref(
                            json!({"op": "unsubscribed", "channel": channel}),
                            reference,
                        )
                        .into(),
                    )
                    .await
                }
                None => {
                    self.refuse(
                        FrameError::new("not_subscribed", format!("not subscribed to {channel:?}")),
                        reference,
                    )
                    .await
                }
            },
            Request::Publish { event } => self.publish(&event, &identity, reference).await,
            Request::Refresh { token } => self.refresh(&token, reference).await,
        }
    }

    /// A hello without a token: the application's connect hook says who this is, or refuses
    /// (4003 with its reason; 1013 when it cannot be asked, so that the client tries again).
    async fn hello_by_hook(&mut self, reference: Option<&RawValue>) -> Result<(), Ending> {
        let headers = self.for_hook.take();
        let (Some(app), Some(headers)) = (self.gw.app.clone(), headers) else {
            self.refuse(
                FrameError::new("unauthorized", "hello needs a token"),
                reference,
            )
            .await?;
            return Err(closing(close::UNAUTHORIZED, "unauthorized"));
        };
        match app.connect("websocket", *headers).await {
            Ok(verified) => self.authenticate(verified, reference).await,
            Err(refusal) => {
                let message = refusal.to_string();
                self.refuse(FrameError::new(refusal.code(), message.clone()), reference)
                    .await?;
                Err(match refusal {
                    Refusal::Refused(_) => closing(close::REFUSED, close_reason(&message)),
                    _ => closing(close::TRY_AGAIN_LATER, "the application did not answer"),
                })
            }
        }
    }

    async fn authenticate(
        &mut self,
        verified: Verified,
        reference: Option<&RawValue>,
    ) -> Result<(), Ending> {
        let inbox = verified.grant.inbox();
        match self.gw.identities.take(&verified.grant.identity) {
            Some(slot) => self._slot = Some(slot),
            None => {
                let _ = self
                    .refuse(
                        FrameError::new(
                            "too_many_connections",
                            format!(
                                "{} already holds {} connections to this gateway (EVENTBUS_GATEWAY_MAX_CONNECTIONS_PER_IDENTITY)",
                                verified.grant.identity, self.gw.identities.max()
                            ),
                        ),
                        reference,
                    )
                    .await;
                return Err(closing(close::TOO_MANY_CONNECTIONS, "too many connections"));
            }
        }
        let welcome = json!({
            "op": "welcome",
            "identity": verified.grant.identity,
            "role": verified.grant.role.as_str(),
            "connection": self.id,
            "expires_at": verified.expires_at,
        });
        debug!(connection = %self.id, identity = %verified.grant.identity, role = verified.grant.role.as_str(), "authenticated");
        self.verified = Some(verified);
        self.send(frames::with_ref(welcome, reference).into())
            .await?;
        // Every identity hears its inbox live from the moment it is authenticated.
        match self.subscribe(&inbox, None, false, None, None, false).await {
            Ok(()) | Err(NotSubscribed::Refused(_)) => Ok(()),
            Err(NotSubscribed::Ended(ending)) => Err(ending),
        }
    }

    async fn refresh(&mut self, token: &str, reference: Option<&RawValue>) -> Result<(), Ending> {
        let fresh = match self.gw.verifier.verify(token).await {
            Ok(fresh) => fresh,
            Err(err) => {
                return self
                    .refuse(FrameError::new(err.code(), err.to_string()), reference)
                    .await;
            }
        };
        let current = self
            .verified
            .as_ref()
            .map(|v| (&v.grant.identity, v.grant.role));
        if current != Some((&fresh.grant.identity, fresh.grant.role)) {
            // A connection is one identity for its life: another's token is not a refresh.
            let _ = self
                .refuse(
                    FrameError::new(
                        "identity_mismatch",
                        "a refresh token must be for the same identity and role",
                    ),
                    reference,
                )
                .await;
            return Err(closing(close::UNAUTHORIZED, "refresh for another identity"));
        }
        // A refresh is a new grant: what the new token no longer allows ends now.
        let mut revoked: Vec<(String, String)> = self
            .subs
            .values()
            .map(|sub| &sub.name)
            // The channels the application decides stay: its answer did not come from the token.
            .filter(|name| {
                !self
                    .gw
                    .app
                    .as_ref()
                    .is_some_and(|app| app.decides_subscribe(&fresh.grant, name))
            })
            .filter_map(|name| {
                fresh
                    .grant
                    .check_subscribe(name)
                    .err()
                    .map(|denied| (name.clone(), denied.to_string()))
            })
            .collect();
        revoked.sort();
        for (name, why) in revoked {
            self.remove_named(&name);
            self.refuse(
                FrameError::new(
                    "forbidden",
                    format!("subscription ended: the refreshed token no longer allows it ({why})"),
                )
                .with_channel(&name),
                None,
            )
            .await?;
        }
        let expires_at = fresh.expires_at;
        self.verified = Some(fresh);
        self.send(
            frames::with_ref(
                json!({"op": "refreshed", "expires_at": expires_at}),
                reference,
            )
            .into(),
        )
        .await
    }

    async fn publish(
        &mut self,
        event: &RawValue,
        identity: &str,
        reference: Option<&RawValue>,
    ) -> Result<(), Ending> {
        let accepted =
            match eventbus_model::parse_event(event.get().as_bytes(), identity, &self.gw.limits) {
                Ok(accepted) => accepted,
                Err(err) => {
                    let code = if matches!(err, EventError::TooLarge { .. }) {
                        "too_large"
                    } else {
                        "invalid_event"
                    };
                    return self
                        .refuse(FrameError::new(code, err.to_string()), reference)
                        .await;
                }
            };
        let Some(grant) = self.verified.as_ref().map(|v| &v.grant) else {
            return Err(Ending::Gone);
        };
        // The application's publish hook is asked by the publish's own task, below: its answer
        // must not hold up this connection's deliveries.
        let asks_app = match &self.gw.app {
            Some(app) if app.decides_publish(grant, &accepted.channel) => {
                Some((app.clone(), grant.clone(), self.gw.limits))
            }
            _ => None,
        };
        if asks_app.is_none()
            && let Err(denied) = grant.check_publish(&accepted.channel)
        {
            return self
                .refuse(
                    FrameError::new(denied.code(), denied.to_string()),
                    reference,
                )
                .await;
        }
        if let Err(limited) = self.gw.rate.check(identity, 1) {
            return self
                .refuse(
                    FrameError::new(
                        "rate_limited",
                        format!("this identity publishes faster than EVENTBUS_PUBLISH_RATE allows ({limited:?}); retry later"),
                    ),
                    reference,
                )
                .await;
        }
        // Waiting here (when 64 publishes are already in flight) stops reading from this client only.
        let publishes = self
            .publishes
            .get_or_insert_with(|| Arc::new(Semaphore::new(MAX_PUBLISHES_IN_FLIGHT)))
            .clone();
        let Ok(permit) = publishes.acquire_owned().await else {
            return Err(Ending::Gone);
        };
        let store = self.gw.store.clone();
        let answers = self.outbox();
        let reference = reference.map(|r| r.to_owned());
        tokio::spawn(async move {
            let accepted = match asks_app {
                None => accepted,
                Some((app, grant, limits)) => {
                    match AppHooks::check_publish(Some(&app), &grant, accepted, &limits).await {
                        Ok(accepted) => accepted,
                        Err(refusal) => {
                            let answer = json!({"op": "error", "code": refusal.code(), "message": refusal.to_string()});
                            let _ = answers.send(frames::with_ref(answer, reference.as_deref()));
                            return;
                        }
                    }
                }
            };
            let answer = match store.append(vec![accepted]).await {
                Ok(mut appended) if appended.len() == 1 => {
                    let a = appended.remove(0);
                    let m = eventbus_runtime::metrics::metrics();
                    if a.duplicate {
                        m.duplicates.inc();
                    } else {
                        m.events_in.inc();
                    }
                    json!({"op": "ack", "id": a.id, "channel": a.channel, "seq": a.seq, "duplicate": a.duplicate})
                }
                Ok(_) => {
                    json!({"op": "error", "code": "unavailable", "message": "the store gave no answer; not stored, retry"})
                }
                Err(err) => {
                    json!({"op": "error", "code": "unavailable", "message": err.to_string()})
                }
            };
            let _ = answers.send(frames::with_ref(answer, reference.as_deref()));
            drop(permit);
        });
        Ok(())
    }

    /// Subscribes: interest first, then the channel's bounds, then its history if asked.
    async fn subscribe(
        &mut self,
        name: &str,
        after: Option<u64>,
        compact: bool,
        group: Option<&str>,
        reference: Option<&RawValue>,
        announce: bool,
    ) -> Result<(), NotSubscribed> {
        let refuse =
            |code, message: String| Err(NotSubscribed::Refused(FrameError::new(code, message)));
        let Some(verified) = &self.verified else {
            return refuse("unauthorized", "send hello first".into());
        };
        if let Err(refusal) =
            AppHooks::check_subscribe(self.gw.app.as_deref(), &verified.grant, name).await
        {
            return refuse(refusal.code(), refusal.to_string());
        }
        // The inbox is not counted: it is the connection's own.
        if announce && !self.holds(name) && self.subs.len() > self.gw.max_subscriptions {
            return refuse(
                "too_many_subscriptions",
                format!(
                    "a connection holds at most {} subscriptions (EVENTBUS_GATEWAY_MAX_SUBSCRIPTIONS); unsubscribe first",
                    self.gw.max_subscriptions
                ),
            );
        }
        if group.is_some() {
            if let Err(denied) = verified.grant.check_group() {
                return refuse(denied.code(), denied.to_string());
            }
            if after.is_some() {
                return refuse(
                    "invalid_frame",
                    "a queue group receives live events only: drop after".into(),
                );
            }
        }
        let pattern = is_pattern(name);
        if pattern && after.is_some() {
            return refuse(
                "invalid_frame",
                "after needs a single channel, not a pattern".into(),
            );
        }
        // A second subscribe to the same name replaces the first.
        remove_named(&mut self.subs, name);
        let id = self.next_sub;
        self.next_sub += 1;
        let interest = match self
            .gw
            .hub
            .join(name, group, id, self.mailbox.clone())
            .await
        {
            Ok(interest) => interest,
            Err(err) => return refuse("unavailable", format!("cannot subscribe now: {err}")),
        };
        let kind = match (group, pattern) {
            (Some(_), _) => Kind::Group,
            (None, true) => Kind::Pattern,
            (None, false) => Kind::Channel,
        };
        let mut sub = Sub {
            name: name.to_owned(),
            kind,
            positions: match kind {
                Kind::Channel => Positions::One(None),
                _ => Positions::Many(HashMap::new()),
            },
            _interest: Some(interest),
            durable: None,
            _counted: Counted::new(&metrics().subscriptions),
            _presence: None,
        };
        let mut head = None;
        if kind == Kind::Channel {
            // Interest is registered first, so anything committed after this head is queued live.
            let (first, now) = match self.gw.store.bounds(name).await {
                Ok(bounds) => bounds,
                Err(err) => {
                    return refuse(
                        "unavailable",
                        format!("cannot read the channel head: {err}"),
                    );
                }
            };
            let position = match Follow::start(after, first, now) {
                Ok(position) => position,
                Err(Start::BeyondHead { head }) => {
                    return refuse(
                        "after_beyond_head",
                        format!(
                            "after={} is beyond the head of {name:?} ({head})",
                            after.unwrap_or(0)
                        ),
                    );
                }
                Err(Start::Truncated { first }) => {
                    return Err(NotSubscribed::Refused(truncated(name, first)));
                }
            };
            sub.set_position(name, position);
            head = Some(now);
            // The implicit inbox subscription (not announced) is nobody's business.
            if announce {
                sub._presence = Some(self.gw.presence.join(
                    eventbus_auth_client::presence::Entry {
                        connection: self.id.clone(),
                        identity: verified.grant.identity.clone(),
                        channel: name.to_owned(),
                    },
                ));
            }
        }
        self.subs.insert(id, Box::new(sub));
        if announce {
            let answer = json!({"op": "subscribed", "channel": name, "head": head});
            self.send(frames::with_ref(answer, reference).into())
                .await?;
        }
        if let (Some(after), Some(head)) = (after, head) {
            // Read in turns with live events by the connection's loop (see `catch_up_turn`).
            self.catching.push_back(CatchUp {
                sub: id,
                channel: name.to_owned(),
                upto: head,
                compacted: compact.then_some(after),
            });
        }
        Ok(())
    }

    /// Where frames made by other tasks (publish acks, durable group events) wait to be written.
    /// Made at first use: most connections never need it, and a channel costs about 1 KiB.
    fn holds(&self, name: &str) -> bool {
        self.subs.values().any(|sub| sub.name == name)
    }

    /// Ends the subscription of that name, if there is one.
    fn remove_named(&mut self, name: &str) -> Option<Box<Sub>> {
        remove_named(&mut self.subs, name)
    }

    fn outbox(&mut self) -> mpsc::UnboundedSender<String> {
        match &self.answers {
            Some(answers) => answers.clone(),
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                self.answered = Some(rx);
                self.answers.insert(tx).clone()
            }
        }
    }

    /// Joins a durable queue group over `name` (a channel or pattern): the store hands this
    /// connection its share of the events, each until it says done (docs/protocol.md).
    async fn subscribe_durable(
        &mut self,
        name: &str,
        after: Option<u64>,
        compact: bool,
        group: Option<String>,
        settings: frames::Durable,
        reference: Option<&RawValue>,
    ) -> Result<(), NotSubscribed> {
        let refuse =
            |code, message: String| Err(NotSubscribed::Refused(FrameError::new(code, message)));
        let Some(verified) = &self.verified else {
            return refuse("unauthorized", "send hello first".into());
        };
        let Some(group) = group else {
            return refuse("invalid_frame", "durable needs a group".into());
        };
        if let Err(denied) = verified.grant.check_group() {
            return refuse(denied.code(), denied.to_string());
        }
        if let Err(denied) = verified.grant.check_subscribe(name) {
            return refuse(denied.code(), denied.to_string());
        }
        if after.is_some() || compact {
            return refuse(
                "invalid_frame",
                "a durable group starts from its own position: drop after and compact (reset the group to replay)".into(),
            );
        }
        if let Err(err) = eventbus_model::names::validate_group(&group) {
            return refuse("invalid_frame", format!("a group's name {err}"));
        }
        if !self.holds(name) && self.subs.len() > self.gw.max_subscriptions {
            return refuse(
                "too_many_subscriptions",
                format!(
                    "a connection holds at most {} subscriptions (EVENTBUS_GATEWAY_MAX_SUBSCRIPTIONS); unsubscribe first",
                    self.gw.max_subscriptions
                ),
            );
        }
        let joined = crate::durable::Joined {
            group: group.clone(),
            pattern: name.to_owned(),
            settings: eventbus_store_client::GroupSettings {
                visibility_ms: settings.visibility_ms,
                max_deliveries: settings.max_deliveries,
                prefetch: settings.prefetch,
            },
        };
        // The group is made (or its pattern checked) before the answer, so that a mismatch is
        // this frame's error rather than a later one.
        if let Err(err) = self
            .gw
            .store
            .group_fetch(
                &group,
                name,
                &self.member_prefix(),
                0,
                Duration::ZERO,
                joined.settings,
            )
            .await
        {
            return match err {
                eventbus_store_client::StoreError::Conflict(message) => {
                    refuse("group_mismatch", message)
                }
                eventbus_store_client::StoreError::Invalid(message) => {
                    refuse("invalid_frame", message)
                }
                other => refuse("unavailable", format!("cannot join the group now: {other}")),
            };
        }
        self.remove_named(name);
        let id = self.next_sub;
        self.next_sub += 1;
        let member = format!("{}/{id}", self.member_prefix());
        let frames = self.outbox();
        let sub = Sub {
            name: name.to_owned(),
            kind: Kind::Durable,
            positions: Positions::Many(HashMap::new()),
            _interest: None,
            durable: Some(Box::new(crate::durable::Member::start(
                self.gw.store.clone(),
                joined,
                member,
                frames,
            ))),
            _counted: Counted::new(&metrics().subscriptions),
            _presence: None,
        };
        self.subs.insert(id, Box::new(sub));
        let answer = json!({"op": "subscribed", "channel": name, "group": group, "durable": true});
        self.send(frames::with_ref(answer, reference).into())
            .await?;
        Ok(())
    }

    /// This connection's members are named after it and the gateway's run, so that a gateway
    /// restarted under the same id never takes over a dead run's members.
    fn member_prefix(&self) -> String {
        format!("{}/{}", self.gw.instance, self.id)
    }

    /// A member is done with events of its durable group.
    async fn on_done(
        &mut self,
        group: Option<String>,
        channel: String,
        seqs: Vec<u64>,
        reference: Option<&RawValue>,
    ) -> Result<(), Ending> {
        let members: Vec<&crate::durable::Member> = self
            .subs
            .values()
            .filter_map(|sub| sub.durable.as_deref())
            .filter(|m| group.as_deref().is_none_or(|g| g == m.group()))
            .collect();
        let found = match members.as_slice() {
            [] => Err(FrameError::new(
                "not_subscribed",
                match &group {
                    Some(group) => format!("not a member of durable group {group:?}"),
                    None => "not a member of any durable group".into(),
                },
            )),
            [member] => Ok(*member),
            _ if group.is_some() => Ok(members[0]),
            _ => Err(FrameError::new(
                "invalid_frame",
                "this connection is in several durable groups: name the group",
            )),
        };
        match found {
            Ok(member) => {
                let allowed = self
                    .verified
                    .as_ref()
                    .map(|v| v.grant.check_subscribe(&channel));
                if let Some(Err(denied)) = allowed {
                    return self
                        .refuse(
                            FrameError::new(denied.code(), denied.to_string())
                                .with_channel(&channel),
                            reference,
                        )
                        .await;
                }
                member.done(channel, seqs);
                Ok(())
            }
            Err(err) => self.refuse(err, reference).await,
        }
    }

    /// One page of the oldest catch-up in progress (from the connection's loop); it goes back to
    /// the front of the queue until it is done.
    async fn catch_up_turn(&mut self) -> Result<(), Ending> {
        let Some(mut job) = self.catching.pop_front() else {
            return Ok(());
        };
        if self.catch_up_page(&mut job).await? == Progress::More {
            self.catching.push_front(job);
        }
        Ok(())
    }

    /// Reads and delivers one page of `job` from the log. See [`follow`] for the rule and what
    /// can go wrong: a history no longer retained ends the subscription (its client is told), an
    /// unreachable log the connection.
    async fn catch_up_page(&mut self, job: &mut CatchUp) -> Result<Progress, Ending> {
        // A subscription that ended (or was replaced) meanwhile needs nothing more.
        let Some(mut position) = self
            .subs
            .get(&job.sub)
            .and_then(|sub| sub.position(&job.channel))
        else {
            return Ok(Progress::Done);
        };
        let channel = job.channel.as_str();
        let store = self.gw.store.clone();
        let outcome = match job.compacted {
            Some(cursor) => follow::compacted(&store, channel, cursor)
                .await
                .map(|(events, end)| (events, Some(end))),
            None => follow::missing(&store, channel, &position, job.upto)
                .await
                .map(|events| (events, None)),
        };
        let progress = match outcome {
            Ok((events, compacted)) => {
                for event in &events {
                    self.send(frame_of(&event.json, self.cloudevents)?).await?;
                }
                metrics().events_out.inc_by(events.len() as u64);
                // Written before the position is kept: a write error ends the connection.
                self.flush().await?;
                match compacted {
                    Some(end) => {
                        let cursor = events.last().map_or(job.compacted.unwrap_or(0), |e| e.seq);
                        match end {
                            // What compaction let go is not owed: on from the head it read.
                            Some(head) => {
                                position = position.caught_up(cursor, head);
                                job.compacted = None;
                            }
                            None => job.compacted = Some(cursor),
                        }
                        Progress::More
                    }
                    None if events.is_empty() => Progress::Done,
                    None => {
                        for event in &events {
                            position.delivered(event.seq);
                        }
                        Progress::More
                    }
                }
            }
            Err(Missed::Truncated { first }) => {
                self.drop_truncated(job.sub, channel, first).await?;
                return Ok(Progress::Done);
            }
            Err(Missed::Behind) => {
                // The log has less than a live event announced (the head read at subscribe is in
                // it): that event is dropped, the position stays where the log ends.
                debug!(connection = %self.id, channel, upto = job.upto, "the store has less than the backbone announced");
                metrics().backbone_beyond_head.inc();
                Progress::Done
            }
            Err(Missed::Unreachable(err)) => return Err(self.store_failed(err).await),
        };
        if let Some(sub) = self.subs.get_mut(&job.sub) {
            sub.set_position(&job.channel, position);
        }
        Ok(progress)
    }

    /// The range a subscription needs is no longer retained: it ends, and the client is told from
    /// where history is kept, so that it decides (resubscribe from there, or reload a snapshot).
    async fn drop_truncated(&mut self, id: u64, channel: &str, first: u64) -> Result<(), Ending> {
        self.subs.remove(&id);
        let err = truncated(channel, first);
        self.send(frames::error(&err, None).into()).await
    }

    async fn store_failed(&mut self, err: eventbus_store_client::StoreError) -> Ending {
        warn!(connection = %self.id, cause = %err, "store read failed during catch-up");
        let _ = self
            .refuse(
                FrameError::new("unavailable", format!("cannot read the log: {err}")),
                None,
            )
            .await;
        closing(
            close::TRY_AGAIN_LATER,
            "the log is unavailable; reconnect and resume with after",
        )
    }

    async fn on_live_batch(&mut self, first: Live, queue: &mut Inbox) -> Result<(), Ending> {
        // Counted once per batch: a shared counter touched per frame would bounce between cores.
        let mut sent = 0;
        let mut outcome = self.on_live(first).await.map(|s| sent += u64::from(s));
        for _ in 1..MAX_WRITE_BATCH {
            if outcome.is_err() {
                break;
            }
            match queue.try_recv() {
                Some(live) => outcome = self.on_live(live).await.map(|s| sent += u64::from(s)),
                None => break,
            }
        }
        metrics().events_out.inc_by(sent);
        outcome
    }

    /// Delivers one live event; true when a frame was written (false: dropped).
    async fn on_live(&mut self, live: Live) -> Result<bool, Ending> {
        let Some(sub) = self.subs.get(&live.subscription) else {
            // A subscription that ended while its events were queued.
            return Ok(false);
        };
        let delivery = &live.delivery;
        // Still reading its history: the event comes from the log in its turn, in order.
        if let Some(job) = self
            .catching
            .iter_mut()
            .find(|job| job.sub == live.subscription && job.channel == delivery.channel)
        {
            job.upto = job.upto.max(delivery.seq);
            return Ok(false);
        }
        let step = match sub.position(&delivery.channel) {
            // A pattern's or a group's first event of a channel: its position starts there.
            None => Step::Deliver,
            Some(position) => match (sub.kind, position.step(delivery.seq)) {
                // A group member sees a share of the events: gaps are expected, not refilled.
                (Kind::Group, Step::Refill { .. }) => Step::Deliver,
                (_, step) => step,
            },
        };
        match step {
            Step::Drop => return Ok(false),
            Step::Deliver => {}
            Step::Refill { upto } => {
                debug!(connection = %self.id, channel = %delivery.channel, upto, to = delivery.seq, sub = %sub.name, "gap, refilling from the store");
                metrics().gap_refills.inc();
                // Read before this event, whole (a gap is short): boxed, like request handling,
                // since the store read is rare here and its future large.
                let mut job = CatchUp {
                    sub: live.subscription,
                    channel: delivery.channel.clone(),
                    upto,
                    compacted: None,
                };
                while Box::pin(self.catch_up_page(&mut job)).await? == Progress::More {}
                let Some(sub) = self.subs.get(&live.subscription) else {
                    return Ok(false);
                };
                // Delivering it now would skip seqs the log does not have, and every real event
                // after: an event announced beyond the store's head is dropped (the refill
                // counted it).
                if sub
                    .position(&delivery.channel)
                    .is_none_or(|p| p.step(delivery.seq) != Step::Deliver)
                {
                    return Ok(false);
                }
            }
        }
        let frame = if self.cloudevents {
            bare_event(&delivery.frame)
        } else {
            delivery.frame.clone()
        };
        self.send(frame).await?;
        if let Some(sub) = self.subs.get_mut(&live.subscription) {
            match sub.position_mut(&delivery.channel) {
                Some(position) => position.delivered(delivery.seq),
                None => sub.set_position(&delivery.channel, Follow::at(delivery.seq)),
            }
        }
        Ok(true)
    }
}

/// A function of the map alone, so that it can be called while the grant is borrowed.
fn remove_named(subs: &mut HashMap<u64, Box<Sub>>, name: &str) -> Option<Box<Sub>> {
    let id = *subs.iter().find(|(_, sub)| sub.name == name)?.0;
    subs.remove(&id)
}

/// A close frame's reason holds at most 123 bytes (RFC 6455 §5.5): longer ones are cut, at a
/// character boundary.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

fn truncated(channel: &str, first: u64) -> FrameError {
    FrameError::new(
        "truncated",
        format!(
            "events of {channel:?} before seq {first} are no longer retained; subscribe with after={} to go on from there",
            first - 1
        ),
    )
    .with_channel(channel)
    .with_first_seq(first)
}

fn frame_of(json: &[u8], cloudevents: bool) -> Result<Utf8Bytes, Ending> {
    let bytes = if cloudevents {
        bytes::Bytes::copy_from_slice(json)
    } else {
        event_frame(json)
    };
    Utf8Bytes::try_from(bytes).map_err(|_| closing(close::INTERNAL, "stored event is not UTF-8"))
}

/// The stored event inside a shared `{"op":"event","event":…}` frame, without copying it.
fn bare_event(frame: &Utf8Bytes) -> Utf8Bytes {
    const PREFIX: usize = "{\"op\":\"event\",\"event\":".len();
    let bytes = bytes::Bytes::from(frame.clone());
    if bytes.len() <= PREFIX {
        return frame.clone();
    }
    // The frame is ASCII-delimited around valid UTF-8, so the slice is valid UTF-8 too.
    Utf8Bytes::try_from(bytes.slice(PREFIX..bytes.len() - 1)).unwrap_or_else(|_| frame.clone())
}
