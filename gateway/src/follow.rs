//! The delivery guarantee, once, for every transport (WebSocket subscriptions, SSE streams): a
//! position in one channel decides, for each event live or from the log, whether it is delivered,
//! dropped or first needs the missing range from the log, and reads that range.
//!
//! The rule (docs/architecture.md, "Ordering and exactly-once delivery"): a subscription keeps the
//! last seq it delivered per channel; an event with `seq <= delivered` is dropped, `seq ==
//! delivered + 1` is delivered, `seq > delivered + 1` waits until `delivered + 1 ..= seq - 1` came
//! from the log. A start position is checked against the channel's bounds first: a history the
//! log no longer holds is reported (never skipped), a position beyond the head refused.
//!
//! Transports keep only their framing, close codes or ids, and timers; what can go wrong here is
//! a typed [`Missed`], which both tell their client about.

use eventbus_model::StoredEvent;
use eventbus_store_client::{StoreClient, StoreError};

/// Most events read from the log per request while catching up.
pub const PAGE: u64 = 1000;

/// A subscription's position in one channel: the last seq it delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Follow {
    delivered: u64,
}

/// What to do with an event that reached a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Already delivered (a double, or something catch-up gave first): drop it.
    Drop,
    /// The next one: deliver it, then [`Follow::delivered`] it.
    Deliver,
    /// Events before it are missing: read up to `upto` from the log first ([`refill`]).
    Refill { upto: u64 },
}

/// Why a position could not start where it was asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// `after` is beyond the channel's head.
    BeyondHead { head: u64 },
    /// The log keeps the channel from `first` on: the events after `after` are partly gone.
    Truncated { first: u64 },
}

/// Why the log could not give what a position needs.
#[derive(Debug)]
pub enum Missed {
    /// The log no longer holds the range: it keeps the channel from `first` on. The subscription
    /// ends, and its client is told from where history is kept.
    Truncated { first: u64 },
    /// The log has less than an event announced (a forged or confused backbone message): the
    /// announced event is dropped, the position stays.
    Behind,
    /// The log could not be read.
    Unreachable(StoreError),
}

impl Follow {
    /// A position that has delivered everything up to `delivered`.
    pub fn at(delivered: u64) -> Follow {
        Follow { delivered }
    }

    /// Where a subscription starts in a channel whose log holds `first ..= head`: right after
    /// `after`, or live at the head. `needs_history` is then whether `after+1 ..= head` must be
    /// read from the log before live events.
    pub fn start(after: Option<u64>, first: u64, head: u64) -> Result<Follow, Start> {
        match after {
            None => Ok(Follow::at(head)),
            Some(after) if after > head => Err(Start::BeyondHead { head }),
            // Never skip silently: the client learns that history is gone and from where.
            Some(after) if after + 1 < first => Err(Start::Truncated { first }),
            Some(after) => Ok(Follow::at(after)),
        }
    }

    /// The last seq delivered.
    pub fn last(&self) -> u64 {
        self.delivered
    }

    /// What to do with event `seq` of this channel.
    pub fn step(&self, seq: u64) -> Step {
        if seq <= self.delivered {
            Step::Drop
        } else if seq == self.delivered + 1 {
            Step::Deliver
        } else {
            Step::Refill { upto: seq - 1 }
        }
    }

    /// Records that `seq` was delivered (after [`Step::Deliver`]).
    pub fn delivered(&mut self, seq: u64) {
        debug_assert!(seq > self.delivered, "positions only move forward");
        self.delivered = self.delivered.max(seq);
    }
}

/// How a refill or catch-up reads the log: the store, or (in tests) anything that answers pages.
pub trait Log {
    /// Events after `after`, at most `limit`, compacted or not, with the channel's head.
    fn page(
        &self,
        channel: &str,
        after: u64,
        limit: u32,
        compact: bool,
    ) -> impl std::future::Future<Output = Result<(Vec<StoredEvent>, u64), Missed>> + Send;
}

impl Log for StoreClient {
    async fn page(
        &self,
        channel: &str,
        after: u64,
        limit: u32,
        compact: bool,
    ) -> Result<(Vec<StoredEvent>, u64), Missed> {
        match self.read(channel, after, limit, compact).await {
            Ok(page) => Ok((page.events, page.head)),
            Err(StoreError::Truncated { first, .. }) => Err(Missed::Truncated { first }),
            Err(err) => Err(Missed::Unreachable(err)),
        }
    }
}

