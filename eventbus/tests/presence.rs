//! Presence: gateways report who is subscribed where on the backbone; `GET /v1/presence/{channel}`
//! and the `presence.<channel>` events follow joins and leaves across gateways, and a gateway that
//! dies without a word has its entries expire. Any number of auth replicas give the same answer;
//! the events are written once, by one of them, and survive its death.

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

/// The presence events of `channel` in the log, in seq order: (type, identity).
async fn presence_log(
    bus: &eventbus_testkit::cluster::Endpoints,
    token: &str,
    channel: &str,
) -> Vec<(String, String)> {
    let history = bus
        .api
        .history(token, &format!("presence.{channel}"), "limit=1000")
        .await;
    assert_eq!(history.status, 200, "{:?}", history.body);
    history.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["type"].as_str().expect("type").to_owned(),
                e["key"].as_str().expect("key").to_owned(),
            )
        })
        .collect()
}

/// Who the compacted presence channel of `channel` shows, once it shows `want`.
async fn logged_when(
    bus: &eventbus_testkit::cluster::Endpoints,
    token: &str,
    channel: &str,
    want: &[&str],
) {
    eventually(&format!("presence.{channel} to show {want:?}"), || async {
        let history = bus
            .api
            .history(token, &format!("presence.{channel}"), "compact=true")
            .await;
        if history.status != 200 {
            return None;
        }
        let mut keys: Vec<String> = history.body["events"]
            .as_array()?
            .iter()
            .filter_map(|e| e["key"].as_str().map(str::to_owned))
            .collect();
        keys.sort();
        (keys == want).then_some(())
    })
    .await;
}

async fn auth_replica(cluster: &Cluster, id: &str) -> (Process, Http) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let keys = cluster.auth_keys_dir();
    let nats = cluster.nats.url();
    let api_keys = format!(
        "{}:{API_KEY_SECRET}",
        eventbus_testkit::cluster::API_KEY_NAME
    );
    let process = Process::start(
        EVENTBUS,
        &["auth"],
        &[
            ("EVENTBUS_AUTH_LISTEN", listen.as_str()),
            ("EVENTBUS_AUTH_ID", id),
            ("EVENTBUS_AUTH_KEYS_DIR", keys.to_str().expect("utf-8 path")),
            ("EVENTBUS_NATS_URL", nats.as_str()),
            ("EVENTBUS_STORE_URL", cluster.store_url.as_str()),
            (
                "EVENTBUS_INTERNAL_TOKEN",
                eventbus_testkit::cluster::INTERNAL_TOKEN,
            ),
            ("EVENTBUS_API_KEYS", api_keys.as_str()),
            ("EVENTBUS_PRESENCE_EVENTS", PRESENCE_EVENTS),
        ],
        port,
    )
    .await;
    (process, Http::new(&format!("http://{listen}")))
}

