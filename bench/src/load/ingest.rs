//! `ingest`: how many events per second `POST /v1/events` makes durable, from many concurrent
//! publishers, and how long each request takes (the 200 comes after the fsync).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Server, emit, now_ns, percentiles, tokens};
use crate::median;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub server: Server,
    /// Concurrent publishers (each one request at a time).
    #[arg(long, default_value_t = 64)]
    pub publishers: usize,
    /// Events per request (1: single-event requests; more: a JSON array).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Distinct channels the events are spread over.
    #[arg(long, default_value_t = 16)]
    pub channels: usize,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value_t = 64)]
    pub pad: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(args.publishers)
        .build()?;
    let token = Arc::new(tokens(&args.server, &http, "bench.ingest").await?.service);
    let url = Arc::new(format!("{}/v1/events", args.server.url));
    let pad = Arc::new("x".repeat(args.pad));
    let mut runs = Vec::new();
    for run in 1..=args.runs.max(1) {
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for p in 0..args.publishers {
            let (http, url, token, pad) = (http.clone(), url.clone(), token.clone(), pad.clone());
            let (batch, channels) = (args.batch, args.channels.max(1));
            tasks.spawn(async move {
                let mut h = super::worker::new_histogram();
                let (mut events, mut errors) = (0u64, 0u64);
                let channel = format!("bench.ingest.{}", p % channels);
                while Instant::now() < deadline {
                    let event = || json!({"channel": channel, "type": "bench.ingest", "data": {"t": now_ns(), "pad": *pad}});
                    let body = if batch == 1 {
                        event()
                    } else {
                        Value::Array((0..batch).map(|_| event()).collect())
                    };
                    let sent = Instant::now();
                    match http.post(url.as_str()).bearer_auth(token.as_str()).json(&body).send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            events += batch as u64;
                            h.saturating_record((sent.elapsed().as_micros() as u64).max(1));
                        }
                        Ok(r) => {
                            if errors == 0 {
                                eprintln!("publish answered {}", r.status());
                            }
                            errors += 1;
                        }
                        Err(err) => {
                            if errors == 0 {
                                eprintln!("publish failed: {err}");
                            }
                            errors += 1;
                        }
                    }
                }
                (events, errors, h)
            });
        }
        let (mut events, mut errors, mut h) = (0, 0, super::worker::new_histogram());
        while let Some(done) = tasks.join_next().await {
            let (e, x, hist) = done?;
            events += e;
            errors += x;
            h.add(hist)?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let result = json!({
            "run": run,
            "events": events,
            "errors": errors,
            "events_per_s": (events as f64 / elapsed).round(),
            "requests_per_s": (h.len() as f64 / elapsed).round(),
            "request_latency": percentiles(&h),
        });
        eprintln!("run {run}: {result}");
        runs.push(result);
    }
    let values = |key: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[key].as_f64()).collect() };
    let p = |key: &str| -> Vec<f64> {
        runs.iter()
            .filter_map(|r| r["request_latency"][key].as_f64())
            .collect()
    };
    let summary = json!({
        "scenario": "ingest",
        "publishers": args.publishers,
        "batch": args.batch,
        "channels": args.channels,
        "seconds": args.seconds,
        "median": {
            "events_per_s": median(&values("events_per_s")),
            "p50_ms": median(&p("p50_ms")),
            "p99_ms": median(&p("p99_ms")),
        },
        "runs": runs,
    });
    eprintln!("ingest: {}", summary["median"]);
    emit(&summary, args.out.as_deref())
}
