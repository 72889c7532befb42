//! docs/openapi.json stays true: every route the services declare is described (with its
//! methods), every described route is declared, and every described route answers on the
//! all-in-one bus (not the router's "no such route").

mod common;

use std::collections::BTreeSet;

use common::AllInOne;
use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// Where the services declare their HTTP routes.
const SOURCES: &[&str] = &[
    "ingest/src/lib.rs",
    "auth/src/lib.rs",
    "hooks/src/lib.rs",
    "gateway/src/lib.rs",
    "runtime/src/lib.rs",
    "eventbus/src/serve.rs",
];
const METHODS: &[&str] = &["get", "post", "put", "delete", "patch"];

/// (path, method) of every `.route("path", method(handler).method(handler))` in `source`.
fn declared(source: &str) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        // The arguments, up to the matching parenthesis.
        let (mut depth, mut end) = (1, 0);
        for (i, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = i;
                break;
            }
        }
        let args = &rest[..end];
        let Some(open) = args.find('"') else { continue };
        let Some(len) = args[open + 1..].find('"') else {
            continue;
        };
        let path = &args[open + 1..open + 1 + len];
        let after_path = &args[open + 1 + len..];
        for method in METHODS {
            let call = format!("{method}(");
            // A method router call: `get(` at the start of a word (not `forget(`).
            let mut from = 0;
            while let Some(i) = after_path[from..].find(&call) {
                let at = from + i;
                let before = after_path[..at].chars().last().unwrap_or(' ');
                if !(before.is_alphanumeric() || before == '_') {
                    found.insert((path.to_owned(), method.to_string()));
                }
                from = at + call.len();
            }
        }
    }
    found
}

fn documented() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(format!("{ROOT}/docs/openapi.json")).expect("docs/openapi.json");
    let doc: Value = serde_json::from_str(&text).expect("openapi.json is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if METHODS.contains(&method.as_str()) {
                routes.insert((path.clone(), method.clone()));
            }
        }
    }
    routes
}

#[test]
fn the_document_and_the_code_name_the_same_routes() {
    let mut code = BTreeSet::new();
    for file in SOURCES {
        let source = std::fs::read_to_string(format!("{ROOT}/{file}")).expect("source");
        code.extend(declared(&source));
    }
    assert!(
        code.contains(&("/v1/events".into(), "post".into())),
        "the scan works: {code:?}"
    );
    let docs = documented();
    let undocumented: Vec<_> = code.difference(&docs).collect();
    let unserved: Vec<_> = docs.difference(&code).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in docs/openapi.json: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in docs/openapi.json but not served: {unserved:?}"
    );
}

#[test]
fn the_scan_sees_methods_and_nested_calls() {
    let found = declared(
        r#".route("/a/{x}", get(|| async { f(1) }).put(handler)) .route(
            "/b", post(h))"#,
    );
    let expected: BTreeSet<(String, String)> =
        [("/a/{x}", "get"), ("/a/{x}", "put"), ("/b", "post")]
            .iter()
            .map(|(p, m)| (p.to_string(), m.to_string()))
            .collect();
    assert_eq!(found, expected);
}

#[tokio::test]
async fn every_documented_route_answers() {
    let bus = AllInOne::start(true).await;
    let base = bus.endpoints.api.base.clone();
    let client = reqwest::Client::new();
    for (path, method) in documented() {
        let url = format!(
            "{base}{}",
            path.replace("{channel}", "openapi.check")
                .replace("{id}", "none")
        );
        let request = match method.as_str() {
            "get" => client.get(&url),
            "post" => client.post(&url),
            "put" => client.put(&url),
            "delete" => client.delete(&url),
            other => panic!("method {other}"),
        };
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let unrouted = status == 405 || (status == 404 && body["detail"] == "no such route");
        assert!(!unrouted, "{method} {path}: {status} {body}");
    }
    bus.stop().await;
}
