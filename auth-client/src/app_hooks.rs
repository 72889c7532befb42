//! Hooks to the application's backend (docs/protocol.md §9): the bus asks the app's own HTTP
//! endpoints who a connection is (connect), whether a client may subscribe to a channel
//! (subscribe), and what becomes of an event a client publishes (publish: allow, refuse, or
//! replace its `data`). Apps keep who-may-see-what in their own database and sessions; with these
//! hooks a browser joins with the app's cookie alone, and a room's membership is the app's
//! answer, not a token minted ahead of time.
//!
//! Every request is a JSON POST signed like a webhook (`X-Eventbus-Signature`) with a request id
//! (`X-Eventbus-Request-Id`, also in the body). An app that does not answer in time, answers
//! anything but 200, or answers something that is not a valid decision, refuses: the bus never
//! lets in what the app did not say yes to.
//!
//! Who is asked: the connect hook, for a WebSocket hello or an SSE request without a token; the
//! subscribe and publish hooks, for clients (role `client`) on channels matching the hook's
//! patterns, whatever their token says; services are the app's own backend and keep their
//! tokens' grants. The app can never grant what no grant may hold (another identity's inbox as
//! a client, the bus's own channels, patterns for clients).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus_model::{Accepted, EventError, Limits};
use eventbus_router::pattern::{is_pattern, matches, validate_pattern};
use eventbus_router::{Denied, Grant, Role};
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::Verified;

/// The hooks an operator configured: all optional; none set, none asked.
#[derive(clap::Args, Clone, Default)]
#[group(id = "app_hooks")]
pub struct Args {
    /// URL the bus POSTs to when a WebSocket hello or an SSE request comes without a token: the
    /// app answers with an identity and its grants, or refuses.
    #[arg(long = "hook-connect-url", env = "EVENTBUS_HOOK_CONNECT_URL")]
    pub connect_url: Option<String>,
    /// URL the bus POSTs to when a client subscribes to a channel of `hook-subscribe-channels`.
    #[arg(long = "hook-subscribe-url", env = "EVENTBUS_HOOK_SUBSCRIBE_URL")]
    pub subscribe_url: Option<String>,
    /// Channels (patterns, comma separated) whose client subscriptions the app decides.
    #[arg(
        long = "hook-subscribe-channels",
        env = "EVENTBUS_HOOK_SUBSCRIBE_CHANNELS",
        value_delimiter = ','
    )]
    pub subscribe_channels: Vec<String>,
    /// URL the bus POSTs to when a client publishes to a channel of `hook-publish-channels`.
    #[arg(long = "hook-publish-url", env = "EVENTBUS_HOOK_PUBLISH_URL")]
    pub publish_url: Option<String>,
    /// Channels (patterns, comma separated) whose client publishes the app decides.
    #[arg(
        long = "hook-publish-channels",
        env = "EVENTBUS_HOOK_PUBLISH_CHANNELS",
        value_delimiter = ','
    )]
    pub publish_channels: Vec<String>,
    /// The secret the hooks' requests are signed with (at least 16 characters; required with any
    /// hook).
    #[arg(
        long = "hook-secret",
        env = "EVENTBUS_HOOK_SECRET",
        hide_env_values = true
    )]
    pub secret: Option<String>,
    /// Request headers passed to the connect hook (names, comma separated); no other header of
    /// the client's request leaves the bus.
    #[arg(
        long = "hook-headers",
        env = "EVENTBUS_HOOK_HEADERS",
        value_delimiter = ',',
        default_value = "cookie"
    )]
    pub headers: Vec<String>,
    /// Milliseconds the app has to answer; after that the hook refuses.
    #[arg(
        long = "hook-timeout-ms",
        env = "EVENTBUS_HOOK_TIMEOUT_MS",
        default_value_t = 3000
    )]
    pub timeout_ms: u64,
    /// Seconds a subscribe hook's answer is reused for the same identity and channel (0: ask
    /// every time).
    #[arg(
        long = "hook-cache-s",
        env = "EVENTBUS_HOOK_CACHE_S",
        default_value_t = 0
    )]
    pub cache_s: u64,
    /// Longest life of a connection the connect hook let in, in seconds (the app's `expires_in`
    /// is capped by it, and is it when the app gives none); the client then reconnects and the
    /// app is asked again.
    #[arg(
        long = "hook-max-connection-s",
        env = "EVENTBUS_HOOK_MAX_CONNECTION_S",
        default_value_t = 3600
    )]
    pub max_connection_s: u64,
}

