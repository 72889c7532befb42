//! `idle`: what an authenticated connection that does nothing costs the gateway, in resident
//! memory, read from /proc before and after opening the connections.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use super::{Fleet, Server, Target, emit, rss_bytes, tokens, ws_url};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub server: Server,
    #[arg(long, default_value_t = 15_000)]
    pub connections: usize,
    /// The process id of the gateway (or the all-in-one server, or nats-server).
    #[arg(long)]
    pub server_pid: u32,
    /// Subscribe each connection to one shared channel (off: authenticated only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub subscribe: bool,
    /// Open and authenticate every connection first, then have all subscribe at once and time
    /// that alone (eventbus only): the subscribe storm.
    #[arg(long)]
    pub storm: bool,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Samples RSS until two samples a second apart differ by under 0.5%.
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    let mut last = rss_bytes(pid)?;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss_bytes(pid)?;
        if now.abs_diff(last) * 200 < last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let channel = "bench.idle";
    let ws = match args.server.target {
        Target::Eventbus => ws_url(
            &args.server,
            &tokens(&args.server, &http, channel).await?.client,
        ),
        Target::Nats | Target::Pusher => ws_url(&args.server, ""),
    };
    // Warm up: the first connections pay for buffers and tables every later one shares.
    let warm = Fleet::start(
        &args.server,
        &ws,
        channel,
        100.min(args.connections),
        args.subscribe,
    )
    .await?;
    let before = settled_rss(args.server_pid)
        .await
        .context("reading the server's memory")?;
    let storm = args.storm && args.subscribe && args.server.target == Target::Eventbus;
    let mut fleet = Fleet::start(
        &args.server,
        &ws,
        channel,
        args.connections,
        args.subscribe && !storm,
    )
    .await?;
    let storm_s = if storm {
        let took = fleet.join_all().await?;
        eprintln!(
            "storm: {} connections subscribed to {channel} at once in {:.2} s",
            args.connections,
            took.as_secs_f64()
        );
        Some(took.as_secs_f64())
    } else {
        None
    };
    let after = settled_rss(args.server_pid).await?;
    let per_connection = after.saturating_sub(before) as f64 / args.connections as f64;
    fleet.stop().await;
    warm.stop().await;
    let summary = json!({
        "scenario": "idle",
        "target": format!("{:?}", args.server.target).to_lowercase(),
        "connections": args.connections,
        "subscribed": args.subscribe,
        "storm_s": storm_s,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_connection": per_connection.round(),
    });
    eprintln!(
        "idle: {} connections: {:.0} MiB → {:.0} MiB, {:.0} bytes ({:.2} KiB) per connection",
        args.connections,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        per_connection,
        per_connection / 1024.0
    );
    emit(&summary, args.out.as_deref())
}
