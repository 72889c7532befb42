//! A subscriber process of the load tool: opens many WebSocket connections, subscribes each, then
//! checks and times every event it receives. The parent talks to it over stdin/stdout, so one
//! scenario can spread its connections over several processes (one process may hold at most
//! 20,000 open files here) and still merge one histogram.
//!
//! stdout: `ready <connections>`, then `progress <received> <closed>` every 200 ms, and
//! `report <json>` after each `report` line on stdin (which also resets the counts). Connections
//! opened without subscribing all subscribe at once on a `join` line (eventbus only), and
//! `joined <connections>` follows when every one is subscribed: a subscribe storm. EOF on stdin
//! ends the process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use super::{Target, now_ns};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, value_enum)]
    pub target: Target,
    /// `ws://…/v1/ws?token=…` for eventbus, `ws://host:port` for NATS.
    #[arg(long)]
    pub ws_url: String,
    #[arg(long)]
    pub channel: String,
    #[arg(long)]
    pub connections: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200)]
    pub open_concurrency: usize,
    /// Subscribe each connection (off: authenticated but idle).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub subscribe: bool,
}

/// What one worker saw since its last report.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct Report {
    pub received: u64,
    /// Events skipped within a connection (a later seq arrived first).
    pub gaps: u64,
    /// Events received twice or out of order.
    pub duplicates: u64,
    /// Connections the server closed, by close code.
    pub closed: Vec<(u16, u64)>,
    /// Unix ns of the last event received (0: none).
    pub last_received_ns: u64,
    /// publish → deliver in µs, HDR V2, base64.
    pub histogram: String,
}

struct Totals {
    received: AtomicU64,
    gaps: AtomicU64,
    duplicates: AtomicU64,
    closed: AtomicU64,
    last_received_ns: AtomicU64,
    close_codes: Mutex<Vec<(u16, u64)>>,
    histogram: Mutex<Histogram<u64>>,
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).unwrap())
}

pub fn encode(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|err| anyhow::anyhow!("histogram: {err:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text)?;
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|err| anyhow::anyhow!("histogram: {err:?}"))
}

impl Totals {
    fn record(&self, sent_ns: u64, now: u64) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.last_received_ns.fetch_max(now, Ordering::Relaxed);
        let micros = now.saturating_sub(sent_ns) / 1000;
        if let Ok(mut h) = self.histogram.lock() {
            h.saturating_record(micros.max(1));
        }
    }

    fn closed_with(&self, code: u16) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut codes) = self.close_codes.lock() {
            match codes.iter_mut().find(|(c, _)| *c == code) {
                Some((_, n)) => *n += 1,
                None => codes.push((code, 1)),
            }
        }
    }

    fn take_report(&self) -> anyhow::Result<Report> {
        let histogram = {
            let mut h = self
                .histogram
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?;
            let text = encode(&h)?;
            h.reset();
            text
        };
        let closed = std::mem::take(
            &mut *self
                .close_codes
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?,
        );
        Ok(Report {
            received: self.received.swap(0, Ordering::Relaxed),
            gaps: self.gaps.swap(0, Ordering::Relaxed),
            duplicates: self.duplicates.swap(0, Ordering::Relaxed),
            closed,
            last_received_ns: self.last_received_ns.swap(0, Ordering::Relaxed),
            histogram,
        })
    }
}

