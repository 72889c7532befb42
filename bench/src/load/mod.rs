//! The load tool's shared parts: subscriber processes (a fleet of `bench worker`s), publishers
//! (HTTP to eventbus, or core NATS), tokens, and the merged report.

pub mod fanout;
pub mod group;
pub mod idle;
pub mod ingest;
pub mod worker;

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// Which server the subscribers talk to.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// eventbus: `GET /v1/ws`, events published over HTTP.
    Eventbus,
    /// A plain nats-server with its WebSocket listener, published to over core NATS.
    Nats,
    /// A Pusher-protocol server (Sockudo, Soketi): subscribers on `/app/{key}` (protocol 7),
    /// events published one per signed `POST /apps/{id}/events`.
    Pusher,
}

/// Where the servers are and how to get in.
#[derive(clap::Args, Debug, Clone)]
pub struct Server {
    #[arg(long, value_enum, default_value = "eventbus")]
    pub target: Target,
    /// eventbus base URL (ingest, auth and gateway in one: the all-in-one `serve`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Gateway base URL when it is not `--url` (several processes).
    #[arg(long)]
    pub gateway_url: Option<String>,
    /// API key for `POST /v1/tokens`; none in development mode.
    #[arg(long, env = "EVENTBUS_API_KEY")]
    pub api_key: Option<String>,
    /// NATS: where to publish (core NATS).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS: its WebSocket listener.
    #[arg(long, default_value = "ws://127.0.0.1:8443")]
    pub nats_ws_url: String,
    /// Pusher: the server's base URL (HTTP API and WebSocket).
    #[arg(long, default_value = "http://127.0.0.1:6001")]
    pub pusher_url: String,
    /// Pusher: the app's id, key and secret (as configured in the server).
    #[arg(long, default_value = "bench-app")]
    pub pusher_app_id: String,
    #[arg(long, default_value = "bench-key")]
    pub pusher_key: String,
    #[arg(long, default_value = "bench-secret")]
    pub pusher_secret: String,
    /// Subscriber processes (one process holds at most ~20,000 open files).
    #[arg(long, default_value_t = 2)]
    pub procs: usize,
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Tokens for a run: a service token to publish with, a client token for the subscribers.
pub struct Tokens {
    pub service: String,
    pub client: String,
}

pub async fn tokens(
    server: &Server,
    http: &reqwest::Client,
    channel: &str,
) -> anyhow::Result<Tokens> {
    async fn mint(
        server: &Server,
        http: &reqwest::Client,
        body: Value,
        bearer: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut request = http.post(format!("{}/v1/tokens", server.url)).json(&body);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request.send().await.context("POST /v1/tokens")?;
        let status = response.status();
        let body: Value = response.json().await?;
        match body["token"].as_str() {
            Some(token) if status.is_success() => Ok(token.to_owned()),
            _ => bail!("POST /v1/tokens answered {status}: {body}"),
        }
    }
    let service = mint(
        server,
        http,
        json!({"sub": "bench", "role": "service", "ttl_s": 86400}),
        server.api_key.as_deref(),
    )
    .await?;
    let client = mint(
        server,
        http,
        json!({"sub": "bench-client", "role": "client", "subscribe": [channel], "publish": [], "ttl_s": 86400}),
        Some(&service),
    )
    .await?;
    Ok(Tokens { service, client })
}

/// The subscriber processes of one scenario.
pub struct Fleet {
    workers: Vec<Worker>,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    received: u64,
    closed: u64,
}

/// Totals of a fleet's progress lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub received: u64,
    pub closed: u64,
}

