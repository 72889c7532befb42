//! The store: the durable, append-only event log of eventbus and the single writer of every
//! channel's `seq`. It answers an append only after the events are fsync'd, then publishes them to
//! the backbone in `seq` order. It serves gRPC (Append, Read, Head) and `/healthz`, `/readyz` on one
//! port. It knows nothing of tokens: its callers (ingest, gateway) authorise.
#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
pub mod groups;
pub mod log;
pub mod postgres;
mod service;

use std::sync::Arc;

use eventbus_router::Backbone;
use eventbus_runtime::Shutdown;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

pub use config::{Config, Settings};
pub use engine::Engine;
pub use log::{Log, LogError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("server error: {0}")]
    Serve(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// Runs the store on `listener` until `shutdown`; returns once in-flight appends are durable.
pub async fn run(
    config: Config,
    listener: TcpListener,
    backbone: Arc<dyn Backbone>,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let credential = config.internal.credential().map_err(Error::Config)?;
    let tls = config.tls.acceptor().map_err(Error::Config)?;
    // The engine: PostgreSQL when a URL is given, else the embedded log (kept apart as well,
    // so that it can be closed, and its writer joined, when everything else let go of it).
    let (engine, mut committed, embedded): (Arc<dyn Engine>, log::Committed, Option<Arc<Log>>) =
        match config.postgres_options() {
            Some(options) => {
                let (pg, committed) = postgres::Postgres::open(options).await?;
                (Arc::new(pg), committed, None)
            }
            None => {
                let options = config.log_options();
                let (log, committed) = tokio::task::spawn_blocking(move || Log::open(options))
                    .await
                    .map_err(|err| Error::Serve(std::io::Error::other(err)))??;
                let log = Arc::new(log);
                (log.clone(), committed, Some(log))
            }
        };
    // Durable groups: served here with the embedded log; on PostgreSQL by whichever replica
    // holds their leadership (groups::route).
    let (routes_tx, routes) =
        tokio::sync::watch::channel(groups::route::Route::Nobody("the store is starting"));
    let groups_task = match (&embedded, config.postgres_options()) {
        (None, Some(options)) => {
            let election = postgres::Election {
                database: postgres::Database::parse(&options.url, &options.trust)?,
                engine: engine.clone(),
                me: config.advertised(listener.local_addr()?),
                credential: credential.clone(),
                trust: config.trust.clone(),
                routes: routes_tx.clone(),
                shutdown: shutdown.clone(),
            };
            let mut decided = routes.clone();
            let task = tokio::spawn(election.run());
            // Serve once the first round is over (leading, or knowing the leader): a store that
            // answers its first group calls with 503 would only make callers retry.
            tokio::select! {
                _ = decided.changed() => {}
                _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {
                    tracing::warn!("no groups' leader after 10 s; serving, group calls wait for one");
                }
                _ = shutdown.wait() => {}
            }
            task
        }
        _ => {
            let saving = Arc::new(groups::saving::Files::new(config.data.join("groups")));
            let groups =
                Arc::new(groups::Groups::open(engine.clone(), saving, shutdown.clone()).await?);
            let _ = routes_tx.send(groups::route::Route::Here(groups.clone()));
            tokio::spawn(async move { groups.maintain().await })
        }
    };

    let tails = engine.tails().await?;
    let publisher_backbone = backbone.clone();
    // The route is replaced before the log closes: this task then holds no groups, and ends
    // once the log has.
    let publisher_groups = routes.clone();
    let publisher = tokio::spawn(async move {
        for event in &tails {
            publish(&*publisher_backbone, event).await;
        }
        while let Some(batch) = committed.recv().await {
            // Waiting group members first: they are in the same process.
            let here = match &*publisher_groups.borrow() {
                groups::route::Route::Here(groups) => Some(groups.clone()),
                _ => None,
            };
            if let Some(groups) = here {
                groups.committed(&batch);
            }
            for event in &batch {
                publish(&*publisher_backbone, event).await;
            }
        }
    });

    let retention_log = engine.clone();
    let retention_interval =
        std::time::Duration::from_secs(config.settings.retention_interval_s.max(1));
    let retention_shutdown = shutdown.clone();
    let retention = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(retention_interval);
        loop {
            tokio::select! {
                _ = retention_shutdown.wait() => return,
                _ = ticks.tick() => {}
            }
            let outcome = retention_log.enforce_retention(log::now_ms()).await;
            eventbus_runtime::metrics::metrics()
                .store_log_bytes
                .set(retention_log.log_bytes() as i64);
            if let Err(err) = outcome {
                warn!(cause = %err, "retention pass failed");
            }
        }
    });

    let (live_log, ready_log) = (engine.clone(), engine.clone());
    let (service, server) = service::server(engine.clone(), routes.clone());
    if let Some(in_process) = &config.in_process {
        in_process.open(service.clone());
    }
    drop(service);
    let grpc = tonic::service::Routes::new(server).into_axum_router();
    let app = eventbus_runtime::internal::require(grpc, credential).merge(
        eventbus_runtime::health_routes_with(
            move || live_log.is_healthy(),
            move || ready_log.is_ready(),
        ),
    );
    info!(addr = %listener.local_addr()?, scheme = config.tls.scheme(), engine = engine.name(), data = %config.data.display(), "store listening");
    // A write or fsync the log cannot continue from ends the process (non-zero), so that its
    // supervisor restarts it and recovery runs: serving on would only refuse every append.
    let failed_log = engine.clone();
    let failed = async move {
        while failed_log.is_healthy() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let stop = shutdown.clone();
    let app: axum::Router = app;
    eventbus_runtime::http::serve(listener, app, &config.http, tls, async move {
        tokio::select! {
            _ = stop.wait() => {}
            _ = failed => error!("the log failed; stopping the store so that it is restarted and recovers"),
        }
    })
    .await?;
    let failed = !engine.is_healthy();
    if failed {
        shutdown.trigger();
    }
    // Callers in this process are answered and let go of the log too (after the trigger above:
    // group members long-poll, and they end on shutdown).
    if let Some(in_process) = &config.in_process {
        in_process.close().await;
    }

    let _ = retention.await;
    let _ = groups_task.await;
    // Nothing serves groups any more; the route lets go of them (and so of the log).
    let _ = routes_tx.send(groups::route::Route::Nobody("the store is stopping"));
    drop((routes_tx, routes));
    drop(engine);
    if let Some(log) = embedded {
        match Arc::try_unwrap(log) {
            Ok(log) => tokio::task::spawn_blocking(move || log.close())
                .await
                .map_err(|err| Error::Serve(std::io::Error::other(err)))?,
            Err(_) => warn!("store stopped with requests still holding the log"),
        }
    }
    let _ = publisher.await;
    if failed {
        return Err(Error::Log(LogError::Failed));
    }
    info!("store stopped");
    Ok(())
}

async fn publish(backbone: &dyn Backbone, event: &eventbus_model::StoredEvent) {
    // The bus's own state (webhook secrets among it) never leaves the store but through its API.
    if eventbus_model::names::is_system(&event.channel) {
        return;
    }
    // At-most-once by design: a lost publish is repaired by the gateways from the log.
    if let Err(err) = backbone.publish(event).await {
        warn!(channel = %event.channel, seq = event.seq, cause = %err, "backbone publish failed");
    }
}
