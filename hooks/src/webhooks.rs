//! Webhooks: services register `{url, channels, secret}`; the bus POSTs each matching event to the
//! URL as a structured CloudEvent, signed, in seq order per channel, at least once.
//!
//! Registrations and delivery positions live in one JSON file (written to a temporary file,
//! fsynced, renamed), so they survive restarts; a position moves only after the receiver answered
//! 2xx, so a crash can repeat a delivery but never skip one. Each webhook has its own task: a slow
//! or dead receiver delays nobody else. New events are found by polling the store's channel heads
//! (one call per webhook per interval), so delivery lags commits by up to that interval.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_router::Grant;
use eventbus_router::pattern::{matches, validate_pattern};

use crate::destinations::{Guard, Resolver};
use eventbus_store_client::StoreClient;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

pub const SIGNATURE_HEADER: &str = "X-Eventbus-Signature";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Active,
    /// Gave up after `max_attempts` failures in a row; `last_error` says why.
    Dead,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Webhook {
    pub id: String,
    pub owner: String,
    pub url: String,
    pub channels: Vec<String>,
    pub secret: String,
    pub state: State,
    pub last_error: Option<String>,
    /// Failed attempts in a row for the event being delivered.
    pub failures: u32,
    pub delivered: u64,
    /// Last seq delivered, per channel.
    pub positions: BTreeMap<String, u64>,
    /// The subscribe patterns of the token that registered it: every delivery stays within them.
    /// (Registrations from before grants were kept have none; their channels stand for it.)
    #[serde(default)]
    pub grant: Vec<String>,
    /// Events waiting for this webhook at its last look (not saved).
    #[serde(skip)]
    pub backlog: u64,
}

impl Webhook {
    /// Whether the grant it was registered with covers `channel`.
    pub fn allows(&self, channel: &str) -> bool {
        let grant = if self.grant.is_empty() {
            &self.channels
        } else {
            &self.grant
        };
        grant.iter().any(|pattern| matches(pattern, channel))
    }

    /// What the API shows: everything but the secret.
    pub fn public(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "url": self.url, "channels": self.channels, "owner": self.owner,
            "state": self.state, "last_error": self.last_error, "failures": self.failures,
            "delivered": self.delivered, "positions": self.positions, "backlog": self.backlog,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    Forbidden(String),
    #[error("webhooks need the store (EVENTBUS_STORE_URL)")]
    NoStore,
    #[error("cannot save the webhooks: {0}")]
    Io(String),
    #[error("the store did not answer: {0}")]
    Store(String),
}

/// Settings of delivery.
#[derive(Debug, Clone)]
pub struct Settings {
    pub dir: PathBuf,
    pub max_attempts: u32,
    pub poll: Duration,
    pub timeout: Duration,
    /// Which destinations are allowed (public addresses, unless opened).
    pub guard: Arc<Guard>,
    /// Whom `https://` destinations are trusted as.
    pub trust: eventbus_runtime::tls::Trust,
}

struct Inner {
    settings: Settings,
    store: Option<StoreClient>,
    hooks: Mutex<BTreeMap<String, Webhook>>,
    /// Held across serialise, write, fsync and rename: one writer of the file at a time, and the
    /// state written last is the newest.
    saving: Mutex<()>,
    tasks: Mutex<BTreeMap<String, JoinHandle<()>>>,
    http: reqwest::Client,
}

#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

type HmacSha256 = Hmac<Sha256>;

/// `t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| {
        // HMAC takes keys of any length; this cannot happen.
        HmacSha256::new_from_slice(b"").expect("empty HMAC key")
    });
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={timestamp},v1={hex}")
}

/// The literal part of a pattern before its first wildcard, for listing channels by prefix.
fn literal_prefix(pattern: &str) -> &str {
    match pattern.find(['*', '>']) {
        Some(i) => &pattern[..i],
        None => pattern,
    }
}

