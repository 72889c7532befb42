//! Appends made at the same time, sent to a store over the network as one: a publish of one event
//! per request is the common case, and each gRPC call costs far more CPU than the events in it
//! (measured: 16k single-event requests/s through a separate ingest and store, against 220k
//! events/s in batches of 100).
//!
//! At most [`IN_FLIGHT`] appends are on the wire at once. An append that finds one free goes out
//! alone at once, so a lone publisher waits for nothing; appends that arrive while all are busy
//! queue, and the next free slot takes everything queued as one call. The store answers each
//! event on its own (seq, duplicate), so the answer splits back exactly.
//!
//! The store takes or refuses a call as a whole. When a combined call is refused for something
//! one of its appends may have caused (an invalid event, a publisher over its channel quota),
//! each append is sent again on its own and gets its own answer: nothing was stored, and ids make
//! a resend safe anyway. When the outcome is unknown (the store unreachable, a timeout), every
//! append in it is told so, as it would have been alone.

use eventbus_proto::store as pb;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{Grpc, StoreError};

/// Appends on the wire at once from one client.
pub const IN_FLIGHT: usize = 4;
/// Appends of at most this many events are combined; larger ones go out as they are.
pub const SMALL: usize = 10;
/// Most events in one combined call (a single append larger than this goes alone).
const MAX_EVENTS: usize = 1000;
/// Most bytes of event bodies in one combined call.
const MAX_BYTES: usize = 4 * 1024 * 1024;

pub(crate) type Answer = Result<Vec<pb::Appended>, StoreError>;

pub(crate) struct Waiting {
    pub events: Vec<pb::EventRecord>,
    pub answer: oneshot::Sender<Answer>,
}

impl Waiting {
    fn bytes(&self) -> usize {
        self.events.iter().map(|e| e.body.len()).sum()
    }
}

/// Runs until every sender of `queue` is gone.
pub(crate) async fn run(grpc: Grpc, mut queue: mpsc::UnboundedReceiver<Waiting>) {
    let slots = std::sync::Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried: Option<Waiting> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match queue.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Everything that queued while the slots were busy goes in this call.
        let (mut events, mut bytes) = (first.events.len(), first.bytes());
        let mut batch = vec![first];
        while let Ok(next) = queue.try_recv() {
            let (more, more_bytes) = (next.events.len(), next.bytes());
            if events + more > MAX_EVENTS || bytes + more_bytes > MAX_BYTES {
                carried = Some(next);
                break;
            }
            events += more;
            bytes += more_bytes;
            batch.push(next);
        }
        let grpc = grpc.clone();
        tokio::spawn(async move {
            send(grpc, batch).await;
            drop(slot);
        });
    }
}

async fn send(grpc: Grpc, batch: Vec<Waiting>) {
    if batch.len() == 1 {
        for waiting in batch {
            let answer = call(grpc.clone(), waiting.events).await;
            let _ = waiting.answer.send(answer);
        }
        return;
    }
    eventbus_runtime::metrics::metrics()
        .store_combined_appends
        .inc_by(batch.len() as u64);
    let combined: Vec<pb::EventRecord> = batch
        .iter()
        .flat_map(|w| w.events.iter().cloned())
        .collect();
    let total = combined.len();
    match call(grpc.clone(), combined).await {
        Ok(results) if results.len() == total => {
            let mut results = results.into_iter();
            for waiting in batch {
                let own: Vec<pb::Appended> = results.by_ref().take(waiting.events.len()).collect();
                let _ = waiting.answer.send(Ok(own));
            }
        }
        Ok(results) => {
            let err = StoreError::Unknown(format!(
                "the store answered {} results for {total} events",
                results.len()
            ));
            for waiting in batch {
                let _ = waiting.answer.send(Err(err.clone()));
            }
        }
        Err(err @ (StoreError::Unknown(_) | StoreError::Unavailable(_))) => {
            for waiting in batch {
                let _ = waiting.answer.send(Err(err.clone()));
            }
        }
        // Refused as a whole, perhaps for one append's sake: each on its own.
        Err(_) => {
            let mut alone = tokio::task::JoinSet::new();
            for waiting in batch {
                let grpc = grpc.clone();
                alone.spawn(async move {
                    let answer = call(grpc, waiting.events).await;
                    let _ = waiting.answer.send(answer);
                });
            }
            while alone.join_next().await.is_some() {}
        }
    }
}

async fn call(mut grpc: Grpc, events: Vec<pb::EventRecord>) -> Answer {
    grpc.append(pb::AppendRequest { events })
        .await
        .map(|response| response.into_inner().results)
        .map_err(crate::append_error)
}
