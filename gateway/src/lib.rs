//! The gateway: the WebSocket endpoint (`GET /v1/ws`) where clients and services receive events
//! live and catch up from the log. Many gateways run side by side on one backbone; each subscribes
//! on the backbone only to what its own connections want, and repairs any gap in a channel's `seq`
//! from the store before delivering further, so a subscriber sees every event once, in order.
#![forbid(unsafe_code)]

pub mod config;
mod connection;
mod durable;
mod follow;
mod frames;
pub mod hub;
mod identities;
mod mailbox;
mod sse;

/// The decoders of what clients send, for the fuzz tests (`fuzz/`). Not an API.
#[doc(hidden)]
pub mod decoders {
    /// A WebSocket client frame: whether it parsed.
    pub fn client_frame(text: &str) -> bool {
        crate::frames::parse(text).is_ok()
    }

    /// An SSE `Last-Event-ID`: how many positions it names.
    pub fn last_event_id(id: &str) -> usize {
        crate::sse::decode_positions(id).len()
    }

    /// An SSE query string: whether it was accepted.
    pub fn sse_query(raw: &str) -> bool {
        crate::sse::parse_query_for_fuzzing(raw)
    }
}

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use eventbus_auth_client::{GrpcKeySource, Verifier};
use eventbus_model::Limits;
use eventbus_router::Backbone;
use eventbus_runtime::Shutdown;
use eventbus_runtime::cors::Origins;
use eventbus_runtime::problem::{Kind, Problem, bearer};
use eventbus_store_client::StoreClient;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::{Config, Settings};
pub use connection::close;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("server error: {0}")]
    Serve(#[from] std::io::Error),
}

const READ_BUFFER_BYTES: usize = 1024;
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

pub(crate) struct Gateway {
    hub: hub::Hub,
    verifier: Verifier,
    /// The application's hooks (connect, subscribe, publish), when the operator configured any.
    app: Option<Arc<eventbus_auth_client::app_hooks::AppHooks>>,
    store: StoreClient,
    limits: Limits,
    origins: Origins,
    queue_len: usize,
    max_subscriptions: usize,
    identities: identities::Identities,
    rate: eventbus_runtime::rate::PublishRate,
    max_frame_bytes: usize,
    hello_timeout: Duration,
    ping_interval: Duration,
    id: String,
    /// This run of the gateway (its id may be the same after a restart).
    instance: String,
    presence: eventbus_auth_client::presence::Reporter,
    next_connection: AtomicU64,
    shutdown: Shutdown,
    connections: TaskTracker,
}

/// The gateway's routes, and the handle that waits for its connections to close at shutdown.
pub struct Service {
    pub routes: axum::Router,
    pub drain: Drain,
}

pub struct Drain {
    connections: TaskTracker,
    grace: Duration,
    presence: eventbus_auth_client::presence::Reporter,
}

impl Drain {
    /// Waits, at most the grace period, for every connection to finish its goodbye.
    pub async fn wait(self) {
        self.connections.close();
        if tokio::time::timeout(self.grace, self.connections.wait())
            .await
            .is_err()
        {
            warn!(
                left = self.connections.len(),
                "grace period over, dropping the remaining connections"
            );
        }
        // The leaves of the closed connections are reported now rather than found at expiry.
        self.presence.flush(Duration::from_secs(2)).await;
    }
}

