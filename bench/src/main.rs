//! `bench`: the eventbus load tool, run by hand (never in CI). Each scenario prints a human summary
//! and one JSON line, with every run and the median, so figures can be pasted into
//! docs/benchmarks.md together with the exact command.

mod jetstream;
mod load;
mod store;
mod store_grpc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Benchmarks of eventbus (run by hand, on a quiet machine)"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// The log engine: durable batched and single appends, replay, compacted read, restart.
    Store(store::Args),
    /// Durable appends through the store's gRPC API, as ingest makes them.
    StoreGrpc(store_grpc::Args),
    /// The same durable appends against NATS JetStream (file storage, sync always), for comparison.
    Jetstream(jetstream::Args),
    /// Many WebSocket subscribers on one channel, events published at a set rate: deliveries/s,
    /// loss and publish → deliver latency (`--target nats` runs the same against nats-server).
    Fanout(load::fanout::FanoutArgs),
    /// Light load latency: by default 100 subscribers × 100 events/s, one event per request.
    Latency(load::fanout::LatencyArgs),
    /// Durable publishes over HTTP from many concurrent publishers.
    Ingest(load::ingest::Args),
    /// A durable queue group of WebSocket workers saying done as they go: drain events/s, and
    /// publish → delivery latency next to a plain subscription.
    Group(load::group::Args),
    /// Gateway memory per idle authenticated connection.
    Idle(load::idle::Args),
    /// A subscriber process (started by the scenarios above, not by hand).
    #[command(hide = true)]
    Worker(load::worker::Args),
}

/// The median of some measurements (the mean of the two middle ones for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A worker is one of several client processes sharing two cores with the server: one thread.
    let runtime = match cli.scenario {
        Scenario::Worker(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        _ => tokio::runtime::Runtime::new()?,
    };
    runtime.block_on(scenario(cli.scenario))
}

async fn scenario(scenario: Scenario) -> anyhow::Result<()> {
    match scenario {
        Scenario::Fanout(args) => load::fanout::run(args, "fanout").await,
        Scenario::Latency(args) => load::fanout::run(args.into(), "latency").await,
        Scenario::Ingest(args) => load::ingest::run(args).await,
        Scenario::Group(args) => load::group::run(args).await,
        Scenario::Idle(args) => load::idle::run(args).await,
        Scenario::Worker(args) => load::worker::run(args).await,
        Scenario::Store(args) => store::run(args).await,
        Scenario::Jetstream(args) => jetstream::run(args).await,
        Scenario::StoreGrpc(args) => store_grpc::run(args).await,
    }
}
