//! Nobody gets more than they were given, in production mode: each row is an attack and the
//! answer it must get.

mod common;

use base64::Engine;
use common::AllInOne;
use eventbus_testkit::cluster::API_KEY_SECRET;
use eventbus_testkit::http::Http;
use serde_json::{Value, json};

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("jwt payload");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64"),
    )
    .expect("json")
}

async fn mint(auth: &Http, credential: &str, body: Value) -> (u16, Value) {
    let answer = auth
        .send(auth.post("/v1/tokens").bearer_auth(credential).json(&body))
        .await;
    (answer.status.as_u16(), answer.body)
}

#[tokio::test]
async fn a_token_never_mints_more_than_it_holds() {
    let bus = AllInOne::start(false).await;
    let auth = bus.endpoints.auth.clone();
    let narrow_request =
        json!({"subscribe": ["billing.*", "inbox.*"], "publish": ["billing.*"], "ttl_s": 600});
    let (status, narrow) = mint(&auth, API_KEY_SECRET, narrow_request).await;
    assert_eq!(status, 200, "{narrow}");
    let narrow = narrow["token"].as_str().expect("token").to_owned();
    let narrow_exp = claims(&narrow)["exp"].as_u64().expect("exp");
    let (_, no_inbox) = mint(
        &auth,
        API_KEY_SECRET,
        json!({"subscribe": ["billing.*"], "publish": ["billing.*"], "ttl_s": 600}),
    )
    .await;
    let no_inbox = no_inbox["token"].as_str().expect("token").to_owned();
    let client = auth
        .token(
            Some(API_KEY_SECRET),
            json!({"sub": "carol", "subscribe": ["billing.a"]}),
        )
        .await;

    // (minter, request, status, the field a refusal names)
    let rows: Vec<(&str, &str, Value, u16, Option<&str>)> = vec![
        ("same grant by default", &narrow, json!({}), 200, None),
        (
            "narrower",
            &narrow,
            json!({"subscribe": ["billing.eu"], "publish": []}),
            200,
            None,
        ),
        (
            "wider subscribe",
            &narrow,
            json!({"subscribe": [">"]}),
            403,
            Some("subscribe"),
        ),
        (
            "wider publish",
            &narrow,
            json!({"publish": ["billing.*", "orders"]}),
            403,
            Some("publish"),
        ),
        (
            "pattern over a literal",
            &narrow,
            json!({"subscribe": ["billing.>"]}),
            403,
            Some("subscribe"),
        ),
        ("longer life", &narrow, json!({"ttl_s": 86400}), 200, None),
        (
            "client within",
            &narrow,
            json!({"sub": "alice", "subscribe": ["billing.alice"]}),
            200,
            None,
        ),
        (
            "client beyond",
            &narrow,
            json!({"sub": "alice", "role": "client", "subscribe": ["anything.>"]}),
            403,
            Some("subscribe"),
        ),
        (
            "client publishing beyond",
            &narrow,
            json!({"sub": "alice", "publish": ["chat.*"]}),
            403,
            Some("publish"),
        ),
        (
            "client without the inbox",
            &no_inbox,
            json!({"sub": "alice", "subscribe": ["billing.alice"]}),
            403,
            Some("sub"),
        ),
        (
            "service for another",
            &narrow,
            json!({"sub": "other", "role": "service"}),
            403,
            None,
        ),
        (
            "client token minting",
            &client,
            json!({"sub": "dave"}),
            403,
            None,
        ),
        (
            "api key beyond",
            API_KEY_SECRET,
            json!({"sub": "alice", "subscribe": ["anything.>"], "ttl_s": 86400}),
            200,
            None,
        ),
    ];
    for (name, minter, request, status, field) in rows {
        let (got, body) = mint(&auth, minter, request.clone()).await;
        assert_eq!(got, status, "{name}: {request} -> {body}");
        if let Some(field) = field {
            assert_eq!(body["field"], field, "{name}: {body}");
        }
        if got == 200 && minter == narrow {
            let minted = claims(body["token"].as_str().expect("token"));
            assert!(
                minted["exp"].as_u64().expect("exp") <= narrow_exp,
                "{name}: expires after its minter"
            );
            if minted["role"] == "service" && request.get("subscribe").is_none() {
                assert_eq!(
                    minted["subscribe"],
                    json!(["billing.*", "inbox.*"]),
                    "{name}"
                );
                assert_eq!(minted["publish"], json!(["billing.*"]), "{name}");
            }
        }
    }

    // A chain narrows, never widens back: a token minted by a narrowed one mints within it.
    let (_, narrower) = mint(
        &auth,
        &narrow,
        json!({"subscribe": ["billing.eu"], "publish": []}),
    )
    .await;
    let narrower = narrower["token"].as_str().expect("token").to_owned();
    let (status, _) = mint(&auth, &narrower, json!({"subscribe": ["billing.*"]})).await;
    assert_eq!(status, 403);
    let (status, again) = mint(&auth, &narrower, json!({})).await;
    assert_eq!(status, 200);
    let again = claims(again["token"].as_str().expect("token"));
    assert_eq!(
        (&again["subscribe"], &again["publish"]),
        (&json!(["billing.eu"]), &json!([]))
    );
    bus.stop().await;
}

#[tokio::test]
async fn a_refresh_is_a_new_grant_and_snapshots_are_written_by_services() {
    use eventbus_testkit::ws::Ws;
    let bus = AllInOne::start(false).await;
    let api = bus.endpoints.api.clone();
    let service = bus.endpoints.service_token().await;
    let client = |subscribe: Value| {
        let auth = bus.endpoints.auth.clone();
        async move {
            auth.token(
                Some(API_KEY_SECRET),
                json!({"sub": "alice", "subscribe": subscribe, "publish": ["room.*"]}),
            )
            .await
        }
    };
    let both = client(json!(["room.a", "room.b"])).await;
    let only_b = client(json!(["room.b"])).await;
    let (mut ws, _) = Ws::hello(&bus.endpoints.ws, &both).await;
    ws.subscribe(json!({"channel": "room.a"})).await;
    ws.subscribe(json!({"channel": "room.b"})).await;
    ws.send(json!({"op": "refresh", "token": only_b, "ref": "r"}))
        .await;
    let ended = ws.recv().await;
    assert_eq!(
        (&ended["op"], &ended["code"], &ended["channel"]),
        (&json!("error"), &json!("forbidden"), &json!("room.a")),
        "{ended}"
    );
    assert_eq!(ws.recv().await["op"], "refreshed");
    // room.a is no longer delivered; room.b is.
    for channel in ["room.a", "room.b"] {
        let answer = api
            .publish(
                &service,
                &json!({"channel": channel, "type": "t", "data": channel}),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
    let next = ws.recv().await;
    assert_eq!(next["event"]["channel"], "room.b", "{next}");

    // Snapshots: a client allowed to publish to room.* may not write room.x's state.
    let published = api
        .publish(&service, &json!({"channel": "room.x", "type": "t"}))
        .await;
    assert_eq!(published.status, 200);
    let snapshot = json!({"seq": 1, "data": {"owned": true}});
    let by_client = api
        .send(api.put_json("/v1/channels/room.x/snapshot", &only_b, &snapshot))
        .await;
    assert_eq!(by_client.status, 403, "{}", by_client.body);
    let by_service = api
        .send(api.put_json("/v1/channels/room.x/snapshot", &service, &snapshot))
        .await;
    assert_eq!(by_service.status, 200, "{}", by_service.body);
    bus.stop().await;
}
