//! Presence: gateways report who is subscribed where to auth; `GET /v1/presence/{channel}` and the
//! `presence.<channel>` events follow joins and leaves across gateways, and a gateway that dies
//! without a word has its entries expire.

use eventbus_testkit::cluster::{API_KEY_SECRET, PRESENCE_EVENTS};
use eventbus_testkit::http::{Answer, Http};
use eventbus_testkit::process::Process;
use eventbus_testkit::ws::Ws;
use eventbus_testkit::{Cluster, eventually, free_port};
use serde_json::{Value, json};

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");

async fn presence(auth: &Http, token: &str, channel: &str) -> Answer {
    auth.send(
        auth.get(&format!("/v1/presence/{channel}"))
            .bearer_auth(token),
    )
    .await
}

/// The identities present in `channel`, once the answer satisfies `want`.
async fn identities_when(auth: &Http, token: &str, channel: &str, want: &[&str]) -> Vec<String> {
    eventually(&format!("presence of {channel} to be {want:?}"), || async {
        let answer = presence(auth, token, channel).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        let found: Vec<String> = answer.body["identities"]
            .as_array()
            .expect("identities")
            .iter()
            .map(|i| i["identity"].as_str().expect("identity").to_owned())
            .collect();
        (found == want).then_some(found)
    })
    .await
}

