//! A real `nats-server` process (from PATH) on a free port, killed when dropped.

use std::process::{Child, Command, Stdio};

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    /// Extra arguments (TLS files, for instance).
    args: Vec<String>,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        Self::start_with(Vec::new()).await
    }

    /// A server requiring this user and password of every client.
    pub async fn start_with_user(user: &str, password: &str) -> NatsServer {
        Self::start_with(vec![
            "--user".into(),
            user.into(),
            "--pass".into(),
            password.into(),
        ])
        .await
    }

    /// A server requiring TLS with this certificate and key (PEM); clients dial `tls://`.
    pub async fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> NatsServer {
        let path = |p: &std::path::Path| p.to_str().expect("UTF-8 path").to_owned();
        Self::start_with(vec![
            "--tls".into(),
            "--tlscert".into(),
            path(cert),
            "--tlskey".into(),
            path(key),
        ])
        .await
    }

    async fn start_with(args: Vec<String>) -> NatsServer {
        let port = crate::free_port();
        let mut server = NatsServer {
            child: None,
            port,
            args,
        };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be on PATH (Debian: apt-get install nats-server)");
        self.child = Some(child);
        let port = self.port;
        crate::eventually("nats-server to listen", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
    }

    /// Kills the server (losing whatever it had in flight) and starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