impl Webhooks {
    /// Loads the registrations in `settings.dir` and starts delivering for the active ones.
    pub fn start(settings: Settings, store: Option<StoreClient>) -> Result<Self, WebhookError> {
        std::fs::create_dir_all(&settings.dir).map_err(|e| WebhookError::Io(e.to_string()))?;
        let path = settings.dir.join("webhooks.json");
        let hooks: BTreeMap<String, Webhook> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| WebhookError::Io(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(WebhookError::Io(e.to_string())),
        };
        let mut http = reqwest::Client::builder()
            .timeout(settings.timeout)
            // A redirect would lead past the destination check: a 3xx is a failed delivery.
            .redirect(reqwest::redirect::Policy::none());
        if !settings.guard.open {
            http = http.dns_resolver(Arc::new(Resolver(settings.guard.clone())));
        }
        http =
            http.use_preconfigured_tls(settings.trust.client_config().map_err(WebhookError::Io)?);
        let http = http.build().map_err(|e| WebhookError::Io(e.to_string()))?;
        let webhooks = Webhooks {
            inner: Arc::new(Inner {
                settings,
                store,
                hooks: Mutex::new(hooks),
                saving: Mutex::new(()),
                tasks: Mutex::default(),
                http,
            }),
        };
        let active: Vec<String> = webhooks
            .lock()
            .values()
            .filter(|h| h.state == State::Active)
            .map(|h| h.id.clone())
            .collect();
        for id in active {
            webhooks.spawn(id);
        }
        Ok(webhooks)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Webhook>> {
        self.inner.hooks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self) -> Result<(), WebhookError> {
        let _one_writer = self.inner.saving.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = serde_json::to_vec_pretty(&*self.lock())
            .map_err(|e| WebhookError::Io(e.to_string()))?;
        let dir = &self.inner.settings.dir;
        let tmp = dir.join(".webhooks.json.tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, dir.join("webhooks.json"))?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| WebhookError::Io(e.to_string()))
    }

    /// Registers a webhook for the holder of `grant`, within it; it starts at the channels'
    /// current heads.
    pub async fn register(
        &self,
        grant: &Grant,
        url: String,
        channels: Vec<String>,
        secret: String,
    ) -> Result<Webhook, WebhookError> {
        let owner = grant.identity.as_str();
        let invalid = |field, message: String| WebhookError::Invalid { field, message };
        let store = self.inner.store.clone().ok_or(WebhookError::NoStore)?;
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048 {
            return Err(invalid("url", "an http:// or https:// URL".into()));
        }
        if channels.is_empty() || channels.len() > 64 {
            return Err(invalid("channels", "1 to 64 channels or patterns".into()));
        }
        for pattern in &channels {
            validate_pattern(pattern)
                .map_err(|e| invalid("channels", format!("{pattern:?}: {e}")))?;
        }
        if secret.len() < 16 {
            return Err(invalid("secret", "at least 16 characters".into()));
        }
        // A webhook reads what its owner may read, no more: every user's inbox is not a pattern
        // away from a URL of the caller's choice.
        for pattern in &channels {
            grant.check_subscribe(pattern).map_err(|denied| {
                WebhookError::Forbidden(format!("channels: {pattern:?}: {denied}"))
            })?;
        }
        self.inner
            .settings
            .guard
            .check_url(&url)
            .await
            .map_err(|why| invalid("url", why))?;
        let mut positions = BTreeMap::new();
        for pattern in &channels {
            for (channel, head) in list(&store, pattern).await? {
                positions.insert(channel, head);
            }
        }
        let hook = Webhook {
            id: uuid::Uuid::now_v7().simple().to_string(),
            owner: owner.to_owned(),
            url,
            channels,
            secret,
            state: State::Active,
            last_error: None,
            failures: 0,
            delivered: 0,
            positions,
            grant: grant.subscribe.clone(),
            backlog: 0,
        };
        self.lock().insert(hook.id.clone(), hook.clone());
        self.save()?;
        self.spawn(hook.id.clone());
        Ok(hook)
    }

    pub fn list(&self, owner: &str) -> Vec<Webhook> {
        self.lock()
            .values()
            .filter(|h| h.owner == owner)
            .cloned()
            .collect()
    }

    pub fn get(&self, owner: &str, id: &str) -> Option<Webhook> {
        self.lock().get(id).filter(|h| h.owner == owner).cloned()
    }

    pub fn delete(&self, owner: &str, id: &str) -> Result<bool, WebhookError> {
        let removed = {
            let mut hooks = self.lock();
            match hooks.get(id) {
                Some(h) if h.owner == owner => hooks.remove(id).is_some(),
                _ => false,
            }
        };
        if removed {
            if let Some(task) = self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id)
            {
                task.abort();
            }
            self.save()?;
        }
        Ok(removed)
    }

    /// Marks a webhook dead for `why`, and saves it.
    fn kill(&self, id: &str, why: String) {
        {
            let mut hooks = self.lock();
            if let Some(h) = hooks.get_mut(id) {
                warn!(webhook = %id, %why, "webhook stopped");
                h.state = State::Dead;
                h.last_error = Some(why);
            }
        }
        if let Err(err) = self.save() {
            warn!(%err, "webhook state not saved");
        }
    }

    /// Records one webhook's backlog and publishes the sum over all of them.
    fn set_backlog(&self, id: &str, backlog: u64) {
        let total: u64 = {
            let mut hooks = self.lock();
            if let Some(h) = hooks.get_mut(id) {
                h.backlog = backlog;
            }
            hooks.values().map(|h| h.backlog).sum()
        };
        eventbus_runtime::metrics::metrics()
            .webhook_backlog
            .set(total as i64);
    }

    fn spawn(&self, id: String) {
        let task = tokio::spawn(deliver_loop(self.clone(), id.clone()));
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, task);
    }
}

