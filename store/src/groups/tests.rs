//! The group's rules, checked against a model: random appends, takes, dones, leaves, the clock
//! running past visibility timeouts and restarts from the saved state, then a drain. After every
//! step: nobody holds an event someone else holds, an event of a key is delivered only once
//! every earlier event of that key (in its channel) is done or dead, no member holds more than
//! its prefetch, a done event is never delivered again; at the end every event is done or dead,
//! dead only after `max_deliveries`.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use proptest::prelude::*;

use super::state::{Group, Settings};

const CHANNELS: [&str; 2] = ["orders.a", "orders.b"];
const KEYS: [Option<&str>; 3] = [None, Some("k1"), Some("k2")];
const SETTINGS: Settings = Settings {
    visibility_ms: 100,
    max_deliveries: 3,
    prefetch: 4,
};

#[derive(Debug, Clone)]
enum Op {
    Append { channel: usize, key: usize },
    Take { member: usize, max: usize },
    Done { member: usize, pick: usize },
    Leave { member: usize },
    Wait { ms: u64 },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, 0..3usize).prop_map(|(channel, key)| Op::Append { channel, key }),
        3 => (0..3usize, 1..6usize).prop_map(|(member, max)| Op::Take { member, max }),
        3 => (0..3usize, 0..8usize).prop_map(|(member, pick)| Op::Done { member, pick }),
        1 => (0..3usize).prop_map(|member| Op::Leave { member }),
        1 => (0..250u64).prop_map(|ms| Op::Wait { ms }),
        1 => Just(Op::Restart),
    ]
}

#[derive(Default)]
struct Model {
    /// channel → the log: key per seq (index = seq - 1).
    log: BTreeMap<String, Vec<Option<String>>>,
    /// (channel, seq) → (member, deadline): what the model knows each member holds.
    held: HashMap<(String, u64), (String, u64)>,
    done: HashMap<(String, u64), ()>,
    dead: HashMap<(String, u64), ()>,
    deliveries: HashMap<(String, u64), u32>,
}

fn refill(group: &mut Group, model: &Model) {
    for (channel, keys) in &model.log {
        group.saw_head(channel, keys.len() as u64);
    }
    loop {
        let refills = group.refills();
        if refills.is_empty() {
            return;
        }
        for r in refills {
            let keys = &model.log[&r.channel];
            let events = (r.after + 1..=keys.len() as u64)
                .take(1000)
                .map(|seq| {
                    (
                        seq,
                        keys[seq as usize - 1].clone(),
                        Bytes::from(format!("{{\"seq\":{seq}}}")),
                    )
                })
                .collect();
            group.fill(&r.channel, r.after, events);
        }
    }
}

/// As the dispatcher does: read ahead, expire, take.
fn take(group: &mut Group, model: &mut Model, member: &str, max: usize, now: u64) {
    refill(group, model);
    for dead in group.expire(now) {
        let at = (dead.channel.clone(), dead.seq);
        assert_eq!(
            dead.deliveries, SETTINGS.max_deliveries,
            "dead only after max deliveries"
        );
        assert!(model.dead.insert(at.clone(), ()).is_none(), "dead twice");
        model.held.remove(&at);
    }
    let delivered = group.take(member, max, now);
    assert!(delivered.len() <= max);
    for d in delivered {
        let at = (d.channel.clone(), d.seq);
        assert!(!model.done.contains_key(&at), "{at:?} delivered after done");
        assert!(!model.dead.contains_key(&at), "{at:?} delivered after dead");
        if let Some((other, deadline)) = model.held.get(&at) {
            assert!(
                *deadline <= now,
                "{at:?} given to {member} while {other} holds it until {deadline} (now {now})"
            );
        }
        // Every earlier event of its key is done or dead.
        let keys = &model.log[&d.channel];
        if let Some(key) = &keys[d.seq as usize - 1] {
            for earlier in 1..d.seq {
                if keys[earlier as usize - 1].as_ref() == Some(key) {
                    let e = (d.channel.clone(), earlier);
                    assert!(
                        model.done.contains_key(&e) || model.dead.contains_key(&e),
                        "{at:?} (key {key}) delivered before {e:?} was done"
                    );
                }
            }
        }
        let count = model.deliveries.entry(at.clone()).or_insert(0);
        *count += 1;
        assert_eq!(d.deliveries, *count, "delivery count of {at:?}");
        model
            .held
            .insert(at, (member.to_owned(), now + SETTINGS.visibility_ms));
    }
    let holding = model
        .held
        .values()
        .filter(|(m, deadline)| m == member && *deadline > now)
        .count();
    assert!(
        holding as u32 <= SETTINGS.prefetch,
        "{member} holds {holding}"
    );
}

