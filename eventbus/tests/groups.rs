//! Durable queue groups over HTTP pull (`/v1/groups/{group}/fetch` and `/done`), against real
//! services: events wait while every worker is away; an event held past its visibility timeout
//! goes to another worker, with its delivery count; a poison event reaches `dead.<group>` after
//! `max_deliveries`; same-key events go out one at a time, in order, under redelivery; the store
//! killed with -9 under load loses nothing and leaves nothing stuck; and nobody gets more than
//! their grant.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_testkit::http::{Answer, Http};
use eventbus_testkit::process::Process;
use eventbus_testkit::{Cluster, NatsServer, eventually, free_port};
use serde_json::{Value, json};

const EVENTBUS: &str = env!("CARGO_BIN_EXE_eventbus");

async fn fetch(api: &Http, token: &str, group: &str, body: Value) -> Answer {
    api.send(
        api.post(&format!("/v1/groups/{group}/fetch"))
            .bearer_auth(token)
            .json(&body),
    )
    .await
}

/// (channel, seq, delivery, data) of each message of a fetch answer.
fn messages(answer: &Answer) -> Vec<(String, u64, u64, Value)> {
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["event"]["channel"].as_str().expect("channel").to_owned(),
                m["event"]["seq"].as_u64().expect("seq"),
                m["delivery"].as_u64().expect("delivery"),
                m["event"]["data"].clone(),
            )
        })
        .collect()
}

/// `POST /v1/groups/{group}/done`, naming the group's channel `of`.
async fn done_of(
    api: &Http,
    token: &str,
    group: &str,
    of: &str,
    events: &[(String, u64)],
) -> Answer {
    let done: Vec<Value> = events
        .iter()
        .map(|(channel, seq)| json!({"channel": channel, "seq": seq}))
        .collect();
    api.send(
        api.post(&format!("/v1/groups/{group}/done"))
            .bearer_auth(token)
            .json(&json!({"channel": of, "done": done})),
    )
    .await
}

/// The groups of these tests follow `orders.*`, `jobs`, `accounts`: each group's own.
async fn done(api: &Http, token: &str, group: &str, events: &[(String, u64)]) -> Answer {
    let of = match group {
        "billing" | "nobody" => "orders.*",
        "jobs" => "jobs",
        "ledger" => "accounts",
        other => panic!("no channel known for group {other}"),
    };
    done_of(api, token, group, of, events).await
}

async fn group(api: &Http, token: &str, group: &str) -> Value {
    let answer = api
        .send(api.get(&format!("/v1/groups/{group}")).bearer_auth(token))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body
}

#[tokio::test]
async fn events_wait_while_every_worker_is_away_and_each_goes_to_one() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;
    // The group starts now: what was published before it is not its business.
    let before = bus
        .api
        .publish(&token, &json!({"channel": "orders.eu", "type": "old"}))
        .await;
    assert_eq!(before.status, 200);
    let first = fetch(&bus.api, &token, "billing", json!({"channel": "orders.*"})).await;
    assert!(messages(&first).is_empty());

    // Every worker away: 1,000 events over two channels (one new since the group began).
    for batch in 0..10 {
        let events: Vec<Value> = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                json!({"channel": if n % 2 == 0 { "orders.eu" } else { "orders.us" }, "type": "placed", "data": n})
            })
            .collect();
        assert_eq!(
            bus.api.publish(&token, &Value::Array(events)).await.status,
            200
        );
    }
    let shown = group(&bus.api, &token, "billing").await;
    assert_eq!(shown["backlog"], 1000, "{shown}");
    assert_eq!(shown["channel"], "orders.*");
    // The same figure for Prometheus.
    eventually("the backlog in /metrics", || async {
        let text = bus
            .api
            .get("/metrics")
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains(r#"eventbus_group_backlog{group="billing"} 1000"#)
            .then_some(())
    })
    .await;

    // One worker comes back: it gets all of them, once each, in seq order per channel.
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut numbers = BTreeSet::new();
    loop {
        let answer = fetch(
            &bus.api,
            &token,
            "billing",
            json!({"channel": "orders.*", "max": 100, "member": "w1"}),
        )
        .await;
        let got = messages(&answer);
        if got.is_empty() {
            break;
        }
        let mut handled = Vec::new();
        for (channel, seq, delivery, data) in got {
            assert_eq!(delivery, 1);
            assert!(numbers.insert(data.as_u64().expect("n")), "{data} twice");
            seen.entry(channel.clone()).or_default().push(seq);
            handled.push((channel, seq));
        }
        let answer = done(&bus.api, &token, "billing", &handled).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body["done"], handled.len());
    }
    assert_eq!(numbers.len(), 1000);
    assert_eq!(
        seen["orders.eu"],
        (2..=501).collect::<Vec<u64>>(),
        "after the old one"
    );
    assert_eq!(seen["orders.us"], (1..=500).collect::<Vec<u64>>());
    let shown = group(&bus.api, &token, "billing").await;
    assert_eq!(
        (shown["backlog"].as_u64(), shown["in_flight"].as_u64()),
        (Some(0), Some(0)),
        "{shown}"
    );
    for channel in shown["channels"].as_array().expect("channels") {
        assert_eq!(channel["position"], channel["head"], "{shown}");
    }
    // A done repeated changes nothing.
    let again = done(&bus.api, &token, "billing", &[("orders.us".into(), 1)]).await;
    assert_eq!(again.body["done"], 0);
    cluster.stop().await;
}

