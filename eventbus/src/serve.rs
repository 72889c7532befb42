//! `eventbus serve`: every service in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::response::Html;
use axum::routing::get;
use eventbus_router::{Backbone, InProcessBackbone};
use eventbus_runtime::Shutdown;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// The all-in-one bus: its one port and data directory, and every setting of every service it
/// runs (each role's `Settings`, under the same flags, variables and file keys as on that role).
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Address of every public endpoint.
    #[arg(
        long = "listen",
        env = "EVENTBUS_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// Directory of the log, the signing keys and the webhooks.
    #[arg(long = "data", env = "EVENTBUS_DATA", default_value = "./data")]
    pub data: PathBuf,
    /// Development mode: tokens without an API key, any browser origin. Never in production.
    #[arg(long = "dev", env = "EVENTBUS_DEV")]
    pub dev: bool,
    /// Service API keys, comma separated, each `name:secret`.
    #[arg(long = "api-keys", env = "EVENTBUS_API_KEYS", value_delimiter = ',')]
    pub api_keys: Vec<eventbus_auth::config::ApiKey>,
    /// A file of service API keys (`name:secret`, one per line or comma separated).
    #[arg(long = "api-keys-file", env = "EVENTBUS_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Channels (patterns, comma separated) whose joins and leaves become events on
    /// `presence.<channel>` (the demo page's channels by default).
    #[arg(
        long = "presence-events",
        env = "EVENTBUS_PRESENCE_EVENTS",
        value_delimiter = ',',
        default_value = "demo.>"
    )]
    pub presence_events: Vec<String>,
    #[command(flatten)]
    pub store: eventbus_store::Settings,
    #[command(flatten)]
    pub auth: eventbus_auth::config::Settings,
    #[command(flatten)]
    pub ingest: eventbus_ingest::Settings,
    #[command(flatten)]
    pub gateway: eventbus_gateway::Settings,
    #[command(flatten)]
    pub hooks: eventbus_hooks::Settings,
    #[command(flatten)]
    pub events: eventbus_runtime::limits::EventLimits,
    #[command(flatten)]
    pub cors: eventbus_runtime::cors::Args,
    #[command(flatten)]
    pub http: eventbus_runtime::http::Limits,
    #[command(flatten)]
    pub publish_rate: eventbus_runtime::rate::Args,
    #[command(flatten)]
    pub tls: eventbus_runtime::tls::Args,
    #[command(flatten)]
    pub trust: eventbus_runtime::tls::Trust,
    #[command(flatten)]
    pub app_hooks: eventbus_auth_client::app_hooks::Args,
    #[command(flatten)]
    pub websub: eventbus_runtime::websub::Args,
}

impl Config {
    /// Defaults with data in `data`, on a free loopback port (for tests).
    pub fn new(data: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data,
            ..eventbus_runtime::config::defaults()
        }
    }
}

