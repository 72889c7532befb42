//! A WebSocket connection's membership of a durable queue group. The store keeps the group (its
//! position, what each member holds, until when): the gateway only pulls events for its member
//! (a long-polling fetch, which the store answers once the member has room under its prefetch)
//! and passes on what the member says it is done with, in batches. Nothing here needs saving: a
//! gateway that dies leaves its members' events to come back after their visibility timeout; a
//! connection that ends gives them back at once.

use std::time::Duration;

use eventbus_store_client::{GroupSettings, StoreClient, StoreError};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

/// How long one fetch waits for events before asking again.
const FETCH_WAIT: Duration = Duration::from_secs(25);
/// After a failed call to the store, the next try waits this long.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// The group a subscription joined, and how.
#[derive(Debug, Clone)]
pub struct Joined {
    pub group: String,
    pub pattern: String,
    pub settings: GroupSettings,
}

/// A live membership: events flow into `frames` until it is dropped; dropping it gives back what
/// the member held.
pub struct Member {
    group: String,
    member: String,
    store: StoreClient,
    /// Taken at drop: the pusher ends once it has sent what is queued.
    done: Option<mpsc::UnboundedSender<(String, u64)>>,
    pull: JoinHandle<()>,
    push: Option<JoinHandle<()>>,
}

impl Member {
    /// Joins `joined.group` as `member`; event frames go to `frames` (at most the group's
    /// prefetch of them outstanding, which the store enforces).
    pub fn start(
        store: StoreClient,
        joined: Joined,
        member: String,
        frames: mpsc::UnboundedSender<String>,
    ) -> Member {
        let (done, done_rx) = mpsc::unbounded_channel();
        let pull = tokio::spawn(pull(
            store.clone(),
            joined.clone(),
            member.clone(),
            frames.clone(),
        ));
        let push = tokio::spawn(push(store.clone(), joined.clone(), done_rx, frames));
        Member {
            group: joined.group,
            member,
            store,
            done: Some(done),
            pull,
            push: Some(push),
        }
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// The member is done with these events of `channel`.
    pub fn done(&self, channel: String, seqs: Vec<u64>) {
        if let Some(done) = &self.done {
            for seq in seqs {
                let _ = done.send((channel.clone(), seq));
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.pull.abort();
        // Dones already sent still reach the store (the pusher ends once its queue is empty),
        // then what the member held goes back to the others.
        let (store, group, member) = (self.store.clone(), self.group.clone(), self.member.clone());
        self.done.take();
        let push = self.push.take();
        tokio::spawn(async move {
            if let Some(push) = push {
                let _ = push.await;
            }
            if let Err(err) = store.group_leave(&group, &member).await {
                debug!(%err, %group, %member, "cannot say a member left; what it held comes back after the visibility timeout");
            }
        });
    }
}

/// Fetches events for the member and hands their frames on, until aborted.
async fn pull(
    store: StoreClient,
    joined: Joined,
    member: String,
    frames: mpsc::UnboundedSender<String>,
) {
    let prefetch = joined.settings.prefetch.unwrap_or(100).max(1);
    let mut failing = false;
    loop {
        let fetched = store
            .group_fetch(
                &joined.group,
                &joined.pattern,
                &member,
                prefetch,
                FETCH_WAIT,
                joined.settings,
            )
            .await;
        match fetched {
            Ok(events) => {
                failing = false;
                for event in events {
                    if frames.send(event_frame(&joined.group, &event)).is_err() {
                        return;
                    }
                }
            }
            Err(err) => {
                if !failing {
                    debug!(%err, group = %joined.group, %member, "cannot fetch group events now; trying again");
                }
                failing = true;
                if matches!(err, StoreError::NotFound(_) | StoreError::Conflict(_)) {
                    // The group was deleted or changed under the member: it ends.
                    let error = json!({"op": "error", "code": "group_gone", "message": err.to_string(), "channel": joined.pattern});
                    let _ = frames.send(error.to_string());
                    return;
                }
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

/// `{"op":"event","event":…,"group":…,"delivery":n}`, spliced as text: the stored event is JSON
/// already, and a group name needs no escaping (its syntax is an identity's).
fn event_frame(group: &str, event: &eventbus_store_client::GroupEvent) -> String {
    let json = String::from_utf8_lossy(&event.json);
    let mut frame = String::with_capacity(json.len() + group.len() + 64);
    frame.push_str(r#"{"op":"event","event":"#);
    frame.push_str(&json);
    frame.push_str(r#","group":""#);
    frame.push_str(group);
    frame.push_str(r#"","delivery":"#);
    frame.push_str(&event.deliveries.to_string());
    frame.push('}');
    frame
}

/// Sends the member's dones to the store, as many at a time as have queued up.
async fn push(
    store: StoreClient,
    joined: Joined,
    mut done: mpsc::UnboundedReceiver<(String, u64)>,
    frames: mpsc::UnboundedSender<String>,
) {
    while let Some(first) = done.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1000 {
            match done.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut tries = 0;
        loop {
            match store
                .group_done(&joined.group, Some(&joined.pattern), &batch)
                .await
            {
                Ok(_) => break,
                Err(StoreError::NotFound(message)) => {
                    let error = json!({"op": "error", "code": "group_gone", "message": message});
                    let _ = frames.send(error.to_string());
                    break;
                }
                Err(err) if tries < 20 => {
                    tries += 1;
                    debug!(%err, group = %joined.group, "cannot pass dones on now; trying again");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
                // Given up: these events come back after their visibility timeout.
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_frame_is_json_with_the_event_whole() {
        let event = eventbus_store_client::GroupEvent {
            channel: "orders.eu".into(),
            seq: 7,
            json: bytes::Bytes::from_static(
                br#"{"channel":"orders.eu","seq":7,"data":{"x":"a\"b"}}"#,
            ),
            deliveries: 2,
        };
        let frame: serde_json::Value =
            serde_json::from_str(&event_frame("billing", &event)).expect("json");
        assert_eq!(frame["op"], "event");
        assert_eq!(frame["group"], "billing");
        assert_eq!(frame["delivery"], 2);
        assert_eq!(frame["event"]["seq"], 7);
        assert_eq!(frame["event"]["data"]["x"], "a\"b");
    }
}