impl Fleet {
    /// Starts `procs` workers sharing `connections` between them and waits until every
    /// connection is subscribed.
    pub async fn start(
        server: &Server,
        ws_url: &str,
        channel: &str,
        connections: usize,
        subscribe: bool,
    ) -> anyhow::Result<Fleet> {
        let exe = std::env::current_exe()?;
        let procs = server.procs.clamp(1, connections.max(1));
        let mut workers = Vec::new();
        for i in 0..procs {
            let share = connections / procs + usize::from(i < connections % procs);
            let mut child = tokio::process::Command::new(&exe)
                .args([
                    "worker",
                    "--target",
                    match server.target {
                        Target::Eventbus => "eventbus",
                        Target::Nats => "nats",
                        Target::Pusher => "pusher",
                    },
                    "--ws-url",
                    ws_url,
                    "--channel",
                    channel,
                    "--connections",
                    &share.to_string(),
                    "--subscribe",
                    &subscribe.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker process")?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let stdout = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
            workers.push(Worker {
                child,
                stdin,
                stdout,
                received: 0,
                closed: 0,
            });
        }
        let started = std::time::Instant::now();
        for worker in &mut workers {
            let line = tokio::time::timeout(Duration::from_secs(300), worker.next_line())
                .await
                .context("workers took over 300 s to connect")??;
            if !line.starts_with("ready ") {
                bail!("a worker said {line:?} instead of ready");
            }
        }
        eprintln!(
            "{connections} connections subscribed in {} processes ({:.1} s)",
            procs,
            started.elapsed().as_secs_f64()
        );
        Ok(Fleet { workers })
    }

    /// Reads progress lines until `until` holds of the totals, or no event arrived for `quiet`.
    pub async fn wait(
        &mut self,
        quiet: Duration,
        until: impl Fn(Progress) -> bool,
    ) -> anyhow::Result<Progress> {
        let mut last_change = std::time::Instant::now();
        let mut last = self.progress();
        loop {
            if until(last) {
                return Ok(last);
            }
            for worker in &mut self.workers {
                let line = worker.next_line().await?;
                if let Some(rest) = line.strip_prefix("progress ") {
                    let mut parts = rest.split(' ');
                    worker.received = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    worker.closed = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                }
            }
            let now = self.progress();
            if now.received != last.received || now.closed != last.closed {
                last_change = std::time::Instant::now();
            } else if last_change.elapsed() > quiet {
                return Ok(now);
            }
            last = now;
        }
    }

    pub fn progress(&self) -> Progress {
        self.workers
            .iter()
            .fold(Progress::default(), |p, w| Progress {
                received: p.received + w.received,
                closed: p.closed + w.closed,
            })
    }

    /// Collects and resets every worker's counts, merged.
    pub async fn report(&mut self) -> anyhow::Result<Merged> {
        for worker in &mut self.workers {
            worker.stdin.write_all(b"report\n").await?;
            worker.stdin.flush().await?;
        }
        let mut merged = Merged {
            report: worker::Report::default(),
            histogram: worker::new_histogram(),
        };
        for worker in &mut self.workers {
            let report = loop {
                let line = worker.next_line().await?;
                if let Some(json) = line.strip_prefix("report ") {
                    break serde_json::from_str::<worker::Report>(json)?;
                }
            };
            worker.received = 0;
            worker.closed = 0;
            merged.histogram.add(worker::decode(&report.histogram)?)?;
            let total = &mut merged.report;
            total.received += report.received;
            total.gaps += report.gaps;
            total.duplicates += report.duplicates;
            total.last_received_ns = total.last_received_ns.max(report.last_received_ns);
            for (code, n) in report.closed {
                match total.closed.iter_mut().find(|(c, _)| *c == code) {
                    Some((_, m)) => *m += n,
                    None => total.closed.push((code, n)),
                }
            }
        }
        Ok(merged)
    }

    /// Tells every connection, opened without subscribing, to subscribe now, and waits until all
    /// have: how long the storm took.
    pub async fn join_all(&mut self) -> anyhow::Result<Duration> {
        let started = std::time::Instant::now();
        for worker in &mut self.workers {
            worker.stdin.write_all(b"join\n").await?;
            worker.stdin.flush().await?;
        }
        for worker in &mut self.workers {
            loop {
                let line = tokio::time::timeout(Duration::from_secs(300), worker.next_line())
                    .await
                    .context("connections took over 300 s to subscribe")??;
                if line.starts_with("joined ") {
                    break;
                }
            }
        }
        Ok(started.elapsed())
    }

    pub async fn stop(mut self) {
        for worker in &mut self.workers {
            let _ = worker.stdin.shutdown().await;
            let _ = tokio::time::timeout(Duration::from_secs(10), worker.child.wait()).await;
        }
    }
}

impl Worker {
    async fn next_line(&mut self) -> anyhow::Result<String> {
        self.stdout
            .next_line()
            .await?
            .context("a worker process ended early (see its stderr)")
    }
}

pub struct Merged {
    pub report: worker::Report,
    pub histogram: Histogram<u64>,
}

/// p50/p90/p99/p99.9/max of a histogram of µs, in ms.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| (v as f64 / 1000.0 * 1000.0).round() / 1000.0;
    json!({
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p90_ms": ms(h.value_at_quantile(0.9)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

/// Reads a process's resident memory in bytes from /proc.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("bad VmRSS")?;
    Ok(kib * 1024)
}

/// Writes `value` to `path` when given, and prints it as one JSON line.
pub fn emit(value: &Value, out: Option<&std::path::Path>) -> anyhow::Result<()> {
    println!("{value}");
    if let Some(path) = out {
        std::fs::write(path, serde_json::to_vec_pretty(value)?)?;
    }
    Ok(())
}

pub fn ws_url(server: &Server, token: &str) -> String {
    match server.target {
        Target::Nats => server.nats_ws_url.clone(),
        Target::Pusher => format!(
            "{}/app/{}?protocol=7&client=bench&version=1.0",
            server.pusher_url.replacen("http", "ws", 1),
            server.pusher_key
        ),
        Target::Eventbus => {
            let base = server.gateway_url.as_deref().unwrap_or(&server.url);
            format!("{}/v1/ws?token={token}", base.replacen("http", "ws", 1))
        }
    }
}