/// Channels matching `pattern`, with heads.
async fn list(store: &StoreClient, pattern: &str) -> Result<Vec<(String, u64)>, WebhookError> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let page = store
            .channels(literal_prefix(pattern), &after, 1000)
            .await
            .map_err(|e| WebhookError::Store(e.to_string()))?;
        let done = page.len() < 1000;
        if let Some((last, _)) = page.last() {
            after = last.clone();
        }
        out.extend(page.into_iter().filter(|(c, _)| matches(pattern, c)));
        if done {
            return Ok(out);
        }
    }
}

/// One webhook's delivery: find channels with events past its positions, POST them in order.
async fn deliver_loop(webhooks: Webhooks, id: String) {
    let Some(store) = webhooks.inner.store.clone() else {
        return;
    };
    let settings = webhooks.inner.settings.clone();
    loop {
        let Some(hook) = webhooks.lock().get(&id).cloned() else {
            return;
        };
        if hook.state != State::Active {
            return;
        }
        let mut behind = Vec::new();
        for pattern in &hook.channels {
            match list(&store, pattern).await {
                Ok(found) => behind.extend(
                    found
                        .into_iter()
                        .filter(|(c, head)| *head > hook.positions.get(c).copied().unwrap_or(0)),
                ),
                Err(err) => debug!(%err, "webhook: cannot list channels now"),
            }
        }
        behind.sort();
        behind.dedup();
        let backlog: u64 = behind
            .iter()
            .map(|(c, head)| head - hook.positions.get(c).copied().unwrap_or(0))
            .sum();
        webhooks.set_backlog(&id, backlog);
        let mut progressed = false;
        for (channel, _) in behind {
            let after = hook.positions.get(&channel).copied().unwrap_or(0);
            let page = match store.read(&channel, after, 100, false).await {
                Ok(page) => page,
                Err(eventbus_store_client::StoreError::Truncated { first, .. }) => {
                    // Retention removed events before they were delivered: say so, go on.
                    {
                        let mut hooks = webhooks.lock();
                        if let Some(h) = hooks.get_mut(&id) {
                            h.positions.insert(channel.clone(), first.saturating_sub(1));
                            h.last_error = Some(format!(
                                "{channel}: events {}..{} were removed by retention before delivery",
                                after + 1,
                                first.saturating_sub(1)
                            ));
                        }
                    }
                    let _ = webhooks.save();
                    progressed = true;
                    continue;
                }
                Err(_) => continue,
            };
            if !hook.allows(&channel) {
                webhooks.kill(
                    &id,
                    format!("{channel} is outside the grant it was registered with"),
                );
                return;
            }
            for event in page.events {
                match deliver(&webhooks, &hook, &event.json, &settings).await {
                    Ok(()) => {
                        progressed = true;
                        let mut hooks = webhooks.lock();
                        let Some(h) = hooks.get_mut(&id) else { return };
                        h.positions.insert(channel.clone(), event.seq);
                        h.failures = 0;
                        h.last_error = None;
                        h.delivered += 1;
                    }
                    Err(()) => {
                        let _ = webhooks.save();
                        return;
                    }
                }
                if let Err(err) = webhooks.save() {
                    warn!(%err, "webhook position not saved; it may be delivered again");
                }
            }
        }
        if !progressed {
            tokio::time::sleep(settings.poll).await;
        }
    }
}

