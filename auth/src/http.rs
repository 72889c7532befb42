//! `POST /v1/tokens` and `GET /v1/jwks`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use bytes::Bytes;
use eventbus_router::Role;
use eventbus_runtime::problem::{Kind, Problem, bearer};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tracing::info;

use crate::claims::{Claims, ISSUER, now_s};
use crate::config::ApiKey;
use crate::keys::KeyRing;
use crate::verifier::Verifier;

pub struct Issuer {
    pub ring: Arc<KeyRing>,
    pub verifier: Verifier,
    pub api_keys: Vec<ApiKey>,
    pub dev: bool,
    pub default_ttl_s: u64,
    pub max_ttl_s: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    sub: Option<String>,
    role: Option<Role>,
    subscribe: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    ttl_s: Option<u64>,
}

/// Who asks for a token.
enum Caller {
    ApiKey(String),
    Service(String),
    /// Development mode only: nobody in particular.
    Anonymous,
}

impl Issuer {
    async fn caller(&self, headers: &HeaderMap) -> Result<Caller, Problem> {
        let Some(credential) = bearer(headers) else {
            return if self.dev {
                Ok(Caller::Anonymous)
            } else {
                Err(Problem::new(
                    Kind::Unauthorized,
                    "send an API key or a service token as Bearer",
                ))
            };
        };
        // Compare against every key in constant time, so timing tells nothing about near misses.
        let mut found = None;
        for key in &self.api_keys {
            if bool::from(key.secret.as_bytes().ct_eq(credential.as_bytes())) {
                found = Some(key.name.clone());
            }
        }
        if let Some(name) = found {
            return Ok(Caller::ApiKey(name));
        }
        let verified = self.verifier.verify(credential).await.map_err(|err| {
            Problem::new(
                Kind::Unauthorized,
                format!("not a known API key, and {err}"),
            )
        })?;
        match verified.grant.role {
            Role::Service => Ok(Caller::Service(verified.grant.identity)),
            Role::Client => Err(Problem::new(
                Kind::Forbidden,
                "a client token cannot mint tokens",
            )),
        }
    }

    pub fn mint(&self, claims: &Claims) -> Result<Value, Problem> {
        let token = self
            .ring
            .sign(claims)
            .map_err(|err| Problem::new(Kind::Internal, format!("cannot sign the token: {err}")))?;
        let expires_at = chrono::DateTime::from_timestamp(claims.exp as i64, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        Ok(json!({ "token": token, "expires_at": expires_at }))
    }
}

fn invalid(field: &str, detail: impl Into<String>) -> Problem {
    Problem::new(Kind::InvalidRequest, detail).with("field", field)
}

fn patterns(
    field: &str,
    given: Option<Vec<String>>,
    default: &[&str],
) -> Result<Vec<String>, Problem> {
    let list = given.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect());
    for pattern in &list {
        eventbus_router::validate_pattern(pattern)
            .map_err(|err| invalid(field, format!("pattern {pattern:?}: {err}")))?;
    }
    Ok(list)
}

pub async fn issue(
    State(issuer): State<Arc<Issuer>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, Problem> {
    let caller = issuer.caller(&headers).await?;
    let request: TokenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TokenRequest {
            sub: None,
            role: None,
            subscribe: None,
            publish: None,
            ttl_s: None,
        }
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            Problem::new(
                Kind::InvalidRequest,
                format!("invalid token request: {err}"),
            )
        })?
    };
    let role = request.role.unwrap_or(if request.sub.is_some() {
        Role::Client
    } else {
        Role::Service
    });
    let ttl_s = request.ttl_s.unwrap_or(issuer.default_ttl_s);
    if ttl_s == 0 || ttl_s > issuer.max_ttl_s {
        return Err(invalid(
            "ttl_s",
            format!("must be 1-{} seconds", issuer.max_ttl_s),
        ));
    }
    let sub = match (role, &caller, request.sub) {
        (Role::Client, _, None) => return Err(invalid("sub", "a client token needs a sub")),
        (Role::Client, _, Some(sub)) => sub,
        (Role::Service, Caller::ApiKey(name) | Caller::Service(name), Some(sub))
            if &sub != name =>
        {
            return Err(Problem::new(
                Kind::Forbidden,
                format!("{name} may only get service tokens for itself"),
            ));
        }
        (Role::Service, Caller::ApiKey(name) | Caller::Service(name), _) => name.clone(),
        (Role::Service, Caller::Anonymous, sub) => sub.unwrap_or_else(|| "dev-service".to_owned()),
    };
    eventbus_model::validate_identity(&sub).map_err(|err| invalid("sub", format!("sub {err}")))?;
    let (default_subscribe, default_publish): (&[&str], &[&str]) = match role {
        Role::Service => (&[">"], &[">"]),
        Role::Client => (&[], &[]),
    };
    let now = now_s();
    let claims = Claims {
        sub,
        role,
        iss: ISSUER.to_owned(),
        iat: now,
        exp: now + ttl_s,
        subscribe: patterns("subscribe", request.subscribe, default_subscribe)?,
        publish: patterns("publish", request.publish, default_publish)?,
    };
    let by = match &caller {
        Caller::ApiKey(name) | Caller::Service(name) => name.as_str(),
        Caller::Anonymous => "anonymous (development mode)",
    };
    info!(sub = %claims.sub, role = claims.role.as_str(), ttl_s, by, "token issued");
    issuer.mint(&claims).map(Json)
}

