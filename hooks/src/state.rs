//! The hooks service keeps its state in the store, not on a volume, so that any replica can serve
//! the API and take over delivery: three of the bus's own channels (never readable by tokens,
//! never on the backbone).
//! - registrations: one compacted key per webhook (a tombstone deletes it);
//! - progress: one compacted key per webhook: positions, state, failures, last error;
//! - lease: who delivers now (see [`eventbus_store_client::lease`]).

use std::collections::BTreeMap;

use eventbus_store_client::{StoreClient, StoreError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub const REGISTRATIONS: &str = "_bus.hooks.registrations";
pub const PROGRESS: &str = "_bus.hooks.progress";
pub const LEASE: &str = "_bus.hooks.lease";

/// What a service registered: fixed for the webhook's life.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub id: String,
    pub owner: String,
    pub url: String,
    pub channels: Vec<String>,
    pub secret: String,
    /// The subscribe patterns of the token that registered it: every delivery stays within them.
    pub grant: Vec<String>,
    /// Set for a WebSub subscription (owner empty, `channels` its topic's channel, `secret`
    /// possibly empty): delivered the WebSub way, until its lease ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websub: Option<WebSubLease>,
}

/// A WebSub subscription's topic, hub and lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WebSubLease {
    /// The topic URL as the subscriber gave it (echoed in `Link: rel="self"`).
    pub topic: String,
    /// The hub's URL as the subscriber reached it (`Link: rel="hub"`).
    pub hub: String,
    /// Unix ms at which the subscription ends unless renewed.
    pub until_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum State {
    #[default]
    Active,
    /// Gave up after `max_attempts` failures in a row; `last_error` says why.
    Dead,
}

/// How far delivery got: written by the replica holding the lease after each delivery.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Progress {
    pub state: State,
    pub last_error: Option<String>,
    /// Failed attempts in a row for the event being delivered.
    pub failures: u32,
    pub delivered: u64,
    /// Last seq delivered, per channel.
    pub positions: BTreeMap<String, u64>,
}

/// The state channels, through the store's internal API.
#[derive(Clone)]
pub struct Kept {
    store: StoreClient,
}

impl Kept {
    pub fn new(store: StoreClient) -> Kept {
        Kept { store }
    }

    pub fn store(&self) -> &StoreClient {
        &self.store
    }

    /// Appends one of the bus's own events to `channel`.
    pub async fn append(
        &self,
        channel: &str,
        key: Option<&str>,
        data: serde_json::Value,
        deleted: bool,
    ) -> Result<u64, StoreError> {
        self.store
            .append_own(channel, "eventbus.hooks", key, data, deleted)
            .await
    }

    pub async fn put_registration(&self, registration: &Registration) -> Result<(), StoreError> {
        let data = serde_json::to_value(registration).unwrap_or_default();
        self.append(REGISTRATIONS, Some(&registration.id), data, false)
            .await
            .map(|_| ())
    }

    pub async fn delete_registration(&self, id: &str) -> Result<(), StoreError> {
        self.append(REGISTRATIONS, Some(id), serde_json::Value::Null, true)
            .await
            .map(|_| ())
    }

    pub async fn put_progress(&self, id: &str, progress: &Progress) -> Result<(), StoreError> {
        let data = serde_json::to_value(progress).unwrap_or_default();
        self.append(PROGRESS, Some(id), data, false)
            .await
            .map(|_| ())
    }

    pub async fn registrations(&self) -> Result<BTreeMap<String, Registration>, StoreError> {
        self.latest(REGISTRATIONS).await
    }

    pub async fn progress(&self) -> Result<BTreeMap<String, Progress>, StoreError> {
        self.latest(PROGRESS).await
    }

    /// The latest value of every live key of `channel` (a compacted read, page by page).
    async fn latest<T: DeserializeOwned>(
        &self,
        channel: &str,
    ) -> Result<BTreeMap<String, T>, StoreError> {
        let mut out = BTreeMap::new();
        let mut after = 0;
        loop {
            let page = match self.store.read(channel, after, 1000, true).await {
                Ok(page) => page,
                // Nothing written yet.
                Err(StoreError::OutOfRange(_)) => return Ok(out),
                Err(err) => return Err(err),
            };
            for event in &page.events {
                after = event.seq;
                let Ok(value) = serde_json::from_slice::<serde_json::Value>(&event.json) else {
                    continue;
                };
                let Some(key) = value["key"].as_str() else {
                    continue;
                };
                if value["deleted"] == true {
                    out.remove(key);
                    continue;
                }
                if let Ok(item) = serde_json::from_value(value["data"].clone()) {
                    out.insert(key.to_owned(), item);
                }
            }
            if page.events.len() < 1000 {
                return Ok(out);
            }
        }
    }
}