/// An error and what caused it, down the chain (reqwest's own message names only the URL).
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// POSTs one event, retrying with backoff and jitter; `Err` once the webhook is dead.
async fn deliver(
    webhooks: &Webhooks,
    hook: &Webhook,
    body: &[u8],
    settings: &Settings,
) -> Result<(), ()> {
    let mut attempt = 0u32;
    loop {
        // Literal addresses never reach the resolver's check: checked here, at every delivery.
        if let Err(why) = settings.guard.check_literal(&hook.url) {
            webhooks.kill(&hook.id, why);
            return Err(());
        }
        let timestamp = eventbus_auth_client::claims::now_s();
        let outcome = webhooks
            .inner
            .http
            .post(&hook.url)
            .header("content-type", "application/cloudevents+json")
            .header(SIGNATURE_HEADER, signature(&hook.secret, timestamp, body))
            .body(body.to_vec())
            .send()
            .await;
        let error = match outcome {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("the receiver answered {}", r.status()),
            Err(e) => format!("cannot reach the receiver: {}", with_causes(&e)),
        };
        attempt += 1;
        eventbus_runtime::metrics::metrics().webhook_failures.inc();
        let dead = attempt >= settings.max_attempts;
        {
            let mut hooks = webhooks.lock();
            if let Some(h) = hooks.get_mut(&hook.id) {
                h.failures = attempt;
                h.last_error = Some(error.clone());
                if dead {
                    h.state = State::Dead;
                }
            }
        }
        if dead {
            warn!(webhook = %hook.id, %error, attempts = attempt, "webhook dead after repeated failures");
            return Err(());
        }
        // Exponential from 250 ms, capped at 60 s, with equal jitter.
        let ceiling = (250u64 << attempt.min(8)).min(60_000);
        let jitter = rand::random::<u64>() % (ceiling / 2 + 1);
        tokio::time::sleep(Duration::from_millis(ceiling / 2 + jitter)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_time_and_body() {
        let sig = signature("0123456789abcdef", 1700000000, br#"{"a":1}"#);
        // Computed with Python's hmac module.
        assert_eq!(
            sig,
            "t=1700000000,v1=9eb18f493f8ec135d9eb2dad817c369bb4e9cbfa818657897a7437c1cd8c3a23"
        );
        assert_ne!(
            sig,
            signature("0123456789abcdeX", 1700000000, br#"{"a":1}"#)
        );
    }

    #[test]
    fn patterns_list_by_their_literal_prefix() {
        assert_eq!(literal_prefix("orders.*"), "orders.");
        assert_eq!(literal_prefix(">"), "");
        assert_eq!(literal_prefix("a.b"), "a.b");
    }
}