async fn loopback() -> anyhow::Result<TcpListener> {
    eventbus_runtime::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// Runs the whole bus on `listener` until `shutdown`; the listener serves once every service answers.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    // A certificate that cannot be used stops the start before anything else runs.
    let tls = config.tls.acceptor().map_err(anyhow::Error::msg)?;
    let backbone: Arc<dyn Backbone> = Arc::new(InProcessBackbone::new());

    let store_listener = loopback().await?;
    let store_url = format!("http://{}", store_listener.local_addr()?);
    // The services talk over loopback: one credential, made for this process, guards it.
    let internal = eventbus_runtime::internal::Args {
        token: Some(eventbus_runtime::internal::Credential::random_secret()),
        token_file: None,
    };
    let credential = internal.credential().map_err(anyhow::Error::msg)?;
    let mut store_config = eventbus_store::Config::with_data(config.data.join("store"));
    store_config.internal = internal.clone();
    store_config.settings = config.store.clone();
    // Ingest, the gateway and the webhooks call the store in this process: the same API as over
    // gRPC without encoding it or a loopback hop (auth and the probes still use the port).
    let in_process = eventbus_store_client::InProcess::new();
    store_config.in_process = Some(in_process.clone());
    let store = tokio::spawn(eventbus_store::run(
        store_config,
        store_listener,
        backbone.clone(),
        shutdown.clone(),
    ));
    // The services below start against a store that serves (in process too: it opens that
    // before its port).
    if let Err(err) = wait_for_store(&store_url, &credential, &shutdown, &store).await {
        if store.is_finished() {
            store.await??;
        }
        return Err(err);
    }

    let mut auth_config = eventbus_auth::Config::with_keys_dir(config.data.join("auth"));
    auth_config.dev = config.dev;
    auth_config.internal = internal.clone();
    auth_config.api_keys = config.api_keys.clone();
    auth_config.api_keys_file = config.api_keys_file.clone();
    auth_config.presence_events = config.presence_events.clone();
    auth_config.store_url = Some(store_url.clone());
    auth_config.settings = config.auth.clone();
    auth_config.cors = config.cors.clone();
    auth_config.trust = config.trust.clone();
    // One process, one replica: a restart takes its own presence lease back at once.
    auth_config.id = Some("all-in-one".into());
    let auth = eventbus_auth::service(&auth_config, backbone.clone(), shutdown.clone())?;
    let auth_listener = loopback().await?;
    let auth_url = format!("http://{}", auth_listener.local_addr()?);
    let auth_internal = tokio::spawn({
        let shutdown = shutdown.clone();
        let limits = config.http.clone();
        async move {
            eventbus_runtime::http::serve(
                auth_listener,
                auth.internal,
                &limits,
                None,
                shutdown.wait(),
            )
            .await
        }
    });

    let mut ingest_config = eventbus_ingest::Config::new(store_url.clone(), auth_url.clone());
    ingest_config.dev = config.dev;
    ingest_config.settings = config.ingest.clone();
    ingest_config.events = config.events.clone();
    ingest_config.publish_rate = config.publish_rate.clone();
    ingest_config.upstream.internal = internal.clone();
    ingest_config.cors = config.cors.clone();
    ingest_config.app_hooks = config.app_hooks.clone();
    ingest_config.websub = config.websub.clone();
    // Not to listen with (the public listener does): to say https in the URLs it advertises.
    ingest_config.tls = config.tls.clone();
    ingest_config.upstream.trust = config.trust.clone();
    ingest_config.store_in_process = Some(in_process.clone());
    let ingest = eventbus_ingest::routes(&ingest_config)?;

    let mut hooks_config = eventbus_hooks::Config::new(
        store_url.clone(),
        auth_url.clone(),
        config.data.join("webhooks"),
    );
    hooks_config.dev = config.dev;
    // One process, one replica: a restart takes its own lease back at once.
    hooks_config.id = Some("all-in-one".into());
    hooks_config.settings = config.hooks.clone();
    hooks_config.upstream.internal = internal.clone();
    hooks_config.upstream.trust = config.trust.clone();
    hooks_config.cors = config.cors.clone();
    hooks_config.websub = config.websub.clone();
    hooks_config.tls = config.tls.clone();
    hooks_config.store_in_process = Some(in_process.clone());
    let hooks = eventbus_hooks::routes(&hooks_config, shutdown.clone()).await?;

    let mut gateway_config = eventbus_gateway::Config::new(store_url.clone(), auth_url);
    gateway_config.dev = config.dev;
    gateway_config.settings = config.gateway.clone();
    gateway_config.events = config.events.clone();
    gateway_config.publish_rate = config.publish_rate.clone();
    gateway_config.upstream.internal = internal;
    gateway_config.cors = config.cors.clone();
    gateway_config.app_hooks = config.app_hooks.clone();
    gateway_config.upstream.trust = config.trust.clone();
    gateway_config.store_in_process = Some(in_process);
    let gateway = eventbus_gateway::service(&gateway_config, backbone, shutdown.clone())?;

    // Ready while the store is (it is not while its disk is below the watermark).
    let store_ready = {
        let url = format!("{store_url}/readyz");
        let client = reqwest::Client::new();
        eventbus_runtime::probe(Duration::from_secs(1), move || {
            let request = client.get(&url).send();
            async move { request.await.is_ok_and(|r| r.status().is_success()) }
        })
    };
    let app = auth
        .public
        .merge(ingest)
        .merge(hooks)
        .merge(gateway.routes)
        .merge(eventbus_runtime::health_routes(move || {
            store_ready.load(std::sync::atomic::Ordering::Relaxed)
        }))
        .route(
            "/",
            get(|| async { Html(include_str!("../demo/index.html")) }),
        )
        .route(
            "/admin",
            get(|| async { Html(include_str!("../demo/admin.html")) }),
        )
        .route(
            "/eventbus.js",
            get(|| async { javascript(include_str!("../../web/eventbus.js")) }),
        )
        .route(
            "/eventbus-dom.js",
            get(|| async { javascript(include_str!("../../web/eventbus-dom.js")) }),
        )
        .fallback(|| async {
            eventbus_runtime::problem::Problem::new(
                eventbus_runtime::problem::Kind::NotFound,
                "no such route",
            )
        });
    let addr = listener.local_addr()?;
    let scheme = config.tls.scheme();
    info!(addr = %addr, scheme, data = %config.data.display(), "eventbus is ready");
    if config.dev {
        warn!(
            "DEVELOPMENT MODE: anyone can get a token of any role from POST /v1/tokens, and any origin is allowed"
        );
        eprintln!(
            "\neventbus (development mode) on {scheme}://{addr}  -  demo page: {scheme}://{addr}/\n\
             publish an event:\n  \
             TOKEN=$(curl -s -X POST {scheme}://{addr}/v1/tokens | sed 's/.*\"token\":\"\\([^\"]*\\)\".*/\\1/')\n  \
             curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\n    \
             -d '{{\"channel\":\"demo\",\"type\":\"greeting\",\"data\":{{\"text\":\"hello\"}}}}' {scheme}://{addr}/v1/events\n"
        );
    }
    let server = eventbus_runtime::http::serve(listener, app, &config.http, tls, shutdown.wait());
    tokio::pin!(server);
    let mut store = store;
    // The store ends early only when its log failed: then the whole bus stops, with its error, so
    // that a supervisor restarts it and the log recovers.
    let store_result = tokio::select! {
        served = &mut server => {
            served?;
            None
        }
        stopped = &mut store => {
            shutdown.trigger();
            server.await?;
            Some(stopped)
        }
    };
    gateway.drain.wait().await;
    auth_internal.await??;
    match store_result {
        Some(stopped) => stopped??,
        None => store.await??,
    }
    info!("eventbus stopped");
    Ok(())
}

fn javascript(source: &'static str) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/javascript; charset=utf-8",
        )],
        source,
    )
}

/// The public port opens only once the store answers, so `/healthz` means the bus works.
async fn wait_for_store<T>(
    url: &str,
    credential: &eventbus_runtime::internal::Credential,
    shutdown: &Shutdown,
    store: &tokio::task::JoinHandle<T>,
) -> anyhow::Result<()> {
    let client =
        eventbus_store_client::StoreClient::new(url, credential.clone(), &Default::default())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match client.head("healthz").await {
            Ok(_) => return Ok(()),
            Err(err)
                if tokio::time::Instant::now() > deadline
                    || shutdown.is_triggered()
                    || store.is_finished() =>
            {
                return Err(err).context("the store did not start");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