/// The next page of what `follow` misses up to and including `upto`, to deliver in order (each
/// then [`Follow::delivered`]): contiguous from `follow.last() + 1`. Empty when nothing is missing;
/// `Missed::Behind` when the log has less than `upto`.
pub async fn missing(
    log: &impl Log,
    channel: &str,
    follow: &Follow,
    upto: u64,
) -> Result<Vec<StoredEvent>, Missed> {
    if follow.last() >= upto {
        return Ok(Vec::new());
    }
    let want = (upto - follow.last()).min(PAGE) as u32;
    let (events, _head) = log.page(channel, follow.last(), want, false).await?;
    // The same rule as live events: a page is in seq order, but nothing is assumed.
    let mut next = *follow;
    let events: Vec<StoredEvent> = events
        .into_iter()
        .filter(|event| {
            let take = event.seq <= upto && next.step(event.seq) == Step::Deliver;
            if take {
                next.delivered(event.seq);
            }
            take
        })
        .collect();
    if events.is_empty() {
        return Err(Missed::Behind);
    }
    Ok(events)
}

/// One page of a compacted catch-up after `cursor` (the latest event per key, in seq order), and,
/// on the last page, the head it was read at: the position then stands at
/// [`Follow::caught_up`], since what compaction let go is not owed.
pub async fn compacted(
    log: &impl Log,
    channel: &str,
    cursor: u64,
) -> Result<(Vec<StoredEvent>, Option<u64>), Missed> {
    let (events, head) = log.page(channel, cursor, PAGE as u32, true).await?;
    let last_page = (events.len() as u64) < PAGE;
    let events = events.into_iter().filter(|e| e.seq > cursor).collect();
    Ok((events, last_page.then_some(head)))
}

impl Follow {
    /// The position after a compacted catch-up that delivered up to `cursor` and read `head`.
    pub fn caught_up(&self, cursor: u64, head: u64) -> Follow {
        Follow::at(head.max(cursor).max(self.delivered))
    }
}

#[cfg(test)]
mod tests {
    //! The specification of the ordering rule, and of what a position does when the log cannot
    //! give what it needs.
    use std::sync::Mutex;

    use super::*;

