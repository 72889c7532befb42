//! `fanout` and `latency`: many subscribers on one channel, events published at a set rate; every
//! delivery checked for order and timed publish → deliver (the send time travels in the event).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::{Fleet, Server, Target, emit, now_ns, percentiles, tokens, ws_url};
use crate::median;

#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub server: Server,
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Events published per second (each reaches every subscriber).
    #[arg(long, default_value_t = 60)]
    pub rate: u64,
    /// Events per publish request (eventbus) / per flush (NATS).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Bytes of padding in each event's data.
    #[arg(long, default_value_t = 64)]
    pub pad: usize,
    #[arg(long, default_value = "bench.fanout")]
    pub channel: String,
    /// Also write the JSON result here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub server: Server,
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value_t = 64)]
    pub pad: usize,
    #[arg(long, default_value = "bench.latency")]
    pub channel: String,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl From<LatencyArgs> for FanoutArgs {
    fn from(a: LatencyArgs) -> Self {
        FanoutArgs {
            server: a.server,
            subscribers: a.subscribers,
            rate: a.rate,
            batch: 1,
            seconds: a.seconds,
            runs: a.runs,
            pad: a.pad,
            channel: a.channel,
            out: a.out,
        }
    }
}

/// Publishes events at a rate; knows how many were accepted.
enum Publisher {
    Http {
        http: reqwest::Client,
        url: String,
        token: String,
    },
    Nats {
        client: async_nats::Client,
        counter: AtomicU64,
    },
    Pusher {
        http: reqwest::Client,
        base: String,
        app_id: String,
        key: String,
        secret: String,
        counter: AtomicU64,
    },
}

struct Published {
    events: u64,
    errors: u64,
    first_ns: u64,
    elapsed: Duration,
}

impl Publisher {
    fn event(channel: &str, pad: &str) -> Value {
        json!({"channel": channel, "type": "bench.tick", "data": {"t": now_ns(), "pad": pad}})
    }

    /// A NATS message as large as the eventbus frame of the same event, so both carry equal bytes.
    fn nats_payload(&self, n: u64, channel: &str, pad: &str) -> Vec<u8> {
        json!({"op": "event", "event": {"n": n, "id": "0193a4c2-7b1e-7d3a-9f00-5c1e2d3f4a5b",
            "channel": channel, "type": "bench.tick", "time": "2026-11-25T15:00:00.000Z",
            "data": {"t": now_ns(), "pad": pad}}})
        .to_string()
        .into_bytes()
    }

    async fn send(&self, channel: &str, batch: usize, pad: &str) -> anyhow::Result<u64> {
        match self {
            Publisher::Pusher {
                http,
                base,
                app_id,
                key,
                secret,
                counter,
            } => {
                for _ in 0..batch {
                    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                    // `data` is a string (Pusher apps send JSON text there): the same event as the
                    // NATS payload, so each frame carries about the bytes of the eventbus one.
                    let data = String::from_utf8(self.nats_payload(n, channel, pad))?;
                    let body = json!({"name": "bench.tick", "channels": [channel], "data": data})
                        .to_string();
                    let path = format!("/apps/{app_id}/events");
                    let query = pusher_query(&path, key, secret, &body, now_ns() / 1_000_000_000);
                    let url = format!("{base}{path}?{query}");
                    let response = http
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await?;
                    let status = response.status();
                    if !status.is_success() {
                        anyhow::bail!("pusher answered {status}: {}", response.text().await?);
                    }
                }
                Ok(batch as u64)
            }
            Publisher::Http { http, url, token } => {
                let body = if batch == 1 {
                    Self::event(channel, pad)
                } else {
                    Value::Array((0..batch).map(|_| Self::event(channel, pad)).collect())
                };
                let response = http.post(url).bearer_auth(token).json(&body).send().await?;
                let status = response.status();
                if !status.is_success() {
                    anyhow::bail!("publish answered {status}: {}", response.text().await?);
                }
                Ok(batch as u64)
            }
            Publisher::Nats { client, counter } => {
                for _ in 0..batch {
                    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                    client
                        .publish(
                            channel.to_owned(),
                            self.nats_payload(n, channel, pad).into(),
                        )
                        .await?;
                }
                client.flush().await?;
                Ok(batch as u64)
            }
        }
    }

    async fn run(
        self: &Arc<Self>,
        channel: &str,
        rate: u64,
        batch: usize,
        seconds: u64,
        pad: &str,
    ) -> Published {
        let ticks = (rate * seconds).div_ceil(batch as u64);
        let period = Duration::from_secs_f64(batch as f64 / rate.max(1) as f64);
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        // NATS publishes through one connection in order (the subscribers check that order);
        // HTTP requests overlap, like many publishing services.
        let in_flight = Arc::new(Semaphore::new(match **self {
            Publisher::Http { .. } => 256,
            // In order, as the subscribers check: one request at a time.
            Publisher::Nats { .. } | Publisher::Pusher { .. } => 1,
        }));
        let events = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let first_ns = now_ns();
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..ticks {
            interval.tick().await;
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let (me, channel, pad) = (self.clone(), channel.to_owned(), pad.to_owned());
            let (events, errors) = (events.clone(), errors.clone());
            tasks.spawn(async move {
                match me.send(&channel, batch, &pad).await {
                    Ok(n) => {
                        events.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(err) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("publish failed: {err:#}");
                        }
                    }
                }
                drop(permit);
            });
        }
        while tasks.join_next().await.is_some() {}
        Published {
            events: events.load(Ordering::Relaxed),
            errors: errors.load(Ordering::Relaxed),
            first_ns,
            elapsed: started.elapsed(),
        }
    }
}

