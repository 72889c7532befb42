use std::io::Write;

use bytes::Bytes;

use super::now_ms;
use super::*;

fn open(dir: &Path) -> (Log, Committed) {
    Log::open(Options {
        segment_bytes: 4096,
        ..Options::new(dir.to_owned())
    })
    .unwrap()
}

fn entry(channel: &str, id: &str, key: Option<&str>, deleted: bool) -> Entry {
    Entry {
        channel: channel.into(),
        id: id.into(),
        source: "svc".into(),
        key: key.map(str::to_owned),
        deleted,
        body: Bytes::from(format!(
            r#"{{"id":"{id}","channel":"{channel}","pad":"{}"}}"#,
            "x".repeat(100)
        )),
    }
}

fn seqs(result: &ReadResult) -> Vec<u64> {
    result.events.iter().map(|e| e.seq).collect()
}

#[tokio::test]
async fn append_read_dedupe_and_recover_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (log, mut committed) = open(dir.path());
    for i in 0..100 {
        let batch = vec![
            entry("a", &format!("a{i}"), None, false),
            entry("b", &format!("b{i}"), None, false),
        ];
        let results = log.append(batch).await.unwrap();
        assert_eq!(results[0].seq, i + 1);
        assert_eq!(results[1].seq, i + 1);
    }
    let again = log
        .append(vec![
            entry("a", "a5", None, false),
            entry("a", "new", None, false),
            entry("a", "new", None, false),
        ])
        .await
        .unwrap();
    assert_eq!((again[0].seq, again[0].duplicate), (6, true));
    assert_eq!((again[1].seq, again[1].duplicate), (101, false));
    assert_eq!((again[2].seq, again[2].duplicate), (101, true));
    // The writer answers first and hands the batch to the backbone right after: wait for it.
    let mut published = Vec::new();
    while published.last() != Some(&101) {
        let batch = tokio::time::timeout(std::time::Duration::from_secs(10), committed.recv())
            .await
            .expect("committed batches arrive")
            .expect("the writer is running");
        published.extend(
            batch
                .into_iter()
                .filter(|e| e.channel == "a")
                .map(|e| e.seq),
        );
    }
    assert_eq!(
        published,
        (1..=101).collect::<Vec<_>>(),
        "committed events are published in seq order"
    );

    let read = log.read("a", 50, 10, false).await.unwrap();
    assert_eq!(seqs(&read), (51..=60).collect::<Vec<_>>());
    assert_eq!(read.head, 101);
    let value: serde_json::Value = serde_json::from_slice(&read.events[0].json).unwrap();
    assert_eq!(value["seq"], 51);
    assert_eq!(value["id"], "a50");
    assert!(matches!(
        log.read("a", 102, 10, false).await,
        Err(LogError::AfterBeyondHead { head: 101, .. })
    ));
    assert!(
        log.read("nothing", 0, 10, false)
            .await
            .unwrap()
            .events
            .is_empty()
    );
    log.close();
    assert!(
        segments::list(dir.path()).unwrap().len() > 2,
        "small segments were rolled"
    );

    let (log, _) = open(dir.path());
    assert_eq!(log.head("a"), 101);
    assert_eq!(log.head("b"), 100);
    let all = log.read("b", 0, 1000, false).await.unwrap();
    assert_eq!(seqs(&all), (1..=100).collect::<Vec<_>>());
    let dup = log
        .append(vec![entry("b", "b3", None, false)])
        .await
        .unwrap();
    assert_eq!(
        (dup[0].seq, dup[0].duplicate),
        (4, true),
        "the dedupe window survives a restart"
    );
    log.close();
}

