//! Auth's gRPC (the signing keys) is for the other services: reaching its port is not enough.

const SECRET: &str = "auth-test-internal-credential";

#[tokio::test]
async fn the_keys_need_the_internal_credential() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = eventbus_auth::Config::with_keys_dir(dir.path().join("auth"));
    config.internal.token = Some(SECRET.to_owned());
    let shutdown = eventbus_runtime::Shutdown::new();
    let service = eventbus_auth::service(
        &config,
        std::sync::Arc::new(eventbus_router::InProcessBackbone::new()),
        shutdown.clone(),
    )
    .expect("auth");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(axum::serve(listener, service.public.merge(service.internal)).into_future());

    let mut stranger = eventbus_proto::auth::auth_client::AuthClient::connect(url.clone())
        .await
        .expect("connect");
    let refused = stranger
        .get_keys(eventbus_proto::auth::GetKeysRequest::default())
        .await
        .expect_err("keys without the internal credential");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");

    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let credential = eventbus_runtime::internal::Credential::new(SECRET).expect("credential");
    let mut member =
        eventbus_proto::auth::auth_client::AuthClient::with_interceptor(channel, credential);
    let keys = member
        .get_keys(eventbus_proto::auth::GetKeysRequest::default())
        .await
        .expect("keys with the credential")
        .into_inner();
    assert!(keys.jwks_json.contains("Ed25519"), "{}", keys.jwks_json);
    shutdown.trigger();
}