impl std::fmt::Debug for Args {
    // The secret never reaches a log line, even through `{:?}` of a whole configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Args")
            .field("connect_url", &self.connect_url)
            .field("subscribe_url", &self.subscribe_url)
            .field("subscribe_channels", &self.subscribe_channels)
            .field("publish_url", &self.publish_url)
            .field("publish_channels", &self.publish_channels)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("headers", &self.headers)
            .field("timeout_ms", &self.timeout_ms)
            .field("cache_s", &self.cache_s)
            .field("max_connection_s", &self.max_connection_s)
            .finish()
    }
}

/// Why the app's hook did not let something through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The app said no, with its reason.
    #[error("{0}")]
    Refused(String),
    /// The app could not be asked, or gave no valid answer: refused all the same.
    #[error("the application's {hook} hook gave no decision: {why}")]
    Unavailable { hook: &'static str, why: String },
    /// The app allowed something no grant may hold.
    #[error("{0}")]
    Denied(Denied),
}

impl Refusal {
    /// The code of the error frame or problem document (docs/protocol.md §9).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Refused(_) => "refused",
            Refusal::Unavailable { .. } => "hook_unavailable",
            Refusal::Denied(denied) => denied.code(),
        }
    }
}

/// The app's hooks, ready to ask.
pub struct AppHooks {
    http: reqwest::Client,
    connect_url: Option<String>,
    subscribe_url: Option<String>,
    subscribe_channels: Vec<String>,
    publish_url: Option<String>,
    publish_channels: Vec<String>,
    secret: String,
    headers: Vec<reqwest::header::HeaderName>,
    cache_for: Duration,
    max_connection_s: u64,
    /// Subscribe answers by (identity, channel), with when they were given.
    answers: Mutex<HashMap<(String, String), Answered>>,
}

