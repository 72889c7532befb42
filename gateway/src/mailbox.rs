//! A connection's live queue: bounded, filled by the hub's fan-outs, emptied by the connection.
//!
//! Not tokio's `mpsc`: that allocates its cache-padded state and a first block of 32 slots when
//! it is made, 1.1 KiB on every connection whether or not an event ever arrives. Here a queue
//! is one small allocation until events flow, and the slow-consumer alarm lives in it too.
//! The lock is held for a push or a pop only; each queue has one consumer and, on a busy
//! channel, one fan-out task pushing, so it is almost never contended.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use crate::hub::Live;

/// Capacity kept by a queue that has drained (16 bytes per entry): a burst's buffer is given
/// back, so a connection that once fell behind does not hold it for the rest of its life.
const KEPT_WHEN_EMPTY: usize = 32;

/// The hub's end: offers events without waiting. Cloned into every topic the connection joins.
#[derive(Clone)]
pub struct Mailbox {
    shared: Arc<Shared>,
}

/// The connection's end. Dropping it closes the mailbox: further offers are refused.
pub struct Inbox {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The connection's task, woken when an event lands in an empty queue.
    waker: AtomicWaker,
    /// Raised when an offer finds the queue full: the connection is closed as a slow consumer.
    slow: Notify,
    capacity: usize,
}

struct Queue {
    items: VecDeque<Live>,
    closed: bool,
}

/// What became of an offer.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    Queued,
    /// The queue was full; the slow-consumer alarm has been raised.
    Full,
    /// The connection has ended.
    Closed,
}

/// A new mailbox holding at most `capacity` events (at least one).
pub fn mailbox(capacity: usize) -> (Mailbox, Inbox) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            items: VecDeque::new(),
            closed: false,
        }),
        waker: AtomicWaker::new(),
        slow: Notify::new(),
        capacity: capacity.max(1),
    });
    (
        Mailbox {
            shared: shared.clone(),
        },
        Inbox { shared },
    )
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock leaves the queue whole (pushes and pops only).
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Mailbox {
    pub fn offer(&self, live: Live) -> Offered {
        let was_empty = {
            let mut queue = self.shared.lock();
            if queue.closed {
                return Offered::Closed;
            }
            if queue.items.len() >= self.shared.capacity {
                drop(queue);
                self.shared.slow.notify_one();
                return Offered::Full;
            }
            queue.items.push_back(live);
            queue.items.len() == 1
        };
        // Only the first event into an empty queue wakes the consumer: it registers before it
        // looks, and takes every event there is before it waits again.
        if was_empty {
            self.shared.waker.wake();
        }
        Offered::Queued
    }

    /// Resolves when an offer has found the queue full.
    pub async fn slow(&self) {
        self.shared.slow.notified().await
    }
}

impl Inbox {
    /// The next event, waiting for one.
    pub async fn recv(&mut self) -> Live {
        poll_fn(|cx| {
            if let Some(live) = self.try_recv() {
                return Poll::Ready(live);
            }
            // Registered before the second look, so an offer between the two is not missed.
            self.shared.waker.register(cx.waker());
            match self.try_recv() {
                Some(live) => Poll::Ready(live),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<Live> {
        let mut queue = self.shared.lock();
        let live = queue.items.pop_front()?;
        if queue.items.is_empty() && queue.items.capacity() > 4 * KEPT_WHEN_EMPTY {
            queue.items.shrink_to(KEPT_WHEN_EMPTY);
        }
        Some(live)
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.closed = true;
        // Events queued for a connection that has ended are freed now, not with the last topic.
        queue.items = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Delivery;

    fn live(seq: u64) -> Live {
        Live {
            subscription: 1,
            delivery: Arc::new(Delivery {
                channel: "c".into(),
                seq,
                frame: "{}".into(),
            }),
        }
    }

    #[tokio::test]
    async fn events_come_out_in_order_and_a_full_queue_raises_the_alarm() {
        let (mailbox, mut inbox) = mailbox(3);
        for seq in 1..=3 {
            assert_eq!(mailbox.offer(live(seq)), Offered::Queued);
        }
        assert_eq!(mailbox.offer(live(4)), Offered::Full);
        // The alarm was raised before anyone waited: `Notify` keeps the permit.
        mailbox.slow().await;
        for seq in 1..=3 {
            assert_eq!(inbox.recv().await.delivery.seq, seq);
        }
        assert!(inbox.try_recv().is_none());
        assert_eq!(mailbox.offer(live(5)), Offered::Queued, "room again");
        drop(inbox);
        assert_eq!(mailbox.offer(live(6)), Offered::Closed);
    }

    /// A consumer that waits is woken by offers from other threads, and misses none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_consumer_gets_every_offer_from_another_thread() {
        let (mailbox, mut inbox) = mailbox(64);
        const N: u64 = 100_000;
        let producer = tokio::spawn(async move {
            let mut seq = 1;
            while seq <= N {
                match mailbox.offer(live(seq)) {
                    Offered::Queued => seq += 1,
                    // Full: the consumer is behind; let it run.
                    Offered::Full => tokio::task::yield_now().await,
                    Offered::Closed => panic!("closed while the consumer runs"),
                }
            }
        });
        let consumed = async {
            for seq in 1..=N {
                assert_eq!(inbox.recv().await.delivery.seq, seq);
            }
        };
        // A lost wake-up shows as a consumer waiting for ever.
        tokio::time::timeout(std::time::Duration::from_secs(30), consumed)
            .await
            .expect("the consumer slept through an offer");
        producer.await.unwrap();
    }

    #[test]
    fn a_drained_queue_gives_its_burst_buffer_back() {
        let (mailbox, mut inbox) = mailbox(10_000);
        for seq in 0..5_000 {
            mailbox.offer(live(seq));
        }
        while inbox.try_recv().is_some() {}
        assert!(mailbox.shared.lock().items.capacity() <= 4 * KEPT_WHEN_EMPTY);
    }
}