/// Reads a decimal number starting at `from` in `text`.
fn number_at(text: &[u8], from: usize) -> Option<u64> {
    let digits = text.get(from..)?;
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The sequence number and send time of a frame of the load tool: `"seq":` (eventbus, the
/// store's number) or `"n":` (NATS, the publisher's count), and `"t":` in the event data.
pub fn parse_payload(text: &[u8], counter: &[u8]) -> Option<(u64, u64)> {
    parse_numbers(text, counter, b"\"t\":")
}

/// The numbers after `counter` and after `time` in `text`.
fn parse_numbers(text: &[u8], counter: &[u8], time: &[u8]) -> Option<(u64, u64)> {
    let seq = number_at(text, find(text, counter)? + counter.len())?;
    let t = number_at(text, find(text, time)? + time.len())?;
    Some((seq, t))
}

/// tungstenite zero-fills its whole read buffer (128 KiB by default) before every read: with
/// thousands of connections that alone would make the client the bottleneck.
async fn connect(
    url: &str,
) -> anyhow::Result<(
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::handshake::client::Response,
)> {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(16 * 1024);
    tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .context("connecting")
}

/// Tracks one connection's order: the next number it expects.
struct Order {
    last: u64,
}

impl Order {
    fn see(&mut self, seq: u64, totals: &Totals) {
        if seq > self.last + 1 {
            totals
                .gaps
                .fetch_add(seq - self.last - 1, Ordering::Relaxed);
        }
        if seq <= self.last {
            totals.duplicates.fetch_add(1, Ordering::Relaxed);
        } else {
            self.last = seq;
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let totals = Arc::new(Totals {
        received: AtomicU64::new(0),
        gaps: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        last_received_ns: AtomicU64::new(0),
        close_codes: Mutex::new(Vec::new()),
        histogram: Mutex::new(new_histogram()),
    });
    let opening = Arc::new(Semaphore::new(args.open_concurrency.max(1)));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(1024);
    let (join_tx, join_rx) = tokio::sync::watch::channel(false);
    let (joined_tx, mut joined_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for _ in 0..args.connections {
        let args = args.clone();
        let totals = totals.clone();
        let opening = opening.clone();
        let ready = ready_tx.clone();
        let storm = Storm {
            join: join_rx.clone(),
            joined: joined_tx.clone(),
        };
        tokio::spawn(async move {
            let result = match args.target {
                Target::Eventbus => {
                    eventbus_connection(&args, &totals, &opening, &ready, storm).await
                }
                Target::Nats => nats_connection(&args, &totals, &opening, &ready).await,
                Target::Pusher => pusher_connection(&args, &totals, &opening, &ready).await,
            };
            if let Err(err) = result {
                let _ = ready.send(Err(err)).await;
            }
        });
    }
    drop(ready_tx);
    let mut stdout = tokio::io::stdout();
    let mut opened = 0;
    while opened < args.connections {
        match ready_rx.recv().await {
            Some(Ok(())) => opened += 1,
            Some(Err(err)) => bail!("a connection failed while opening: {err:#}"),
            None => bail!("connections ended while opening"),
        }
    }
    stdout
        .write_all(format!("ready {opened}\n").as_bytes())
        .await?;
    stdout.flush().await?;

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut joined = 0;
    loop {
        tokio::select! {
            Some(()) = joined_rx.recv() => {
                joined += 1;
                if joined == args.connections {
                    stdout.write_all(format!("joined {joined}\n").as_bytes()).await?;
                    stdout.flush().await?;
                }
            }
            line = stdin.next_line() => match line? {
                Some(line) if line.trim() == "join" => {
                    join_tx.send_replace(true);
                }
                Some(line) if line.trim() == "report" => {
                    let report = serde_json::to_string(&totals.take_report()?)?;
                    stdout.write_all(format!("report {report}\n").as_bytes()).await?;
                    stdout.flush().await?;
                }
                Some(_) => {}
                None => return Ok(()),
            },
            _ = tick.tick() => {
                let line = format!(
                    "progress {} {}\n",
                    totals.received.load(Ordering::Relaxed),
                    totals.closed.load(Ordering::Relaxed)
                );
                stdout.write_all(line.as_bytes()).await?;
                stdout.flush().await?;
            }
            late = ready_rx.recv() => if let Some(Err(err)) = late {
                eprintln!("worker: a connection failed: {err:#}");
            },
        }
    }
}

/// A connection's part in a subscribe storm: wait for the word, subscribe, say so.
struct Storm {
    join: tokio::sync::watch::Receiver<bool>,
    joined: tokio::sync::mpsc::UnboundedSender<()>,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn eventbus_connection(
    args: &Args,
    totals: &Totals,
    opening: &Semaphore,
    ready: &tokio::sync::mpsc::Sender<anyhow::Result<()>>,
    mut storm: Storm,
) -> anyhow::Result<()> {
    let permit = opening.acquire().await?;
    let (mut ws, _) = connect(&args.ws_url).await?;
    let welcome = ws.next().await.context("closed before welcome")??;
    if !welcome.to_text().unwrap_or("").contains("\"welcome\"") {
        bail!("expected welcome, got {welcome:?}");
    }
    let mut order = Order { last: 0 };
    if args.subscribe {
        order.last = eventbus_subscribe(&mut ws, &args.channel).await?;
    }
    drop(permit);
    ready.send(Ok(())).await?;
    if !args.subscribe {
        loop {
            tokio::select! {
                join = storm.join.wait_for(|join| *join) => {
                    join?;
                    break;
                }
                // Reading meanwhile answers the gateway's pings.
                frame = ws.next() => {
                    frame.context("closed before the storm")??;
                }
            }
        }
        order.last = eventbus_subscribe(&mut ws, &args.channel).await?;
        storm.joined.send(())?;
    }
    receive(ws, order, totals, b"\"seq\":", b"\"t\":", None).await
}

/// Subscribes from the head: the head it answers.
async fn eventbus_subscribe(ws: &mut Socket, channel: &str) -> anyhow::Result<u64> {
    let subscribe = serde_json::json!({"op": "subscribe", "channel": channel});
    ws.send(Message::text(subscribe.to_string())).await?;
    let answer = ws.next().await.context("closed before subscribed")??;
    let text = answer.to_text().unwrap_or("");
    if !text.contains("\"subscribed\"") {
        bail!("expected subscribed, got {text}");
    }
    Ok(number_at(
        text.as_bytes(),
        find(text.as_bytes(), b"\"head\":").unwrap_or(0) + 7,
    )
    .unwrap_or(0))
}

/// Reads text frames until the connection ends, checking the order of and timing every event
/// found in them (its counter after `counter`, its send time after `time`), and answering a frame
/// that contains `ping.0` with `ping.1`.
async fn receive(
    mut ws: Socket,
    mut order: Order,
    totals: &Totals,
    counter: &[u8],
    time: &[u8],
    ping: Option<(&[u8], &'static str)>,
) -> anyhow::Result<()> {
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => {
                let now = now_ns();
                let bytes = text.as_bytes();
                if let Some((n, sent)) = parse_numbers(bytes, counter, time) {
                    order.see(n, totals);
                    totals.record(sent, now);
                } else if let Some((asked, answer)) = ping
                    && find(bytes, asked).is_some()
                {
                    ws.send(Message::text(answer)).await?;
                }
            }
            Ok(Message::Close(frame)) => {
                totals.closed_with(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                return Ok(());
            }
            Ok(_) => {}
            Err(_) => {
                totals.closed_with(1006);
                return Ok(());
            }
        }
    }
    totals.closed_with(1006);
    Ok(())
}

/// A Pusher client (protocol 7), as pusher-js runs one: the connection's welcome, a subscribe, then
/// events whose `data` is JSON text (so its numbers appear escaped); pings are answered.
async fn pusher_connection(
    args: &Args,
    totals: &Totals,
    opening: &Semaphore,
    ready: &tokio::sync::mpsc::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let permit = opening.acquire().await?;
    let (mut ws, _) = connect(&args.ws_url).await?;
    let welcome = ws.next().await.context("closed before the welcome")??;
    if !welcome
        .to_text()
        .unwrap_or("")
        .contains("pusher:connection_established")
    {
        bail!("expected pusher:connection_established, got {welcome:?}");
    }
    if args.subscribe {
        let subscribe =
            serde_json::json!({"event": "pusher:subscribe", "data": {"channel": args.channel}});
        ws.send(Message::text(subscribe.to_string())).await?;
        let answer = ws.next().await.context("closed before subscribed")??;
        let text = answer.to_text().unwrap_or("");
        if !text.contains("pusher_internal:subscription_succeeded") {
            bail!("expected pusher_internal:subscription_succeeded, got {text}");
        }
    }
    drop(permit);
    ready.send(Ok(())).await?;
    receive(
        ws,
        Order { last: 0 },
        totals,
        br#"\"n\":"#,
        br#"\"t\":"#,
        Some((b"pusher:ping", r#"{"event":"pusher:pong","data":{}}"#)),
    )
    .await
}

/// A NATS client over WebSocket, as a browser would run one: the NATS text protocol in binary
/// frames, a message possibly split across frames.
async fn nats_connection(
    args: &Args,
    totals: &Totals,
    opening: &Semaphore,
    ready: &tokio::sync::mpsc::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let permit = opening.acquire().await?;
    let (mut ws, _) = connect(&args.ws_url).await?;
    let hello = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"headers\":false}}\r\n{}PING\r\n",
        if args.subscribe {
            format!("SUB {} 1\r\n", args.channel)
        } else {
            String::new()
        }
    );
    ws.send(Message::binary(hello.into_bytes())).await?;
    let mut buffer: Vec<u8> = Vec::with_capacity(4096);
    let mut order = Order { last: 0 };
    let mut permit = Some(permit);
    loop {
        let Some(message) = ws.next().await else {
            totals.closed_with(1006);
            return Ok(());
        };
        let now = now_ns();
        match message {
            Ok(Message::Binary(bytes)) => buffer.extend_from_slice(&bytes),
            Ok(Message::Text(text)) => buffer.extend_from_slice(text.as_bytes()),
            Ok(Message::Close(frame)) => {
                totals.closed_with(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                return Ok(());
            }
            Ok(_) => continue,
            Err(_) => {
                totals.closed_with(1006);
                return Ok(());
            }
        }
        let mut at = 0;
        let mut pongs = 0;
        while let Some(eol) = find(&buffer[at..], b"\r\n") {
            let line = &buffer[at..at + eol];
            if let Some(rest) = line.strip_prefix(b"MSG ") {
                // MSG <subject> <sid> [reply] <len>
                let len: usize = std::str::from_utf8(rest)
                    .ok()
                    .and_then(|r| r.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .context("bad MSG line")?;
                let start = at + eol + 2;
                if buffer.len() < start + len + 2 {
                    break;
                }
                if let Some((n, sent)) = parse_payload(&buffer[start..start + len], b"\"n\":") {
                    order.see(n, totals);
                    totals.record(sent, now);
                }
                at = start + len + 2;
                continue;
            }
            if line == b"PING" {
                pongs += 1;
            } else if line == b"PONG" {
                if let Some(permit) = permit.take() {
                    drop(permit);
                    ready.send(Ok(())).await?;
                }
            } else if line.starts_with(b"-ERR") {
                bail!("nats: {}", String::from_utf8_lossy(line));
            }
            at += eol + 2;
        }
        buffer.drain(..at);
        for _ in 0..pongs {
            ws.send(Message::binary(b"PONG\r\n".to_vec())).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_numbers_are_found() {
        let frame =
            br#"{"op":"event","event":{"seq":42,"id":"x","data":{"t":1700000000000000000}}}"#;
        assert_eq!(
            parse_payload(frame, b"\"seq\":"),
            Some((42, 1_700_000_000_000_000_000))
        );
        assert_eq!(parse_payload(br#"{"n":7,"t":9}"#, b"\"n\":"), Some((7, 9)));
        assert_eq!(parse_payload(br#"{"n":7}"#, b"\"n\":"), None);
        // A Pusher event: the payload is JSON text inside `data`.
        let pusher = br#"{"event":"bench.tick","channel":"bench","data":"{\"op\":\"event\",\"event\":{\"n\":3,\"data\":{\"t\":99,\"pad\":\"x\"}}}"}"#;
        assert_eq!(
            parse_numbers(pusher, br#"\"n\":"#, br#"\"t\":"#),
            Some((3, 99))
        );
    }

    #[test]
    fn order_counts_gaps_and_duplicates() {
        let totals = Totals {
            received: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            last_received_ns: AtomicU64::new(0),
            close_codes: Mutex::new(Vec::new()),
            histogram: Mutex::new(new_histogram()),
        };
        let mut order = Order { last: 3 };
        for seq in [4, 5, 8, 8, 6, 9] {
            order.see(seq, &totals);
        }
        assert_eq!(totals.gaps.load(Ordering::Relaxed), 2);
        assert_eq!(totals.duplicates.load(Ordering::Relaxed), 2);
    }
}