/// The largest answer read from the app: a decision is a small JSON object.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A response's body, unless it is longer than `max` bytes (read no further than that): what
/// answers the bus's own requests to other people's servers (hooks, WebSub callbacks) must not
/// cost it more memory than it expects.
pub async fn read_at_most(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(format!("its answer is over {max} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|_| "its answer was cut short".to_owned())?
    {
        if body.len() + chunk.len() > max {
            return Err(format!("its answer is over {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Counts one decision of a hook by its outcome (`eventbus_app_hook_requests_total`; a cached
/// subscribe decision counts again, as it is one more decision).
fn counted<T>(hook: &'static str, result: Result<T, Refusal>) -> Result<T, Refusal> {
    let outcome = match &result {
        Ok(_) => "allowed",
        Err(Refusal::Refused(_)) => "refused",
        Err(_) => "unavailable",
    };
    eventbus_runtime::metrics::metrics()
        .app_hook_requests
        .get_or_create(&vec![
            ("hook".to_owned(), hook.to_owned()),
            ("outcome".to_owned(), outcome.to_owned()),
        ])
        .inc();
    result
}

/// A subscribe hook's answer, and when it was given.
type Answered = (Instant, Result<(), Refusal>);

/// Most subscribe answers kept; past it the cache starts over.
const MAX_CACHED: usize = 100_000;

impl AppHooks {
    /// The hooks `args` configure, or `None` when none is.
    pub fn new(
        args: &Args,
        trust: &eventbus_runtime::tls::Trust,
    ) -> Result<Option<Arc<AppHooks>>, String> {
        let configured = args.connect_url.is_some()
            || args.subscribe_url.is_some()
            || args.publish_url.is_some();
        if !configured {
            return Ok(None);
        }
        for url in [&args.connect_url, &args.subscribe_url, &args.publish_url]
            .into_iter()
            .flatten()
        {
            reqwest::Url::parse(url)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| format!("hook URL {url:?} is not an http:// or https:// URL"))?;
        }
        for (url, patterns, name) in [
            (
                &args.subscribe_url,
                &args.subscribe_channels,
                "EVENTBUS_HOOK_SUBSCRIBE_CHANNELS",
            ),
            (
                &args.publish_url,
                &args.publish_channels,
                "EVENTBUS_HOOK_PUBLISH_CHANNELS",
            ),
        ] {
            if url.is_some() && patterns.is_empty() {
                return Err(format!(
                    "{name} must name the channels the hook decides (patterns)"
                ));
            }
            for pattern in patterns {
                validate_pattern(pattern).map_err(|err| format!("{name}: {pattern:?}: {err}"))?;
            }
        }
        let secret = args
            .secret
            .as_deref()
            .map(str::trim)
            .filter(|s| s.len() >= 16)
            .ok_or("EVENTBUS_HOOK_SECRET (at least 16 characters) is required with any hook")?
            .to_owned();
        let headers = args
            .headers
            .iter()
            .map(|h| h.trim())
            .filter(|h| !h.is_empty())
            .map(|h| {
                reqwest::header::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("EVENTBUS_HOOK_HEADERS: {h:?} is not a header name"))
            })
            .collect::<Result<_, _>>()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(args.timeout_ms.max(1)))
            // The answer is the app's, from the URL the operator gave: not from wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .use_preconfigured_tls(trust.client_config()?)
            .build()
            .map_err(|err| format!("cannot make the hooks' HTTP client: {err}"))?;
        Ok(Some(Arc::new(AppHooks {
            http,
            connect_url: args.connect_url.clone(),
            subscribe_url: args.subscribe_url.clone(),
            subscribe_channels: args.subscribe_channels.clone(),
            publish_url: args.publish_url.clone(),
            publish_channels: args.publish_channels.clone(),
            secret,
            headers,
            cache_for: Duration::from_secs(args.cache_s),
            max_connection_s: args.max_connection_s.max(1),
            answers: Mutex::new(HashMap::new()),
        })))
    }

    /// Whether a connection without a token asks the app who it is.
    pub fn connects(&self) -> bool {
        self.connect_url.is_some()
    }

    /// The allow-listed headers of a client's request: all the connect hook will see of it.
    pub fn passed_headers(&self, headers: &HeaderMap) -> Vec<(String, String)> {
        self.headers
            .iter()
            .flat_map(|name| {
                headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .map(|v| (name.as_str().to_owned(), v.to_owned()))
            })
            .collect()
    }

    /// POSTs `body` (with its request id added) to `url`; the app's JSON answer, or why none.
    async fn ask(&self, hook: &'static str, url: &str, mut body: Value) -> Result<Value, Refusal> {
        let request_id = uuid::Uuid::now_v7().to_string();
        body["hook"] = json!(hook);
        body["request_id"] = json!(request_id);
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let unavailable = |why: String| Refusal::Unavailable { hook, why };
        let timestamp = crate::claims::now_s();
        let started = Instant::now();
        let response = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header(
                crate::signature::HEADER,
                crate::signature::signature(&self.secret, timestamp, &bytes),
            )
            .header("x-eventbus-request-id", &request_id)
            .body(bytes)
            .send()
            .await
            .map_err(|err| {
                let why = if err.is_timeout() {
                    "no answer in time (EVENTBUS_HOOK_TIMEOUT_MS)".to_owned()
                } else {
                    "cannot reach it".to_owned()
                };
                warn!(hook, %request_id, cause = %err, "application hook failed");
                unavailable(why)
            })?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            warn!(hook, %request_id, %status, "application hook answered other than 200");
            return Err(unavailable(format!("it answered {status}")));
        }
        let answer = read_at_most(response, MAX_ANSWER_BYTES)
            .await
            .map_err(|why| {
                warn!(hook, %request_id, %why, "application hook's answer not read");
                unavailable(why)
            })?;
        debug!(hook, %request_id, ms = started.elapsed().as_millis() as u64, "application hook answered");
        serde_json::from_slice(&answer).map_err(|err| {
            warn!(hook, %request_id, cause = %err, "application hook's answer is not JSON");
            unavailable(format!("its answer is not JSON: {err}"))
        })
    }

    /// Asks the connect hook who the client of a request with these headers is.
    pub async fn connect(
        &self,
        transport: &str,
        headers: Vec<(String, String)>,
    ) -> Result<Verified, Refusal> {
        counted("connect", self.ask_connect(transport, headers).await)
    }

    async fn ask_connect(
        &self,
        transport: &str,
        headers: Vec<(String, String)>,
    ) -> Result<Verified, Refusal> {
        let Some(url) = &self.connect_url else {
            return Err(Refusal::Unavailable {
                hook: "connect",
                why: "none is configured".into(),
            });
        };
        let mut passed = serde_json::Map::new();
        for (name, value) in headers {
            // A header sent twice (cookies may be) is joined as HTTP joins them.
            match passed.get_mut(&name) {
                Some(Value::String(seen)) => {
                    seen.push_str(if name == "cookie" { "; " } else { ", " });
                    seen.push_str(&value);
                }
                _ => {
                    passed.insert(name, Value::String(value));
                }
            }
        }
        let answer = self
            .ask(
                "connect",
                url,
                json!({"transport": transport, "headers": passed}),
            )
            .await?;
        decide_connect(answer, self.max_connection_s)
    }

    /// Whether the app decides this subscription (a client's, to a channel of the hook's).
    pub fn decides_subscribe(&self, grant: &Grant, channel: &str) -> bool {
        self.subscribe_url.is_some()
            && grant.role == Role::Client
            && !is_pattern(channel)
            && eventbus_model::names::inbox_owner(channel) != Some(grant.identity.as_str())
            && self.subscribe_channels.iter().any(|p| matches(p, channel))
    }

    /// May the holder of `grant` subscribe to `channel`: its grant, or for the channels of the
    /// subscribe hook, the app.
    pub async fn check_subscribe(
        hooks: Option<&Self>,
        grant: &Grant,
        channel: &str,
    ) -> Result<(), Refusal> {
        let by_grant = grant.check_subscribe(channel);
        let Some(hooks) = hooks.filter(|h| h.decides_subscribe(grant, channel)) else {
            return by_grant.map_err(Refusal::Denied);
        };
        match by_grant {
            // What no grant may hold stays refused whatever the app says.
            Err(denied) if !matches!(denied, Denied::NotSubscribable(_)) => {
                Err(Refusal::Denied(denied))
            }
            _ => hooks.subscribe(&grant.identity, channel).await,
        }
    }

    async fn subscribe(&self, identity: &str, channel: &str) -> Result<(), Refusal> {
        counted("subscribe", self.ask_subscribe(identity, channel).await)
    }

    async fn ask_subscribe(&self, identity: &str, channel: &str) -> Result<(), Refusal> {
        let key = (identity.to_owned(), channel.to_owned());
        if !self.cache_for.is_zero() {
            let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, answer)) = answers.get(&key)
                && at.elapsed() < self.cache_for
            {
                return answer.clone();
            }
        }
        let url = self.subscribe_url.as_deref().unwrap_or_default();
        let answer = self
            .ask(
                "subscribe",
                url,
                json!({"identity": identity, "channel": channel}),
            )
            .await?;
        let decision: Decision =
            serde_json::from_value(answer).map_err(|err| Refusal::Unavailable {
                hook: "subscribe",
                why: format!("bad answer: {err}"),
            })?;
        let answer = if decision.allow {
            Ok(())
        } else {
            Err(Refusal::Refused(decision.reason.unwrap_or_else(|| {
                format!("the application refused the subscription to {channel:?}")
            })))
        };
        // Only the app's decisions are kept: an app that could not be asked is asked again.
        if !self.cache_for.is_zero() {
            let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
            if answers.len() >= MAX_CACHED {
                answers.clear();
            }
            answers.insert(key, (Instant::now(), answer.clone()));
        }
        answer
    }

    /// Whether the app decides this publish (a client's, to a channel of the hook's).
    pub fn decides_publish(&self, grant: &Grant, channel: &str) -> bool {
        self.publish_url.is_some()
            && grant.role == Role::Client
            && self.publish_channels.iter().any(|p| matches(p, channel))
    }

    /// May the holder of `grant` publish `event`, and as what: its grant, or for the channels of
    /// the publish hook, the app, which may replace the event's `data`. Publish answers are never
    /// cached: they may depend on the event.
    pub async fn check_publish(
        hooks: Option<&Self>,
        grant: &Grant,
        event: Accepted,
        limits: &Limits,
    ) -> Result<Accepted, Refusal> {
        let by_grant = grant.check_publish(&event.channel);
        let Some(hooks) = hooks.filter(|h| h.decides_publish(grant, &event.channel)) else {
            return by_grant.map(|()| event).map_err(Refusal::Denied);
        };
        if let Err(denied) = by_grant
            && !matches!(denied, Denied::NotPublishable(_))
        {
            return Err(Refusal::Denied(denied));
        }
        hooks.publish(&grant.identity, event, limits).await
    }

    async fn publish(
        &self,
        identity: &str,
        event: Accepted,
        limits: &Limits,
    ) -> Result<Accepted, Refusal> {
        counted("publish", self.ask_publish(identity, event, limits).await)
    }

    async fn ask_publish(
        &self,
        identity: &str,
        event: Accepted,
        limits: &Limits,
    ) -> Result<Accepted, Refusal> {
        let shown: Value = serde_json::from_slice(&event.body).unwrap_or_default();
        let url = self.publish_url.as_deref().unwrap_or_default();
        let answer = self
            .ask(
                "publish",
                url,
                json!({"identity": identity, "channel": event.channel, "event": shown}),
            )
            .await?;
        decide_publish(answer, event, limits)
    }
}

/// The connect hook's answer: who the connection is, or why not.
fn decide_connect(answer: Value, max_connection_s: u64) -> Result<Verified, Refusal> {
    let bad = |why: String| Refusal::Unavailable {
        hook: "connect",
        why: format!("bad answer: {why}"),
    };
    let decision: ConnectAnswer =
        serde_json::from_value(answer).map_err(|err| bad(err.to_string()))?;
    if !decision.allow {
        return Err(Refusal::Refused(decision.reason.unwrap_or_else(|| {
            "the application refused the connection".into()
        })));
    }
    let identity = decision
        .identity
        .ok_or_else(|| bad("allow without an identity".into()))?;
    eventbus_model::validate_identity(&identity)
        .map_err(|err| bad(format!("identity {identity:?}: {err}")))?;
    for pattern in decision.subscribe.iter().chain(&decision.publish) {
        validate_pattern(pattern).map_err(|err| bad(format!("pattern {pattern:?}: {err}")))?;
    }
    let lifetime = decision
        .expires_in
        .unwrap_or(max_connection_s)
        .clamp(1, max_connection_s);
    Ok(Verified {
        grant: Grant {
            identity,
            // What a connection with the app's cookie is: a browser, never a service.
            role: Role::Client,
            subscribe: decision.subscribe,
            publish: decision.publish,
        },
        expires_at: crate::claims::now_s() + lifetime,
    })
}

/// The publish hook's answer: the event to store (maybe with the app's `data`), or why none.
fn decide_publish(answer: Value, event: Accepted, limits: &Limits) -> Result<Accepted, Refusal> {
    let bad = |why: String| Refusal::Unavailable {
        hook: "publish",
        why: format!("bad answer: {why}"),
    };
    let decision: PublishAnswer =
        serde_json::from_value(answer).map_err(|err| bad(err.to_string()))?;
    if !decision.allow {
        return Err(Refusal::Refused(decision.reason.unwrap_or_else(|| {
            format!("the application refused the event on {:?}", event.channel)
        })));
    }
    let Some(data) = decision.data else {
        return Ok(event);
    };
    let shown: Value = serde_json::from_slice(&event.body).unwrap_or_default();
    with_data(&event, shown, data, limits).map_err(|err| bad(format!("data: {err}")))
}

/// The decoders of what the app answers, for the fuzz tests (`fuzz/`). Not an API.
#[doc(hidden)]
pub mod decoders {
    use super::*;

    /// A connect hook's answer (JSON text): whether it lets a connection in.
    pub fn connect_answer(bytes: &[u8]) -> bool {
        serde_json::from_slice(bytes)
            .ok()
            .is_some_and(|answer| decide_connect(answer, 3600).is_ok())
    }

    /// A publish hook's answer (JSON text) for a small event: whether an event comes out.
    pub fn publish_answer(bytes: &[u8]) -> bool {
        let limits = Limits::default();
        let Ok(event) = eventbus_model::parse_event(
            br#"{"channel":"chat.a","type":"said","data":{"text":"hi"}}"#,
            "fuzz",
            &limits,
        ) else {
            return false;
        };
        let Ok(answer) = serde_json::from_slice::<Value>(bytes) else {
            return false;
        };
        decide_publish(answer, event, &limits).is_ok()
    }
}

/// `event` with its `data` replaced, accepted again under the same rules (and the same id, so
/// that a retried publish is still a duplicate).
fn with_data(
    event: &Accepted,
    mut shown: Value,
    data: Value,
    limits: &Limits,
) -> Result<Accepted, EventError> {
    if let Some(fields) = shown.as_object_mut() {
        fields.remove("data_base64");
        fields.remove("datacontenttype");
        // `channel` stays (an inbox event's `to` was turned into it), and so do `id` and `time`.
        fields.insert("data".into(), data);
    }
    let json = serde_json::to_vec(&shown).unwrap_or_default();
    eventbus_model::parse_event(&json, &event.source, limits)
}

#[derive(Deserialize)]
struct ConnectAnswer {
    allow: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct Decision {
    allow: bool,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
struct PublishAnswer {
    allow: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

/// A refusal on an HTTP endpoint: 403 with the app's reason, 503 when the app gave no decision
/// (retry), or the grant's own refusal; `code` says which.
impl From<Refusal> for eventbus_runtime::problem::Problem {
    fn from(refusal: Refusal) -> Self {
        use eventbus_runtime::problem::{Kind, Problem};
        let code = refusal.code();
        match refusal {
            Refusal::Denied(denied) => Problem::from(denied),
            Refusal::Refused(reason) => Problem::new(Kind::Forbidden, reason).with("code", code),
            unavailable @ Refusal::Unavailable { .. } => {
                Problem::new(Kind::Unavailable, unavailable.to_string()).with("code", code)
            }
        }
    }
}
