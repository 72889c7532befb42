//! Every decoder of bytes eventbus did not write itself, fed mutated inputs (see `src/lib.rs`):
//! the event parser (single, batch, CloudEvents binary headers), WebSocket client frames, the SSE
//! query and `Last-Event-ID`, the WebSub hub's form, the application hooks' answers, and what
//! the store reads back from a damaged disk (records,
//! segments, checkpoints, the retention manifest). None may panic, or allocate more at once than a
//! small multiple of the input it was given.

use std::path::Path;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use eventbus_fuzz::{Seal, Watched, fuzz, inputs};

#[global_allocator]
static ALLOCATOR: Watched = Watched;

/// What a decoder may allocate at once: a small multiple of its input, never what a length field
/// claims.
fn proportional(len: usize) -> usize {
    16 * len + 64 * 1024
}

fn seeds(texts: &[&str]) -> Vec<Vec<u8>> {
    texts.iter().map(|t| t.as_bytes().to_vec()).collect()
}

fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

#[test]
fn events_json_single_and_batch() {
    let limits = eventbus_model::Limits::default();
    let accepted = fuzz(
        "events",
        &seeds(&[
            r#"{"channel":"orders","type":"order_placed","data":{"n":1}}"#,
            r#"{"id":"e1","channel":"chat.room-7","type":"said","key":"k","deleted":true,"time":"2026-01-01T00:00:00Z","data":null}"#,
            r#"{"to":"alice","type":"hi","specversion":"1.0","subject":"s","datacontenttype":"application/json","dataschema":"https://x/y","traceparent":"00-ab","data":[1,2.5,"x"]}"#,
            r#"[{"channel":"a","type":"t"},{"channel":"b.c","type":"t","data":{"deep":[[[{}]]]}}]"#,
            r#"{"channel":"a","type":"t","data_base64":"aGVsbG8="}"#,
        ]),
        Seal::None,
        proportional,
        |bytes| eventbus_model::parse_events(bytes, "fuzz", &limits).is_ok(),
    );
    assert!(accepted >= 5, "the seeds themselves are accepted");
}

#[test]
fn cloudevents_binary_mode_headers() {
    // Input: `name: value` lines, an empty line, then the body.
    let accepted = fuzz(
        "cloudevents-binary",
        &seeds(&[
            "ce-specversion: 1.0\nce-id: e1\nce-type: t\nce-source: s\nce-channel: orders\ncontent-type: application/json\n\n{\"a\":1}",
            "ce-specversion: 1.0\nce-type: t\nce-channel: c\nce-key: k\nce-deleted: true\ncontent-type: text/plain; charset=utf-8\n\nhello",
            "ce-specversion: 1.0\nce-type: t\nce-channel: c\n\n\x00\x01\x02",
        ]),
        Seal::None,
        proportional,
        |bytes| {
            let split = bytes
                .windows(2)
                .position(|w| w == b"\n\n")
                .unwrap_or(bytes.len());
            let body = bytes.get(split + 2..).unwrap_or_default();
            let mut headers = HeaderMap::new();
            for line in bytes[..split].split(|b| *b == b'\n') {
                let Some(colon) = line.iter().position(|b| *b == b':') else {
                    continue;
                };
                let name = HeaderName::from_bytes(&line[..colon]);
                let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii());
                if let (Ok(name), Ok(value)) = (name, value) {
                    headers.append(name, value);
                }
            }
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            eventbus_ingest::decoders::binary_mode(&headers, content_type.as_deref(), body)
        },
    );
    assert!(accepted >= 3, "the seeds themselves are accepted");
}

#[test]
fn websocket_client_frames() {
    let accepted = fuzz(
        "ws-frames",
        &seeds(&[
            r#"{"op":"hello","token":"abc.def.ghi","ref":1}"#,
            r#"{"op":"subscribe","channel":"orders","after":41,"compact":true,"ref":"s1"}"#,
            r#"{"op":"subscribe","channel":"orders.*","group":"billing"}"#,
            r#"{"op":"unsubscribe","channel":"orders"}"#,
            r#"{"op":"publish","event":{"channel":"chat.a","type":"said","data":"hi"},"ref":7}"#,
            r#"{"op":"ping"}"#,
            r#"{"op":"refresh","token":"x.y.z"}"#,
        ]),
        Seal::None,
        proportional,
        |bytes| text(bytes).is_some_and(eventbus_gateway::decoders::client_frame),
    );
    assert!(accepted >= 7, "the seeds themselves are accepted");
}

#[test]
fn sse_query_and_last_event_id() {
    let accepted = fuzz(
        "sse-query",
        &seeds(&[
            "channel=orders",
            "channel=a&channel=b.c&token=abc.def&last_event_id=a%3A3%2Cb.c%3A7",
            "channel=chat.room-7&token=x+y",
        ]),
        Seal::None,
        proportional,
        |bytes| text(bytes).is_some_and(eventbus_gateway::decoders::sse_query),
    );
    assert!(accepted >= 3);
    let named = fuzz(
        "last-event-id",
        &seeds(&["a:12,b.c:7", "orders:1", "x:18446744073709551615,y:0"]),
        Seal::None,
        proportional,
        |bytes| text(bytes).is_some_and(|id| eventbus_gateway::decoders::last_event_id(id) > 0),
    );
    assert!(named >= 3);
}

