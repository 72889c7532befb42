//! A service binary run as its own process, killed (SIGKILL) when dropped.

use std::process::{Child, Command, Stdio};

pub struct Process {
    program: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
    /// The port of its `/healthz`.
    pub port: u16,
}

impl Process {
    /// Starts `program args` with `envs` and waits until `http://127.0.0.1:{port}/healthz` answers.
    pub async fn start(program: &str, args: &[&str], envs: &[(&str, &str)], port: u16) -> Process {
        let mut process = Process {
            program: program.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            port,
        };
        process.spawn().await;
        process
    }

    async fn spawn(&mut self) {
        let child = Command::new(&self.program)
            .args(&self.args)
            // The test clusters' internal credential, unless the test gives its own.
            .env("EVENTBUS_INTERNAL_TOKEN", crate::cluster::INTERNAL_TOKEN)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env(
                "EVENTBUS_LOG",
                std::env::var("EVENTBUS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", self.program));
        self.child = Some(child);
        let url = format!("http://127.0.0.1:{}/healthz", self.port);
        let client = reqwest::Client::new();
        crate::eventually(&format!("{} to be healthy", self.args.join(" ")), || {
            let request = client.get(&url).send();
            async move {
                request
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            }
        })
        .await;
    }

    /// `kill -9`: no goodbye, no flush, whatever was in flight is cut.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (a name such as `STOP` or `CONT`) to the process: `STOP` freezes it with its
    /// sockets open, as a stalled machine would, until `CONT`.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the process is running").id();
        let status = Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -s {signal} {pid} failed");
    }

    /// How the process ended, if it has (it is then forgotten: `start_again` runs a new one).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Starts the process again (after it exited or was killed) with the same arguments.
    pub async fn start_again(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Kills the process and starts it again with the same arguments.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
