//! The WebSub hub (W3C Recommendation, 23 January 2018) at `POST /v1/websub`: anyone may follow a
//! channel the operator made public (`EVENTBUS_WEBSUB_CHANNELS`) with no account. A subscription
//! request is answered 202, then the hub verifies the subscriber's intent (a GET to the callback
//! that must echo `hub.challenge`) before anything is kept or delivered; unsubscribing is
//! verified the same way. A verified subscription is delivered like a webhook (in seq order, at
//! least once, retried, from the store's positions, by the replica holding the lease), the WebSub
//! way: each event's JSON POSTed with `Link` (hub, topic) and, when the subscriber gave a secret,
//! `X-Hub-Signature: sha256=…`; it ends when its lease does, unless renewed.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use eventbus_runtime::problem::{Kind, Problem};
use eventbus_runtime::websub::{HUB_PATH, topic_channel};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::state::WebSubLease;
use crate::webhooks::Webhooks;

/// The hub's settings and its deliveries.
pub struct Hub {
    pub webhooks: Webhooks,
    pub public: eventbus_runtime::websub::Args,
    /// Whether the bus's listener speaks TLS (for the hub URL derived from `Host`).
    pub tls: bool,
    /// The longest lease, and the lease of a request that names none.
    pub max_lease_s: u64,
    pub max_subscriptions: usize,
    /// Verifications under way at most: anyone may ask the hub to call a URL, so it calls out at
    /// a bounded rate of its own.
    pub verifying: Arc<tokio::sync::Semaphore>,
}

/// Intent verifications under way at once, at most.
pub const MAX_VERIFYING: usize = 64;

/// Longest secret the Recommendation allows (§5.1: less than 200 bytes).
const MAX_SECRET_BYTES: usize = 199;

fn invalid(field: &str, detail: impl Into<String>) -> Problem {
    Problem::new(Kind::InvalidRequest, detail).with("field", field)
}

struct Request {
    subscribe: bool,
    callback: String,
    topic: String,
    channel: String,
    lease_s: u64,
    secret: String,
}

impl Hub {
    /// Checks a request's form, its topic against what is public, its callback against the
    /// destinations allowed.
    async fn parse(&self, form: &[u8]) -> Result<Request, Problem> {
        let request = self.decode(form)?;
        self.webhooks
            .guard()
            .check_url(&request.callback)
            .await
            .map_err(|why| invalid("hub.callback", why))?;
        Ok(request)
    }

    /// A request's form, checked in itself and against what is public.
    fn decode(&self, form: &[u8]) -> Result<Request, Problem> {
        decode(form, &self.public, self.max_lease_s)
    }
}

/// Whether a hub request's form decodes (for the fuzz tests, `fuzz/`): every channel public.
#[doc(hidden)]
pub fn decodes(form: &[u8]) -> bool {
    let public = eventbus_runtime::websub::Args {
        channels: vec![">".into()],
        public_url: None,
    };
    decode(form, &public, 864_000).is_ok()
}

fn decode(
    form: &[u8],
    public: &eventbus_runtime::websub::Args,
    max_lease_s: u64,
) -> Result<Request, Problem> {
    let mut fields = std::collections::HashMap::new();
    for (name, value) in url::form_urlencoded::parse(form) {
        if fields
            .insert(name.clone().into_owned(), value.into_owned())
            .is_some()
        {
            return Err(invalid(&name, format!("{name} is given twice")));
        }
    }
    let mut take = |name: &str| fields.remove(name);
    let subscribe = match take("hub.mode").as_deref() {
        Some("subscribe") => true,
        Some("unsubscribe") => false,
        _ => return Err(invalid("hub.mode", "hub.mode is subscribe or unsubscribe")),
    };
    let callback = take("hub.callback")
        .filter(|c| (c.starts_with("http://") || c.starts_with("https://")) && c.len() <= 2048)
        .ok_or_else(|| invalid("hub.callback", "hub.callback is an http(s) URL"))?;
    let topic = take("hub.topic").ok_or_else(|| invalid("hub.topic", "hub.topic is required"))?;
    let channel = topic_channel(&topic).ok_or_else(|| {
        invalid(
            "hub.topic",
            "hub.topic is a channel's URL on this bus: <base>/v1/channels/<channel>/events",
        )
    })?;
    if !public.public(&channel) {
        return Err(Problem::new(
            Kind::Forbidden,
            format!("{channel:?} is not public to WebSub (EVENTBUS_WEBSUB_CHANNELS)"),
        )
        .with("field", "hub.topic"));
    }
    let lease_s = match take("hub.lease_seconds") {
        None => max_lease_s,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| invalid("hub.lease_seconds", "hub.lease_seconds is a whole number"))?
            .clamp(1, max_lease_s),
    };
    let secret = take("hub.secret").unwrap_or_default();
    if secret.len() > MAX_SECRET_BYTES {
        return Err(invalid("hub.secret", "hub.secret is less than 200 bytes"));
    }
    Ok(Request {
        subscribe,
        callback,
        topic,
        channel,
        lease_s,
        secret,
    })
}

