//! The `jetstream` scenario: the same durable appends against NATS JetStream, for comparison. Start
//! a nats-server with JetStream on file storage and `sync_interval: always` (fsync before every
//! ack, the store's own promise), then point this at it; see docs/benchmarks.md for the config.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use serde_json::json;

use crate::median;

#[derive(clap::Args)]
pub struct Args {
    /// NATS server with JetStream enabled.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Events per run.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Publishes waiting for their ack at once (JetStream has no batch append).
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Size of each message, in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = async_nats::connect(&args.nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let payload = Bytes::from("x".repeat(args.size));
    let mut rates = Vec::new();
    for _ in 0..args.runs {
        let _ = js.delete_stream("BENCH").await;
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.in_flight {
            let js = js.clone();
            let next = next.clone();
            let payload = payload.clone();
            let total = args.events;
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    // The second await is the ack: JetStream has stored (and, configured so, synced) it.
                    js.publish("bench.c", payload.clone()).await?.await?;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        rates.push(args.events as f64 / started.elapsed().as_secs_f64());
    }
    let _ = js.delete_stream("BENCH").await;
    let median = median(&rates);
    println!(
        "jetstream_publish  median {median:>14.1} events/s  runs {:?}",
        rates.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    println!(
        "{}",
        json!({"scenario": "jetstream", "events": args.events, "in_flight": args.in_flight, "size": args.size,
               "results": {"jetstream_publish": {"unit": "events/s", "median": median, "runs": rates}}})
    );
    Ok(())
}
