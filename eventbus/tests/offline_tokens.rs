//! Keys and tokens without a running bus: `eventbus keygen` adds a signing key, `eventbus token
//! --keys-dir` signs a token a running bus with those keys accepts (and holds to its grant), and
//! `eventbus token check` says valid (0), invalid (1) or expired (2). The key rotation procedure
//! of docs/operations.md, run as written.

mod common;

use std::process::Output;

use common::AllInOne;
use eventbus_testkit::eventually;
use eventbus_testkit::ws::Ws;
use serde_json::{Value, json};

async fn eventbus(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(args)
        .env_remove("EVENTBUS_URL")
        .env_remove("EVENTBUS_AUTH_KEYS_DIR")
        .output()
        .await
        .expect("run eventbus")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Signs a token offline; panics unless it works.
async fn offline_token(keys: &str, args: &[&str]) -> String {
    let output = eventbus(&[&["token", "--keys-dir", keys], args].concat()).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

/// `token check`: its exit code and what it printed.
async fn check(token: &str, against: &[&str]) -> (Option<i32>, Value) {
    let output = eventbus(&[&["token", "check", token], against].concat()).await;
    let printed = serde_json::from_str(&stdout(&output)).unwrap_or(Value::Null);
    (output.status.code(), printed)
}

#[tokio::test]
async fn tokens_signed_offline_are_accepted_within_their_grant_and_checked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("auth");
    let keys = keys.to_str().expect("path").to_owned();

    // A key made before the bus ever ran; the bus signs with it and publishes it.
    let made = eventbus(&["keygen", "--keys-dir", &keys]).await;
    assert!(made.status.success(), "{made:?}");
    let made: Value = serde_json::from_str(&stdout(&made)).expect("keygen prints JSON");
    let file = made["file"].as_str().expect("file");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the key file is readable by others: {mode:o}"
    );

    let bus = AllInOne::start_in(dir, false).await;
    let jwks = bus
        .endpoints
        .auth
        .send(bus.endpoints.auth.get("/v1/jwks"))
        .await;
    assert_eq!(jwks.body["keys"][0]["kid"], made["kid"], "{}", jwks.body);

    // A service token signed offline publishes; a client token signed offline holds to its grant.
    let service = offline_token(&keys, &["--sub", "billing", "--role", "service"]).await;
    let answer = bus
        .endpoints
        .api
        .publish(
            &service,
            &json!({"channel": "room.1", "type": "t", "data": 1}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let alice = offline_token(
        &keys,
        &["--sub", "alice", "--subscribe", "room.1", "--ttl-s", "600"],
    )
    .await;
    let (mut ws, _) = Ws::hello(&bus.endpoints.ws, &alice).await;
    ws.subscribe(json!({"channel": "room.1", "after": 0})).await;
    assert_eq!(ws.events(1).await[0]["data"], 1);
    ws.send(json!({"op": "subscribe", "channel": "room.2"}))
        .await;
    let refused = ws.recv_op("error").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");

    // check: valid against the key directory and against the running bus's key set.
    let (code, printed) = check(&alice, &["--keys-dir", &keys]).await;
    assert_eq!(code, Some(0), "{printed}");
    assert_eq!(printed["valid"], true);
    assert_eq!(printed["claims"]["sub"], "alice");
    assert_eq!(printed["claims"]["subscribe"], json!(["room.1"]));
    let left = printed["expires_in_s"].as_i64().expect("time left");
    assert!((590..=600).contains(&left), "{left}");
    let (code, _) = check(&alice, &["--url", &bus.endpoints.auth.base]).await;
    assert_eq!(code, Some(0));

    // Invalid: signed by keys the bus does not have, or tampered with.
    let stranger_keys = tempfile::tempdir().expect("temp dir");
    let stranger_keys = stranger_keys.path().to_str().expect("path").to_owned();
    assert!(
        eventbus(&["keygen", "--keys-dir", &stranger_keys])
            .await
            .status
            .success()
    );
    let forged = offline_token(&stranger_keys, &["--sub", "mallory", "--role", "service"]).await;
    let (code, printed) = check(&forged, &["--url", &bus.endpoints.auth.base]).await;
    assert_eq!(code, Some(1), "{printed}");
    assert_eq!(printed["valid"], false);
    let answer = bus
        .endpoints
        .api
        .publish(
            &forged,
            &json!({"channel": "room.1", "type": "t", "data": 2}),
        )
        .await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    // One character of the claims changed (replacing every 'A' was no change at all for a
    // token whose claims happened to hold none: a flaky pass as valid).
    let mut parts: Vec<String> = alice.split('.').map(str::to_owned).collect();
    let mut claims: Vec<char> = parts[1].chars().collect();
    claims[10] = if claims[10] == 'A' { 'B' } else { 'A' };
    parts[1] = claims.into_iter().collect();
    let (code, _) = check(&parts.join("."), &["--keys-dir", &keys]).await;
    assert_eq!(code, Some(1));
    let (code, _) = check("not-a-jwt", &["--keys-dir", &keys]).await;
    assert_eq!(code, Some(1));

    // Expired: exit 2, claims still shown.
    let brief = offline_token(&keys, &["--sub", "bob", "--ttl-s", "1"]).await;
    let (code, printed) = eventually("the one-second token to expire", || async {
        let (code, printed) = check(&brief, &["--keys-dir", &keys]).await;
        (code != Some(0)).then_some((code, printed))
    })
    .await;
    assert_eq!(code, Some(2), "{printed}");
    assert_eq!(printed["claims"]["sub"], "bob");

    // No keys, no token: a usage error that says how to make one.
    let empty = tempfile::tempdir().expect("temp dir");
    let output = eventbus(&[
        "token",
        "--keys-dir",
        empty.path().to_str().expect("path"),
        "--sub",
        "x",
    ])
    .await;
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("eventbus keygen"));
    bus.stop().await;
}

/// docs/operations.md "Rotate signing keys": add a key with keygen, restart auth; tokens signed
/// with the old key stay valid, new tokens are signed with the new one.
#[tokio::test]
async fn a_key_added_with_keygen_signs_after_a_restart_and_old_tokens_stay_valid() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("auth");
    let keys = keys.to_str().expect("path").to_owned();
    let bus = AllInOne::start_in(dir, false).await;
    let before = bus.endpoints.service_token().await;

    let added = eventbus(&["keygen", "--keys-dir", &keys]).await;
    let added: Value = serde_json::from_str(&stdout(&added)).expect("keygen JSON");
    let dir = bus.stop().await;
    let bus = AllInOne::start_in(dir, false).await;

    let after = bus.endpoints.service_token().await;
    let kid = |token: &str| {
        let header = token.split('.').next().expect("header");
        use base64::Engine;
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .expect("base64");
        serde_json::from_slice::<Value>(&header).expect("json")["kid"].clone()
    };
    assert_eq!(kid(&after), added["kid"], "the added key signs");
    assert_ne!(kid(&before), added["kid"]);
    for token in [&before, &after] {
        let answer = bus
            .endpoints
            .api
            .publish(
                token,
                &json!({"channel": "rotation", "type": "t", "data": 1}),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    bus.stop().await;
}
