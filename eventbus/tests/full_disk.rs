//! A full disk is an outage that heals. The all-in-one bus on a 12 MiB tmpfs: below the low-space
//! watermark publishing is refused with a clear problem and readiness fails, and both come back by
//! themselves once space is freed; with no watermark, a write that fails for want of space makes the
//! process exit non-zero, and a restart recovers everything acknowledged.

use std::path::{Path, PathBuf};
use std::process::Command;

use eventbus_testkit::http::Http;
use eventbus_testkit::process::Process;
use eventbus_testkit::{eventually, free_port};
use serde_json::{Value, json};

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");

/// A tmpfs of `size`, unmounted when dropped. The tests run as root (as CI does).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount(8)");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

fn ballast(path: &Path, bytes: u64) -> PathBuf {
    let file = path.join("ballast");
    std::fs::write(&file, vec![7u8; bytes as usize]).expect("ballast");
    file
}

async fn bus(data: &Path, port: u16, min_free: &str) -> Process {
    let listen = format!("127.0.0.1:{port}");
    Process::start(
        EVENTBUS,
        &["serve", "--dev"],
        &[
            ("EVENTBUS_LISTEN", &listen),
            ("EVENTBUS_DATA", data.to_str().expect("path")),
            ("EVENTBUS_STORE_MIN_FREE_BYTES", min_free),
        ],
        port,
    )
    .await
}

/// Publishes batches of fifty 2 KB events until one is refused; returns the acknowledged ids and
/// the refusal.
async fn fill(api: &Http, token: &str, prefix: &str) -> (Vec<String>, Value) {
    let data = "x".repeat(2000);
    let mut acked = Vec::new();
    for batch in 0.. {
        let ids: Vec<String> = (0..50).map(|i| format!("{prefix}-{batch}-{i}")).collect();
        let events: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "channel": "disk", "type": "t", "data": data}))
            .collect();
        let answer = api.publish(token, &Value::Array(events)).await;
        if answer.status != 200 {
            assert_eq!(answer.status, 503, "{}", answer.body);
            return (acked, answer.body);
        }
        acked.extend(ids);
        assert!(batch < 1000, "the disk never filled");
    }
    unreachable!()
}

async fn stored_ids(api: &Http, token: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let page = api
            .history(token, "disk", &format!("after={after}&limit=1000"))
            .await;
        assert_eq!(page.status, 200, "{}", page.body);
        let events = page.body["events"].as_array().expect("events").clone();
        if events.is_empty() {
            return ids;
        }
        for event in events {
            after = event["seq"].as_u64().expect("seq");
            ids.push(event["id"].as_str().expect("id").to_owned());
        }
    }
}

async fn status(api: &Http, path: &str) -> u16 {
    api.send(api.get(path)).await.status.as_u16()
}

#[tokio::test]
async fn below_the_watermark_publishing_waits_for_space_and_resumes_by_itself() {
    let disk = Tmpfs::mount("12m");
    let port = free_port();
    let _bus = bus(&disk.path().join("data"), port, "2097152").await;
    let api = Http::new(&format!("http://127.0.0.1:{port}"));
    let token = api.token(None, json!({})).await;
    let ballast = ballast(disk.path(), 4 * 1024 * 1024);

    let (acked, refusal) = fill(&api, &token, "a").await;
    assert!(
        acked.len() >= 500,
        "{} acknowledged before the watermark",
        acked.len()
    );
    assert_eq!(refusal["outcome"], "not-stored", "{refusal}");
    let detail = refusal["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("EVENTBUS_STORE_MIN_FREE_BYTES"), "{detail}");
    eventually("readiness to fail while space is low", || {
        let api = api.clone();
        async move { (status(&api, "/readyz").await == 503).then_some(()) }
    })
    .await;
    assert_eq!(
        status(&api, "/healthz").await,
        200,
        "alive: nothing to restart"
    );

    std::fs::remove_file(ballast).expect("free space");
    eventually("publishing to resume without a restart", || {
        let (api, token) = (api.clone(), token.clone());
        async move {
            let answer = api
                .publish(
                    &token,
                    &json!({"id": "after", "channel": "disk", "type": "t"}),
                )
                .await;
            (answer.status == 200).then_some(())
        }
    })
    .await;
    eventually("readiness to come back", || {
        let api = api.clone();
        async move { (status(&api, "/readyz").await == 200).then_some(()) }
    })
    .await;
    let mut expected = acked;
    expected.push("after".into());
    assert_eq!(stored_ids(&api, &token).await, expected);
}

#[tokio::test]
async fn a_write_that_fails_for_want_of_space_stops_the_bus_and_a_restart_recovers() {
    let disk = Tmpfs::mount("12m");
    let port = free_port();
    let data = disk.path().join("data");
    // No watermark: the disk really fills under the writer.
    let mut bus = bus(&data, port, "0").await;
    let api = Http::new(&format!("http://127.0.0.1:{port}"));
    let token = api.token(None, json!({})).await;
    let ballast = ballast(
        disk.path(),
        free_bytes(disk.path()).saturating_sub(3 * 1024 * 1024),
    );

    let (acked, _refusal) = fill(&api, &token, "b").await;
    assert!(!acked.is_empty());
    let exit = eventually("the bus to exit after its log failed", || {
        let exited = bus.exited();
        async move { exited }
    })
    .await;
    assert!(
        !exit.success(),
        "a failed log ends the process non-zero: {exit}"
    );

    std::fs::remove_file(ballast).expect("free space");
    bus.start_again().await;
    let token = api.token(None, json!({})).await;
    let stored = stored_ids(&api, &token).await;
    assert_eq!(
        &stored[..acked.len()],
        &acked[..],
        "every acknowledged event, in order"
    );
    let answer = api
        .publish(
            &token,
            &json!({"id": "after", "channel": "disk", "type": "t"}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}
