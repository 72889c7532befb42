//! `GET /v1/sse?channel=…&channel=…`: Server-Sent Events for passive browser updates.
//!
//! Every SSE message's `id` holds the position of every channel of the stream (`a:12,b:7`), so the
//! browser's automatic reconnect (`Last-Event-ID`) resumes each channel exactly after what it
//! delivered. The first message (`event: positions`) carries the starting positions, so even a stream
//! that has delivered nothing resumes from where it began. The same delivery core as a WebSocket
//! subscription ([`crate::follow`]): seq order, gaps refilled from the store, doubles dropped; a
//! history let go while the stream runs is told (`event: error`, code `truncated`) before the
//! stream ends; a client that cannot keep up has its stream ended (the browser reconnects and
//! resumes).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use eventbus_auth_client::Verified;
use eventbus_auth_client::app_hooks::AppHooks;
use eventbus_auth_client::claims::now_s;
use eventbus_runtime::problem::{Kind, Problem, bearer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use crate::Gateway;
use crate::follow::{self, Follow, Missed, Start, Step};
use crate::hub::Interest;
use crate::mailbox::{Inbox, Mailbox};

/// Most channels in one stream.
const MAX_CHANNELS: usize = 64;
/// SSE messages buffered for a stream before it counts as not keeping up.
const OUT_BUFFER: usize = 256;

/// The positions of a stream, as carried in SSE ids: `channel:seq` pairs joined by `,`.
pub fn encode_positions<'a>(positions: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    let mut id = String::new();
    for (channel, seq) in positions {
        if !id.is_empty() {
            id.push(',');
        }
        id.push_str(channel);
        id.push(':');
        id.push_str(&seq.to_string());
    }
    id
}

/// Reads `Last-Event-ID`; channels it does not name (or a malformed id) are absent.
pub fn decode_positions(id: &str) -> HashMap<String, u64> {
    id.split(',')
        .filter_map(|pair| {
            let (channel, seq) = pair.rsplit_once(':')?;
            Some((channel.to_owned(), seq.parse().ok()?))
        })
        .collect()
}

struct Query {
    channels: Vec<String>,
    token: Option<String>,
    last_event_id: Option<String>,
    /// History from after this seq, with one channel (docs/protocol.md §6b); `Last-Event-ID` wins over it.
    after: Option<u64>,
}

pub(crate) fn parse_query_for_fuzzing(raw: &str) -> bool {
    parse_query(Some(raw)).is_ok()
}

fn parse_query(raw: Option<&str>) -> Result<Query, Problem> {
    let mut query = Query {
        channels: Vec::new(),
        token: None,
        last_event_id: None,
        after: None,
    };
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match key {
            "channel" => query.channels.push(value),
            "token" => query.token = Some(value),
            "last_event_id" => query.last_event_id = Some(value),
            "after" => {
                query.after = Some(value.parse().map_err(|_| {
                    Problem::new(Kind::InvalidRequest, "after must be a seq (a whole number)")
                        .with("field", "after")
                })?)
            }
            other => {
                return Err(Problem::new(
                    Kind::InvalidRequest,
                    format!(
                        "unknown query parameter {other:?} (channel, token, after, last_event_id)"
                    ),
                )
                .with("field", other));
            }
        }
    }
    if query.channels.is_empty() {
        return Err(
            Problem::new(Kind::InvalidRequest, "name at least one channel=")
                .with("field", "channel"),
        );
    }
    if query.after.is_some() && query.channels.len() != 1 {
        return Err(Problem::new(
            Kind::InvalidRequest,
            "after= goes with exactly one channel (several channels resume with last_event_id)",
        )
        .with("field", "after"));
    }
    if query.channels.len() > MAX_CHANNELS {
        return Err(Problem::new(
            Kind::InvalidRequest,
            format!("at most {MAX_CHANNELS} channels per stream"),
        )
        .with("field", "channel"));
    }
    Ok(query)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or(""),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) async fn stream(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    match open(gateway, &headers, raw.as_deref()).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    }
}