pub async fn run(args: FanoutArgs, scenario: &str) -> anyhow::Result<()> {
    let server = &args.server;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let (publisher, ws) = match server.target {
        Target::Eventbus => {
            let tokens = tokens(server, &http, &args.channel).await?;
            let ws = ws_url(server, &tokens.client);
            (
                Publisher::Http {
                    http: http.clone(),
                    url: format!("{}/v1/events", server.url),
                    token: tokens.service,
                },
                ws,
            )
        }
        Target::Pusher => (
            Publisher::Pusher {
                http: http.clone(),
                base: server.pusher_url.clone(),
                app_id: server.pusher_app_id.clone(),
                key: server.pusher_key.clone(),
                secret: server.pusher_secret.clone(),
                counter: AtomicU64::new(0),
            },
            ws_url(server, ""),
        ),
        Target::Nats => (
            Publisher::Nats {
                client: async_nats::connect(&server.nats_url)
                    .await
                    .context("connecting to NATS")?,
                counter: AtomicU64::new(0),
            },
            ws_url(server, ""),
        ),
    };
    let publisher = Arc::new(publisher);
    let mut fleet = Fleet::start(server, &ws, &args.channel, args.subscribers, true).await?;
    let pad = "x".repeat(args.pad);
    let subscribers = args.subscribers as u64;
    let mut runs = Vec::new();
    let mut all = super::worker::new_histogram();
    for run in 1..=args.runs.max(1) {
        let published = publisher
            .run(&args.channel, args.rate, args.batch, args.seconds, &pad)
            .await;
        let expected = published.events * subscribers;
        fleet
            .wait(Duration::from_secs(5), |p| p.received >= expected)
            .await?;
        let merged = fleet.report().await?;
        let r = &merged.report;
        all.add(&merged.histogram)?;
        let span_s = (r.last_received_ns.saturating_sub(published.first_ns)) as f64 / 1e9;
        let result = json!({
            "run": run,
            "published": published.events,
            "publish_errors": published.errors,
            "publish_s": published.elapsed.as_secs_f64(),
            "offered_deliveries_per_s": (expected as f64 / published.elapsed.as_secs_f64()).round(),
            "expected": expected,
            "received": r.received,
            "missing": expected.saturating_sub(r.received),
            "gaps": r.gaps,
            "duplicates": r.duplicates,
            "closed": r.closed,
            "deliveries_per_s": if span_s > 0.0 { (r.received as f64 / span_s).round() } else { 0.0 },
            "latency": percentiles(&merged.histogram),
        });
        eprintln!(
            "run {run}: {} events × {} subscribers: received {}/{} ({} missing, {} gaps, {} dup, closed {:?}), {:.0} deliveries/s, latency {}",
            published.events,
            subscribers,
            r.received,
            expected,
            expected.saturating_sub(r.received),
            r.gaps,
            r.duplicates,
            r.closed,
            result["deliveries_per_s"].as_f64().unwrap_or(0.0),
            result["latency"]
        );
        runs.push(result);
        if r.closed.iter().map(|(_, n)| n).sum::<u64>() >= subscribers {
            eprintln!("every subscriber was closed; stopping");
            break;
        }
    }
    fleet.stop().await;
    let pick = |key: &str, sub: Option<&str>| -> f64 {
        let values: Vec<f64> = runs
            .iter()
            .filter_map(|r| match sub {
                Some(s) => r[key][s].as_f64(),
                None => r[key].as_f64(),
            })
            .collect();
        median(&values)
    };
    let summary = json!({
        "scenario": scenario,
        "target": format!("{:?}", server.target).to_lowercase(),
        "subscribers": args.subscribers,
        "rate": args.rate,
        "batch": args.batch,
        "seconds": args.seconds,
        "procs": server.procs,
        "median": {
            "deliveries_per_s": pick("deliveries_per_s", None),
            "p50_ms": pick("latency", Some("p50_ms")),
            "p99_ms": pick("latency", Some("p99_ms")),
            "missing": pick("missing", None),
        },
        "all_runs_latency": percentiles(&all),
        "runs": runs,
    });
    eprintln!(
        "{scenario} {:?}: median {} deliveries/s, p50 {} ms, p99 {} ms, missing {}",
        server.target,
        summary["median"]["deliveries_per_s"],
        summary["median"]["p50_ms"],
        summary["median"]["p99_ms"],
        summary["median"]["missing"]
    );
    emit(&summary, args.out.as_deref())
}

/// The signed query string of a Pusher HTTP API request (auth version 1.0) made at `timestamp`
/// (unix s): `body_md5`, then an HMAC-SHA256 over the method, the path and the sorted parameters,
/// keyed with the app secret.
fn pusher_query(path: &str, key: &str, secret: &str, body: &str, timestamp: u64) -> String {
    use hmac::{Hmac, Mac};
    use md5::Digest;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let query = format!(
        "auth_key={key}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={}",
        hex(&md5::Md5::digest(body.as_bytes()))
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    format!(
        "{query}&auth_signature={}",
        hex(&mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::pusher_query;

    #[test]
    fn pusher_requests_are_signed_as_in_the_protocol_example() {
        // The example of Pusher's HTTP API reference (app 3, key 278d425bdf160c739803, secret
        // 7ad3773142a6692b25b8).
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(
            pusher_query(
                "/apps/3/events",
                "278d425bdf160c739803",
                "7ad3773142a6692b25b8",
                body,
                1353088179
            ),
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }
}