#[tokio::test]
async fn a_held_event_goes_to_another_worker_and_a_poison_one_to_the_dead_letters() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;
    let settings = json!({"channel": "jobs", "visibility_ms": 300, "max_deliveries": 3, "max": 10});
    assert!(messages(&fetch(&bus.api, &token, "jobs", settings.clone()).await).is_empty());
    for data in ["poison", "fine"] {
        let answer = bus
            .api
            .publish(
                &token,
                &json!({"channel": "jobs", "type": "job", "data": data}),
            )
            .await;
        assert_eq!(answer.status, 200);
    }
    let a = messages(&fetch(&bus.api, &token, "jobs", settings.clone()).await);
    assert_eq!(a.len(), 2);
    done(&bus.api, &token, "jobs", &[("jobs".into(), 2)]).await;
    // Worker a never finishes 1: after the visibility timeout it goes to the next worker, with a
    // delivery count, while a waiting fetch is woken for it.
    let mut long = settings.clone();
    long["wait_s"] = json!(10);
    for delivery in 2..=3 {
        let got = messages(&fetch(&bus.api, &token, "jobs", long.clone()).await);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].1, got[0].2), (1, delivery));
        assert_eq!(got[0].3, "poison");
    }
    // Its last delivery times out too: it goes to dead.jobs, once, with why.
    eventually("the dead letter", || async {
        let dead = bus.api.history(&token, "dead.jobs", "after=0").await;
        let events = dead.body["events"].as_array()?.clone();
        (events.len() == 1).then(|| events[0].clone())
    })
    .await;
    let dead = bus.api.history(&token, "dead.jobs", "after=0").await;
    let letter = &dead.body["events"][0];
    assert_eq!(letter["type"], "eventbus.dead_letter");
    assert_eq!(letter["data"]["group"], "jobs");
    assert_eq!(letter["data"]["channel"], "jobs");
    assert_eq!(letter["data"]["seq"], 1);
    assert_eq!(letter["data"]["deliveries"], 3);
    assert_eq!(letter["data"]["reason"], "max_deliveries");
    assert_eq!(letter["data"]["event"]["data"], "poison");
    let shown = group(&bus.api, &token, "jobs").await;
    assert_eq!(
        (shown["dead"].as_u64(), shown["backlog"].as_u64()),
        (Some(1), Some(0)),
        "{shown}"
    );
    assert!(messages(&fetch(&bus.api, &token, "jobs", settings).await).is_empty());
    cluster.stop().await;
}

#[tokio::test]
async fn same_key_events_go_out_one_at_a_time_in_order_under_redelivery() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;
    let settings = json!({"channel": "accounts", "visibility_ms": 300, "max": 10});
    fetch(&bus.api, &token, "ledger", settings.clone()).await;
    let events: Vec<Value> = [("k1", 1), ("k1", 2), ("k1", 3), ("k2", 4)]
        .iter()
        .map(|(key, n)| json!({"channel": "accounts", "type": "moved", "key": key, "data": n}))
        .collect();
    assert_eq!(
        bus.api.publish(&token, &Value::Array(events)).await.status,
        200
    );
    let seqs =
        |got: Vec<(String, u64, u64, Value)>| got.into_iter().map(|m| m.1).collect::<Vec<_>>();
    // k1's first and k2's only: the rest of k1 waits for its first.
    assert_eq!(
        seqs(messages(
            &fetch(&bus.api, &token, "ledger", settings.clone()).await
        )),
        [1, 4]
    );
    done(&bus.api, &token, "ledger", &[("accounts".into(), 4)]).await;
    assert!(messages(&fetch(&bus.api, &token, "ledger", settings.clone()).await).is_empty());
    // 1 times out: it is redelivered, and still before 2.
    let mut long = settings.clone();
    long["wait_s"] = json!(10);
    let again = messages(&fetch(&bus.api, &token, "ledger", long.clone()).await);
    assert_eq!((again[0].1, again[0].2, again.len()), (1, 2, 1));
    done(&bus.api, &token, "ledger", &[("accounts".into(), 1)]).await;
    assert_eq!(
        seqs(messages(
            &fetch(&bus.api, &token, "ledger", long.clone()).await
        )),
        [2]
    );
    done(&bus.api, &token, "ledger", &[("accounts".into(), 2)]).await;
    assert_eq!(
        seqs(messages(&fetch(&bus.api, &token, "ledger", long).await)),
        [3]
    );
    cluster.stop().await;
}