async fn open(
    gw: Arc<Gateway>,
    headers: &HeaderMap,
    raw: Option<&str>,
) -> Result<Response, Problem> {
    if gw.shutdown.is_triggered() {
        return Err(Problem::new(
            Kind::Unavailable,
            "the gateway is shutting down",
        ));
    }
    let query = parse_query(raw)?;
    let token = bearer(headers).map(str::to_owned).or(query.token.clone());
    let verified = match (token, &gw.app) {
        (Some(token), _) => gw.verifier.verify(&token).await.map_err(Problem::from)?,
        // Without a token, the application's connect hook says who this is.
        (None, Some(app)) if app.connects() => app
            .connect("sse", app.passed_headers(headers))
            .await
            .map_err(Problem::from)?,
        (None, _) => {
            return Err(Problem::new(
                Kind::Unauthorized,
                "send a token as Bearer or as the token query parameter",
            ));
        }
    };
    let slot = gw.identities.take(&verified.grant.identity).ok_or_else(|| {
        Problem::new(
            Kind::Overloaded,
            format!(
                "{} already holds {} connections to this gateway (EVENTBUS_GATEWAY_MAX_CONNECTIONS_PER_IDENTITY)",
                verified.grant.identity,
                gw.identities.max()
            ),
        )
    })?;
    for channel in &query.channels {
        if eventbus_router::pattern::is_pattern(channel) {
            return Err(Problem::new(
                Kind::InvalidRequest,
                "SSE streams name channels, not patterns (use the WebSocket for patterns)",
            )
            .with("channel", channel.as_str()));
        }
        AppHooks::check_subscribe(gw.app.as_deref(), &verified.grant, channel)
            .await
            .map_err(|refusal| Problem::from(refusal).with("channel", channel.as_str()))?;
    }
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(query.last_event_id.clone())
        .map(|id| decode_positions(&id))
        .or_else(|| {
            let channel = query.channels.first()?;
            Some(HashMap::from([(channel.clone(), query.after?)]))
        })
        .unwrap_or_default();

    // Interest first, then heads: anything committed after a head is queued live.
    let (mailbox, live) = crate::mailbox::mailbox(gw.queue_len);
    let mut interests = Vec::new();
    let mut positions: Vec<(String, Follow)> = Vec::new();
    let mut heads = Vec::new();
    for (i, channel) in query.channels.iter().enumerate() {
        if positions.iter().any(|(c, _)| c == channel) {
            continue;
        }
        let interest = gw
            .hub
            .join(channel, None, i as u64, mailbox.clone())
            .await
            .map_err(|err| {
                Problem::new(Kind::Unavailable, format!("cannot subscribe now: {err}"))
            })?;
        interests.push(interest);
        let (first, head) = gw.store.bounds(channel).await.map_err(Problem::from)?;
        let after = resume.get(channel).copied();
        let start = match Follow::start(after, first, head) {
            Ok(start) => start,
            Err(Start::BeyondHead { head }) => {
                return Err(Problem::new(
                    Kind::InvalidRequest,
                    format!(
                        "Last-Event-ID says {channel}:{}, beyond its head {head}",
                        after.unwrap_or(0)
                    ),
                )
                .with("channel", channel.as_str()));
            }
            Err(Start::Truncated { first }) => {
                return Err(truncated(channel, first));
            }
        };
        positions.push((channel.clone(), start));
        heads.push(head);
    }
    let (out, events) = mpsc::channel::<Result<Event, Infallible>>(OUT_BUFFER);
    let feeder = Feeder {
        gw: gw.clone(),
        verified,
        positions,
        out,
        mailbox,
        _interests: interests,
        _slot: slot,
    };
    gw.connections.spawn(feeder.run(heads, live));
    let mut response = Sse::new(ReceiverStream::new(events))
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies such as nginx must pass each message on at once.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

fn truncated(channel: &str, first: u64) -> Problem {
    Problem::new(
        Kind::Truncated,
        format!(
            "events of {channel:?} before seq {first} are no longer retained; resume with {channel}:{} to go on from there",
            first - 1
        ),
    )
    .with("channel", channel)
    .with("first_seq", first)
}

struct Feeder {
    gw: Arc<Gateway>,
    verified: Verified,
    /// The position in each channel, in the order of the query.
    positions: Vec<(String, Follow)>,
    out: mpsc::Sender<Result<Event, Infallible>>,
    /// Kept for its slow-consumer alarm.
    mailbox: Mailbox,
    _interests: Vec<Interest>,
    /// This stream's place among its identity's connections.
    _slot: crate::identities::Slot,
}

enum End {
    /// The client is gone, fell behind, or the stream must stop (token expiry, shutdown).
    Stop,
}

impl Feeder {
    async fn run(mut self, heads: Vec<u64>, mut live: Inbox) {
        let opened = eventbus_runtime::metrics::metrics();
        opened.connections.inc();
        let _ = self.serve(heads, &mut live).await;
        opened.connections.dec();
        debug!("sse stream ended");
    }

    async fn serve(&mut self, heads: Vec<u64>, live: &mut Inbox) -> Result<(), End> {
        // Where the stream starts, even before any event.
        let start: serde_json::Map<String, serde_json::Value> = self
            .positions
            .iter()
            .map(|(c, p)| (c.clone(), p.last().into()))
            .collect();
        self.emit(
            Event::default()
                .event("positions")
                .id(self.id())
                .data(serde_json::Value::Object(start).to_string()),
        )
        .await?;
        for (i, head) in heads.into_iter().enumerate() {
            self.refill(i, head).await?;
        }
        // One timer for the stream, not one per event.
        let expires = tokio::time::sleep_until(
            tokio::time::Instant::now()
                + Duration::from_secs(self.verified.expires_at.saturating_sub(now_s())),
        );
        tokio::pin!(expires);
        let shutdown = self.gw.shutdown.wait();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Err(End::Stop),
                _ = self.mailbox.slow() => return Err(End::Stop),
                _ = &mut expires => return Err(End::Stop),
                item = live.recv() => {
                    let i = item.subscription as usize;
                    let Some(&(_, position)) = self.positions.get(i) else { continue };
                    let delivery = &item.delivery;
                    match position.step(delivery.seq) {
                        Step::Drop => continue,
                        Step::Deliver => {}
                        Step::Refill { upto } => {
                            eventbus_runtime::metrics::metrics().gap_refills.inc();
                            self.refill(i, upto).await?;
                            if self.positions[i].1.step(delivery.seq) != Step::Deliver {
                                // Announced beyond what the log has: dropped, as on WebSockets.
                                eventbus_runtime::metrics::metrics().backbone_beyond_head.inc();
                                continue;
                            }
                        }
                    }
                    let json = &delivery.frame.as_str()[EVENT_FRAME_PREFIX.len()..delivery.frame.len() - 1];
                    self.deliver(i, delivery.seq, json.to_owned()).await?;
                }
            }
        }
    }

    /// Delivers channel `i`'s events from the store up to `upto` (see [`follow::missing`]). A
    /// history let go, or a log that cannot be read, is told to the client before the stream ends.
    async fn refill(&mut self, i: usize, upto: u64) -> Result<(), End> {
        loop {
            let (channel, position) = self.positions[i].clone();
            match follow::missing(&self.gw.store, &channel, &position, upto).await {
                Ok(events) if events.is_empty() => return Ok(()),
                Ok(events) => {
                    for event in events {
                        let json = String::from_utf8_lossy(&event.json).into_owned();
                        self.deliver(i, event.seq, json).await?;
                    }
                }
                Err(Missed::Behind) => return Ok(()),
                Err(Missed::Truncated { first }) => {
                    let problem = truncated(&channel, first);
                    return self
                        .fail("truncated", &problem.detail, &channel, Some(first))
                        .await;
                }
                Err(Missed::Unreachable(err)) => {
                    let detail = format!("cannot read the log: {err}; reconnect to resume");
                    return self.fail("unavailable", &detail, &channel, None).await;
                }
            }
        }
    }

    /// Tells the client why the stream ends (`event: error`), then ends it.
    async fn fail(
        &self,
        code: &str,
        detail: &str,
        channel: &str,
        first_seq: Option<u64>,
    ) -> Result<(), End> {
        let mut data = serde_json::json!({"code": code, "message": detail, "channel": channel});
        if let Some(first) = first_seq {
            data["first_seq"] = first.into();
        }
        let _ = self
            .emit(Event::default().event("error").data(data.to_string()))
            .await;
        Err(End::Stop)
    }

    async fn deliver(&mut self, i: usize, seq: u64, json: String) -> Result<(), End> {
        self.positions[i].1.delivered(seq);
        let event = Event::default().id(self.id()).data(json);
        self.emit(event).await?;
        eventbus_runtime::metrics::metrics().events_out.inc();
        Ok(())
    }

    /// The SSE id: every channel's position.
    fn id(&self) -> String {
        encode_positions(self.positions.iter().map(|(c, p)| (c.as_str(), p.last())))
    }

    async fn emit(&self, event: Event) -> Result<(), End> {
        tokio::select! {
            sent = self.out.send(Ok(event)) => sent.map_err(|_| End::Stop),
            _ = self.mailbox.slow() => Err(End::Stop),
        }
    }
}

/// `{"op":"event","event":` in front of every shared frame (model::event_frame).
const EVENT_FRAME_PREFIX: &str = "{\"op\":\"event\",\"event\":";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip() {
        let id = encode_positions([("a.b", 12), ("c", 0)]);
        assert_eq!(id, "a.b:12,c:0");
        let back = decode_positions(&id);
        assert_eq!(back.get("a.b"), Some(&12));
        assert_eq!(back.get("c"), Some(&0));
        assert!(decode_positions("garbage").is_empty());
    }

    #[test]
    fn queries_are_read_strictly() {
        let q = parse_query(Some(
            "channel=a&channel=b.c&token=x%2By&last_event_id=a%3A3",
        ))
        .unwrap();
        assert_eq!(q.channels, ["a", "b.c"]);
        assert_eq!(q.token.as_deref(), Some("x+y"));
        assert_eq!(q.last_event_id.as_deref(), Some("a:3"));
        assert!(parse_query(Some("")).is_err());
        assert!(parse_query(Some("channel=a&colour=red")).is_err());
    }
}
