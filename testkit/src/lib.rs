//! Test support for eventbus: a real `nats-server` on a free port, the services started in-process
//! on ephemeral listeners with real gRPC and real NATS between them, and small real HTTP and
//! WebSocket clients. Nothing here is a mock; every wait is on a condition with a bounded timeout.

pub mod cluster;
pub mod http;
pub mod load;
pub mod nats;
pub mod postgres;
pub mod process;
pub mod tls;
pub mod ws;

use std::future::Future;
use std::time::Duration;

pub use cluster::Cluster;
pub use nats::NatsServer;

/// The bound on every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// A free TCP port on loopback (the OS's choice; bound and released), never one this process was
/// handed before: a test that takes several ports before starting anything on them would
/// otherwise now and then get the same one twice (seen: a WebSocket client reaching the store).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port on loopback");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `check` until it returns `Some`, or fails after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
