//! A gateway with more presence entries than auth takes in one report sends them in chunks, and
//! auth ends up with all of them: against a real auth service over gRPC, with the internal
//! credential.

use std::time::Duration;

use eventbus_auth_client::presence::{Entry, Reporter};

const SECRET: &str = "presence-test-internal-credential";
const API_KEY: &str = "ops:ops-secret-0123456789";

#[tokio::test]
async fn a_report_larger_than_auth_takes_arrives_whole_in_chunks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = eventbus_auth::Config::with_keys_dir(dir.path().join("auth"));
    config.internal.token = Some(SECRET.to_owned());
    config.api_keys = vec![API_KEY.parse().expect("api key")];
    let service = eventbus_auth::service(&config).expect("auth");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(axum::serve(listener, service.public.merge(service.internal)).into_future());

    let credential = eventbus_runtime::internal::Credential::new(SECRET).expect("credential");
    let reporter = Reporter::start(
        &url,
        credential,
        &Default::default(),
        "g1".into(),
        Duration::from_secs(60),
    )
    .expect("reporter");
    let entries = eventbus_auth_client::presence::MAX_REPORT_ENTRIES + 5_000;
    let memberships: Vec<_> = (0..entries)
        .map(|n| {
            reporter.join(Entry {
                connection: format!("c{n}"),
                identity: format!("user-{}", n % 100),
                channel: format!("room.{n}"),
            })
        })
        .collect();
    reporter.flush(Duration::from_secs(20)).await;

    let http = reqwest::Client::new();
    let token: serde_json::Value = http
        .post(format!("{url}/v1/tokens"))
        .bearer_auth("ops-secret-0123456789")
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json");
    let stats: serde_json::Value = http
        .get(format!("{url}/v1/admin/stats"))
        .bearer_auth(token["token"].as_str().expect("token"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["gateways"][0]["subscriptions"], entries, "{stats}");

    // Reaching auth's port is not enough to forge presence: a report without the credential is
    // refused, and nothing it claims is counted.
    let mut stranger = eventbus_proto::auth::auth_client::AuthClient::connect(url.clone())
        .await
        .expect("connect");
    let forged = eventbus_proto::auth::PresenceReport {
        gateway: "forger".into(),
        ttl_s: 60,
        full: true,
        joined: vec![eventbus_proto::auth::PresenceEntry {
            connection: "x".into(),
            identity: "mallory".into(),
            channel: "room.1".into(),
        }],
        left: vec![],
    };
    let refused = stranger
        .report_presence(forged)
        .await
        .expect_err("a report without the internal credential");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    let keys = stranger
        .get_keys(eventbus_proto::auth::GetKeysRequest::default())
        .await
        .expect_err("keys without the internal credential");
    assert_eq!(keys.code(), tonic::Code::Unauthenticated, "{keys}");
    drop(memberships);
}
