//! `group`: a durable queue group of WebSocket workers that say done as they go.
//! - drain: events published while every worker is away, then the workers join: events/s from
//!   their first delivery to the last `done`;
//! - latency: events published at a set rate while the workers are there: publish → delivery,
//!   next to the same for a plain subscription of the same channels in the same run.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{Server, emit, now_ns, percentiles, tokens, ws_url};
use crate::median;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub server: Server,
    /// Workers in the group.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Events waiting for the workers (drain).
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Channels the events are spread over.
    #[arg(long, default_value_t = 16)]
    pub channels: usize,
    /// Events each worker holds at most.
    #[arg(long, default_value_t = 500)]
    pub prefetch: u32,
    /// Events per second while measuring latency.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &Server, token: &str) -> anyhow::Result<Socket> {
    let (socket, _) = tokio_tungstenite::connect_async(ws_url(server, token)).await?;
    Ok(socket)
}

/// Reads frames until `subscribed` (or an error frame, which fails).
async fn subscribed(socket: &mut Socket) -> anyhow::Result<()> {
    while let Some(message) = socket.next().await {
        if let Message::Text(text) = message? {
            let frame: Value = serde_json::from_str(&text)?;
            match frame["op"].as_str() {
                Some("subscribed") => return Ok(()),
                Some("error") => anyhow::bail!("subscribe refused: {frame}"),
                _ => {}
            }
        }
    }
    anyhow::bail!("connection closed before subscribed")
}

/// A worker: every event it gets is done at once. Counts them; records publish → delivery
/// (microseconds) when `latency` is set.
async fn worker(
    server: Server,
    token: String,
    group: String,
    prefetch: u32,
    handled: Arc<AtomicU64>,
    latency: Option<tokio::sync::mpsc::UnboundedSender<u64>>,
) -> anyhow::Result<()> {
    let mut socket = connect(&server, &token).await?;
    let subscribe = json!({"op": "subscribe", "channel": "bench.group.*", "group": group, "durable": true, "prefetch": prefetch});
    socket.send(Message::text(subscribe.to_string())).await?;
    subscribed(&mut socket).await?;
    // Done as it goes: after each burst of frames that have arrived, one done frame per
    // channel for what it handled.
    let mut handled_now: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    while let Some(message) = socket.next().await {
        let mut message = Some(message?);
        while let Some(Message::Text(text)) = message.take() {
            // Only what a worker needs of the frame: a light reader, as a real worker would be.
            if let Ok(Frame { event: Some(event) }) = serde_json::from_str::<Frame>(&text) {
                if let (Some(latency), Some(t)) = (&latency, event.data.and_then(|d| d.t)) {
                    let _ = latency.send(now_ns().saturating_sub(t) / 1000);
                }
                handled_now
                    .entry(event.channel.to_owned())
                    .or_default()
                    .push(event.seq);
            }
            // More already here? Take it before answering.
            if let Some(Some(next)) = futures_util::FutureExt::now_or_never(socket.next()) {
                message = Some(next?);
            }
        }
        for (channel, seqs) in std::mem::take(&mut handled_now) {
            let n = seqs.len() as u64;
            let done = json!({"op": "done", "channel": channel, "seqs": seqs});
            socket.send(Message::text(done.to_string())).await?;
            handled.fetch_add(n, Ordering::Relaxed);
        }
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    event: Option<EventRef<'a>>,
}

#[derive(serde::Deserialize)]
struct EventRef<'a> {
    channel: &'a str,
    seq: u64,
    data: Option<Stamp>,
}

#[derive(serde::Deserialize)]
struct Stamp {
    t: Option<u64>,
}

