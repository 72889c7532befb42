//! Webhooks: services register `{url, channels, secret}`; the bus POSTs each matching event to the
//! URL as a structured CloudEvent, signed, in seq order per channel, at least once.
//!
//! Registrations and delivery positions are kept in the store ([`crate::state`]), so any replica
//! serves the API and none needs a volume. One replica delivers at a time, the holder of the lease
//! ([`eventbus_store_client::lease`]); when it dies, another takes over from the positions it saved. A position is
//! saved only after the receiver answered 2xx, so a takeover or a crash can repeat a delivery but
//! never skip one. Each webhook has its own task: a slow or dead receiver delays nobody else. New
//! events are found by polling the store's channel heads, so delivery lags commits by up to that
//! interval.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_router::Grant;
use eventbus_router::pattern::{matches, validate_pattern};
use eventbus_store_client::StoreClient;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::destinations::{Guard, Resolver};
pub use crate::state::State;
use crate::state::{Kept, Progress, Registration};
use eventbus_store_client::lease::{self, Lease, now_ms};

pub use eventbus_auth_client::signature::{HEADER as SIGNATURE_HEADER, signature};

/// A webhook as the API shows it: what was registered, and how far delivery got.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub registration: Registration,
    pub progress: Progress,
    /// Events waiting for it at the holder's last look (0 on other replicas).
    pub backlog: u64,
}

impl Webhook {
    /// Whether the grant it was registered with covers `channel`.
    pub fn allows(&self, channel: &str) -> bool {
        let r = &self.registration;
        let grant = if r.grant.is_empty() {
            &r.channels
        } else {
            &r.grant
        };
        grant.iter().any(|pattern| matches(pattern, channel))
    }

