//! Every service started in-process on its own ephemeral listener, with real gRPC between them and a
//! real nats-server as the backbone: the topology of a deployment, in one test process.

use std::sync::Arc;

use eventbus_router::{Backbone, NatsBackbone};
use eventbus_runtime::Shutdown;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::NatsServer;
use crate::http::Http;

/// The API key the test clusters configure.
pub const API_KEY_NAME: &str = "billing";
pub const API_KEY_SECRET: &str = "billing-secret-0123456789";
/// The internal credential the test clusters share (the store's and auth's gRPC demand it).
pub const INTERNAL_TOKEN: &str = "internal-test-credential-0123456789";

/// The internal credential's settings, for a service configuration.
pub fn internal() -> eventbus_runtime::internal::Args {
    eventbus_runtime::internal::Args {
        token: Some(INTERNAL_TOKEN.to_owned()),
        token_file: None,
    }
}

/// Channels whose joins and leaves the test clusters publish as presence events.
pub const PRESENCE_EVENTS: &str = "rooms.>";

/// Where a running bus answers, whatever its topology.
#[derive(Clone)]
pub struct Endpoints {
    /// Base URL of the publishing API (`/v1/events`, `/v1/channels`).
    pub api: Http,
    /// Base URL of the token API (`/v1/tokens`).
    pub auth: Http,
    /// URL of the WebSocket endpoint.
    pub ws: String,
}

impl Endpoints {
    /// A service token for the test API key.
    pub async fn service_token(&self) -> String {
        self.auth.token(Some(API_KEY_SECRET), json!({})).await
    }
}

pub struct Cluster {
    pub nats: NatsServer,
    /// The store's database, when the log is on PostgreSQL ([`Cluster::start_on_postgres`], or
    /// every cluster under `EVENTBUS_TEST_ENGINE=postgres`).
    pub postgres: Option<crate::postgres::Postgres>,
    pub endpoints: Endpoints,
    pub store_url: String,
    pub auth_url: String,
    shutdown: Shutdown,
    tasks: Vec<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback")
}

fn spawn<E>(
    future: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) -> JoinHandle<()>
where
    E: std::fmt::Display + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(err) = future.await {
            panic!("service failed: {err}");
        }
    })
}

impl Cluster {
    /// NATS, store, auth, ingest and one gateway.
    pub async fn start() -> Cluster {
        Self::start_with_store(None).await
    }

    /// As [`Cluster::start`], but using the store at `store_url` (e.g. a separate process) when given.
    pub async fn start_with_store(store_url: Option<String>) -> Cluster {
        Self::start_tuned(store_url, |_| {}).await
    }

    /// As [`Cluster::start_with_store`], with the in-process store's settings changed by `tune`.
    pub async fn start_tuned(
        store_url: Option<String>,
        tune: impl FnOnce(&mut eventbus_store::Config),
    ) -> Cluster {
        Self::start_full(store_url, tune, false, true).await
    }

    /// As [`Cluster::start`], but its auth writes no presence events: a test runs replicas of
    /// auth of its own (with [`Cluster::auth_keys_dir`]) that do, and can kill them.
    pub async fn start_with_presence_elsewhere() -> Cluster {
        Self::start_full(None, |_| {}, false, false).await
    }

    /// A cluster whose store publishes to a backbone nobody listens to: the gateways hear only
    /// what a test itself puts on NATS, so a test can lose backbone messages at will.
    pub async fn start_with_detached_store() -> Cluster {
        Self::start_full(None, |_| {}, true, true).await
    }

    /// As [`Cluster::start`], with the store's log on a PostgreSQL server of its own.
    pub async fn start_on_postgres() -> Cluster {
        let postgres = crate::postgres::Postgres::primary().await;
        Self::start_full_on(None, |_| {}, false, true, Some(postgres)).await
    }

    async fn start_full(
        store_url: Option<String>,
        tune: impl FnOnce(&mut eventbus_store::Config),
        detached_store: bool,
        presence_events: bool,
    ) -> Cluster {
        // The end-to-end suite runs once more with the log on PostgreSQL (scripts/test.sh).
        let postgres = match std::env::var("EVENTBUS_TEST_ENGINE").as_deref() {
            Ok("postgres") if store_url.is_none() => {
                Some(crate::postgres::Postgres::primary().await)
            }
            _ => None,
        };
        Self::start_full_on(store_url, tune, detached_store, presence_events, postgres).await
    }