async fn publish(
    http: &reqwest::Client,
    server: &Server,
    token: &str,
    events: Vec<Value>,
) -> anyhow::Result<()> {
    let response = http
        .post(format!("{}/v1/events", server.url))
        .bearer_auth(token)
        .json(&Value::Array(events))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "publish: {}",
        response.status()
    );
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let service = tokens(&args.server, &http, "bench.group.*").await?.service;
    let channels = args.channels.max(1);
    let mut runs = Vec::new();
    for run in 1..=args.runs.max(1) {
        let group = format!("bench-{}-{run}", now_ns() % 1_000_000_000);
        // The group exists (from the heads now) before anything is published to it.
        let probe = http
            .post(format!("{}/v1/groups/{group}/fetch", args.server.url))
            .bearer_auth(&service)
            .json(&json!({"channel": "bench.group.*", "max": 1}))
            .send()
            .await?;
        anyhow::ensure!(probe.status().is_success(), "group: {}", probe.status());

        // Drain: everything waits, then the workers come.
        let mut published = 0u64;
        while published < args.events {
            let n = (args.events - published).min(1000);
            let batch = (published..published + n)
                .map(|i| json!({"channel": format!("bench.group.{}", i as usize % channels), "type": "bench.group", "data": {"i": i}}))
                .collect();
            publish(&http, &args.server, &service, batch).await?;
            published += n;
        }
        let handled = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..args.workers {
            workers.spawn(worker(
                args.server.clone(),
                service.clone(),
                group.clone(),
                args.prefetch,
                handled.clone(),
                None,
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        while handled.load(Ordering::Relaxed) < args.events {
            anyhow::ensure!(Instant::now() < deadline, "the drain took over 600 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let drain_s = started.elapsed().as_secs_f64();
        workers.abort_all();
        while workers.join_next().await.is_some() {}

        // Latency: the same workers again (a new group), and a plain subscriber beside them.
        let group = format!("{group}-live");
        let probe = http
            .post(format!("{}/v1/groups/{group}/fetch", args.server.url))
            .bearer_auth(&service)
            .json(&json!({"channel": "bench.group.*", "max": 1}))
            .send()
            .await?;
        anyhow::ensure!(probe.status().is_success(), "group: {}", probe.status());
        let (tx, mut group_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..args.workers {
            workers.spawn(worker(
                args.server.clone(),
                service.clone(),
                group.clone(),
                args.prefetch,
                Arc::new(AtomicU64::new(0)),
                Some(tx.clone()),
            ));
        }
        let (plain_tx, mut plain_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let mut plain = connect(&args.server, &service).await?;
        plain
            .send(Message::text(
                json!({"op": "subscribe", "channel": "bench.group.*"}).to_string(),
            ))
            .await?;
        subscribed(&mut plain).await?;
        let plain_reader = tokio::spawn(async move {
            while let Some(Ok(message)) = plain.next().await {
                if let Message::Text(text) = message
                    && let Ok(frame) = serde_json::from_str::<Value>(&text)
                    && let Some(t) = frame["event"]["data"]["t"].as_u64()
                {
                    let _ = plain_tx.send(now_ns().saturating_sub(t) / 1000);
                }
            }
        });
        // Let every worker join before the clock starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let interval = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
        let mut tick = tokio::time::interval(interval);
        let until = Instant::now() + Duration::from_secs(args.seconds);
        let mut i = 0u64;
        while Instant::now() < until {
            tick.tick().await;
            let event = json!({"channel": format!("bench.group.{}", i as usize % channels), "type": "bench.group", "data": {"t": now_ns()}});
            publish(&http, &args.server, &service, vec![event]).await?;
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        workers.abort_all();
        while workers.join_next().await.is_some() {}
        plain_reader.abort();
        let (mut g, mut p) = (
            super::worker::new_histogram(),
            super::worker::new_histogram(),
        );
        while let Ok(us) = group_rx.try_recv() {
            g.saturating_record(us.max(1));
        }
        while let Ok(us) = plain_rx.try_recv() {
            p.saturating_record(us.max(1));
        }
        let result = json!({
            "run": run,
            "drain_events": args.events,
            "drain_events_per_s": (args.events as f64 / drain_s).round(),
            "live_events": i,
            "group_delivered": g.len(),
            "group_latency": percentiles(&g),
            "plain_delivered": p.len(),
            "plain_latency": percentiles(&p),
        });
        eprintln!("run {run}: {result}");
        runs.push(result);
    }
    let values = |key: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[key].as_f64()).collect() };
    let p = |which: &str, key: &str| -> Vec<f64> {
        runs.iter().filter_map(|r| r[which][key].as_f64()).collect()
    };
    let summary = json!({
        "scenario": "group",
        "workers": args.workers,
        "prefetch": args.prefetch,
        "events": args.events,
        "rate": args.rate,
        "median": {
            "drain_events_per_s": median(&values("drain_events_per_s")),
            "group_p50_ms": median(&p("group_latency", "p50_ms")),
            "group_p99_ms": median(&p("group_latency", "p99_ms")),
            "plain_p50_ms": median(&p("plain_latency", "p50_ms")),
            "plain_p99_ms": median(&p("plain_latency", "p99_ms")),
        },
        "runs": runs,
    });
    eprintln!("group: {}", summary["median"]);
    emit(&summary, args.out.as_deref())
}
