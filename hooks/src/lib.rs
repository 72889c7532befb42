//! Webhooks as their own service: services register `{url, channels, secret}` at `/v1/webhooks`;
//! the hooks service POSTs each matching event to the URL as a signed CloudEvent, in seq order per
//! channel, at least once, within the grant of the token that registered it and only to
//! destinations the operator allows. It reads events from the store and checks tokens against
//! auth's keys, like ingest: it is on no other service's path. It is also the WebSub hub
//! (`/v1/websub`, see [`websub`]), whose subscriptions are delivered the same way.
#![forbid(unsafe_code)]

pub mod config;
pub mod destinations;
mod http;
pub mod state;
pub mod webhooks;
pub mod websub;

use std::sync::Arc;

use axum::routing::{get, post};
use eventbus_auth_client::{GrpcKeySource, Verifier};
use eventbus_runtime::Shutdown;
use eventbus_store_client::StoreClient;
use tokio::net::TcpListener;
use tracing::info;

pub use config::{Config, Settings};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("server error: {0}")]
    Serve(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// The webhook API's routes, for [`run`] and for the all-in-one listener; this replica delivers
/// while it holds the lease (see [`eventbus_store_client::lease`]).
pub async fn routes(config: &Config, shutdown: Shutdown) -> Result<axum::Router, Error> {
    let store = StoreClient::for_upstream(&config.upstream, config.store_in_process.as_ref())
        .map_err(|err| Error::Config(err.to_string()))?;
    let webhooks = webhooks::Webhooks::start(
        webhooks::Settings {
            max_attempts: config.settings.webhook_max_attempts.max(1),
            poll: std::time::Duration::from_millis(config.settings.webhook_poll_ms.max(10)),
            timeout: std::time::Duration::from_secs(10),
            guard: Arc::new(destinations::Guard {
                open: config.dev,
                allow: config.settings.destinations.allow_networks.clone(),
            }),
            trust: config.upstream.trust.clone(),
        },
        store,
        config
            .id
            .clone()
            .unwrap_or_else(eventbus_runtime::replica_id),
        Some(&config.webhooks_dir),
        shutdown,
    )
    .await
    .map_err(|err| Error::Config(err.to_string()))?;
    let hub = Arc::new(websub::Hub {
        webhooks: webhooks.clone(),
        public: config.websub.clone(),
        tls: config.tls.scheme() == "https",
        max_lease_s: config.settings.websub_max_lease_s.max(1),
        max_subscriptions: config.settings.websub_max_subscriptions,
        verifying: Arc::new(tokio::sync::Semaphore::new(websub::MAX_VERIFYING)),
    });
    let api = Arc::new(http::Api {
        webhooks,
        verifier: Verifier::new(
            GrpcKeySource::for_upstream(&config.upstream).map_err(Error::Config)?,
        ),
    });
    let origins = eventbus_runtime::cors::Origins::new(&config.cors, config.dev);
    Ok(axum::Router::new()
        .route(
            "/v1/webhooks",
            post(http::register_webhook).get(http::list_webhooks),
        )
        .route(
            "/v1/webhooks/{id}",
            get(http::get_webhook).delete(http::delete_webhook),
        )
        .route("/v1/webhooks/{id}/retry", post(http::retry_webhook))
        .with_state(api)
        .merge(
            axum::Router::new()
                .route("/v1/websub", post(websub::hub))
                .with_state(hub),
        )
        .layer(origins.layer()))
}

/// Runs the hooks service on `listener` until `shutdown`.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
    let app = routes(&config, shutdown.clone())
        .await?
        .merge(eventbus_runtime::health_routes(|| true));
    let tls = config.tls.acceptor().map_err(Error::Config)?;
    info!(addr = %listener.local_addr()?, scheme = config.tls.scheme(), "hooks listening");
    eventbus_runtime::http::serve(listener, app, &config.http, tls, shutdown.wait()).await?;
    info!("hooks stopped");
    Ok(())
}