fn run(ops: Vec<Op>) {
    let mut model = Model::default();
    let mut group = Group::new("orders.*", SETTINGS, &[]);
    let mut now = 1_000u64;
    let member = |m: usize| format!("m{m}");
    for op in ops {
        match op {
            Op::Append { channel, key } => {
                model
                    .log
                    .entry(CHANNELS[channel].to_owned())
                    .or_default()
                    .push(KEYS[key].map(str::to_owned));
            }
            Op::Take { member: m, max } => take(&mut group, &mut model, &member(m), max, now),
            Op::Done { member: m, pick } => {
                let mut mine: Vec<(String, u64)> = model
                    .held
                    .iter()
                    .filter(|(_, (holder, _))| *holder == member(m))
                    .map(|(at, _)| at.clone())
                    .collect();
                mine.sort();
                if let Some(at) = mine.get(pick).cloned() {
                    group.done(&at.0, at.1);
                    model.held.remove(&at);
                    model.done.insert(at, ());
                }
            }
            Op::Leave { member: m } => {
                group.leave(&member(m));
                model.held.retain(|_, (holder, _)| *holder != member(m));
            }
            Op::Wait { ms } => now += ms,
            Op::Restart => {
                group = Group::restore(group.saved());
                // Nothing held survives: every hold ends now.
                model.held.clear();
            }
        }
        // The figures are sound at every step, a restored group's before it reads the log too.
        let stats = group.stats();
        let total: u64 = model.log.values().map(|keys| keys.len() as u64).sum();
        assert!(
            stats.backlog <= total,
            "backlog {} of {total} events",
            stats.backlog
        );
    }
    // Drain: time passes, every member takes and finishes everything.
    for round in 0..200 {
        now += SETTINGS.visibility_ms + 1;
        for m in 0..3 {
            take(&mut group, &mut model, &member(m), 10, now);
            let mine: Vec<(String, u64)> = model
                .held
                .iter()
                .filter(|(_, (holder, _))| *holder == member(m))
                .map(|(at, _)| at.clone())
                .collect();
            for at in mine {
                group.done(&at.0, at.1);
                model.held.remove(&at);
                model.done.insert(at, ());
            }
        }
        let total: usize = model.log.values().map(Vec::len).sum();
        if model.done.len() + model.dead.len() == total {
            break;
        }
        assert!(round < 199, "events stuck: {:?}", group.stats());
    }
    for (channel, position, head) in group.positions() {
        assert_eq!(
            position, head,
            "{channel}: position behind the head at the end"
        );
    }
    assert_eq!(group.stats().backlog, 0);
    assert_eq!(group.stats().in_flight, 0);
}

/// 256 in CI; `GROUP_MODEL_CASES` for a longer run (docs/testing.md).
fn cases() -> u32 {
    std::env::var("GROUP_MODEL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]
    #[test]
    fn a_group_keeps_its_rules_through_any_sequence(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops);
    }
}

#[test]
fn a_key_waits_for_its_earlier_event_and_an_unkeyed_one_does_not() {
    let mut group = Group::new("orders.*", SETTINGS, &[]);
    group.saw_head("orders.a", 3);
    let key = |k: &str| Some(k.to_owned());
    group.fill(
        "orders.a",
        0,
        vec![
            (1, key("k"), Bytes::from_static(b"{}")),
            (2, key("k"), Bytes::from_static(b"{}")),
            (3, None, Bytes::from_static(b"{}")),
        ],
    );
    let first = group.take("a", 10, 0);
    assert_eq!(
        first.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [1, 3],
        "2 waits for 1 (same key)"
    );
    assert!(group.take("b", 10, 0).is_empty());
    group.done("orders.a", 1);
    assert_eq!(group.take("b", 10, 0)[0].seq, 2);
}

#[test]
fn an_event_that_keeps_timing_out_dies_after_max_deliveries() {
    let mut group = Group::new("jobs", SETTINGS, &[]);
    group.saw_head("jobs", 1);
    group.fill("jobs", 0, vec![(1, None, Bytes::from_static(b"{}"))]);
    let mut now = 0;
    for n in 1..=SETTINGS.max_deliveries {
        assert!(group.expire(now).is_empty());
        let taken = group.take("worker", 1, now);
        assert_eq!(taken[0].deliveries, n);
        now += SETTINGS.visibility_ms;
    }
    let dead = group.expire(now);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].deliveries, SETTINGS.max_deliveries);
    assert!(group.take("worker", 1, now).is_empty());
    assert_eq!(group.positions(), [("jobs".to_owned(), 1, 1)]);
}

/// A fetch sees every event acknowledged before it, even on a channel that did not exist when
/// the group last looked, and so does the group's backlog, even before the writer's hand-off of the batch reaches the groups.
#[tokio::test]
async fn a_group_sees_an_acknowledged_event_on_a_new_channel_at_once() {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::log::{Entry, Log, Options};

    let dir = tempfile::tempdir().unwrap();
    // The hand-off (`committed`) is never read here: only the log itself can tell the group.
    let (log, _committed) = Log::open(Options::new(dir.path().join("log"))).unwrap();
    let log = Arc::new(log);
    let groups = super::Groups::open(
        log.clone(),
        Arc::new(super::saving::Files::new(dir.path().join("groups"))),
        eventbus_runtime::Shutdown::new(),
    )
    .await
    .unwrap();
    let fetch = || {
        groups.fetch(
            "ledger",
            "accounts.*",
            "m1",
            10,
            Duration::ZERO,
            Default::default(),
        )
    };
    assert!(fetch().await.unwrap().is_empty());
    log.append(vec![Entry {
        channel: "accounts.eu".into(),
        id: "e1".into(),
        source: "svc".into(),
        key: None,
        deleted: false,
        body: Bytes::from_static(br#"{"id":"e1","channel":"accounts.eu"}"#),
    }])
    .await
    .unwrap();
    assert_eq!(groups.list().await.unwrap()[0].stats.backlog, 1);
    let got = fetch().await.unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
}