    fn event(seq: u64, key: &str) -> StoredEvent {
        StoredEvent {
            channel: "c".into(),
            seq,
            json: format!(r#"{{"seq":{seq},"key":"{key}"}}"#)
                .into_bytes()
                .into(),
            committed_ms: 0,
        }
    }

    /// A log holding `first ..= head` of one channel, each event keyed `k{seq % keys}`.
    struct Fake {
        first: u64,
        head: u64,
        keys: u64,
        down: bool,
        reads: Mutex<u32>,
    }

    impl Fake {
        fn new(first: u64, head: u64) -> Fake {
            Fake {
                first,
                head,
                keys: 1000,
                down: false,
                reads: Mutex::new(0),
            }
        }
    }

    impl Log for Fake {
        async fn page(
            &self,
            _channel: &str,
            after: u64,
            limit: u32,
            compact: bool,
        ) -> Result<(Vec<StoredEvent>, u64), Missed> {
            *self.reads.lock().unwrap() += 1;
            if self.down {
                return Err(Missed::Unreachable(StoreError::Unavailable("down".into())));
            }
            if after + 1 < self.first {
                return Err(Missed::Truncated { first: self.first });
            }
            let seqs = (after + 1..=self.head).filter(|seq| {
                // Compacted: only the latest of each key.
                !compact || seq + self.keys > self.head
            });
            let events = seqs
                .take(limit as usize)
                .map(|s| event(s, &format!("k{}", s % self.keys)))
                .collect();
            Ok((events, self.head))
        }
    }

    /// What a transport does: deliver every page, advancing the position.
    async fn collect(log: &Fake, follow: &mut Follow, upto: u64) -> (Vec<u64>, Result<(), Missed>) {
        let mut got = Vec::new();
        loop {
            match missing(log, "c", follow, upto).await {
                Ok(events) if events.is_empty() => return (got, Ok(())),
                Ok(events) => {
                    for event in events {
                        got.push(event.seq);
                        follow.delivered(event.seq);
                    }
                }
                Err(missed) => return (got, Err(missed)),
            }
        }
    }

    #[test]
    fn each_event_is_dropped_delivered_or_waits_for_the_missing_range() {
        let follow = Follow::at(5);
        assert_eq!(follow.step(3), Step::Drop);
        assert_eq!(follow.step(5), Step::Drop, "a double");
        assert_eq!(follow.step(6), Step::Deliver);
        assert_eq!(follow.step(9), Step::Refill { upto: 8 });
    }

    #[test]
    fn a_start_is_checked_against_the_bounds_never_skipping_history() {
        assert_eq!(
            Follow::start(None, 1, 10),
            Ok(Follow::at(10)),
            "live at the head"
        );
        assert_eq!(Follow::start(Some(4), 1, 10), Ok(Follow::at(4)));
        assert_eq!(Follow::start(Some(10), 1, 10), Ok(Follow::at(10)));
        assert_eq!(
            Follow::start(Some(11), 1, 10),
            Err(Start::BeyondHead { head: 10 })
        );
        // The log keeps 5..=10: after=3 would skip 4.
        assert_eq!(
            Follow::start(Some(3), 5, 10),
            Err(Start::Truncated { first: 5 })
        );
        assert_eq!(Follow::start(Some(4), 5, 10), Ok(Follow::at(4)));
        assert_eq!(
            Follow::start(Some(0), 1, 0),
            Ok(Follow::at(0)),
            "empty channel"
        );
    }

    #[tokio::test]
    async fn a_refill_delivers_the_range_in_order_once_across_pages() {
        let log = Fake::new(1, 2500);
        let mut follow = Follow::at(10);
        let (got, outcome) = collect(&log, &mut follow, 2400).await;
        assert!(outcome.is_ok());
        assert_eq!(got, (11..=2400).collect::<Vec<_>>());
        assert_eq!(follow.last(), 2400);
        assert_eq!(*log.reads.lock().unwrap(), 3, "pages of {PAGE}");
        // Nothing more to do: no read.
        let (got, outcome) = collect(&log, &mut follow, 2400).await;
        assert!(outcome.is_ok() && got.is_empty());
        assert_eq!(*log.reads.lock().unwrap(), 3);
    }

    #[tokio::test]
    async fn a_log_behind_the_announcement_leaves_the_position_where_the_log_ends() {
        let log = Fake::new(1, 7);
        let mut follow = Follow::at(5);
        let (got, outcome) = collect(&log, &mut follow, 9).await;
        assert_eq!(got, vec![6, 7]);
        assert!(matches!(outcome, Err(Missed::Behind)));
        assert_eq!(
            follow.last(),
            7,
            "what the log has is delivered, nothing beyond"
        );
        assert_eq!(
            follow.step(10),
            Step::Refill { upto: 9 },
            "still waiting for 8, 9"
        );
    }

    #[tokio::test]
    async fn a_range_the_log_let_go_is_reported_with_where_it_keeps_from() {
        let log = Fake::new(50, 100);
        let mut follow = Follow::at(10);
        let (got, outcome) = collect(&log, &mut follow, 100).await;
        assert!(got.is_empty());
        assert!(matches!(outcome, Err(Missed::Truncated { first: 50 })));
        assert_eq!(follow.last(), 10, "nothing skipped");
    }

    #[tokio::test]
    async fn an_unreachable_log_stops_the_refill() {
        let mut log = Fake::new(1, 100);
        log.down = true;
        let mut follow = Follow::at(10);
        let (_, outcome) = collect(&log, &mut follow, 20).await;
        assert!(matches!(outcome, Err(Missed::Unreachable(_))));
        assert_eq!(follow.last(), 10);
    }

    #[tokio::test]
    async fn a_compacted_catch_up_gives_the_latest_per_key_then_stands_at_the_head() {
        let mut log = Fake::new(1, 3000);
        log.keys = 3;
        let follow = Follow::at(0);
        let mut got = Vec::new();
        let mut cursor = follow.last();
        let follow = loop {
            let (events, end) = compacted(&log, "c", cursor).await.unwrap();
            for event in events {
                got.push(event.seq);
                cursor = event.seq;
            }
            if let Some(head) = end {
                break follow.caught_up(cursor, head);
            }
        };
        assert_eq!(got, vec![2998, 2999, 3000]);
        assert_eq!(follow.last(), 3000);
        assert_eq!(
            follow.step(3001),
            Step::Deliver,
            "then live, with nothing owed"
        );
    }
}