    async fn start_full_on(
        store_url: Option<String>,
        tune: impl FnOnce(&mut eventbus_store::Config),
        detached_store: bool,
        presence_events: bool,
        postgres: Option<crate::postgres::Postgres>,
    ) -> Cluster {
        let nats = NatsServer::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let shutdown = Shutdown::new();
        let mut tasks = Vec::new();

        let store_url = match store_url {
            Some(url) => url,
            None => {
                let listener = listener().await;
                let url = format!("http://{}", listener.local_addr().expect("addr"));
                let backbone: Arc<dyn Backbone> = if detached_store {
                    Arc::new(eventbus_router::InProcessBackbone::new())
                } else {
                    nats_backbone(&nats).await
                };
                let mut config = eventbus_store::Config::with_data(dir.path().join("store"));
                config.internal = internal();
                config.settings.postgres = postgres
                    .as_ref()
                    .map(|pg| eventbus_store::config::DatabaseUrl(pg.url()));
                tune(&mut config);
                tasks.push(spawn(eventbus_store::run(
                    config,
                    listener,
                    backbone,
                    shutdown.clone(),
                )));
                url
            }
        };

        let auth_listener = listener().await;
        let auth_url = format!("http://{}", auth_listener.local_addr().expect("addr"));
        let mut auth_config = eventbus_auth::Config::with_keys_dir(dir.path().join("auth"));
        auth_config.internal = internal();
        auth_config.api_keys = vec![
            format!("{API_KEY_NAME}:{API_KEY_SECRET}")
                .parse()
                .expect("api key"),
        ];
        if presence_events {
            auth_config.presence_events = vec![PRESENCE_EVENTS.to_owned()];
        }
        auth_config.store_url = Some(store_url.clone());
        tasks.push(spawn(eventbus_auth::run(
            auth_config,
            auth_listener,
            nats_backbone(&nats).await,
            shutdown.clone(),
        )));

        let ingest_listener = listener().await;
        let ingest_url = format!("http://{}", ingest_listener.local_addr().expect("addr"));
        let mut ingest_config = eventbus_ingest::Config::new(store_url.clone(), auth_url.clone());
        ingest_config.upstream.internal = internal();
        tasks.push(spawn(eventbus_ingest::run(
            ingest_config,
            ingest_listener,
            shutdown.clone(),
        )));

        let mut cluster = Cluster {
            endpoints: Endpoints {
                api: Http::new(&ingest_url),
                auth: Http::new(&auth_url),
                ws: String::new(),
            },
            nats,
            postgres,
            store_url,
            auth_url,
            shutdown,
            tasks,
            dir,
        };
        cluster.endpoints.ws = cluster.add_gateway().await;
        cluster
    }

    /// Starts one more store replica on the cluster's database (a cluster on PostgreSQL) and
    /// NATS; returns its gRPC URL.
    pub async fn add_store(&mut self) -> String {
        let url = self
            .postgres
            .as_ref()
            .expect("more store replicas need the log on PostgreSQL")
            .url();
        let listener = listener().await;
        let store_url = format!("http://{}", listener.local_addr().expect("addr"));
        let n = self.tasks.len();
        let mut config =
            eventbus_store::Config::with_data(self.dir.path().join(format!("store-{n}")));
        config.internal = internal();
        config.settings.postgres = Some(eventbus_store::config::DatabaseUrl(url));
        let backbone = nats_backbone(&self.nats).await;
        self.tasks.push(spawn(eventbus_store::run(
            config,
            listener,
            backbone,
            self.shutdown.clone(),
        )));
        store_url
    }

    /// Starts one more gateway on the same NATS; returns its WebSocket URL.
    pub async fn add_gateway(&mut self) -> String {
        self.add_gateway_with(|_| {}).await
    }

    /// Starts one more gateway, with settings changed by `tune`; returns its WebSocket URL.
    pub async fn add_gateway_with(
        &mut self,
        tune: impl FnOnce(&mut eventbus_gateway::Config),
    ) -> String {
        let listener = listener().await;
        let url = format!("ws://{}/v1/ws", listener.local_addr().expect("addr"));
        let mut config =
            eventbus_gateway::Config::new(self.store_url.clone(), self.auth_url.clone());
        config.upstream.internal = internal();
        tune(&mut config);
        let backbone = nats_backbone(&self.nats).await;
        self.tasks.push(spawn(eventbus_gateway::run(
            config,
            listener,
            backbone,
            self.shutdown.clone(),
        )));
        url
    }

    /// The signing keys of the cluster's auth: another auth replica given them issues tokens
    /// every service of the cluster accepts.
    pub fn auth_keys_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("auth")
    }

    /// Stops every service gracefully and waits for them.
    pub async fn stop(mut self) {
        self.shutdown.trigger();
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(crate::WAIT, task).await;
        }
    }
}

async fn nats_backbone(nats: &NatsServer) -> Arc<dyn Backbone> {
    Arc::new(
        NatsBackbone::connect(&nats.url(), eventbus_router::subject::DEFAULT_PREFIX)
            .await
            .expect("connect to nats"),
    )
}
