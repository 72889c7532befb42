//! The `store-grpc` scenario: durable appends through the store's gRPC API, as ingest makes them
//! (the store in-process on a loopback port, a real tonic client), for a like-for-like comparison
//! with a networked server such as JetStream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use eventbus_model::{Accepted, Limits, parse_event};
use eventbus_router::InProcessBackbone;
use eventbus_runtime::Shutdown;
use eventbus_store::Config;
use eventbus_store_client::StoreClient;
use serde_json::json;

use crate::median;

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the log (a fresh subdirectory per run; removed afterwards).
    #[arg(long, default_value = "./bench-data")]
    dir: std::path::PathBuf,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Events per run.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Events per Append call (1: single-event appends).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 16)]
    callers: usize,
    /// Serialized size of each event, in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
}

fn event(n: u64, size: usize) -> anyhow::Result<Accepted> {
    let pad = "x".repeat(size.saturating_sub(150));
    let json = json!({"id": format!("e{n}"), "type": "bench", "channel": "bench.c", "data": pad})
        .to_string();
    Ok(parse_event(json.as_bytes(), "bench", &Limits::default())?)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let mut rates = Vec::new();
    for run in 0..args.runs {
        let dir = args.dir.join(format!("grpc-{run}-{}", std::process::id()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shutdown = Shutdown::new();
        let secret = eventbus_runtime::internal::Credential::random_secret();
        let mut config = Config::with_data(dir.clone());
        config.internal.token = Some(secret.clone());
        let server = tokio::spawn(eventbus_store::run(
            config,
            listener,
            Arc::new(InProcessBackbone::new()),
            shutdown.clone(),
        ));
        let credential =
            eventbus_runtime::internal::Credential::new(&secret).map_err(anyhow::Error::msg)?;
        let client = StoreClient::new(&url, credential, &Default::default())?;
        client.head("bench.c").await?;
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.callers {
            let (client, next) = (client.clone(), next.clone());
            let (batch, total, size) = (args.batch as u64, args.events, args.size);
            tasks.push(tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(batch, Ordering::Relaxed);
                    if first >= total {
                        return anyhow::Ok(());
                    }
                    let events = (first..(first + batch).min(total))
                        .map(|n| event(n, size))
                        .collect::<anyhow::Result<_>>()?;
                    client.append(events).await?;
                }
            }));
        }
        for task in tasks {
            task.await??;
        }
        rates.push(args.events as f64 / started.elapsed().as_secs_f64());
        shutdown.trigger();
        server.await??;
        std::fs::remove_dir_all(&dir)?;
    }
    let median = median(&rates);
    println!(
        "store_grpc_append  median {median:>14.1} events/s  runs {:?}",
        rates.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    println!(
        "{}",
        json!({"scenario": "store-grpc", "events": args.events, "batch": args.batch, "callers": args.callers, "size": args.size,
               "results": {"store_grpc_append": {"unit": "events/s", "median": median, "runs": rates}}})
    );
    Ok(())
}