#[tokio::test]
async fn torn_and_corrupt_tails_are_cut_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(Options {
        segment_bytes: 1 << 30,
        ..Options::new(dir.path().to_owned())
    })
    .unwrap();
    for i in 0..10 {
        log.append(vec![entry("c", &format!("c{i}"), None, false)])
            .await
            .unwrap();
    }
    log.close();
    let path = segments::path_of(dir.path(), 0);
    let full = std::fs::metadata(&path).unwrap().len();

    // A torn write: half a record at the end.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    let mut torn = Vec::new();
    record::encode(
        &record::Record {
            seq: 11,
            time_ms: 0,
            channel: "c",
            id: "c10",
            key: None,
            deleted: false,
            source: Some("svc"),
            body: b"{}",
        },
        &mut torn,
    );
    file.write_all(&torn[..torn.len() / 2]).unwrap();
    drop(file);
    let (log, _) = Log::open(Options {
        segment_bytes: 1 << 30,
        ..Options::new(dir.path().to_owned())
    })
    .unwrap();
    assert_eq!(log.head("c"), 10);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        full,
        "the torn tail is cut off the file"
    );
    log.close();

    // A flipped byte inside the last record: the record is dropped, the ones before it kept.
    let mut data = std::fs::read(&path).unwrap();
    let last = data.len() - 3;
    data[last] ^= 0xff;
    std::fs::write(&path, &data).unwrap();
    let (log, _) = Log::open(Options {
        segment_bytes: 1 << 30,
        ..Options::new(dir.path().to_owned())
    })
    .unwrap();
    assert_eq!(log.head("c"), 9);
    let read = log.read("c", 0, 100, false).await.unwrap();
    assert_eq!(seqs(&read), (1..=9).collect::<Vec<_>>());
    let next = log
        .append(vec![entry("c", "again", None, false)])
        .await
        .unwrap();
    assert_eq!(
        next[0].seq, 10,
        "the cut seq is reused only because it was never acknowledged"
    );
    log.close();
}

#[tokio::test]
async fn compacted_reads_keep_newest_per_key_and_drop_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path());
    log.append(vec![
        entry("k", "1", Some("x"), false),
        entry("k", "2", Some("y"), false),
        entry("k", "3", None, false),
        entry("k", "4", Some("x"), false),
        entry("k", "5", Some("y"), true),
    ])
    .await
    .unwrap();
    assert_eq!(
        seqs(&log.read("k", 0, 100, true).await.unwrap()),
        vec![3, 4]
    );
    assert_eq!(seqs(&log.read("k", 3, 100, true).await.unwrap()), vec![4]);
    log.close();
}

#[tokio::test]
async fn retention_deletes_whole_segments_and_refuses_truncated_reads() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        segment_bytes: 1024,
        retention: vec![
            "metrics:max_events=10".parse().unwrap(),
            "logs.*:max_age_s=3600".parse().unwrap(),
        ],
        ..Options::new(dir.path().to_owned())
    };
    let (log, _) = Log::open(options.clone()).unwrap();
    for i in 0..60 {
        log.append(vec![entry("metrics", &format!("m{i}"), None, false)])
            .await
            .unwrap();
    }
    for i in 0..20 {
        log.append(vec![entry("logs.app", &format!("l{i}"), None, false)])
            .await
            .unwrap();
    }
    let segments_before = segments::list(dir.path()).unwrap().len();
    let (dropped, deleted) = log.enforce_retention(now_ms()).unwrap();
    assert_eq!(dropped, 50, "metrics keeps its newest 10, logs are young");
    assert!(deleted > 0, "segments holding only old metrics are deleted");
    assert_eq!(
        segments::list(dir.path()).unwrap().len(),
        segments_before - deleted
    );
    assert_eq!(log.bounds("metrics"), (51, 60));
    assert!(matches!(
        log.read("metrics", 0, 10, false).await,
        Err(LogError::Truncated { first: 51 })
    ));
    assert!(matches!(
        log.read("metrics", 0, 10, true).await,
        Err(LogError::Truncated { first: 51 })
    ));
    assert_eq!(
        seqs(&log.read("metrics", 50, 100, false).await.unwrap()),
        (51..=60).collect::<Vec<_>>()
    );

    // Two hours later, the logs have aged out, except the newest event, which keeps the head known.
    let later = now_ms() + 2 * 3600 * 1000;
    log.enforce_retention(later).unwrap();
    assert_eq!(log.bounds("logs.app").1, 20);
    assert!(log.bounds("logs.app").0 > 1);
    log.close();

    // A restart keeps what was let go gone, and the log still appends after it.
    let (log, _) = Log::open(options).unwrap();
    assert_eq!(log.bounds("metrics"), (51, 60));
    let next = log
        .append(vec![entry("metrics", "m60", None, false)])
        .await
        .unwrap();
    assert_eq!(next[0].seq, 61);
    log.close();
}