#[tokio::test]
async fn groups_stay_within_the_grant_and_say_what_is_wrong() {
    let cluster = Cluster::start().await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;
    let eu_only = bus
        .auth
        .token(
            Some(eventbus_testkit::cluster::API_KEY_SECRET),
            json!({"subscribe": ["orders.eu"], "publish": []}),
        )
        .await;
    let client = bus
        .auth
        .client_token(&token, "alice", &["orders.*"], &[])
        .await;
    let refused = fetch(
        &bus.api,
        &client,
        "billing",
        json!({"channel": "orders.eu"}),
    )
    .await;
    assert_eq!(
        (refused.status.as_u16(), refused.problem().as_str()),
        (403, "forbidden"),
        "{}",
        refused.body
    );
    let refused = fetch(
        &bus.api,
        &eu_only,
        "billing",
        json!({"channel": "orders.*"}),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        messages(&fetch(&bus.api, &token, "billing", json!({"channel": "orders.*"})).await)
            .is_empty()
    );
    // A narrower service neither sees the group nor says anything of its channels.
    let listed = bus
        .api
        .send(bus.api.get("/v1/groups").bearer_auth(&eu_only))
        .await;
    assert_eq!(listed.body["groups"], json!([]), "{}", listed.body);
    let hidden = bus
        .api
        .send(bus.api.get("/v1/groups/billing").bearer_auth(&eu_only))
        .await;
    assert_eq!(hidden.status, 403);
    let outside = done(&bus.api, &eu_only, "billing", &[("orders.us".into(), 1)]).await;
    assert_eq!(outside.status, 403);
    // Nor may it mark the group's events of its own channel done (they would be lost to it).
    let inside = done(&bus.api, &eu_only, "billing", &[("orders.eu".into(), 1)]).await;
    assert_eq!(inside.status, 403, "{}", inside.body);
    let narrowed = done_of(
        &bus.api,
        &eu_only,
        "billing",
        "orders.eu",
        &[("orders.eu".into(), 1)],
    )
    .await;
    assert_eq!(
        (narrowed.status.as_u16(), narrowed.problem().as_str()),
        (409, "conflict"),
        "{}",
        narrowed.body
    );
    let reset = bus
        .api
        .send(
            bus.api
                .post("/v1/groups/billing/reset")
                .bearer_auth(&eu_only)
                .json(&json!({"to": "head"})),
        )
        .await;
    assert_eq!(reset.status, 403);
    // Another pattern under the same name, a bad name, an unknown group, a bad body.
    let mismatch = fetch(
        &bus.api,
        &token,
        "billing",
        json!({"channel": "payments.*"}),
    )
    .await;
    assert_eq!(
        (mismatch.status.as_u16(), mismatch.problem().as_str()),
        (409, "conflict"),
        "{}",
        mismatch.body
    );
    let bad = fetch(&bus.api, &token, "no.dots", json!({"channel": "orders.*"})).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let unknown = done(&bus.api, &token, "nobody", &[("orders.eu".into(), 1)]).await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    let too_many = fetch(
        &bus.api,
        &token,
        "billing",
        json!({"channel": "orders.*", "max": 5000}),
    )
    .await;
    assert_eq!(too_many.status, 400);
    let garbage = bus
        .api
        .send(
            bus.api
                .post("/v1/groups/billing/fetch")
                .bearer_auth(&token)
                .body("{"),
        )
        .await;
    assert_eq!(garbage.status, 400);
    // A reset names a well-formed channel, or it moves nothing: a 400 naming the member. A seq
    // written with a fraction part is still a whole number (JSON Schema's integer).
    for (body, status, field) in [
        (json!({"to": 0, "channel": "a..b"}), 400, Some("channel")),
        (json!({"to": 1.5}), 400, Some("to")),
        (json!({"to": 0.0}), 200, None),
    ] {
        let answer = bus
            .api
            .send(
                bus.api
                    .post("/v1/groups/billing/reset")
                    .bearer_auth(&token)
                    .json(&body),
            )
            .await;
        assert_eq!(answer.status, status, "{body}: {}", answer.body);
        assert_eq!(
            answer.body.get("field").and_then(|f| f.as_str()),
            field,
            "{body}: {}",
            answer.body
        );
    }
    // Reset and delete, for the service that covers it.
    let reset = bus
        .api
        .send(
            bus.api
                .post("/v1/groups/billing/reset")
                .bearer_auth(&token)
                .json(&json!({"to": "head"})),
        )
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    let deleted = bus
        .api
        .send(bus.api.delete("/v1/groups/billing").bearer_auth(&token))
        .await;
    assert_eq!(deleted.status, 204);
    let gone = bus
        .api
        .send(bus.api.get("/v1/groups/billing").bearer_auth(&token))
        .await;
    assert_eq!(gone.status, 404);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_killed_under_load_loses_nothing_and_leaves_nothing_stuck() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let nats_url = nats.url();
    let data = dir.path().join("store");
    let mut store = Process::start(
        EVENTBUS,
        &["store"],
        &[
            ("EVENTBUS_STORE_LISTEN", listen.as_str()),
            ("EVENTBUS_NATS_URL", nats_url.as_str()),
            ("EVENTBUS_STORE_DATA", data.to_str().expect("path")),
        ],
        port,
    )
    .await;
    let cluster = Cluster::start_with_store(Some(format!("http://{listen}"))).await;
    let bus = cluster.endpoints.clone();
    let token = bus.service_token().await;
    let settings = json!({"channel": "work.*", "visibility_ms": 1000, "max": 20, "wait_s": 1});
    assert!(messages(&fetch(&bus.api, &token, "crunch", settings.clone()).await).is_empty());

    const EVENTS: u64 = 600;
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let handled = Arc::new(Mutex::new(BTreeSet::new()));
    let publisher = tokio::spawn({
        let (api, token, acked) = (bus.api.clone(), token.clone(), acked.clone());
        async move {
            for n in 0..EVENTS {
                let event = json!({"id": format!("e{n}"), "channel": format!("work.{}", n % 3), "type": "job", "data": n});
                loop {
                    let sent = api
                        .post("/v1/events")
                        .bearer_auth(&token)
                        .json(&event)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    if sent.is_ok_and(|r| r.status() == 200) {
                        acked.lock().expect("lock").insert(n);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    let mut workers = Vec::new();
    for w in 0..2 {
        let (api, token, handled, settings) = (
            bus.api.clone(),
            token.clone(),
            handled.clone(),
            settings.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut body = settings;
            body["member"] = json!(format!("w{w}"));
            loop {
                // Errors while the store is down: try again.
                let Ok(response) = api
                    .post("/v1/groups/crunch/fetch")
                    .bearer_auth(&token)
                    .json(&body)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if response.status() != 200 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                let mut finished = Vec::new();
                for m in answer["messages"].as_array().cloned().unwrap_or_default() {
                    handled
                        .lock()
                        .expect("lock")
                        .insert(m["event"]["data"].as_u64().expect("n"));
                    finished
                        .push(json!({"channel": m["event"]["channel"], "seq": m["event"]["seq"]}));
                }
                if !finished.is_empty() {
                    let _ = api
                        .post("/v1/groups/crunch/done")
                        .bearer_auth(&token)
                        .json(&json!({"channel": "work.*", "done": finished}))
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                }
            }
        }));
    }
    for kill in 1..=2u64 {
        let progress = handled.clone();
        eventually("workers to make progress", || {
            let count = progress.lock().expect("lock").len() as u64;
            async move { (count >= kill * EVENTS / 3).then_some(()) }
        })
        .await;
        store.restart().await;
    }
    publisher.await.expect("publisher");
    // Every acknowledged event is handled (some twice: at least once), and the group drains.
    eventually("every acknowledged event handled", || async {
        let acked = acked.lock().expect("lock").clone();
        let handled = handled.lock().expect("lock").clone();
        (acked.len() as u64 == EVENTS && acked.is_subset(&handled)).then_some(())
    })
    .await;
    eventually("the group to drain", || async {
        let shown = bus
            .api
            .send(bus.api.get("/v1/groups/crunch").bearer_auth(&token))
            .await;
        (shown.status == 200 && shown.body["backlog"] == 0 && shown.body["in_flight"] == 0)
            .then_some(())
    })
    .await;
    for worker in workers {
        worker.abort();
    }
    cluster.stop().await;
}
