//! The webhook API: `/v1/webhooks` for service tokens, each webhook within its owner's grant.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use bytes::Bytes;
use eventbus_auth_client::{Verified, Verifier};
use eventbus_router::{Grant, Role};
use eventbus_runtime::problem::{Kind, Problem, bearer};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::webhooks::{WebhookError, Webhooks};

pub struct Api {
    pub webhooks: Webhooks,
    pub verifier: Verifier,
}

impl Api {
    /// The verified bearer token of a request.
    async fn caller(&self, headers: &HeaderMap) -> Result<Verified, Problem> {
        let token = bearer(headers)
            .ok_or_else(|| Problem::new(Kind::Unauthorized, "send a token as Bearer"))?;
        self.verifier.verify(token).await.map_err(Problem::from)
    }
}

fn invalid(field: &str, detail: impl Into<String>) -> Problem {
    Problem::new(Kind::InvalidRequest, detail).with("field", field)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    url: String,
    channels: Vec<String>,
    secret: String,
}

impl Api {
    /// The identity of a service token (webhooks are for services).
    async fn service(&self, headers: &HeaderMap) -> Result<String, Problem> {
        Ok(self.service_grant(headers).await?.identity)
    }

    /// The grant of a service token.
    async fn service_grant(&self, headers: &HeaderMap) -> Result<Grant, Problem> {
        let verified = self.caller(headers).await?;
        if verified.grant.role != Role::Service {
            return Err(Problem::new(
                Kind::Forbidden,
                "webhooks are for service tokens",
            ));
        }
        Ok(verified.grant)
    }
}

/// `POST /v1/webhooks` `{url, channels, secret}`: 201 with the registration (secret left out).
pub async fn register_webhook(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(axum::http::StatusCode, Json<Value>), Problem> {
    let grant = api.service_grant(&headers).await?;
    let request: WebhookRequest = Problem::json_body(&body, "invalid webhook")?;
    let hook = api
        .webhooks
        .register(&grant, request.url, request.channels, request.secret)
        .await
        .map_err(problem)?;
    Ok((axum::http::StatusCode::CREATED, Json(hook.public())))
}

/// The problem for a refusal of the webhooks (registering, retrying).
fn problem(err: WebhookError) -> Problem {
    match err {
        WebhookError::Invalid { field, .. } => invalid(field, err.to_string()),
        WebhookError::Forbidden(message) => {
            Problem::new(Kind::Forbidden, message).with("field", "channels")
        }
        other => Problem::new(Kind::Unavailable, other.to_string()),
    }
}

/// `GET /v1/webhooks`: the caller's webhooks.
pub async fn list_webhooks(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    let owner = api.service(&headers).await?;
    let hooks: Vec<Value> = api
        .webhooks
        .list(&owner)
        .await
        .map_err(|err| Problem::new(Kind::Unavailable, err.to_string()))?
        .iter()
        .map(|h| h.public())
        .collect();
    Ok(Json(json!({ "webhooks": hooks })))
}

/// `GET /v1/webhooks/{id}`: one webhook, with its state, positions and last error.
pub async fn get_webhook(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    let owner = api.service(&headers).await?;
    shown(api.webhooks.get(&owner, &id).await)
}

/// `POST /v1/webhooks/{id}/retry`: a dead webhook goes again from where it stopped; 200 with it.
pub async fn retry_webhook(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    let grant = api.service_grant(&headers).await?;
    shown(api.webhooks.retry(&grant, &id).await)
}

/// One of the caller's webhooks as the API shows it, or 404 when it is not the caller's.
fn shown(
    found: Result<Option<crate::webhooks::Webhook>, WebhookError>,
) -> Result<Json<Value>, Problem> {
    found
        .map_err(problem)?
        .map(|h| Json(h.public()))
        .ok_or_else(|| Problem::new(Kind::NotFound, "no such webhook"))
}

/// `DELETE /v1/webhooks/{id}`: 204.
pub async fn delete_webhook(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::http::StatusCode, Problem> {
    let owner = api.service(&headers).await?;
    match api.webhooks.delete(&owner, &id).await {
        Ok(true) => Ok(axum::http::StatusCode::NO_CONTENT),
        Ok(false) => Err(Problem::new(Kind::NotFound, "no such webhook")),
        Err(err) => Err(Problem::new(Kind::Unavailable, err.to_string())),
    }
}