#[tokio::test]
async fn a_clean_restart_loads_the_checkpoint_and_a_damaged_one_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        segment_bytes: 2048,
        ..Options::new(dir.path().to_owned())
    };
    let (log, _) = Log::open(options.clone()).unwrap();
    for i in 0..40 {
        let key = (i % 4 != 0).then(|| format!("k{}", i % 3));
        log.append(vec![entry(
            "a",
            &format!("a{i}"),
            key.as_deref(),
            i % 7 == 6 && key.is_some(),
        )])
        .await
        .unwrap();
    }
    let before = (
        log.read("a", 0, 100, false).await.unwrap(),
        log.read("a", 0, 100, true).await.unwrap(),
    );
    log.close();

    let (log, _) = Log::open(options.clone()).unwrap();
    assert_eq!(
        log.recovery(),
        Recovery {
            from_checkpoint: true,
            scanned_events: 0,
            retired_jumps: 0,
        }
    );
    let after = (
        log.read("a", 0, 100, false).await.unwrap(),
        log.read("a", 0, 100, true).await.unwrap(),
    );
    assert_eq!(seqs(&after.0), seqs(&before.0));
    assert_eq!(
        seqs(&after.1),
        seqs(&before.1),
        "the compaction index comes back too"
    );
    let dup = log
        .append(vec![entry("a", "a3", None, false)])
        .await
        .unwrap();
    assert!(dup[0].duplicate, "the idempotency window comes back too");
    log.append(vec![entry("a", "a40", None, false)])
        .await
        .unwrap();
    log.close();

    // A damaged checkpoint is ignored; the segments rebuild the same index.
    let path = checkpoint::path_of(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&path, &bytes).unwrap();
    let (log, _) = Log::open(options).unwrap();
    assert_eq!(
        log.recovery(),
        Recovery {
            from_checkpoint: false,
            scanned_events: 41,
            retired_jumps: 0,
        }
    );
    assert_eq!(log.head("a"), 41);
    assert_eq!(
        seqs(&log.read("a", 0, 100, true).await.unwrap()),
        seqs(&before.1).into_iter().chain([41]).collect::<Vec<_>>()
    );
    log.close();
}

#[tokio::test]
async fn a_full_backbone_queue_drops_and_counts_but_never_holds_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (log, mut committed) = Log::open(Options {
        backbone_queue: 2,
        ..Options::new(dir.path().to_owned())
    })
    .unwrap();
    let dropped = || {
        eventbus_runtime::metrics::metrics()
            .store_backbone_dropped
            .get()
    };
    let before = dropped();
    // Nobody drains the queue: the first two batches wait in it, the other three are dropped.
    for i in 0..5 {
        let appended = log
            .append(vec![entry("a", &format!("e{i}"), None, false)])
            .await
            .unwrap();
        assert_eq!(appended[0].seq, i + 1);
    }
    // The writer answers first and hands off to the backbone right after: wait for the last one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dropped() < before + 3 {
        assert!(std::time::Instant::now() < deadline, "drops are counted");
        tokio::task::yield_now().await;
    }
    assert_eq!(committed.recv().await.unwrap()[0].seq, 1);
    assert_eq!(committed.recv().await.unwrap()[0].seq, 2);
    assert!(committed.try_recv().is_err(), "the queue holds at most two");
    // What the backbone never carried is in the log.
    assert_eq!(
        seqs(&log.read("a", 0, 10, false).await.unwrap()),
        vec![1, 2, 3, 4, 5]
    );
    log.close();
}

