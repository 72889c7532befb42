//! The bus under test in its two shapes, and the scenarios both must pass.
#![allow(dead_code)]

pub mod scenarios;

use eventbus_runtime::Shutdown;
use eventbus_testkit::cluster::{API_KEY_NAME, API_KEY_SECRET, Endpoints};
use eventbus_testkit::http::Http;

pub struct AllInOne {
    pub endpoints: Endpoints,
    pub shutdown: Shutdown,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub dir: tempfile::TempDir,
}

impl AllInOne {
    pub async fn start(dev: bool) -> AllInOne {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, dev).await
    }

    pub async fn start_in(dir: tempfile::TempDir, dev: bool) -> AllInOne {
        Self::start_with(dir, dev, |_| {}).await
    }

    /// As [`AllInOne::start_in`], with the settings changed by `tune`.
    pub async fn start_with(
        dir: tempfile::TempDir,
        dev: bool,
        tune: impl FnOnce(&mut eventbus::serve::Config),
    ) -> AllInOne {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = eventbus::serve::Config::new(dir.path().to_owned());
        config.dev = dev;
        config.api_keys = vec![
            format!("{API_KEY_NAME}:{API_KEY_SECRET}")
                .parse()
                .expect("api key"),
        ];
        tune(&mut config);
        let shutdown = Shutdown::new();
        let task = tokio::spawn(eventbus::serve::run(config, listener, shutdown.clone()));
        let base = format!("http://{addr}");
        let http = Http::new(&base);
        let answer = http.send(http.get("/healthz")).await;
        assert_eq!(answer.status, 200);
        AllInOne {
            endpoints: Endpoints {
                api: http.clone(),
                auth: http,
                ws: format!("ws://{addr}/v1/ws"),
            },
            shutdown,
            task,
            dir,
        }
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.shutdown.trigger();
        let result = tokio::time::timeout(eventbus_testkit::WAIT, self.task)
            .await
            .expect("all-in-one did not stop in time")
            .expect("all-in-one task panicked");
        result.expect("all-in-one failed");
        self.dir
    }
}

/// Panics unless `headers` carry the `X-Eventbus-Signature` of `body` with `secret`:
/// `t=<unix s>,v1=HMAC-SHA256(secret, "<t>.<body>")` (webhooks and the application's hooks).
pub fn assert_signed(headers: &axum::http::HeaderMap, secret: &str, body: &[u8]) {
    let header = headers["x-eventbus-signature"].to_str().expect("ascii");
    let t: u64 = header
        .strip_prefix("t=")
        .and_then(|r| r.split(',').next())
        .and_then(|t| t.parse().ok())
        .expect("t=");
    assert_eq!(
        header,
        eventbus_auth_client::signature::signature(secret, t, body),
        "signed with the secret"
    );
}