/// Builds the gateway on `backbone`; its connections close (1001) when `shutdown` triggers.
pub fn service(
    config: &Config,
    backbone: Arc<dyn Backbone>,
    shutdown: Shutdown,
) -> Result<Service, Error> {
    let connections = TaskTracker::new();
    let store = StoreClient::for_upstream(&config.upstream, config.store_in_process.as_ref())
        .map_err(|err| Error::Config(err.to_string()))?;
    let id = config
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string()[20..].to_owned());
    let presence = eventbus_auth_client::presence::Reporter::start(
        backbone.clone(),
        id.clone(),
        Duration::from_secs(config.settings.presence_ttl_s.max(1)),
    );
    let gateway = Arc::new(Gateway {
        hub: hub::Hub::with_tail_check(
            backbone,
            store.clone(),
            Duration::from_secs(config.settings.tail_check_s.max(1)),
        ),
        verifier: Verifier::new(
            GrpcKeySource::for_upstream(&config.upstream).map_err(Error::Config)?,
        ),
        app: eventbus_auth_client::app_hooks::AppHooks::new(
            &config.app_hooks,
            &config.upstream.trust,
        )
        .map_err(Error::Config)?,
        store,
        limits: config.events.model(),
        origins: Origins::new(&config.cors, config.dev),
        queue_len: config.settings.queue_len.max(1),
        max_subscriptions: config.settings.max_subscriptions,
        identities: identities::Identities::new(config.settings.max_connections_per_identity),
        rate: eventbus_runtime::rate::PublishRate::new(&config.publish_rate),
        max_frame_bytes: config.settings.max_frame_bytes,
        hello_timeout: Duration::from_secs(config.settings.hello_timeout_s),
        ping_interval: Duration::from_secs(config.settings.ping_interval_s.max(1)),
        id,
        instance: uuid::Uuid::now_v7().simple().to_string()[20..].to_owned(),
        presence: presence.clone(),
        next_connection: AtomicU64::new(1),
        shutdown,
        connections: connections.clone(),
    });
    let sse_cors = gateway.origins.layer();
    let routes = axum::Router::new()
        .route("/v1/ws", get(upgrade))
        .merge(
            axum::Router::new()
                .route("/v1/sse", get(sse::stream))
                .layer(sse_cors),
        )
        .with_state(gateway);
    Ok(Service {
        routes,
        drain: Drain {
            connections,
            grace: Duration::from_secs(config.settings.grace_s),
            presence,
        },
    })
}

async fn upgrade(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !gateway.origins.permits(headers.get(header::ORIGIN)) {
        return Problem::new(
            Kind::Forbidden,
            "this origin is not allowed (EVENTBUS_CORS_ORIGINS)",
        )
        .into_response();
    }
    if gateway.shutdown.is_triggered() {
        return Problem::new(Kind::Unavailable, "the gateway is shutting down").into_response();
    }
    // A token given at the upgrade authenticates the connection at once; otherwise hello must.
    let token = bearer(&headers)
        .map(str::to_owned)
        .or_else(|| query.get("token").cloned());
    let verified = match token {
        None => None,
        Some(token) => match gateway.verifier.verify(&token).await {
            Ok(verified) => Some(verified),
            Err(err) => return Problem::from(err).into_response(),
        },
    };
    // Without a token, a hello without one asks the connect hook about this request: all it
    // will see of it are the allow-listed headers, kept until then.
    let for_hook = match (&verified, &gateway.app) {
        (None, Some(app)) if app.connects() => Some(Box::new(app.passed_headers(&headers))),
        _ => None,
    };
    let tracker = gateway.connections.clone();
    let upgrade = upgrade.protocols([connection::CLOUDEVENTS_PROTOCOL]);
    let cloudevents = upgrade.selected_protocol().is_some();
    // tungstenite's defaults reserve 128 KiB to read into and let 128 KiB of writes pile up per
    // connection: 2 GB for 15k idle clients. Clients send small frames, and 16 KiB per write
    // still batches ~70 events when a connection is behind.
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(gateway.max_frame_bytes)
        .max_frame_size(gateway.max_frame_bytes)
        .on_upgrade(move |socket| {
            tracker.track_future(connection::serve(
                gateway,
                socket,
                verified,
                for_hook,
                cloudevents,
            ))
        })
}

/// Runs the gateway on `listener` until `shutdown`, then closes every connection with 1001.
pub async fn run(
    config: Config,
    listener: TcpListener,
    backbone: Arc<dyn Backbone>,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let ready_backbone = backbone.clone();
    // Ready while NATS is connected and the store answers (catch-up and gap refill need it).
    let probe_store = StoreClient::for_upstream(&config.upstream, config.store_in_process.as_ref())
        .map_err(|err| Error::Config(err.to_string()))?;
    let store_up = eventbus_runtime::probe(Duration::from_secs(2), move || {
        let store = probe_store.clone();
        async move { store.head("readyz").await.is_ok() }
    });
    let service = service(&config, backbone, shutdown.clone())?;
    let app = service
        .routes
        .merge(eventbus_runtime::health_routes(move || {
            ready_backbone.is_connected() && store_up.load(std::sync::atomic::Ordering::Relaxed)
        }));
    let tls = config.tls.acceptor().map_err(Error::Config)?;
    info!(addr = %listener.local_addr()?, scheme = config.tls.scheme(), "gateway listening");
    eventbus_runtime::http::serve(listener, app, &config.http, tls, shutdown.wait()).await?;
    service.drain.wait().await;
    info!("gateway stopped");
    Ok(())
}
