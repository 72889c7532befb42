//! The ingest service: the HTTP API where services and clients publish events (`POST /v1/events`)
//! and read a channel's history (`GET /v1/channels/{channel}/events`), and where workers without a
//! socket take events of durable queue groups (`/v1/groups`). It validates and authorises
//! each request, asks the store to append, and answers 200 only once the store says the events are
//! durable. It owns no state, so any number run side by side.
#![forbid(unsafe_code)]

mod binary_mode;
pub mod config;
mod groups;
mod history;
mod publish;
mod snapshots;

/// The decoders of what publishers send, for the fuzz tests (`fuzz/`). Not an API.
#[doc(hidden)]
pub mod decoders {
    /// A CloudEvents binary-mode request (`ce-*` headers and a body), through to the event model
    /// as a publish takes it: whether it was accepted.
    pub fn binary_mode(
        headers: &axum::http::HeaderMap,
        content_type: Option<&str>,
        body: &[u8],
    ) -> bool {
        crate::binary_mode::to_structured(headers, content_type, body).is_ok_and(|json| {
            eventbus_model::parse_event(&json, "fuzz", &eventbus_model::Limits::default()).is_ok()
        })
    }
}

use std::sync::Arc;

use axum::routing::{get, post};
use eventbus_auth_client::{GrpcKeySource, Verified, Verifier};
use eventbus_model::Limits;
use eventbus_runtime::Shutdown;
use eventbus_runtime::problem::{Kind, Problem, bearer};
use eventbus_store_client::StoreClient;
use tokio::net::TcpListener;
use tracing::info;

pub use config::{Config, Settings};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("server error: {0}")]
    Serve(#[from] std::io::Error),
}

pub(crate) struct Ingest {
    verifier: Verifier,
    /// The application's hooks (subscribe and publish decide for clients on their channels).
    app: Option<Arc<eventbus_auth_client::app_hooks::AppHooks>>,
    store: StoreClient,
    limits: Limits,
    max_batch_events: usize,
    max_body_bytes: usize,
    rate: eventbus_runtime::rate::PublishRate,
    /// Channels public to WebSub, whose history advertises the hub.
    websub: eventbus_runtime::websub::Args,
    /// Whether the listener speaks TLS (for the URLs derived from `Host`).
    tls: bool,
}

impl Ingest {
    async fn authenticate(&self, headers: &axum::http::HeaderMap) -> Result<Verified, Problem> {
        let token = bearer(headers).ok_or_else(|| {
            Problem::new(Kind::Unauthorized, "send a token as Authorization: Bearer")
        })?;
        self.verifier.verify(token).await.map_err(Problem::from)
    }
}

/// The public routes of ingest, for [`run`] and for the all-in-one listener.
pub fn routes(config: &Config) -> Result<axum::Router, Error> {
    let ingest = Arc::new(Ingest {
        verifier: Verifier::new(
            GrpcKeySource::for_upstream(&config.upstream).map_err(Error::Config)?,
        ),
        app: eventbus_auth_client::app_hooks::AppHooks::new(
            &config.app_hooks,
            &config.upstream.trust,
        )
        .map_err(Error::Config)?,
        store: StoreClient::for_upstream(&config.upstream, config.store_in_process.as_ref())
            .map_err(|err| Error::Config(err.to_string()))?,
        limits: config.events.model(),
        max_batch_events: config.settings.max_batch_events,
        max_body_bytes: config.settings.max_body_bytes,
        rate: eventbus_runtime::rate::PublishRate::new(&config.publish_rate),
        websub: config.websub.clone(),
        tls: config.tls.scheme() == "https",
    });
    let origins = eventbus_runtime::cors::Origins::new(&config.cors, config.dev);
    Ok(axum::Router::new()
        .route("/v1/events", post(publish::publish))
        .route("/v1/channels/{channel}/events", get(history::history))
        .route("/v1/channels", get(history::channels))
        .route(
            "/v1/channels/{channel}/snapshot",
            get(snapshots::get).put(snapshots::put),
        )
        .route("/v1/groups", get(groups::list))
        .route(
            "/v1/groups/{group}",
            get(groups::get).delete(groups::delete),
        )
        .route("/v1/groups/{group}/fetch", post(groups::fetch))
        .route("/v1/groups/{group}/done", post(groups::done))
        .route("/v1/groups/{group}/reset", post(groups::reset))
        .with_state(ingest)
        .layer(origins.layer()))
}

/// Runs ingest on `listener` until `shutdown`.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
    // Ready while the store answers: without it no publish can be made durable.
    let store = StoreClient::for_upstream(&config.upstream, config.store_in_process.as_ref())
        .map_err(|err| Error::Config(err.to_string()))?;
    let store_up = eventbus_runtime::probe(std::time::Duration::from_secs(2), move || {
        let store = store.clone();
        async move { store.head("readyz").await.is_ok() }
    });
    let app = routes(&config)?
        .merge(eventbus_runtime::health_routes(move || {
            store_up.load(std::sync::atomic::Ordering::Relaxed)
        }))
        .fallback(|| async { Problem::new(Kind::NotFound, "no such route") });
    let tls = config.tls.acceptor().map_err(Error::Config)?;
    info!(addr = %listener.local_addr()?, scheme = config.tls.scheme(), store = %config.upstream.store_url, "ingest listening");
    eventbus_runtime::http::serve(listener, app, &config.http, tls, shutdown.wait()).await?;
    info!("ingest stopped");
    Ok(())
}