pub struct PresenceApi {
    pub registry: crate::presence::Registry,
    pub verifier: Verifier,
    pub webhooks: crate::webhooks::Webhooks,
}

impl PresenceApi {
    /// The verified bearer token of a request.
    async fn caller(&self, headers: &HeaderMap) -> Result<crate::Verified, Problem> {
        let token = bearer(headers)
            .ok_or_else(|| Problem::new(Kind::Unauthorized, "send a token as Bearer"))?;
        self.verifier
            .verify(token)
            .await
            .map_err(|err| Problem::new(Kind::Unauthorized, err.to_string()))
    }
}

/// `GET /v1/presence/{channel}`: who is subscribed to a channel now, for whoever may read it.
pub async fn presence(
    State(api): State<Arc<PresenceApi>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    let verified = api.caller(&headers).await?;
    if eventbus_router::pattern::is_pattern(&channel) {
        return Err(invalid(
            "channel",
            "presence is kept per channel, not pattern",
        ));
    }
    verified.grant.check_subscribe(&channel).map_err(|denied| {
        let kind = match denied {
            eventbus_router::Denied::InvalidChannel { .. } => Kind::InvalidRequest,
            _ => Kind::Forbidden,
        };
        Problem::new(kind, denied.to_string())
    })?;
    let members = api.registry.members(&channel);
    let connections: u32 = members.iter().map(|(_, n)| n).sum();
    Ok(Json(json!({
        "channel": channel,
        "identities": members
            .iter()
            .map(|(identity, n)| json!({"identity": identity, "connections": n}))
            .collect::<Vec<_>>(),
        "count": members.len(),
        "connections": connections,
    })))
}

/// `GET /v1/admin/stats`: per-gateway figures from the presence reports, for service tokens.
pub async fn admin_stats(
    State(api): State<Arc<PresenceApi>>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    let verified = api.caller(&headers).await?;
    if verified.grant.role != Role::Service {
        return Err(Problem::new(
            Kind::Forbidden,
            "the admin figures are for service tokens",
        ));
    }
    let (gateways, channels) = api.registry.overview();
    Ok(Json(json!({
        "gateways": gateways
            .iter()
            .map(|(id, connections, subscriptions)| json!({
                "id": id, "subscribed_connections": connections, "subscriptions": subscriptions,
            }))
            .collect::<Vec<_>>(),
        "channels_with_subscribers": channels,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    url: String,
    channels: Vec<String>,
    secret: String,
}

impl PresenceApi {
    /// The identity of a service token (webhooks are for services).
    async fn service(&self, headers: &HeaderMap) -> Result<String, Problem> {
        let verified = self.caller(headers).await?;
        if verified.grant.role != Role::Service {
            return Err(Problem::new(
                Kind::Forbidden,
                "webhooks are for service tokens",
            ));
        }
        Ok(verified.grant.identity)
    }
}

/// `POST /v1/webhooks` `{url, channels, secret}`: 201 with the registration (secret left out).
pub async fn register_webhook(
    State(api): State<Arc<PresenceApi>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(axum::http::StatusCode, Json<Value>), Problem> {
    let owner = api.service(&headers).await?;
    let request: WebhookRequest = serde_json::from_slice(&body)
        .map_err(|err| Problem::new(Kind::InvalidRequest, format!("invalid webhook: {err}")))?;
    use crate::webhooks::WebhookError;
    let hook = api
        .webhooks
        .register(&owner, request.url, request.channels, request.secret)
        .await
        .map_err(|err| match err {
            WebhookError::Invalid { field, .. } => invalid(field, err.to_string()),
            other => Problem::new(Kind::Unavailable, other.to_string()),
        })?;
    Ok((axum::http::StatusCode::CREATED, Json(hook.public())))
}

/// `GET /v1/webhooks`: the caller's webhooks.
pub async fn list_webhooks(
    State(api): State<Arc<PresenceApi>>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    let owner = api.service(&headers).await?;
    let hooks: Vec<Value> = api
        .webhooks
        .list(&owner)
        .iter()
        .map(|h| h.public())
        .collect();
    Ok(Json(json!({ "webhooks": hooks })))
}

/// `GET /v1/webhooks/{id}`: one webhook, with its state, positions and last error.
pub async fn get_webhook(
    State(api): State<Arc<PresenceApi>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    let owner = api.service(&headers).await?;
    api.webhooks
        .get(&owner, &id)
        .map(|h| Json(h.public()))
        .ok_or_else(|| Problem::new(Kind::NotFound, "no such webhook"))
}

/// `DELETE /v1/webhooks/{id}`: 204.
pub async fn delete_webhook(
    State(api): State<Arc<PresenceApi>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::http::StatusCode, Problem> {
    let owner = api.service(&headers).await?;
    match api.webhooks.delete(&owner, &id) {
        Ok(true) => Ok(axum::http::StatusCode::NO_CONTENT),
        Ok(false) => Err(Problem::new(Kind::NotFound, "no such webhook")),
        Err(err) => Err(Problem::new(Kind::Unavailable, err.to_string())),
    }
}

pub async fn jwks(State(issuer): State<Arc<Issuer>>) -> Json<jsonwebtoken::jwk::JwkSet> {
    Json(issuer.ring.jwks())
}