/// A log with several segments, a checkpoint and a retention manifest, written by the store
/// itself: the seeds of the disk decoders.
#[test]
fn websub_hub_requests() {
    let accepted = fuzz(
        "websub-form",
        &seeds(&[
            "hub.mode=subscribe&hub.topic=https%3A%2F%2Fbus.example%2Fv1%2Fchannels%2Fnews.a%2Fevents&hub.callback=https%3A%2F%2Fr.example%2Fcb&hub.lease_seconds=3600&hub.secret=s3cret",
            "hub.mode=unsubscribe&hub.topic=http://h/v1/channels/x/events&hub.callback=http://r/cb?x=1",
        ]),
        Seal::None,
        proportional,
        eventbus_hooks::websub::decodes,
    );
    assert!(accepted >= 2);
}

#[test]
fn application_hook_answers() {
    use eventbus_auth_client::app_hooks::decoders;
    let allowed = fuzz(
        "connect-answer",
        &seeds(&[
            r#"{"allow":true,"identity":"alice","subscribe":["rooms.a","news.>"],"publish":["rooms.a"],"expires_in":600}"#,
            r#"{"allow":true,"identity":"bob"}"#,
            r#"{"allow":false,"reason":"not signed in"}"#,
        ]),
        Seal::None,
        proportional,
        decoders::connect_answer,
    );
    assert!(allowed >= 2);
    let allowed = fuzz(
        "publish-answer",
        &seeds(&[
            r#"{"allow":true}"#,
            r#"{"allow":true,"data":{"text":"****"}}"#,
            r#"{"allow":false,"reason":"read-only"}"#,
        ]),
        Seal::None,
        proportional,
        decoders::publish_answer,
    );
    assert!(allowed >= 2);
}

fn written_log(dir: &Path) {
    use eventbus_store::log::{Entry, Log, Options};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let options = Options {
        segment_bytes: 1024,
        retention: vec!["tmp.>:max_events=2".parse().expect("rule")],
        ..Options::new(dir.to_owned())
    };
    let (log, _committed) = Log::open(options).expect("open");
    runtime.block_on(async {
        for n in 0..40u32 {
            let channel = if n == 0 { "keep" } else { "tmp.x" };
            let key = (n % 3 == 0).then(|| format!("k{}", n % 5));
            log.append(vec![Entry {
                channel: channel.into(),
                id: format!("id-{n}"),
                source: "fuzz".into(),
                deleted: key.is_some() && n % 7 == 0,
                key,
                body: bytes::Bytes::from(format!(
                    r#"{{"id":"id-{n}","data":"{}"}}"#,
                    "x".repeat(n as usize * 3)
                )),
            }])
            .await
            .expect("append");
        }
    });
    log.enforce_retention(eventbus_store::log::now_ms())
        .expect("retention");
    log.close();
}

fn files(dir: &Path, wanted: impl Fn(&str) -> bool) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(&wanted))
        .map(|e| std::fs::read(e.path()).expect("read"))
        .collect();
    out.sort();
    out
}

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../eventbus/tests/fixtures/upgrade/format-0/data/store")
            .join(path),
    )
    .expect("fixture")
}

#[test]
fn what_the_store_reads_back_from_a_damaged_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    written_log(dir.path());

    let mut segments = files(dir.path(), |n| n.ends_with(".seg"));
    segments.push(fixture("0000000000.seg"));
    // Each record on its own too, so that resealing a mutated one reaches its payload decoder.
    let mut records = Vec::new();
    for segment in &segments {
        let mut offset = 0;
        while offset + 4 <= segment.len() {
            let len =
                u32::from_le_bytes(segment[offset..offset + 4].try_into().expect("4")) as usize;
            let end = (offset + 8 + len).min(segment.len());
            records.push(segment[offset..end].to_vec());
            offset = end;
        }
    }
    assert!(eventbus_store::log::decoders::segment(&segments[0]) > 0);
    fuzz("segment", &segments, Seal::None, proportional, |bytes| {
        eventbus_store::log::decoders::segment(bytes) > 0
    });
    let accepted = fuzz("record", &records, Seal::Record, proportional, |bytes| {
        eventbus_store::log::decoders::segment(bytes) > 0
    });
    assert!(
        accepted > records.len(),
        "resealed mutants get past the checksum"
    );

    let mut checkpoints = files(dir.path(), |n| n == "index.ckpt");
    checkpoints.push(fixture("index.ckpt"));
    let accepted = fuzz(
        "checkpoint",
        &checkpoints,
        Seal::Trailing,
        proportional,
        eventbus_store::log::decoders::checkpoint,
    );
    assert!(accepted >= 2, "the seeds themselves are accepted");

    let manifests = files(dir.path(), |n| n == "retired.manifest");
    assert_eq!(
        manifests.len(),
        1,
        "retention deleted segments: there is a manifest"
    );
    let accepted = fuzz(
        "manifest",
        &manifests,
        Seal::Trailing,
        proportional,
        eventbus_store::log::decoders::manifest,
    );
    assert!(accepted >= 1);
}

#[test]
fn records_round_trip() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let word = |rng: &mut rand::rngs::StdRng, max: usize| -> String {
        let n = rng.random_range(0..max);
        (0..n).map(|_| rng.random_range(' '..='~')).collect()
    };
    for _ in 0..inputs() {
        let channel = word(&mut rng, 200);
        let id = word(&mut rng, 200);
        let key = rng.random_bool(0.5).then(|| word(&mut rng, 300));
        let source = rng.random_bool(0.8).then(|| word(&mut rng, 70));
        let body: Vec<u8> = (0..rng.random_range(0..2000))
            .map(|_| rng.random())
            .collect();
        assert!(eventbus_store::log::decoders::record_round_trip(
            rng.random(),
            rng.random(),
            &channel,
            &id,
            key.as_deref(),
            source.as_deref(),
            rng.random(),
            &body,
        ));
    }
}
