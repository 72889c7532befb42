//! The `store` scenario: the log engine itself, in-process, every append durable: the embedded
//! log on a real disk (fsync'd), or with `--postgres URL` the PostgreSQL engine (committed), a
//! fresh database per run on that server.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use eventbus_store::Engine;
use eventbus_store::log::{Entry, Log, Options};
use serde_json::json;

use crate::median;

#[derive(clap::Args)]
pub struct Args {
    /// Directory for the logs (a fresh subdirectory per run; removed afterwards).
    #[arg(long, default_value = "./bench-data")]
    dir: PathBuf,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Events per batched-append run.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events per batch.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent appenders of batches.
    #[arg(long, default_value_t = 16)]
    appenders: usize,
    /// Events per single-append run.
    #[arg(long, default_value_t = 200_000)]
    single_events: u64,
    /// Concurrent appenders of single events.
    #[arg(long, default_value_t = 256)]
    single_appenders: usize,
    /// Serialized size of each event body, in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Events in the log for the restart measurement (0 skips it).
    #[arg(long, default_value_t = 10_000_000)]
    restart_events: u64,
    /// Measure the PostgreSQL engine on the server of this URL (its user may create databases);
    /// the restart measurement is the embedded log's only.
    #[arg(long)]
    postgres: Option<String>,
    /// Distinct keys for the compacted-read measurement.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
}

fn body(size: usize, n: u64) -> Bytes {
    let head =
        json!({"id": format!("e{n}"), "type": "bench", "channel": "bench.c", "source": "bench",
        "time": "2026-11-25T12:00:00.000000Z", "specversion": "1.0", "data": ""})
        .to_string();
    let pad = size.saturating_sub(head.len());
    Bytes::from(head.replace(
        "\"data\":\"\"",
        &format!("\"data\":\"{}\"", "x".repeat(pad)),
    ))
}

/// One event. The store never parses bodies, so every event shares one body (a `Bytes` clone):
/// the load generator must not cost more than what it measures.
fn entry(channel: &str, template: &Bytes, n: u64, key: Option<String>) -> Entry {
    Entry {
        channel: channel.into(),
        id: format!("e{n}"),
        source: "bench".into(),
        key,
        deleted: false,
        body: template.clone(),
    }
}

/// An engine opened for one run: the embedded log in `dir`, or a fresh database named after
/// `dir` on the server of `postgres`.
async fn open(dir: &std::path::Path, postgres: Option<&str>) -> anyhow::Result<Opened> {
    let (engine, mut committed, log): (Arc<dyn Engine>, _, _) = match postgres {
        None => {
            let (log, committed) = Log::open(Options {
                segment_bytes: 128 * 1024 * 1024,
                ..Options::new(dir.to_owned())
            })?;
            let log = Arc::new(log);
            (log.clone(), committed, Some(log))
        }
        Some(url) => {
            let name = format!(
                "bench_{}",
                dir.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("run")
                    .replace('-', "_")
            );
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            // Two statements: several in one string are one transaction, which these refuse.
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
                .await?;
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await?;
            let mut config: tokio_postgres::Config = url.parse()?;
            config.dbname(&name);
            let url = format!(
                "postgres://{}@{}:{}/{name}",
                config.get_user().unwrap_or("postgres"),
                match config.get_hosts().first() {
                    Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
                    _ => "127.0.0.1".into(),
                },
                config.get_ports().first().copied().unwrap_or(5432)
            );
            let (pg, committed) = eventbus_store::postgres::Postgres::open(
                eventbus_store::postgres::Options::new(url),
            )
            .await?;
            (Arc::new(pg), committed, None)
        }
    };
    // Nothing publishes in this scenario: drain what the writer hands to the backbone.
    tokio::spawn(async move { while committed.recv().await.is_some() {} });
    Ok(Opened { engine, log })
}

struct Opened {
    engine: Arc<dyn Engine>,
    log: Option<Arc<Log>>,
}

fn close(opened: Opened) {
    let Opened { engine, log } = opened;
    drop(engine);
    if let Some(Ok(log)) = log.map(Arc::try_unwrap) {
        log.close();
    }
}

