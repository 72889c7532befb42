//! What every eventbus service binary shares: logging set-up, the shutdown signal, and the small
//! HTTP pieces every service serves (`/healthz`, `/readyz`). No business logic lives here.
#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

pub mod backbone;
pub mod config;
pub mod cors;
pub mod http;
pub mod internal;
pub mod limits;
pub mod metrics;
pub mod problem;
pub mod rate;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod websub;

/// A shutdown signal that any number of tasks can wait on. Cloning is cheap.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Self {
            rx,
            tx: Arc::new(tx),
        }
    }

    /// Starts the shutdown: every waiter wakes up.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once the shutdown has started.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            // An error means every sender is gone, which can only happen once nothing can trigger.
            let _ = rx.wait_for(|triggered| *triggered).await;
        }
    }

    /// Triggers on SIGINT or SIGTERM.
    pub fn on_signals(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received");
            this.trigger();
        });
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(cause = %err, "cannot listen for SIGTERM, only SIGINT will stop");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Exit code for a bad configuration (EX_USAGE), so supervisors can tell it from a crash.
pub const EXIT_CONFIG: i32 = 64;

/// A readiness flag that a background task keeps up to date by running `check` every `interval`
/// (readiness endpoints must answer at once, and a dependency's answer can take seconds). The task
/// ends when the flag is dropped.
pub fn probe<F, Fut>(
    interval: std::time::Duration,
    check: F,
) -> std::sync::Arc<std::sync::atomic::AtomicBool>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    use std::sync::atomic::{AtomicBool, Ordering};
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    let weak = std::sync::Arc::downgrade(&flag);
    tokio::spawn(async move {
        loop {
            let ok = tokio::time::timeout(interval, check())
                .await
                .unwrap_or(false);
            let Some(flag) = weak.upgrade() else { return };
            if flag.swap(ok, Ordering::Relaxed) != ok {
                tracing::info!(ready = ok, "readiness changed");
            }
            drop(flag);
            tokio::time::sleep(interval).await;
        }
    });
    flag
}

/// `GET /healthz` (alive), `GET /readyz` (ready when `ready()` says so) and `GET /metrics`.
pub fn health_routes<S>(ready: impl Fn() -> bool + Clone + Send + Sync + 'static) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    health_routes_with(|| true, ready)
}

/// As [`health_routes`], with `/healthz` answering 503 once `live()` says the process can no longer
/// do its work and must be restarted.
pub fn health_routes_with<S>(
    live: impl Fn() -> bool + Clone + Send + Sync + 'static,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    use axum::http::StatusCode;
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let live = live.clone();
                async move {
                    if live() {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "failed: restart\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                    metrics::metrics().encode(),
                )
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
}

/// A name for this replica among others of its role (in leases): the host name (the pod's on
/// Kubernetes) and the process id, so that two replicas on one machine differ while a pod that
/// restarts (its process is pid 1 again) comes back under its own name.
pub fn replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "eventbus".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Binds a TCP listener, naming the address in the error.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {addr}: {err}"))
}

/// Parses the command line, the `EVENTBUS_*` variables and the configuration file a role names
/// (`--config`, see [`config`]); a bad value exits with [`EXIT_CONFIG`] and a message that names
/// the flag, the variable or the file's key.
pub fn parse_cli<T: clap::Parser>() -> T {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = match config::prepare(T::command(), &args) {
        Ok(command) => command,
        Err(why) => {
            eprintln!("error: {why}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    let parsed = command
        .try_get_matches_from(&args)
        .and_then(|matches| T::from_arg_matches(&matches));
    match parsed {
        Ok(cli) => cli,
        Err(err) => {
            let code = if err.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = err.print();
            std::process::exit(code);
        }
    }
}

/// Ends a service binary: logs the error and exits non-zero.
pub fn exit_on_error(service: &str, result: anyhow::Result<()>) {
    if let Err(err) = result {
        tracing::error!(cause = %format!("{err:#}"), "{service} failed");
        std::process::exit(1);
    }
}

/// The body of every service binary's `main`: logging, SIGINT/SIGTERM as the shutdown signal, and
/// a non-zero exit (with the cause logged) when `run` fails.
pub async fn serve_main<F, Fut>(service: &str, run: F)
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    telemetry::init();
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    exit_on_error(service, run(shutdown).await);
}