#[tokio::test]
async fn each_publisher_creates_at_most_its_quota_of_channels_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        max_channels_per_source: 2,
        ..Options::new(dir.path().to_owned())
    };
    let by = |source: &str, channel: &str, id: &str| Entry {
        source: source.into(),
        ..entry(channel, id, None, false)
    };
    let (log, _) = Log::open(options.clone()).unwrap();
    log.append(vec![by("a", "c1", "1"), by("a", "c2", "2")])
        .await
        .unwrap();
    let refused = log.append(vec![by("a", "c3", "3")]).await;
    assert!(
        matches!(refused, Err(LogError::Quota { .. })),
        "{refused:?}"
    );
    // A batch is taken or refused whole; existing channels and other publishers are not limited.
    let mixed = log
        .append(vec![by("a", "c1", "4"), by("a", "c4", "5")])
        .await;
    assert!(matches!(mixed, Err(LogError::Quota { .. })));
    assert_eq!(log.head("c1"), 1);
    log.append(vec![
        by("a", "c1", "6"),
        by("a", "c2", "7"),
        by("b", "c3", "8"),
    ])
    .await
    .unwrap();
    log.close();
    // The counts come back from the log itself.
    let (log, _) = Log::open(options).unwrap();
    assert!(matches!(
        log.append(vec![by("a", "c5", "9")]).await,
        Err(LogError::Quota { .. })
    ));
    log.append(vec![by("b", "c6", "10")]).await.unwrap();
    assert!(matches!(
        log.append(vec![by("b", "c7", "11")]).await,
        Err(LogError::Quota { .. })
    ));
    log.close();
}

/// The active segment runs ahead of its last record with zeros (so that an fdatasync writes no
/// new size); a kill leaves them, and the next start cuts them quietly and appends right after the
/// last record. A segment sealed by a roll, and one closed cleanly, end exactly at their last
/// record.
#[tokio::test]
async fn zeros_written_ahead_are_cut_and_sealed_segments_end_at_their_last_record() {
    let dir = tempfile::tempdir().unwrap();
    let options = || Options {
        segment_bytes: 64 * 1024,
        ..Options::new(dir.path().to_owned())
    };
    let len_of = |segment| {
        std::fs::metadata(segments::path_of(dir.path(), segment))
            .unwrap()
            .len()
    };
    let (log, _) = Log::open(options()).unwrap();
    for i in 0..10 {
        log.append(vec![entry("z", &format!("z{i}"), None, false)])
            .await
            .unwrap();
    }
    let written = len_of(0);
    assert!(written >= 64 * 1024 / 2, "zeros ahead: {written} bytes");
    log.crash();

    let (log, _) = Log::open(options()).unwrap();
    assert_eq!(log.head("z"), 10);
    let records = len_of(0);
    assert!(records < 10 * 300, "cut to the records: {records} bytes");
    assert!(segments::verify_prefix(dir.path(), 0, records).unwrap());
    // On past the first segment's size: it is sealed at its last record.
    for i in 10..600 {
        log.append(vec![entry("z", &format!("z{i}"), None, false)])
            .await
            .unwrap();
    }
    assert!(segments::list(dir.path()).unwrap().len() > 1, "rolled");
    let sealed = len_of(0);
    assert!(sealed <= 64 * 1024 && segments::verify_prefix(dir.path(), 0, sealed).unwrap());
    assert_eq!(log.head("z"), 600);
    log.close();
    let last = *segments::list(dir.path()).unwrap().last().unwrap();
    assert!(
        segments::verify_prefix(dir.path(), last, len_of(last)).unwrap(),
        "a clean stop leaves exact files"
    );

    let (log, _) = Log::open(options()).unwrap();
    assert_eq!(log.head("z"), 600);
    assert_eq!(
        seqs(&log.read("z", 0, 1000, false).await.unwrap()),
        (1..=600).collect::<Vec<_>>()
    );
    log.close();
}
