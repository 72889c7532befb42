//! The identity service of eventbus: it issues JWTs (service tokens for API keys, client tokens
//! minted by services), signs them with Ed25519 keys that it publishes as a JWKS, and serves that key
//! set over HTTP and gRPC. Tokens are checked where they are used, by `eventbus-auth-client`'s
//! verifier; auth also answers who is present where, from the gateways' reports on the backbone
//! ([`presence`]). Every replica holds the same keys and the same registry, so any number may run.
#![forbid(unsafe_code)]

use eventbus_auth_client::claims;
pub mod config;
mod http;
pub mod keys;
pub mod presence;
use eventbus_auth_client::verifier::{StaticKeys, Verifier};
use eventbus_auth_client::{Verified, verifier};

use std::sync::Arc;

use axum::routing::{get, post};
use eventbus_proto::auth as pb;
use eventbus_runtime::Shutdown;
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use config::Config;
pub use keys::KeyRing;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("server error: {0}")]
    Serve(#[from] std::io::Error),
}

struct AuthService {
    ring: Arc<KeyRing>,
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    async fn get_keys(
        &self,
        _: tonic::Request<pb::GetKeysRequest>,
    ) -> Result<tonic::Response<pb::GetKeysResponse>, tonic::Status> {
        let jwks_json = serde_json::to_string(&self.ring.jwks())
            .map_err(|err| tonic::Status::internal(err.to_string()))?;
        Ok(tonic::Response::new(pb::GetKeysResponse { jwks_json }))
    }
}

/// The routes of the auth service: `public` (HTTP, for everyone) and `internal` (gRPC, for the
/// other services). [`run`] serves both on one listener; the all-in-one mode keeps `internal` on
/// loopback.
pub struct Service {
    pub public: axum::Router,
    pub internal: axum::Router,
}

/// Builds the auth service; its presence registry follows the reports on `backbone` until
/// `shutdown`.
pub fn service(
    config: &Config,
    backbone: Arc<dyn eventbus_router::Backbone>,
    shutdown: Shutdown,
) -> Result<Service, Error> {
    let credential = config.internal.credential().map_err(Error::Config)?;
    let ring = Arc::new(KeyRing::load_or_create(&config.keys_dir)?);
    if config.dev {
        warn!(
            "DEVELOPMENT MODE: POST /v1/tokens issues tokens of any role WITHOUT an API key. Never run this in production."
        );
    }
    let api_keys = config::api_keys(&config.api_keys, config.api_keys_file.as_deref())
        .map_err(Error::Config)?;
    if api_keys.is_empty() && !config.dev {
        warn!("no API keys are configured (EVENTBUS_API_KEYS): no service can obtain a token");
    }
    let issuer = Arc::new(http::Issuer {
        verifier: Verifier::new(StaticKeys(ring.jwks())),
        ring: ring.clone(),
        api_keys,
        dev: config.dev,
        default_ttl_s: config.settings.default_ttl_s,
        max_ttl_s: config.settings.max_ttl_s,
    });
    for pattern in &config.presence_events {
        eventbus_router::validate_pattern(pattern).map_err(|err| {
            Error::Config(format!("EVENTBUS_PRESENCE_EVENTS: {pattern:?}: {err}"))
        })?;
    }
    let store = match &config.store_url {
        Some(url) => Some(
            eventbus_store_client::StoreClient::new(url, credential.clone(), &config.trust)
                .map_err(|err| Error::Config(err.to_string()))?,
        ),
        None if !config.presence_events.is_empty() => {
            return Err(Error::Config(
                "EVENTBUS_PRESENCE_EVENTS needs the store: set EVENTBUS_STORE_URL".into(),
            ));
        }
        None => None,
    };
    let registry = presence::Registry::start(
        backbone,
        store,
        config.presence_events.clone(),
        config
            .id
            .clone()
            .unwrap_or_else(eventbus_runtime::replica_id),
        shutdown,
    );
    let presence_api = Arc::new(http::PresenceApi {
        registry: registry.clone(),
        verifier: Verifier::new(StaticKeys(ring.jwks())),
    });
    let origins = eventbus_runtime::cors::Origins::new(&config.cors, config.dev);
    let public = axum::Router::new()
        .route("/v1/tokens", post(http::issue))
        .route("/v1/jwks", get(http::jwks))
        .with_state(issuer)
        .merge(
            axum::Router::new()
                .route("/v1/presence/{channel}", get(http::presence))
                .route("/v1/admin/stats", get(http::admin_stats))
                .with_state(presence_api),
        )
        .layer(origins.layer());
    // Keys are for the other services only: they hold the credential.
    let internal = eventbus_runtime::internal::require(
        tonic::service::Routes::new(pb::auth_server::AuthServer::new(AuthService { ring }))
            .into_axum_router(),
        credential,
    );
    Ok(Service { public, internal })
}

/// Runs the auth service on `listener` until `shutdown`, following presence on `backbone`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    backbone: Arc<dyn eventbus_router::Backbone>,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let service = service(&config, backbone, shutdown.clone())?;
    let app = service
        .public
        .merge(service.internal)
        .merge(eventbus_runtime::health_routes(|| true));
    let tls = config.tls.acceptor().map_err(Error::Config)?;
    info!(addr = %listener.local_addr()?, scheme = config.tls.scheme(), keys = %config.keys_dir.display(), "auth listening");
    eventbus_runtime::http::serve(listener, app, &config.http, tls, shutdown.wait()).await?;
    info!("auth stopped");
    Ok(())
}
