//! One configuration: a TOML file with a section per role, under the environment and the flags;
//! `genconfig` prints every setting and `checkconfig` refuses what no role takes. The file's keys
//! are what docs/operations.md documents.

use std::path::Path;
use std::process::Command;

use eventbus_testkit::cluster::{API_KEY_NAME, API_KEY_SECRET};
use eventbus_testkit::http::Http;
use eventbus_testkit::process::Process;
use eventbus_testkit::{NatsServer, eventually, free_port};
use serde_json::{Value, json};

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");

fn genconfig() -> String {
    let output = Command::new(EVENTBUS)
        .arg("genconfig")
        .output()
        .expect("run genconfig");
    assert!(output.status.success());
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// `eventbus checkconfig FILE`: exit code and stderr.
fn checkconfig(dir: &Path, text: &str) -> (Option<i32>, String) {
    let path = dir.join("check.toml");
    std::fs::write(&path, text).expect("write");
    let output = Command::new(EVENTBUS)
        .args(["checkconfig"])
        .arg(&path)
        .output()
        .expect("run checkconfig");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every key `genconfig` prints, set or commented out: `(section, key)`.
fn keys(generated: &str) -> Vec<(String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in generated.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let line = line.strip_prefix("# ").unwrap_or(line);
        if let Some((key, _)) = line.split_once(" = ")
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            out.push((section.clone(), key.to_owned()));
        }
    }
    out
}

#[test]
fn genconfig_prints_every_setting_that_checkconfig_accepts_and_the_docs_list() {
    let dir = tempfile::tempdir().expect("temp dir");
    let generated = genconfig();
    let (code, stderr) = checkconfig(dir.path(), &generated);
    assert_eq!(code, Some(0), "{stderr}");

    let keys = keys(&generated);
    for wanted in [
        "segment_bytes",
        "retention",
        "default_ttl_s",
        "queue_len",
        "tls_cert",
    ] {
        assert!(
            keys.iter().any(|(_, k)| k == wanted),
            "{wanted} not printed"
        );
    }
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .expect("docs/operations.md");
    let missing: Vec<_> = keys
        .iter()
        .filter(|(_, key)| !docs.contains(&format!("`{key}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not list these keys of `eventbus genconfig`: {missing:?}"
    );
}

#[test]
fn checkconfig_names_what_is_wrong_and_where() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("check.toml").display().to_string();
    let cases = [
        ("segment_byte = 1\n", "unknown key `segment_byte`"),
        (
            "[store]\nsegmnt_bytes = 1\n",
            "unknown key `segmnt_bytes` in [store]",
        ),
        ("[stroe]\n", "unknown section [stroe]"),
        (
            "[store]\nsegment_bytes = \"lots\"\n",
            "[store] `segment_bytes`",
        ),
        (
            "[store]\nretention = [\"x:max_events=many\"]\n",
            "[store] `retention`",
        ),
        ("[gateway]\nqueue_len = [1, 2]\n", "expected one value"),
        ("[auth]\nlisten = { host = \"x\" }\n", "[auth] `listen`"),
        ("dev = \"yes\"\n", "`dev`"),
        (
            "[ingest]\nmax_event_bytes = 1000\n[gateway]\nmax_event_bytes = 2000\n",
            "differs in [ingest] and [gateway]",
        ),
        ("[store\n", "check.toml"),
    ];
    for (text, expected) in cases {
        let (code, stderr) = checkconfig(dir.path(), text);
        assert_eq!(code, Some(64), "{text:?} was accepted");
        assert!(stderr.contains(expected), "{text:?}: {stderr}");
        assert!(
            stderr.contains(&file),
            "{text:?} does not name the file: {stderr}"
        );
    }
    // The same setting with the same value in two sections is fine; so is any role's section.
    let fine = "max_event_bytes = 1000\n[ingest]\nmax_body_bytes = 100000\n[gateway]\nqueue_len = 10\n[store]\nretention = \"a.>:max_events=5;b:max_age_s=60\"\n";
    assert_eq!(checkconfig(dir.path(), fine).0, Some(0));
}

/// `serve --config`: settings of the roles it runs come from their sections (a retention rule
/// from `[store]`, API keys from `[auth]`); the environment overrides the file, and flags the
/// environment.
#[tokio::test]
async fn serve_takes_every_role_section_under_the_environment_and_flags() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (in_file, in_env, in_flag) = (free_port(), free_port(), free_port());
    let data = dir.path().join("data");
    let config = dir.path().join("eventbus.toml");
    std::fs::write(
        &config,
        format!(
            r#"
http_header_timeout_s = 5

[serve]
listen = "127.0.0.1:{in_file}"
data = {data:?}

[store]
retention = "ticker:max_events=10"
retention_interval_s = 1
segment_bytes = 4096

[auth]
api_keys = ["{API_KEY_NAME}:{API_KEY_SECRET}"]
"#
        ),
    )
    .expect("write config");
    let config = config.to_str().expect("path");

    let bus = Process::start(EVENTBUS, &["serve", "--config", config], &[], in_file).await;
    let api = Http::new(&format!("http://127.0.0.1:{in_file}"));
    let service = api.token(Some(API_KEY_SECRET), json!({})).await;
    let ticks: Vec<Value> = (0..30)
        .map(|i| json!({"channel": "ticker", "type": "tick", "data": i}))
        .collect();
    assert_eq!(
        api.publish(&service, &Value::Array(ticks)).await.status,
        200
    );
    let refused = eventually("the file's retention rule to let old ticks go", || {
        let (api, service) = (api.clone(), service.clone());
        async move {
            let answer = api.history(&service, "ticker", "after=0").await;
            (answer.status == 410).then_some(answer)
        }
    })
    .await;
    assert_eq!(refused.problem(), "truncated");
    assert_eq!(refused.body["first_seq"], 21);
    drop(bus);

    // The environment over the file, the flag over the environment.
    let listen_env = format!("127.0.0.1:{in_env}");
    let bus = Process::start(
        EVENTBUS,
        &["serve", "--config", config],
        &[("EVENTBUS_LISTEN", &listen_env)],
        in_env,
    )
    .await;
    drop(bus);
    let listen_flag = format!("127.0.0.1:{in_flag}");
    let bus = Process::start(
        EVENTBUS,
        &["serve", "--config", config, "--listen", &listen_flag],
        &[("EVENTBUS_LISTEN", &listen_env)],
        in_flag,
    )
    .await;
    drop(bus);
}

/// A role on its own reads the top of the file and its own section (and the same file serves
/// every role: the other sections are for the others).
#[tokio::test]
async fn a_role_reads_the_top_and_its_own_section() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let config = dir.path().join("eventbus.toml");
    std::fs::write(
        &config,
        format!(
            r#"
nats_url = "{}"

[store]
listen = "127.0.0.1:{port}"
data = {:?}

[gateway]
queue_len = 64
"#,
            nats.url(),
            dir.path().join("store"),
        ),
    )
    .expect("write config");
    let config = config.to_str().expect("path");
    // EVENTBUS_CONFIG names the file as --config does.
    let store = Process::start(EVENTBUS, &["store"], &[("EVENTBUS_CONFIG", config)], port).await;
    assert!(dir.path().join("store").join("store.format").exists());
    drop(store);
}
