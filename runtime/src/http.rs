//! Every HTTP listener of the bus (public APIs, WebSocket and SSE, the gRPC ports), served with
//! the limits a hostile client meets first:
//! - a **header timeout**: a client has this long to send a request's headers, and an HTTP/1
//!   connection kept alive may sit idle this long between requests (hyper's header read timer
//!   runs from the moment a connection waits for a request head), so half-sent requests cannot
//!   hold connections for good (slowloris);
//! - an **HTTP/2 keep-alive**: a ping every `idle_timeout`, a peer that does not answer within
//!   20 s is dropped;
//! - a **connection cap**, sized under the process's file limit by default: past it a new
//!   connection is closed at once, so that the rest keep being served.
//!
//! WebSocket and SSE connections outlive the header timer (an upgraded connection is no longer
//! HTTP, and a streaming response is not idle); they have heartbeats of their own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

#[derive(clap::Args, Debug, Clone)]
#[group(id = "http_limits")]
pub struct Limits {
    /// Seconds a client has to send a request's headers; also how long a kept-alive HTTP/1
    /// connection may wait idle for its next request.
    #[arg(
        long = "http-header-timeout-s",
        env = "EVENTBUS_HTTP_HEADER_TIMEOUT_S",
        default_value_t = 30
    )]
    pub header_timeout_s: u64,
    /// Seconds between keep-alive pings on an idle HTTP/2 connection (gRPC among them).
    #[arg(
        long = "http-idle-timeout-s",
        env = "EVENTBUS_HTTP_IDLE_TIMEOUT_S",
        default_value_t = 120
    )]
    pub idle_timeout_s: u64,
    /// Open connections at most, WebSockets included; 0 sizes it under the process's file limit
    /// (the soft RLIMIT_NOFILE less 10% and 64 for files and clients of its own).
    #[arg(
        long = "max-connections",
        env = "EVENTBUS_MAX_CONNECTIONS",
        default_value_t = 0
    )]
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        crate::config::defaults()
    }
}

impl Limits {
    /// The connection cap in force.
    pub fn connection_cap(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(1 << 20)
            .min(1 << 20) as usize;
        (files - files / 10).saturating_sub(64).max(16)
    }
}

/// Serves `app` on `listener` with `limits` (over TLS when `tls` is given) until `shutdown`
/// resolves, then stops accepting and waits for the requests in flight (as
/// `axum::serve(..).with_graceful_shutdown` does).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: &Limits,
    tls: Option<crate::tls::Acceptor>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let header_timeout = Duration::from_secs(limits.header_timeout_s.max(1));
    let cap = limits.connection_cap();
    let permits = Arc::new(Semaphore::new(cap));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(limits.idle_timeout_s.max(1)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: pause, rather than spin.
                    warn!(cause = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Refused at once: a full server must not starve the connections it holds.
            crate::metrics::metrics().connections_refused.inc();
            debug!(%peer, cap, "connection refused: at the connection cap");
            drop(stream);
            continue;
        };
        // Nagle off: HTTP/2 (gRPC) answers go out as several small writes, and with Nagle on the
        // last one waits for the peer's delayed ACK (40 ms on Linux) whenever requests overlap
        // (measured: store appends over gRPC ran at 35k events/s).
        if let Err(err) = stream.set_nodelay(true) {
            debug!(cause = %err, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        // The permit goes with the socket (under TLS too), so a connection upgraded to a
        // WebSocket (which hyper hands over, ending its own task) still counts until it closes.
        let counted = Counted {
            io: stream,
            _permit: permit,
        };
        match &tls {
            None => {
                let connection =
                    builder.serve_connection_with_upgrades(TokioIo::new(counted), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        debug!(%peer, cause = %err, "connection ended with an error");
                    }
                });
            }
            Some(tls) => {
                // The handshake runs in the connection's own task (a slow one must not hold up
                // accepting), bounded by the header timeout like the request head it precedes.
                let handshake = tls.accept(counted);
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(header_timeout, handshake).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(err)) => {
                            debug!(%peer, cause = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    if let Err(err) = watcher.watch(connection.into_owned()).await {
                        debug!(%peer, cause = %err, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A socket holding its place under the connection cap.
struct Counted {
    io: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
