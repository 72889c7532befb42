//! Upgrades keep the data: a data directory written by an earlier version of the bus (one fixture
//! per on-disk format, made by `scripts/make-upgrade-fixture.sh` with that version's binary and
//! committed) opens with this version with every event, compacted read, snapshot, signing key,
//! webhook and idempotency entry intact, and goes on from there.

mod common;

use std::path::Path;

use base64::Engine;
use common::AllInOne;
use serde_json::{Value, json};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn kid_of(token: &str) -> String {
    let header = token.split('.').next().expect("jwt header");
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .expect("base64"),
    )
    .expect("json");
    header["kid"].as_str().expect("kid").to_owned()
}

async fn opens_with_everything(fixture: &str) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/upgrade")
        .join(fixture);
    let expected: Value = serde_json::from_slice(
        &std::fs::read(fixture.join("expected.json")).expect("expected.json"),
    )
    .expect("expected json");
    let dir = tempfile::tempdir().expect("temp dir");
    copy_dir(&fixture.join("data"), dir.path());

    // The fixture's ids were stored when it was made: remember them for as long as it may be old.
    let tune =
        |config: &mut eventbus::serve::Config| config.store.dedupe_window_s = 100 * 365 * 86_400;
    let bus = AllInOne::start_with(dir, true, tune).await;
    let api = &bus.endpoints.api;
    let token = bus.endpoints.auth.token(None, json!({})).await;
    assert_eq!(
        expected["kids"].as_array().expect("kids")[0].as_str(),
        Some(kid_of(&token).as_str()),
        "the signing key is the one the old version made"
    );
    let jwks = api.send(api.get("/v1/jwks")).await;
    for kid in expected["kids"].as_array().expect("kids") {
        assert!(
            jwks.body["keys"]
                .as_array()
                .expect("keys")
                .iter()
                .any(|k| &k["kid"] == kid),
            "key {kid} is still served"
        );
    }

    for (channel, history) in expected["history"].as_object().expect("history") {
        let page = api.history(&token, channel, "after=0&limit=1000").await;
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(&page.body, history, "history of {channel}");
    }
    for (channel, compacted) in expected["compacted"].as_object().expect("compacted") {
        let page = api
            .history(&token, channel, "after=0&limit=1000&compact=true")
            .await;
        assert_eq!(&page.body, compacted, "compacted read of {channel}");
    }
    for (channel, snapshot) in expected["snapshot"].as_object().expect("snapshot") {
        let got = api
            .send(
                api.get(&format!("/v1/channels/{channel}/snapshot"))
                    .bearer_auth(&token),
            )
            .await;
        assert_eq!(&got.body, snapshot, "snapshot of {channel}");
    }
    let hooks = api.send(api.get("/v1/webhooks").bearer_auth(&token)).await;
    let hook = &expected["webhooks"]["webhooks"][0];
    let found = hooks.body["webhooks"]
        .as_array()
        .expect("webhooks")
        .iter()
        .find(|h| h["id"] == hook["id"])
        .expect("the webhook registration survives");
    assert_eq!(
        (&found["url"], &found["channels"]),
        (&hook["url"], &hook["channels"])
    );

    for retry in expected["retry"].as_array().expect("retry") {
        let channel = retry["channel"].as_str().expect("channel");
        let id = retry["id"].as_str().expect("id");
        let seq = expected["history"][channel]["events"]
            .as_array()
            .expect("events")
            .iter()
            .find(|e| e["id"] == id)
            .expect("retried id in the history")["seq"]
            .clone();
        let answer = api
            .publish(
                &token,
                &json!({"id": id, "channel": channel, "type": "retry"}),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body["events"][0]["seq"], seq, "retry of {id}");
        assert_eq!(answer.body["events"][0]["duplicate"], true, "retry of {id}");
    }
    let head = expected["history"]["orders"]["head"]
        .as_u64()
        .expect("head");
    let next = api
        .publish(
            &token,
            &json!({"id": "after-upgrade", "channel": "orders", "type": "t"}),
        )
        .await;
    assert_eq!(
        next.body["events"][0]["seq"],
        head + 1,
        "seqs go on after the upgrade"
    );

    // A clean stop and a start in the new format keep it all.
    let dir = bus.stop().await;
    assert!(dir.path().join("store/store.format").exists());
    let bus = AllInOne::start_with(dir, true, tune).await;
    let token = bus.endpoints.auth.token(None, json!({})).await;
    let page = bus
        .endpoints
        .api
        .history(&token, "orders", "after=0&limit=1000")
        .await;
    assert_eq!(page.body["head"], head + 1);
    bus.stop().await;
}

#[tokio::test]
async fn a_data_directory_of_format_0_opens_with_everything() {
    opens_with_everything("format-0").await;
}

/// Format 1 (b92f628): versioned directory, checkpoint EBCKPT01, records without their source.
#[tokio::test]
async fn a_data_directory_of_format_1_opens_with_everything() {
    opens_with_everything("format-1").await;
}