    /// What the API shows: everything but the secret.
    pub fn public(&self) -> serde_json::Value {
        let (r, p) = (&self.registration, &self.progress);
        serde_json::json!({
            "id": r.id, "url": r.url, "channels": r.channels, "owner": r.owner,
            "state": p.state, "last_error": p.last_error, "failures": p.failures,
            "delivered": p.delivered, "positions": p.positions, "backlog": self.backlog,
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
    #[error("cannot save the webhooks: {0}")]
    Io(String),
    #[error("the store did not answer: {0}")]
    Store(String),
}

/// Settings of delivery.
#[derive(Debug, Clone)]
pub struct Settings {
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
    kept: Kept,
    http: reqwest::Client,
    /// The holder's working copy of every active webhook (empty on other replicas).
    hooks: Mutex<BTreeMap<String, Webhook>>,
    tasks: Mutex<BTreeMap<String, JoinHandle<()>>>,
    /// Unix ms until which this replica may deliver (its lease, less the margin).
    deliver_until: AtomicU64,
}

#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

/// The literal part of a pattern before its first wildcard, for listing channels by prefix.
fn literal_prefix(pattern: &str) -> &str {
    match pattern.find(['*', '>']) {
        Some(i) => &pattern[..i],
        None => pattern,
    }
}

impl Webhooks {
    /// Starts the replica `instance`: it serves the API at once and delivers while it holds the
    /// lease. Registrations from a webhooks file of an earlier version (in `legacy`) are moved
    /// into the store first.
    pub async fn start(
        settings: Settings,
        store: StoreClient,
        instance: String,
        legacy: Option<&std::path::Path>,
        shutdown: eventbus_runtime::Shutdown,
    ) -> Result<Self, WebhookError> {
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
        let kept = Kept::new(store);
        if let Some(dir) = legacy {
            import_legacy(&kept, dir).await?;
        }
        let webhooks = Webhooks {
            inner: Arc::new(Inner {
                settings,
                kept,
                http,
                hooks: Mutex::default(),
                tasks: Mutex::default(),
                deliver_until: AtomicU64::new(0),
            }),
        };
        tokio::spawn(lead(webhooks.clone(), instance, shutdown));
        Ok(webhooks)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Webhook>> {
        self.inner.hooks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self) -> &StoreClient {
        self.inner.kept.store()
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
        covered(grant, &channels)?;
        self.inner
            .settings
            .guard
            .check_url(&url)
            .await
            .map_err(|why| invalid("url", why))?;
        let mut positions = BTreeMap::new();
        for pattern in &channels {
            for (channel, head) in list(self.store(), pattern).await? {
                positions.insert(channel, head);
            }
        }
        let registration = Registration {
            id: uuid::Uuid::now_v7().simple().to_string(),
            owner: owner.to_owned(),
            url,
            channels,
            secret,
            grant: grant.subscribe.clone(),
            websub: None,
        };
        let progress = Progress {
            positions,
            ..Progress::default()
        };
        // Progress first: a holder that sees the registration finds where to start.
        let kept = &self.inner.kept;
        kept.put_progress(&registration.id, &progress)
            .await
            .map_err(store_error)?;
        kept.put_registration(&registration)
            .await
            .map_err(store_error)?;
        let hook = Webhook {
            registration,
            progress,
            backlog: 0,
        };
        // The holder starts at once rather than at its next look.
        if self.may_deliver() {
            self.lock()
                .insert(hook.registration.id.clone(), hook.clone());
            self.spawn(hook.registration.id.clone());
        }
        Ok(hook)
    }

    /// Every webhook, as kept in the store, with the holder's backlog when this replica holds.
    async fn all(&self) -> Result<BTreeMap<String, Webhook>, WebhookError> {
        let kept = &self.inner.kept;
        let registrations = kept.registrations().await.map_err(store_error)?;
        let mut progress = kept.progress().await.map_err(store_error)?;
        let working = self.lock().clone();
        Ok(registrations
            .into_iter()
            .map(|(id, registration)| {
                let backlog = working.get(&id).map_or(0, |w| w.backlog);
                let progress = progress.remove(&id).unwrap_or_default();
                (
                    id,
                    Webhook {
                        registration,
                        progress,
                        backlog,
                    },
                )
            })
            .collect())
    }

    pub async fn list(&self, owner: &str) -> Result<Vec<Webhook>, WebhookError> {
        Ok(self
            .all()
            .await?
            .into_values()
            .filter(|h| h.registration.owner == owner)
            .collect())
    }

    pub async fn get(&self, owner: &str, id: &str) -> Result<Option<Webhook>, WebhookError> {
        Ok(self
            .all()
            .await?
            .remove(id)
            .filter(|h| h.registration.owner == owner))
    }

    /// Sets a dead webhook going again from where it stopped (its positions are kept): active,
    /// failures and last error cleared. `None` when it is not the owner's or does not exist; a
    /// webhook that is not dead is left as it is. The caller's grant must cover the webhook's
    /// channels, as it must to register them: a narrowed token of the owner does not set going
    /// again a delivery of what it may not read.
    pub async fn retry(&self, grant: &Grant, id: &str) -> Result<Option<Webhook>, WebhookError> {
        let Some(mut hook) = self.get(&grant.identity, id).await? else {
            return Ok(None);
        };
        covered(grant, &hook.registration.channels)?;
        if hook.progress.state != State::Dead {
            return Ok(Some(hook));
        }
        hook.progress.state = State::Active;
        hook.progress.failures = 0;
        hook.progress.last_error = None;
        self.inner
            .kept
            .put_progress(id, &hook.progress)
            .await
            .map_err(store_error)?;
        // The holder's working copy goes at once when the holder is this replica; another
        // holder takes the change up at its next look (`refresh`).
        let here = match self.lock().get_mut(id) {
            Some(working) => {
                working.progress = hook.progress.clone();
                true
            }
            None => false,
        };
        if here && self.may_deliver() {
            self.spawn(id.to_owned());
        }
        info!(webhook = %id, "dead webhook set going again");
        Ok(Some(hook))
    }

    pub async fn delete(&self, owner: &str, id: &str) -> Result<bool, WebhookError> {
        if self.get(owner, id).await?.is_none() {
            return Ok(false);
        }
        self.remove(id).await?;
        Ok(true)
    }

    /// Removes a registration and its progress, and stops its delivery here.
    pub(crate) async fn remove(&self, id: &str) -> Result<(), WebhookError> {
        let kept = &self.inner.kept;
        kept.delete_registration(id).await.map_err(store_error)?;
        // Its progress goes too (a write by a delivery still in flight may bring it back; only
        // registrations make webhooks, so that is harmless).
        kept.append(
            crate::state::PROGRESS,
            Some(id),
            serde_json::Value::Null,
            true,
        )
        .await
        .map_err(store_error)?;
        // The holder stops its task at its next look; stop it here at once when it is this one.
        self.stop(id);
        Ok(())
    }

    /// Keeps a verified WebSub subscription: a new one starts at its channel's head (nothing
    /// before its verification is delivered); a renewal keeps its position and gets the new
    /// lease and secret.
    pub(crate) async fn keep_websub(
        &self,
        id: String,
        channel: String,
        callback: String,
        secret: String,
        lease: crate::state::WebSubLease,
    ) -> Result<(), WebhookError> {
        let kept = &self.inner.kept;
        let renewal = kept
            .registrations()
            .await
            .map_err(store_error)?
            .contains_key(&id);
        if renewal {
            // A subscriber that asks again is back: a subscription that had given up on it goes
            // on from where it stopped.
            if let Some(mut progress) = kept.progress().await.map_err(store_error)?.remove(&id)
                && progress.state == State::Dead
            {
                progress.state = State::Active;
                progress.failures = 0;
                progress.last_error = None;
                kept.put_progress(&id, &progress)
                    .await
                    .map_err(store_error)?;
                if let Some(working) = self.lock().get_mut(&id) {
                    working.progress = progress;
                }
            }
        } else {
            let mut positions = BTreeMap::new();
            for (found, head) in list(self.store(), &channel).await? {
                positions.insert(found, head);
            }
            let progress = Progress {
                positions,
                ..Progress::default()
            };
            kept.put_progress(&id, &progress)
                .await
                .map_err(store_error)?;
        }
        let registration = Registration {
            id: id.clone(),
            owner: String::new(),
            url: callback,
            channels: vec![channel.clone()],
            secret,
            grant: vec![channel],
            websub: Some(lease),
        };
        kept.put_registration(&registration)
            .await
            .map_err(store_error)?;
        if self.may_deliver() {
            let progress = kept
                .progress()
                .await
                .map_err(store_error)?
                .remove(&id)
                .unwrap_or_default();
            let mut hooks = self.lock();
            match hooks.get_mut(&id) {
                Some(working) => working.registration = registration,
                None => {
                    hooks.insert(
                        id.clone(),
                        Webhook {
                            registration,
                            progress,
                            backlog: 0,
                        },
                    );
                }
            }
            drop(hooks);
            self.spawn(id);
        }
        Ok(())
    }

    /// WebSub subscriptions kept now.
    pub(crate) async fn websub_count(&self) -> Result<usize, WebhookError> {
        let registrations = self.inner.kept.registrations().await.map_err(store_error)?;
        Ok(registrations
            .values()
            .filter(|r| r.websub.is_some())
            .count())
    }

    /// The HTTP client of deliveries (destinations checked, no redirects), for WebSub's intent
    /// verification.
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    pub(crate) fn guard(&self) -> &Guard {
        &self.inner.settings.guard
    }

    fn stop(&self, id: &str) {
        self.lock().remove(id);
        if let Some(task) = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            task.abort();
        }
    }

    fn stop_all(&self) {
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        for id in ids {
            self.stop(&id);
        }
    }

    /// Saves one webhook's progress from the working copy.
    async fn save(&self, id: &str) {
        let Some(progress) = self.lock().get(id).map(|h| h.progress.clone()) else {
            return;
        };
        if let Err(err) = self.inner.kept.put_progress(id, &progress).await {
            warn!(webhook = %id, cause = %err, "webhook progress not saved; it may be delivered again");
        }
    }

    /// Marks a webhook dead for `why`, and saves it.
    async fn kill(&self, id: &str, why: String) {
        if let Some(h) = self.lock().get_mut(id) {
            warn!(webhook = %id, %why, "webhook stopped");
            h.progress.state = State::Dead;
            h.progress.last_error = Some(why);
        }
        self.save(id).await;
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

    /// Whether this replica may deliver now (it holds the lease, with the margin left).
    fn may_deliver(&self) -> bool {
        now_ms() < self.inner.deliver_until.load(Ordering::Relaxed)
    }

    fn spawn(&self, id: String) {
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks.get(&id).is_some_and(|t| !t.is_finished()) {
            return;
        }
        let task = tokio::spawn(deliver_loop(self.clone(), id.clone()));
        tasks.insert(id, task);
    }
}

/// Whether `grant` may read every one of `channels` (patterns included).
fn covered(grant: &Grant, channels: &[String]) -> Result<(), WebhookError> {
    for pattern in channels {
        grant.check_subscribe(pattern).map_err(|denied| {
            WebhookError::Forbidden(format!("channels: {pattern:?}: {denied}"))
        })?;
    }
    Ok(())
}

fn store_error(err: eventbus_store_client::StoreError) -> WebhookError {
    WebhookError::Store(err.to_string())
}

/// Moves the registrations of a webhooks file (versions before the store kept them) into the
/// store, once: the file is renamed `webhooks.json.imported` after.
async fn import_legacy(kept: &Kept, dir: &std::path::Path) -> Result<(), WebhookError> {
    #[derive(serde::Deserialize)]
    struct Legacy {
        id: String,
        owner: String,
        url: String,
        channels: Vec<String>,
        secret: String,
        #[serde(default)]
        state: State,
        #[serde(default)]
        last_error: Option<String>,
        #[serde(default)]
        delivered: u64,
        #[serde(default)]
        positions: BTreeMap<String, u64>,
        #[serde(default)]
        grant: Vec<String>,
    }
    let path = dir.join("webhooks.json");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(WebhookError::Io(format!("{}: {e}", path.display()))),
    };
    let hooks: BTreeMap<String, Legacy> = serde_json::from_slice(&bytes)
        .map_err(|e| WebhookError::Io(format!("{}: {e}", path.display())))?;
    for (_, hook) in hooks {
        let progress = Progress {
            state: hook.state,
            last_error: hook.last_error,
            failures: 0,
            delivered: hook.delivered,
            positions: hook.positions,
        };
        kept.put_progress(&hook.id, &progress)
            .await
            .map_err(store_error)?;
        kept.put_registration(&Registration {
            id: hook.id,
            owner: hook.owner,
            url: hook.url,
            channels: hook.channels,
            secret: hook.secret,
            grant: hook.grant,
            websub: None,
        })
        .await
        .map_err(store_error)?;
    }
    std::fs::rename(&path, dir.join("webhooks.json.imported"))
        .map_err(|e| WebhookError::Io(format!("{}: {e}", path.display())))?;
    info!(file = %path.display(), "webhook registrations moved into the store");
    Ok(())
}

/// The lease, looked at every [`lease::LOOK_EVERY`]: while this replica holds it, every active
/// webhook has a delivery task; when it loses it, they stop.
async fn lead(webhooks: Webhooks, instance: String, shutdown: eventbus_runtime::Shutdown) {
    let mut lease = Lease::new(instance, crate::state::LEASE);
    let mut holding = false;
    let stopping = shutdown.wait();
    tokio::pin!(stopping);
    loop {
        let holds = match lease.look(webhooks.inner.kept.store()).await {
            Ok(holds) => holds,
            Err(err) => {
                debug!(cause = %err, "cannot look at the webhook lease now");
                lease.holds(now_ms())
            }
        };
        if holds {
            // Never past the lease itself: a holder cut off from the store stops in time.
            webhooks
                .inner
                .deliver_until
                .store(lease.deliver_until(), Ordering::Relaxed);
            if !holding {
                info!("this replica now delivers webhooks");
                holding = true;
            }
            if let Err(err) = refresh(&webhooks).await {
                debug!(%err, "cannot read the webhooks now");
            }
        } else {
            webhooks.inner.deliver_until.store(0, Ordering::Relaxed);
            if holding {
                info!("this replica no longer delivers webhooks");
                holding = false;
                webhooks.stop_all();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(lease::LOOK_EVERY) => {}
            _ = &mut stopping => {
                webhooks.inner.deliver_until.store(0, Ordering::Relaxed);
                webhooks.stop_all();
                if let Err(err) = lease.release(webhooks.inner.kept.store()).await {
                    debug!(cause = %err, "cannot give the webhook lease up; it runs out by itself");
                }
                return;
            }
        }
    }
}

/// The holder's working copy follows the store: new webhooks start, deleted ones stop.
async fn refresh(webhooks: &Webhooks) -> Result<(), WebhookError> {
    let kept = &webhooks.inner.kept;
    let registrations = kept.registrations().await.map_err(store_error)?;
    let known: Vec<String> = webhooks.lock().keys().cloned().collect();
    for id in known.iter().filter(|id| !registrations.contains_key(*id)) {
        webhooks.stop(id);
    }
    // A registration changed elsewhere (a WebSub renewal: new lease, new secret) is taken up.
    {
        let mut hooks = webhooks.lock();
        for (id, working) in hooks.iter_mut() {
            if let Some(stored) = registrations.get(id) {
                working.registration = stored.clone();
            }
        }
    }
    let new: Vec<&String> = registrations
        .keys()
        .filter(|id| !known.contains(id))
        .collect();
    // A dead webhook retried through another replica is active in the store only.
    let dead: Vec<String> = webhooks
        .lock()
        .iter()
        .filter(|(_, h)| h.progress.state == State::Dead)
        .map(|(id, _)| id.clone())
        .collect();
    if !new.is_empty() || !dead.is_empty() {
        let mut progress = kept.progress().await.map_err(store_error)?;
        let mut hooks = webhooks.lock();
        for id in new {
            hooks.insert(
                id.clone(),
                Webhook {
                    registration: registrations[id].clone(),
                    progress: progress.remove(id).unwrap_or_default(),
                    backlog: 0,
                },
            );
        }
        for id in dead {
            if let (Some(stored), Some(working)) = (progress.remove(&id), hooks.get_mut(&id))
                && stored.state == State::Active
            {
                working.progress = stored;
            }
        }
    }
    // A dead WebSub subscription has no task to notice its lease end: noticed here.
    let ended: Vec<Webhook> = webhooks
        .lock()
        .values()
        .filter(|h| {
            h.registration
                .websub
                .as_ref()
                .is_some_and(|l| l.until_ms <= now_ms())
        })
        .cloned()
        .collect();
    for hook in ended {
        lease_over(webhooks, &hook).await;
    }
    let active: Vec<String> = webhooks
        .lock()
        .values()
        .filter(|h| h.progress.state == State::Active)
        .map(|h| h.registration.id.clone())
        .collect();
    for id in active {
        webhooks.spawn(id);
    }
    Ok(())
}

/// Channels matching `pattern`, with heads (the bus's own channels never match).
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
        out.extend(
            page.into_iter()
                .filter(|(c, _)| matches(pattern, c) && !eventbus_model::names::is_system(c)),
        );
        if done {
            return Ok(out);
        }
    }
}

/// One webhook's delivery while this replica holds the lease: find channels with events past its
/// positions, POST them in order.
async fn deliver_loop(webhooks: Webhooks, id: String) {
    let settings = webhooks.inner.settings.clone();
    let store = webhooks.store().clone();
    loop {
        if !webhooks.may_deliver() {
            return;
        }
        let Some(hook) = webhooks.lock().get(&id).cloned() else {
            return;
        };
        if lease_over(&webhooks, &hook).await {
            return;
        }
        if hook.progress.state != State::Active {
            return;
        }
        let mut behind = Vec::new();
        for pattern in &hook.registration.channels {
            match list(&store, pattern).await {
                Ok(found) => behind.extend(found.into_iter().filter(|(c, head)| {
                    *head > hook.progress.positions.get(c).copied().unwrap_or(0)
                })),
                Err(err) => debug!(%err, "webhook: cannot list channels now"),
            }
        }
        behind.sort();
        behind.dedup();
        let backlog: u64 = behind
            .iter()
            .map(|(c, head)| head - hook.progress.positions.get(c).copied().unwrap_or(0))
            .sum();
        webhooks.set_backlog(&id, backlog);
        let mut progressed = false;
        for (channel, _) in behind {
            let after = hook.progress.positions.get(&channel).copied().unwrap_or(0);
            let page = match store.read(&channel, after, 100, false).await {
                Ok(page) => page,
                Err(eventbus_store_client::StoreError::Truncated { first, .. }) => {
                    // Retention removed events before they were delivered: say so, go on.
                    if let Some(h) = webhooks.lock().get_mut(&id) {
                        h.progress
                            .positions
                            .insert(channel.clone(), first.saturating_sub(1));
                        h.progress.last_error = Some(format!(
                            "{channel}: events {}..{} were removed by retention before delivery",
                            after + 1,
                            first.saturating_sub(1)
                        ));
                    }
                    webhooks.save(&id).await;
                    progressed = true;
                    continue;
                }
                Err(_) => continue,
            };
            if !hook.allows(&channel) {
                webhooks
                    .kill(
                        &id,
                        format!("{channel} is outside the grant it was registered with"),
                    )
                    .await;
                return;
            }
            for event in page.events {
                if !webhooks.may_deliver() || lease_over(&webhooks, &hook).await {
                    return;
                }
                match deliver(&webhooks, &hook, &event.json, &settings).await {
                    Ok(()) => {
                        progressed = true;
                        {
                            let mut hooks = webhooks.lock();
                            let Some(h) = hooks.get_mut(&id) else { return };
                            h.progress.positions.insert(channel.clone(), event.seq);
                            h.progress.failures = 0;
                            h.progress.last_error = None;
                            h.progress.delivered += 1;
                        }
                        webhooks.save(&id).await;
                    }
                    Err(()) => {
                        webhooks.save(&id).await;
                        return;
                    }
                }
            }
        }
        if !progressed {
            tokio::time::sleep(settings.poll).await;
        }
    }
}

/// Whether a WebSub subscription's lease is over; if it is (in the store too: a renewal through
/// another replica may not have reached this working copy yet), the subscription is removed.
async fn lease_over(webhooks: &Webhooks, hook: &Webhook) -> bool {
    let Some(lease) = &hook.registration.websub else {
        return false;
    };
    if now_ms() < lease.until_ms {
        return false;
    }
    let id = &hook.registration.id;
    let stored = match webhooks.inner.kept.registrations().await {
        Ok(mut all) => all.remove(id),
        // Not known now: nothing is delivered past the lease all the same.
        Err(_) => return true,
    };
    match stored.and_then(|r| r.websub) {
        Some(renewed) if now_ms() < renewed.until_ms => {
            if let Some(working) = webhooks.lock().get_mut(id) {
                working.registration.websub = Some(renewed);
            }
            false
        }
        _ => {
            info!(subscription = %id, topic = %lease.topic, "WebSub lease over: subscription removed");
            if let Err(err) = webhooks.remove(id).await {
                debug!(%err, "cannot remove an expired WebSub subscription now");
            }
            true
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

/// POSTs one event, retrying with backoff and jitter; `Err` once the webhook is dead (or this
/// replica lost the lease).
async fn deliver(
    webhooks: &Webhooks,
    hook: &Webhook,
    body: &[u8],
    settings: &Settings,
) -> Result<(), ()> {
    let id = &hook.registration.id;
    let mut attempt = 0u32;
    loop {
        // Literal addresses never reach the resolver's check: checked here, at every delivery.
        if let Err(why) = settings.guard.check_literal(&hook.registration.url) {
            webhooks.kill(id, why).await;
            return Err(());
        }
        let request = webhooks.inner.http.post(&hook.registration.url);
        let request = match &hook.registration.websub {
            None => {
                let timestamp = eventbus_auth_client::claims::now_s();
                request
                    .header("content-type", "application/cloudevents+json")
                    .header(
                        SIGNATURE_HEADER,
                        signature(&hook.registration.secret, timestamp, body),
                    )
            }
            // WebSub content distribution (W3C Recommendation §7): the topic's new content, the
            // hub and the topic in `Link`, signed when the subscriber gave a secret.
            Some(lease) => {
                let request = request.header("content-type", "application/json").header(
                    "link",
                    format!(
                        "<{}>; rel=\"hub\", <{}>; rel=\"self\"",
                        lease.hub, lease.topic
                    ),
                );
                if hook.registration.secret.is_empty() {
                    request
                } else {
                    request.header(
                        "x-hub-signature",
                        eventbus_auth_client::signature::hub_signature(
                            &hook.registration.secret,
                            body,
                        ),
                    )
                }
            }
        };
        let outcome = request.body(body.to_vec()).send().await;
        let error = match outcome {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("the receiver answered {}", r.status()),
            Err(e) => format!("cannot reach the receiver: {}", with_causes(&e)),
        };
        attempt += 1;
        eventbus_runtime::metrics::metrics().webhook_failures.inc();
        let dead = attempt >= settings.max_attempts;
        if let Some(h) = webhooks.lock().get_mut(id) {
            h.progress.failures = attempt;
            h.progress.last_error = Some(error.clone());
            if dead {
                h.progress.state = State::Dead;
            }
        }
        // Kept at once, so that the API (on any replica) shows why deliveries fail.
        webhooks.save(id).await;
        if dead {
            warn!(webhook = %id, %error, attempts = attempt, "webhook dead after repeated failures");
            return Err(());
        }
        if !webhooks.may_deliver() {
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
    fn patterns_list_by_their_literal_prefix() {
        assert_eq!(literal_prefix("orders.*"), "orders.");
        assert_eq!(literal_prefix(">"), "");
        assert_eq!(literal_prefix("a.b"), "a.b");
    }
}
