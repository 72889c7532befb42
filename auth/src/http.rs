//! `POST /v1/tokens` and `GET /v1/jwks`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use bytes::Bytes;
use eventbus_router::{Grant, Role, covers};
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
    #[serde(default, deserialize_with = "eventbus_model::whole::optional")]
    ttl_s: Option<u64>,
}

/// Who asks for a token.
enum Caller {
    ApiKey(String),
    /// A service token: what it mints stays within its grant and its expiry.
    Service(Grant, u64),
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
            Role::Service => Ok(Caller::Service(verified.grant, verified.expires_at)),
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
    default: Vec<String>,
) -> Result<Vec<String>, Problem> {
    let list = given.unwrap_or(default);
    for pattern in &list {
        eventbus_router::validate_pattern(pattern)
            .map_err(|err| invalid(field, format!("pattern {pattern:?}: {err}")))?;
    }
    Ok(list)
}

/// Holds a token minted with a service token within that token: every pattern covered by one of
/// the minter's, the expiry no later than the minter's, and (for a client token, whose holder is
/// always subscribed to its own inbox) the client's inbox within the minter's subscribe grant.
fn confine(claims: &mut Claims, minter: &Grant, minter_exp: u64) -> Result<(), Problem> {
    let beyond = |field: &str, pattern: &str| {
        Problem::new(
            Kind::Forbidden,
            format!(
                "{field} {pattern:?} is not within the minting token's grant: a token never widens"
            ),
        )
        .with("field", field)
    };
    for (field, wanted, held) in [
        ("subscribe", &claims.subscribe, &minter.subscribe),
        ("publish", &claims.publish, &minter.publish),
    ] {
        if let Some(pattern) = wanted.iter().find(|p| !held.iter().any(|h| covers(h, p))) {
            return Err(beyond(field, pattern));
        }
    }
    if claims.role == Role::Client {
        let inbox = eventbus_model::names::inbox_of(&claims.sub);
        if !minter.subscribe.iter().any(|h| covers(h, &inbox)) {
            return Err(beyond("sub", &inbox));
        }
    }
    claims.exp = claims.exp.min(minter_exp);
    Ok(())
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
        Problem::json_body(&body, "invalid token request")?
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
    let caller_name = match &caller {
        Caller::ApiKey(name) => Some(name.as_str()),
        Caller::Service(grant, _) => Some(grant.identity.as_str()),
        Caller::Anonymous => None,
    };
    let sub = match (role, caller_name, request.sub) {
        (Role::Client, _, None) => return Err(invalid("sub", "a client token needs a sub")),
        (Role::Client, _, Some(sub)) => sub,
        (Role::Service, Some(name), Some(sub)) if sub != name => {
            return Err(Problem::new(
                Kind::Forbidden,
                format!("{name} may only get service tokens for itself"),
            ));
        }
        (Role::Service, Some(name), _) => name.to_owned(),
        (Role::Service, None, sub) => sub.unwrap_or_else(|| "dev-service".to_owned()),
    };
    eventbus_model::validate_identity(&sub).map_err(|err| invalid("sub", format!("sub {err}")))?;
    // A token minted with a token never widens it: by default it holds what the minter holds.
    let minter = match &caller {
        Caller::Service(grant, exp) => Some((grant, *exp)),
        _ => None,
    };
    let (default_subscribe, default_publish): (Vec<String>, Vec<String>) = match (role, minter) {
        (Role::Service, Some((grant, _))) => (grant.subscribe.clone(), grant.publish.clone()),
        (Role::Service, None) => (vec![">".into()], vec![">".into()]),
        (Role::Client, _) => (Vec::new(), Vec::new()),
    };
    let now = now_s();
    let mut claims = Claims {
        sub,
        role,
        iss: ISSUER.to_owned(),
        iat: now,
        exp: now + ttl_s,
        subscribe: patterns("subscribe", request.subscribe, default_subscribe)?,
        publish: patterns("publish", request.publish, default_publish)?,
    };
    if let Some((grant, exp)) = minter {
        confine(&mut claims, grant, exp)?;
    }
    let by = caller_name.unwrap_or("anonymous (development mode)");
    info!(sub = %claims.sub, role = claims.role.as_str(), ttl_s, by, "token issued");
    issuer.mint(&claims).map(Json)
}

pub struct PresenceApi {
    pub registry: crate::presence::Registry,
    pub verifier: Verifier,
}

impl PresenceApi {
    /// The verified bearer token of a request.
    async fn caller(&self, headers: &HeaderMap) -> Result<crate::Verified, Problem> {
        let token = bearer(headers)
            .ok_or_else(|| Problem::new(Kind::Unauthorized, "send a token as Bearer"))?;
        self.verifier.verify(token).await.map_err(Problem::from)
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
    verified
        .grant
        .check_subscribe(&channel)
        .map_err(|denied| Problem::from(denied).with("channel", channel.as_str()))?;
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

pub async fn jwks(State(issuer): State<Arc<Issuer>>) -> Json<jsonwebtoken::jwk::JwkSet> {
    Json(issuer.ring.jwks())
}