#[tokio::test]
async fn presence_follows_joins_and_leaves_across_gateways() {
    assert_eq!(PRESENCE_EVENTS, "rooms.>");
    let mut cluster = Cluster::start().await;
    let second = cluster.add_gateway().await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    let alice = bus
        .auth
        .client_token(&service, "alice", &["rooms.*"], &[])
        .await;
    let bob = bus
        .auth
        .client_token(&service, "bob", &["rooms.lobby"], &[])
        .await;
    let outsider = bus
        .auth
        .client_token(&service, "mallory", &["other"], &[])
        .await;

    // A watcher of the presence channel, subscribed before anybody comes.
    let (mut watcher, _) = Ws::hello(&bus.ws, &alice).await;
    watcher
        .subscribe(json!({"channel": "presence.rooms.lobby"}))
        .await;

    let (mut a, _) = Ws::hello(&bus.ws, &alice).await;
    let (mut a2, _) = Ws::hello(&second, &alice).await;
    let (mut b, _) = Ws::hello(&second, &bob).await;
    a.subscribe(json!({"channel": "rooms.lobby"})).await;
    a2.subscribe(json!({"channel": "rooms.lobby"})).await;
    b.subscribe(json!({"channel": "rooms.lobby"})).await;
    identities_when(&bus.auth, &bob, "rooms.lobby", &["alice", "bob"]).await;
    let answer = presence(&bus.auth, &service, "rooms.lobby").await;
    assert_eq!(answer.body["count"], 2);
    assert_eq!(answer.body["connections"], 3, "alice twice, bob once");

    // Leaving: bob closes; alice unsubscribes one of her two connections and stays present.
    b.close().await;
    a2.send(json!({"op": "unsubscribe", "channel": "rooms.lobby"}))
        .await;
    a2.recv_op("unsubscribed").await;
    identities_when(&bus.auth, &alice, "rooms.lobby", &["alice"]).await;

    // The events: alice and bob joined (each once, whatever the order), then bob left.
    let events = watcher.events(3).await;
    let summary: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().expect("type").to_owned(),
                e["key"].as_str().expect("key").to_owned(),
            )
        })
        .collect();
    let mut joins: Vec<&str> = summary[..2].iter().map(|(_, k)| k.as_str()).collect();
    joins.sort();
    assert_eq!(joins, ["alice", "bob"], "{summary:?}");
    assert!(
        summary[..2]
            .iter()
            .all(|(t, _)| t == "eventbus.presence.joined")
    );
    assert_eq!(summary[2], ("eventbus.presence.left".into(), "bob".into()));
    assert_eq!(events[2]["deleted"], true);
    assert_eq!(
        events[2]["data"],
        json!({"channel": "rooms.lobby", "identity": "bob"})
    );

    // A compacted read of the presence channel is who is there now.
    let history = bus
        .api
        .history(&alice, "presence.rooms.lobby", "compact=true")
        .await;
    assert_eq!(history.status, 200, "{:?}", history.body);
    let keys: Vec<&str> = history.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["deleted"] != Value::Bool(true))
        .map(|e| e["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys, ["alice"]);

    // Nobody publishes presence events but the bus.
    let forged = bus
        .api
        .publish(
            &service,
            &json!({"channel": "presence.rooms.lobby", "type": "eventbus.presence.joined", "key": "eve", "data": {}}),
        )
        .await;
    assert_eq!(forged.status, 403, "{:?}", forged.body);

    // Presence is for whoever may read the channel, with a token.
    let answer = presence(&bus.auth, &outsider, "rooms.lobby").await;
    assert_eq!(
        (answer.status.as_u16(), answer.problem().as_str()),
        (403, "forbidden")
    );
    let answer = bus
        .auth
        .send(bus.auth.get("/v1/presence/rooms.lobby"))
        .await;
    assert_eq!(answer.status, 401);
    let answer = presence(&bus.auth, &alice, "rooms.*").await;
    assert_eq!(answer.status, 400, "{:?}", answer.body);
    let answer = presence(&bus.auth, &alice, "rooms..x").await;
    assert_eq!(answer.status, 400, "{:?}", answer.body);
    // The admin figures, from the gateways' reports; for service tokens only.
    // alice's first connection and the watcher, both on the first gateway (a2 unsubscribed, b left;
    // reports arrive in their own time).
    eventually("admin figures of 2 subscribed connections", || async {
        let stats = bus
            .auth
            .send(bus.auth.get("/v1/admin/stats").bearer_auth(&service))
            .await;
        assert_eq!(stats.status, 200, "{:?}", stats.body);
        let gateways = stats.body["gateways"].as_array().expect("gateways").clone();
        let subscribed: u64 = gateways
            .iter()
            .map(|g| g["subscribed_connections"].as_u64().expect("count"))
            .sum();
        (subscribed == 2 && gateways.len() == 1).then_some(())
    })
    .await;
    let denied = bus
        .auth
        .send(bus.auth.get("/v1/admin/stats").bearer_auth(&alice))
        .await;
    assert_eq!(denied.status, 403);
    let anonymous = bus.auth.send(bus.auth.get("/v1/admin/stats")).await;
    assert_eq!(anonymous.status, 401);
    a.close().await;
    watcher.close().await;
    cluster.stop().await;
}

#[tokio::test]
async fn the_entries_of_a_killed_gateway_expire() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let nats = cluster.nats.url();
    let mut gateway = Process::start(
        EVENTBUS,
        &["gateway"],
        &[
            ("EVENTBUS_GATEWAY_LISTEN", listen.as_str()),
            ("EVENTBUS_NATS_URL", nats.as_str()),
            ("EVENTBUS_STORE_URL", cluster.store_url.as_str()),
            ("EVENTBUS_AUTH_URL", cluster.auth_url.as_str()),
            ("EVENTBUS_PRESENCE_TTL_S", "2"),
        ],
        port,
    )
    .await;
    let service = bus.auth.token(Some(API_KEY_SECRET), json!({})).await;
    let carol = bus
        .auth
        .client_token(&service, "carol", &["rooms.kitchen"], &[])
        .await;
    let (mut c, _) = Ws::hello(&format!("ws://{listen}/v1/ws"), &carol).await;
    c.subscribe(json!({"channel": "rooms.kitchen"})).await;
    identities_when(&bus.auth, &service, "rooms.kitchen", &["carol"]).await;

    // kill -9: the gateway says nothing; its last report expires after 2 s.
    gateway.kill();
    identities_when(&bus.auth, &service, "rooms.kitchen", &[]).await;
    cluster.stop().await;
}