/// The replica holding the presence events' lease, once one of `among` does.
async fn lease_holder(cluster: &Cluster, among: &[&str]) -> String {
    let credential =
        eventbus_runtime::internal::Credential::new(eventbus_testkit::cluster::INTERNAL_TOKEN)
            .expect("credential");
    let store = eventbus_store_client::StoreClient::new(
        &cluster.store_url,
        credential,
        &Default::default(),
    )
    .expect("store client");
    eventually("a replica to hold the presence lease", || async {
        let mut lease = eventbus_store_client::lease::Lease::new(
            "observer".into(),
            eventbus_auth::presence::LEASE,
        );
        let holder = lease.holder(&store).await.ok()??;
        among.contains(&holder.as_str()).then_some(holder)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_replicas_agree_and_presence_events_are_written_once_across_a_kill() {
    let mut cluster = Cluster::start_with_presence_elsewhere().await;
    // The second gateway reports everything only every 200 s: a replica that starts late learns
    // its entries by asking, not by waiting.
    let second = cluster
        .add_gateway_with(|config| config.settings.presence_ttl_s = 600)
        .await;
    let bus = cluster.endpoints.clone();
    let (mut a, auth_a) = auth_replica(&cluster, "auth-a").await;
    let (mut b, auth_b) = auth_replica(&cluster, "auth-b").await;
    let service = bus.service_token().await;
    let token = |who: &'static str| {
        let (auth, service) = (bus.auth.clone(), service.clone());
        async move { auth.client_token(&service, who, &["rooms.*"], &[]).await }
    };
    let (alice, bob, carol, dave) = (
        token("alice").await,
        token("bob").await,
        token("carol").await,
        token("dave").await,
    );

    let (mut alice_ws, _) = Ws::hello(&bus.ws, &alice).await;
    let (mut bob_ws, _) = Ws::hello(&second, &bob).await;
    alice_ws.subscribe(json!({"channel": "rooms.lobby"})).await;
    bob_ws.subscribe(json!({"channel": "rooms.lobby"})).await;
    // Every replica gives the same answer, the one in the cluster included.
    for auth in [&auth_a, &auth_b, &bus.auth] {
        identities_when(auth, &service, "rooms.lobby", &["alice", "bob"]).await;
    }
    logged_when(&bus, &service, "rooms.lobby", &["alice", "bob"]).await;

    // kill -9 the replica that writes the events: the other answers as before, at once.
    let holder = lease_holder(&cluster, &["auth-a", "auth-b"]).await;
    let (survivor, _) = if holder == "auth-a" {
        a.kill();
        (&auth_b, &mut b)
    } else {
        b.kill();
        (&auth_a, &mut a)
    };
    let answer = presence(survivor, &service, "rooms.lobby").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.body["count"], 2, "{:?}", answer.body);

    // Changes while nobody holds the lease reach the log once the survivor takes it over.
    bob_ws.close().await;
    let (mut carol_ws, _) = Ws::hello(&second, &carol).await;
    carol_ws.subscribe(json!({"channel": "rooms.lobby"})).await;
    for auth in [survivor, &bus.auth] {
        identities_when(auth, &service, "rooms.lobby", &["alice", "carol"]).await;
    }
    logged_when(&bus, &service, "rooms.lobby", &["alice", "carol"]).await;

    // A replica started now knows at once who is on both gateways.
    let (_late, auth_late) = auth_replica(&cluster, "auth-late").await;
    identities_when(&auth_late, &service, "rooms.lobby", &["alice", "carol"]).await;
    let (mut dave_ws, _) = Ws::hello(&second, &dave).await;
    dave_ws.subscribe(json!({"channel": "rooms.lobby"})).await;
    for auth in [survivor, &auth_late, &bus.auth] {
        identities_when(auth, &service, "rooms.lobby", &["alice", "carol", "dave"]).await;
    }
    logged_when(&bus, &service, "rooms.lobby", &["alice", "carol", "dave"]).await;

    // Each change once in the log, whoever wrote it: two replicas never both wrote one.
    let log = presence_log(&bus, &service, "rooms.lobby").await;
    let joined = |who: &str| ("eventbus.presence.joined".to_owned(), who.to_owned());
    let left = |who: &str| ("eventbus.presence.left".to_owned(), who.to_owned());
    assert_eq!(log.len(), 5, "{log:?}");
    let mut first_two = log[..2].to_vec();
    first_two.sort();
    assert_eq!(first_two, [joined("alice"), joined("bob")], "{log:?}");
    let mut middle = log[2..4].to_vec();
    middle.sort();
    assert_eq!(middle, [joined("carol"), left("bob")], "{log:?}");
    assert_eq!(log[4], joined("dave"), "{log:?}");

    for ws in [alice_ws, carol_ws, dave_ws] {
        ws.close().await;
    }
    cluster.stop().await;
}

#[tokio::test]
async fn a_report_larger_than_a_listener_takes_arrives_whole_in_chunks() {
    use eventbus_auth_client::presence::{Entry, MAX_REPORT_ENTRIES, Reporter};
    let cluster = Cluster::start().await;
    let backbone: std::sync::Arc<dyn eventbus_router::Backbone> = std::sync::Arc::new(
        eventbus_router::NatsBackbone::connect(
            &cluster.nats.url(),
            eventbus_router::subject::DEFAULT_PREFIX,
        )
        .await
        .expect("nats"),
    );
    let reporter = Reporter::start(
        backbone,
        "g-large".into(),
        std::time::Duration::from_secs(60),
    );
    let entries = MAX_REPORT_ENTRIES + 5_000;
    let memberships: Vec<_> = (0..entries)
        .map(|n| {
            reporter.join(Entry {
                connection: format!("c{n}"),
                identity: format!("user-{}", n % 100),
                channel: format!("room.{n}"),
            })
        })
        .collect();
    reporter.flush(std::time::Duration::from_secs(20)).await;
    let bus = cluster.endpoints.clone();
    let service = bus.service_token().await;
    eventually("auth to hold every entry", || async {
        let stats = bus
            .auth
            .send(bus.auth.get("/v1/admin/stats").bearer_auth(&service))
            .await;
        let gateways = stats.body["gateways"].as_array()?.clone();
        gateways
            .iter()
            .any(|g| g["id"] == "g-large" && g["subscriptions"] == entries)
            .then_some(())
    })
    .await;
    drop(memberships);
    cluster.stop().await;
}
