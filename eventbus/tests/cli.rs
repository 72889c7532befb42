//! Every subcommand of the eventbus binary parses its settings cleanly; the command-line client
//! publishes and tails for real, with exit codes scripts can rely on.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::AllInOne;
use eventbus_testkit::cluster::API_KEY_SECRET;

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "serve", "store", "auth", "ingest", "gateway", "hooks", "token", "keygen", "pub", "tail",
        "webhooks",
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
            .args([sub, "--help"])
            .output()
            .expect("run eventbus");
        assert!(
            output.status.success(),
            "{sub}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("EVENTBUS_"),
            "{sub}"
        );
    }
}

/// A log read from a file or a container's output has no colour escapes in it.
#[test]
fn logs_off_a_terminal_carry_no_colour_escapes() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The store refuses to start without the internal credential, and logs why.
    let output = Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(["store", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .env_remove("EVENTBUS_INTERNAL_TOKEN")
        .env_remove("EVENTBUS_INTERNAL_TOKEN_FILE")
        .env_remove("NO_COLOR")
        .env("EVENTBUS_LOG", "info")
        .output()
        .expect("run eventbus store");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{log}");
    assert!(log.contains("EVENTBUS_INTERNAL_TOKEN"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log: {log:?}");
}

/// `eventbus probe` is what container healthchecks run: 0 for a 2xx answer, 1 otherwise.
#[test]
fn probe_exits_by_the_answer() {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        for status in ["200 OK", "503 Service Unavailable"] {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let probe = |url: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
            .args(["probe", url])
            .output()
            .expect("run eventbus probe")
            .status
            .code()
    };
    let url = format!("http://127.0.0.1:{port}/readyz");
    assert_eq!(probe(&url), Some(0), "200");
    assert_eq!(probe(&url), Some(1), "503");
    server.join().expect("server");
    assert_eq!(probe(&url), Some(1), "nobody listening");
    assert_eq!(probe("ftp://127.0.0.1/"), Some(1), "http and https only");
}

fn cli(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eventbus"));
    command
        .args(args)
        .env("EVENTBUS_URL", url)
        .env("EVENTBUS_API_KEY", API_KEY_SECRET)
        .env_remove("EVENTBUS_TOKEN");
    command
}

// Multi-threaded: the test waits for the CLI processes synchronously while the bus it talks to
// runs in this same runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pub_and_tail_round_trip_with_reliable_exit_codes() {
    // The webhook added below points at loopback, which production mode refuses unless allowed.
    let bus = AllInOne::start_with(tempfile::tempdir().expect("temp dir"), false, |c| {
        c.hooks.destinations.allow_networks = vec!["127.0.0.0/8".parse().expect("cidr")]
    })
    .await;
    let url = bus.endpoints.api.base.clone();

    // One event from the argument; an ack line per event.
    let out = cli(&url, &["pub", "cli.demo", "greeting", r#"{"n":1}"#])
        .output()
        .expect("run pub");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ack: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ack JSON");
    assert_eq!(ack["seq"], 1);

    // tail from the start, following live.
    let mut tail = cli(&url, &["tail", "cli.demo", "--after", "0", "--count", "4"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tail");
    let stdout = tail.stdout.take().expect("stdout");
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });

    // Three more from stdin lines.
    let mut publisher = cli(&url, &["pub", "cli.demo", "greeting", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run pub -");
    publisher
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"{\"n\":2}\n\n{\"n\":3}\n\"four\"\n")
        .expect("write");
    assert!(publisher.wait().expect("pub -").success());

    let lines = tokio::time::timeout(eventbus_testkit::WAIT, lines)
        .await
        .expect("tail printed 4 events in time")
        .expect("reader");
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert_eq!(events[3]["data"], "four");
    assert!(tail.wait().expect("tail").success());
    // Every event is sent with an id, so a retry is never stored twice.
    assert!(
        events
            .iter()
            .all(|e| e["id"].as_str().is_some_and(|id| !id.is_empty()))
    );
    let again = |id: &str| {
        let out = cli(&url, &["pub", "--id", id, "cli.demo", "greeting", "5"])
            .output()
            .expect("run pub --id");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("ack JSON")
    };
    assert_eq!(again("five")["duplicate"], false);
    let retried = again("five");
    assert_eq!(
        (&retried["seq"], &retried["duplicate"]),
        (&5.into(), &true.into())
    );

    // Exit codes: bad data 65, bad credentials 77, forbidden 77, unreachable 69.
    let code = |mut c: Command| c.output().expect("run").status.code();
    assert_eq!(
        code(cli(&url, &["pub", "cli.demo", "t", "{not json"])),
        Some(65)
    );
    let mut bad_key = cli(&url, &["pub", "cli.demo", "t", "1"]);
    bad_key.env("EVENTBUS_API_KEY", "not-the-key-0123456789");
    assert_eq!(code(bad_key), Some(77));
    assert_eq!(code(cli(&url, &["pub", "presence.x", "t", "1"])), Some(77));
    assert_eq!(
        code(cli(&url, &["pub", "bad..channel", "t", "1"])),
        Some(65)
    );
    assert_eq!(
        code(cli("http://127.0.0.1:9", &["pub", "cli.demo", "t", "1"])),
        Some(69)
    );
    assert_eq!(code(cli(&url, &["tail", "bad..channel"])), Some(65));
    assert_eq!(code(cli(&url, &["pub"])), Some(64), "usage");

    // webhooks: add, list, show, delete; a bad one is bad data.
    let out = cli(
        &url,
        &[
            "webhooks",
            "add",
            "http://127.0.0.1:9/h",
            "--channels",
            "cli.*",
            "--secret",
            "0123456789abcdef",
        ],
    )
    .output()
    .expect("run webhooks add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hook: serde_json::Value = serde_json::from_slice(&out.stdout).expect("webhook JSON");
    let id = hook["id"].as_str().expect("id").to_owned();
    let out = cli(&url, &["webhooks", "list"]).output().expect("run list");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert!(
        cli(&url, &["webhooks", "show", &id])
            .output()
            .expect("show")
            .status
            .success()
    );
    assert!(
        cli(&url, &["webhooks", "delete", &id])
            .output()
            .expect("delete")
            .status
            .success()
    );
    assert_eq!(
        code(cli(&url, &["webhooks", "show", &id])),
        Some(1),
        "gone: 404"
    );
    assert_eq!(
        code(cli(
            &url,
            &[
                "webhooks",
                "add",
                "ftp://x",
                "--channels",
                "a",
                "--secret",
                "0123456789abcdef"
            ]
        )),
        Some(65)
    );

    // token: a client token for an identity.
    let out = cli(
        &url,
        &["token", "--sub", "alice", "--subscribe", "cli.demo"],
    )
    .output()
    .expect("run token");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split('.')
            .count(),
        3
    );
    bus.stop().await;
}