/// A subscription is one per (callback, topic): subscribing again renews it.
fn subscription_id(callback: &str, topic: &str) -> String {
    let digest = Sha256::new()
        .chain_update(callback.as_bytes())
        .chain_update(b"\n")
        .chain_update(topic.as_bytes())
        .finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("websub-{hex}")
}

/// `POST /v1/websub` (form-encoded): 202 and intent verification to follow, or a problem.
pub async fn hub(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Problem> {
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !form {
        return Err(Problem::new(
            Kind::UnsupportedMediaType,
            "send application/x-www-form-urlencoded (W3C WebSub §5.1)",
        ));
    }
    let request = hub.parse(&body).await?;
    if request.subscribe
        && hub
            .webhooks
            .websub_count()
            .await
            .map_err(|err| Problem::new(Kind::Unavailable, err.to_string()))?
            >= hub.max_subscriptions
    {
        return Err(Problem::new(
            Kind::Unavailable,
            "the hub holds as many subscriptions as it may (EVENTBUS_WEBSUB_MAX_SUBSCRIPTIONS)",
        ));
    }
    let Ok(permit) = hub.verifying.clone().try_acquire_owned() else {
        let mut problem = Problem::new(
            Kind::Overloaded,
            "the hub is verifying as many subscribers as it may at once; retry later",
        );
        problem.retry_after_s = Some(10);
        return Err(problem);
    };
    let hub_url = format!(
        "{}{HUB_PATH}",
        hub.public
            .base(&headers, hub.tls)
            .unwrap_or_else(|| "http://localhost".into())
    );
    tokio::spawn(async move {
        verify(hub.clone(), request, hub_url).await;
        drop(permit);
    });
    Ok(StatusCode::ACCEPTED)
}

/// Verifies the subscriber's intent (§5.3), then keeps or removes the subscription.
async fn verify(hub: Arc<Hub>, request: Request, hub_url: String) {
    let challenge = format!("{:032x}", rand::random::<u128>());
    let mode = if request.subscribe {
        "subscribe"
    } else {
        "unsubscribe"
    };
    // Built in a block: the serializer is not `Send`, and must be gone before the first await.
    let query = {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("hub.mode", mode)
            .append_pair("hub.topic", &request.topic)
            .append_pair("hub.challenge", &challenge);
        if request.subscribe {
            query.append_pair("hub.lease_seconds", &request.lease_s.to_string());
        }
        query.finish()
    };
    let separator = if request.callback.contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!("{}{separator}{query}", request.callback);
    let id = subscription_id(&request.callback, &request.topic);
    // Literal addresses never reach the resolver's check.
    if let Err(why) = hub.webhooks.guard().check_literal(&request.callback) {
        warn!(subscription = %id, %why, "WebSub callback refused");
        return;
    }
    let answered = hub
        .webhooks
        .http()
        .get(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    let echoed = match answered {
        // The challenge and little more: a callback's answer is anybody's.
        Ok(response) if response.status().is_success() => {
            eventbus_auth_client::app_hooks::read_at_most(response, 1024)
                .await
                .is_ok_and(|body| body.trim_ascii() == challenge.as_bytes())
        }
        _ => false,
    };
    if !echoed {
        info!(subscription = %id, mode, "WebSub intent not verified: nothing changes");
        return;
    }
    let kept = if request.subscribe {
        let lease = WebSubLease {
            topic: request.topic.clone(),
            hub: hub_url,
            until_ms: eventbus_store_client::lease::now_ms() + request.lease_s * 1000,
        };
        hub.webhooks
            .keep_websub(
                id.clone(),
                request.channel,
                request.callback,
                request.secret,
                lease,
            )
            .await
    } else {
        hub.webhooks.remove(&id).await
    };
    match kept {
        Ok(()) => info!(subscription = %id, mode, topic = %request.topic, "WebSub intent verified"),
        Err(err) => warn!(subscription = %id, mode, %err, "WebSub subscription not saved"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_subscription_per_callback_and_topic() {
        let a = subscription_id("https://s/cb", "https://b/v1/channels/x/events");
        assert_eq!(
            a,
            subscription_id("https://s/cb", "https://b/v1/channels/x/events")
        );
        assert_ne!(
            a,
            subscription_id("https://s/cb2", "https://b/v1/channels/x/events")
        );
        assert!(a.starts_with("websub-") && a.len() == 7 + 32);
    }
}