/// Appends `total` events from `appenders` tasks, `batch` at a time; returns events per second.
async fn append_rate(
    log: &Arc<dyn Engine>,
    channel: &'static str,
    total: u64,
    batch: usize,
    appenders: usize,
    size: usize,
    keys: u64,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let template = body(size, 0);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..appenders {
        let log = log.clone();
        let next = next.clone();
        let template = template.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(batch as u64, Ordering::Relaxed);
                if first >= total {
                    return anyhow::Ok(());
                }
                let last = (first + batch as u64).min(total);
                let entries = (first..last)
                    .map(|n| {
                        entry(
                            channel,
                            &template,
                            n,
                            (keys > 0).then(|| format!("k{}", n % keys)),
                        )
                    })
                    .collect();
                log.append(entries).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

struct Report {
    name: &'static str,
    unit: &'static str,
    runs: Vec<f64>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let mut reports = Vec::new();
    let fresh = |name: &str, run: usize| {
        args.dir
            .join(format!("{name}-{run}-{}", std::process::id()))
    };

    let mut batched = Report {
        name: "batched_append",
        unit: "events/s",
        runs: vec![],
    };
    let mut single = Report {
        name: "single_append",
        unit: "events/s",
        runs: vec![],
    };
    let mut replay = Report {
        name: "replay",
        unit: "events/s",
        runs: vec![],
    };
    let mut during_replay = Report {
        name: "batched_while_replaying",
        unit: "events/s",
        runs: vec![],
    };
    let mut compacted = Report {
        name: "compacted_read",
        unit: "ms",
        runs: vec![],
    };
    for run in 0..args.runs {
        let dir = fresh("batched", run);
        let opened = open(&dir, args.postgres.as_deref()).await?;
        let log = opened.engine.clone();
        batched.runs.push(
            append_rate(
                &log,
                "bench.c",
                args.events,
                args.batch,
                args.appenders,
                args.size,
                args.keys,
            )
            .await?,
        );

        // Replay of the channel just written, in pages of 1000, as a catching-up reader does.
        let started = Instant::now();
        let mut after = 0;
        loop {
            let page = log.read("bench.c", after, 1000, false).await?;
            match page.events.last() {
                Some(last) => after = last.seq,
                None => break,
            }
        }
        anyhow::ensure!(
            after == args.events,
            "replay read {after} of {} events",
            args.events
        );
        replay
            .runs
            .push(after as f64 / started.elapsed().as_secs_f64());

        let started = Instant::now();
        let mut after = 0;
        let mut kept = 0;
        loop {
            let page = log.read("bench.c", after, 1000, true).await?;
            match page.events.last() {
                Some(last) => after = last.seq,
                None => break,
            }
            kept += page.events.len();
        }
        anyhow::ensure!(
            kept as u64 == args.keys.min(args.events),
            "compacted read kept {kept}"
        );
        compacted
            .runs
            .push(started.elapsed().as_secs_f64() * 1000.0);

        // Appends to another channel while a reader replays this one from the start, over and
        // over: reads must not stall the writer.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (log, stop) = (log.clone(), stop.clone());
            tokio::spawn(async move {
                let mut read = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut after = 0;
                    while let Some(last) =
                        log.read("bench.c", after, 1000, false).await?.events.last()
                    {
                        after = last.seq;
                        read += 1000;
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
                anyhow::Ok(read)
            })
        };
        during_replay.runs.push(
            append_rate(
                &log,
                "bench.other",
                args.events / 2,
                args.batch,
                args.appenders,
                args.size,
                0,
            )
            .await?,
        );
        stop.store(true, Ordering::Relaxed);
        reader.await??;
        drop(log);
        close(opened);
        let _ = std::fs::remove_dir_all(&dir);

        let dir = fresh("single", run);
        let opened = open(&dir, args.postgres.as_deref()).await?;
        let log = opened.engine.clone();
        single.runs.push(
            append_rate(
                &log,
                "bench.c",
                args.single_events,
                1,
                args.single_appenders,
                args.size,
                0,
            )
            .await?,
        );
        drop(log);
        close(opened);
        let _ = std::fs::remove_dir_all(&dir);
    }
    reports.extend([batched, single, replay, compacted, during_replay]);

    if args.restart_events > 0 && args.postgres.is_none() {
        let dir = fresh("restart", 0);
        let opened = open(&dir, None).await?;
        append_rate(
            &opened.engine,
            "bench.c",
            args.restart_events,
            1000,
            4,
            args.size,
            0,
        )
        .await?;
        close(opened);
        let mut restart = Report {
            name: "restart_to_ready",
            unit: "ms",
            runs: vec![],
        };
        for _ in 0..args.runs {
            let started = Instant::now();
            let opened = open(&dir, None).await?;
            restart.runs.push(started.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(
                opened.engine.bounds("bench.c").await?.1 == args.restart_events,
                "restart lost events"
            );
            close(opened);
        }
        std::fs::remove_dir_all(&dir)?;
        reports.push(restart);
    }

    let mut json_runs = serde_json::Map::new();
    for report in &reports {
        let median = median(&report.runs);
        println!(
            "{:<18} median {:>14.1} {:<9} runs {:?}",
            report.name,
            median,
            report.unit,
            report.runs.iter().map(|r| r.round()).collect::<Vec<_>>()
        );
        json_runs.insert(
            report.name.into(),
            json!({"unit": report.unit, "median": median, "runs": report.runs}),
        );
    }
    println!(
        "{}",
        json!({"scenario": "store", "engine": if args.postgres.is_some() { "postgres" } else { "embedded" }, "events": args.events, "batch": args.batch, "appenders": args.appenders,
               "single_events": args.single_events, "single_appenders": args.single_appenders, "size": args.size,
               "restart_events": args.restart_events, "results": json_runs})
    );
    Ok(())
}
