//! `GET /v1/channels?prefix=`: the channels a caller may read, with their heads, paged.

mod common;

use common::AllInOne;
use serde_json::{Value, json};

#[tokio::test]
async fn channels_are_listed_by_prefix_for_whoever_may_read_them() {
    let bus = AllInOne::start(false).await;
    let api = bus.endpoints.api.clone();
    let service = bus.endpoints.service_token().await;
    for (channel, n) in [
        ("chan.a", 2),
        ("chan.b", 1),
        ("chan.c", 3),
        ("other.x", 1),
        ("inbox.bob", 1),
    ] {
        for i in 0..n {
            let event = json!({"channel": channel, "type": "t", "data": i});
            assert_eq!(api.publish(&service, &event).await.status, 200);
        }
    }
    let alice = bus
        .endpoints
        .auth
        .client_token(&service, "alice", &["chan.*", "inbox.*"], &[])
        .await;
    let list = |token: String, query: &'static str| {
        let api = api.clone();
        async move {
            api.send(api.get(&format!("/v1/channels?{query}")).bearer_auth(token))
                .await
        }
    };
    let names = |body: &Value| -> Vec<(String, u64)> {
        body["channels"]
            .as_array()
            .expect("channels")
            .iter()
            .map(|c| {
                (
                    c["channel"].as_str().expect("name").to_owned(),
                    c["head"].as_u64().expect("head"),
                )
            })
            .collect()
    };

    let page = list(alice.clone(), "prefix=chan.").await;
    assert_eq!(page.status, 200, "{:?}", page.body);
    assert_eq!(
        names(&page.body),
        [
            ("chan.a".into(), 2),
            ("chan.b".into(), 1),
            ("chan.c".into(), 3)
        ]
    );
    assert_eq!(page.body["next_after"], Value::Null);

    let first = list(alice.clone(), "prefix=chan.&limit=2").await;
    assert_eq!(names(&first.body).len(), 2);
    assert_eq!(first.body["next_after"], "chan.b");
    let rest = list(alice.clone(), "prefix=chan.&limit=2&after=chan.b").await;
    assert_eq!(names(&rest.body), [("chan.c".into(), 3)]);
    assert_eq!(rest.body["next_after"], Value::Null);

    // Another identity's inbox and channels outside the grant are not listed.
    let all = list(alice.clone(), "").await;
    let seen: Vec<String> = names(&all.body).into_iter().map(|(n, _)| n).collect();
    assert_eq!(seen, ["chan.a", "chan.b", "chan.c"]);
    let everything = list(service.clone(), "").await;
    assert_eq!(
        names(&everything.body).len(),
        5,
        "a service with > sees every channel"
    );

    assert_eq!(list(alice.clone(), "colour=red").await.status, 400);
    assert_eq!(list(alice, "limit=0").await.status, 400);
    let anonymous = api.send(api.get("/v1/channels")).await;
    assert_eq!(anonymous.status, 401);
    bus.stop().await;
}
