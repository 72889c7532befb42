//! The store's gRPC API refuses bad requests with clear errors and keeps serving.

use std::sync::Arc;

use eventbus_model::{Accepted, Limits, parse_event};
use eventbus_router::InProcessBackbone;
use eventbus_runtime::Shutdown;
use eventbus_runtime::internal::Credential;
use eventbus_store::Config;
use eventbus_store_client::{StoreClient, StoreError};

/// Waits until the store answers (it opens its log first).
async fn until_serving(store: &StoreClient) {
    for _ in 0..200 {
        if store.head("orders").await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the store did not start");
}

fn event(channel: &str, n: usize) -> Accepted {
    parse_event(
        format!(r#"{{"channel":"{channel}","type":"t","data":{n}}}"#).as_bytes(),
        "test",
        &Limits::default(),
    )
    .expect("valid event")
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    bad_requests_get_clear_errors_on(None).await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors_on_postgres() {
    let postgres = eventbus_testkit::postgres::Postgres::primary().await;
    bad_requests_get_clear_errors_on(Some(postgres.url())).await;
}

/// The same requests and answers whatever the engine: the embedded log, or PostgreSQL at `url`.
async fn bad_requests_get_clear_errors_on(postgres: Option<String>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = Shutdown::new();
    let mut config = Config::with_data(dir.path().to_owned());
    let secret = "internal-credential-of-this-test";
    config.internal.token = Some(secret.to_owned());
    config.settings.postgres = postgres.map(eventbus_store::config::DatabaseUrl);
    let server = tokio::spawn(eventbus_store::run(
        config,
        listener,
        Arc::new(InProcessBackbone::new()),
        shutdown.clone(),
    ));
    let credential = |secret: &str| Credential::new(secret).expect("credential");
    let store = StoreClient::new(&url, credential(secret), &Default::default()).expect("client");

    // Reaching the port is not enough: without the internal credential nothing is appended or read.
    let stranger = StoreClient::new(
        &url,
        credential("not-the-internal-credential"),
        &Default::default(),
    )
    .expect("client");
    until_serving(&store).await;
    match stranger.append(vec![event("orders", 0)]).await {
        Err(StoreError::Refused(message)) => assert!(message.contains("credential"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(stranger.read("orders", 0, 10, false).await.is_err());

    let appended = store
        .append(vec![event("orders", 1), event("orders", 2)])
        .await
        .expect("append");
    assert_eq!(
        appended.iter().map(|a| a.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );

    let too_many = (0..10_001).map(|n| event("orders", n)).collect();
    match store.append(too_many).await {
        Err(StoreError::Invalid(message)) => {
            assert!(message.contains("at most 10000"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(
        store.append(vec![]).await,
        Err(StoreError::Invalid(_))
    ));
    let mut not_json = event("orders", 3);
    not_json.body = b"not json".to_vec();
    assert!(matches!(
        store.append(vec![not_json]).await,
        Err(StoreError::Invalid(_))
    ));
    let mut bad_channel = event("orders", 4);
    bad_channel.channel = "no..good".into();
    assert!(matches!(
        store.append(vec![bad_channel]).await,
        Err(StoreError::Invalid(_))
    ));

    // Fields the record codec could not read back are refused, never acknowledged: a direct gRPC
    // caller skips ingest's validation.
    let mut long_key = event("orders", 5);
    long_key.key = Some("k".repeat(70_000));
    let mut long_id = event("orders", 6);
    long_id.id = "i".repeat(129);
    let mut nul_key = event("orders", 8);
    nul_key.key = Some("a\0b".into());
    let mut huge = event("orders", 7);
    huge.body = format!(r#"{{"data":"{}"}}"#, "x".repeat(33 * 1024 * 1024)).into_bytes();
    for (what, bad) in [
        ("key", long_key),
        ("id", long_id),
        ("event", huge),
        ("NUL", nul_key),
    ] {
        match store.append(vec![bad]).await {
            Err(StoreError::Invalid(message)) => assert!(message.contains(what), "{message}"),
            other => panic!("expected a refusal of the {what}, got {other:?}"),
        }
    }

    match store.read("orders", 3, 10, false).await {
        Err(StoreError::OutOfRange(message)) => {
            assert!(message.contains("beyond the head"), "{message}")
        }
        other => panic!("expected out of range, got {other:?}"),
    }
    let unknown = store
        .read("never-written", 0, 10, false)
        .await
        .expect("an unknown channel is empty");
    assert_eq!((unknown.events.len(), unknown.head), (0, 0));
    assert!(matches!(
        store.read("never-written", 1, 10, false).await,
        Err(StoreError::OutOfRange(_))
    ));
    assert!(matches!(
        store.read("a.*", 0, 10, false).await,
        Err(StoreError::Invalid(_))
    ));

    // Many heads in one call, in the order asked, 0 where nothing was written; more channels than
    // one call may carry are split by the client, and a bad name refuses the whole call.
    store
        .append(vec![event("payments", 1)])
        .await
        .expect("append");
    let names = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(
        store
            .heads(&names(&["payments", "never-written", "orders", "payments"]))
            .await
            .expect("heads"),
        vec![1, 0, 2, 1]
    );
    let many: Vec<String> = (0..10_001)
        .map(|n| {
            if n == 10_000 {
                "orders".into()
            } else {
                format!("c{n}")
            }
        })
        .collect();
    let heads = store.heads(&many).await.expect("heads in two calls");
    assert_eq!((heads.len(), heads[0], heads[10_000]), (10_001, 0, 2));
    assert!(matches!(
        store.heads(&names(&["orders", "a.*"])).await,
        Err(StoreError::Invalid(_))
    ));

    // Still serving, and nothing of the refused requests was stored.
    assert_eq!(store.head("orders").await.expect("head"), 2);
    shutdown.trigger();
    server.await.expect("join").expect("store stopped cleanly");
}
