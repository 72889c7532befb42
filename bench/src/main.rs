//! `bench`: the eventbus load tool, run by hand (never in CI). Each scenario prints a human summary
//! and one JSON line, with every run and the median, so figures can be pasted into
//! docs/benchmarks.md together with the exact command.

mod jetstream;
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Store(args) => store::run(args).await,
        Scenario::Jetstream(args) => jetstream::run(args).await,
        Scenario::StoreGrpc(args) => store_grpc::run(args).await,
    }
}
