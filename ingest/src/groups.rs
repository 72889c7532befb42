//! Durable queue groups over HTTP, for workers that hold no socket (serverless, cron): fetch
//! events of a group (long-polling), say which are done, and operate the groups. The store keeps
//! every group's state; these handlers check who may do what and translate.
//!
//! - `POST /v1/groups/{group}/fetch` `{"channel":…, "max":…, "wait_s":…, "member":…}`
//! - `POST /v1/groups/{group}/done` `{"channel":…, "done":[{"channel":…,"seq":…}]}`
//! - `GET /v1/groups`, `GET /v1/groups/{group}`
//! - `POST /v1/groups/{group}/reset` `{"to":"head"|N, "channel":…}`, `DELETE /v1/groups/{group}`
//!
//! Every one is for service tokens whose subscribe grant covers the group's channel or pattern.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use eventbus_auth_client::Verified;
use eventbus_runtime::problem::{Kind, Problem};
use eventbus_store_client::{GroupInfo, GroupSettings};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::Ingest;

/// Most events one fetch returns.
const MAX_FETCH: u32 = 1000;
/// Longest a fetch waits, in seconds.
const MAX_WAIT_S: u64 = 60;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fetch {
    channel: String,
    #[serde(default, deserialize_with = "eventbus_model::whole::optional")]
    max: Option<u32>,
    #[serde(default, deserialize_with = "eventbus_model::whole::optional")]
    wait_s: Option<u64>,
    #[serde(default)]
    member: Option<String>,
    #[serde(default, deserialize_with = "eventbus_model::whole::optional")]
    visibility_ms: Option<u64>,
    #[serde(default, deserialize_with = "eventbus_model::whole::optional")]
    max_deliveries: Option<u32>,
    #[serde(default, deserialize_with = "eventbus_model::whole::optional")]
    prefetch: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Done {
    /// The group's channel or pattern, as in the fetch: what the caller must be allowed.
    channel: String,
    done: Vec<DonePosition>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DonePosition {
    channel: String,
    #[serde(deserialize_with = "eventbus_model::whole::required")]
    seq: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reset {
    to: Value,
    #[serde(default)]
    channel: Option<String>,
}

fn invalid(field: &str, message: impl Into<String>) -> Problem {
    Problem::new(Kind::InvalidRequest, message).with("field", field)
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8], shape: &str) -> Result<T, Problem> {
    Problem::json_body(bytes, shape)
}

/// The caller, if it may use groups at all.
async fn service(ingest: &Ingest, headers: &HeaderMap) -> Result<Verified, Problem> {
    let verified = ingest.authenticate(headers).await?;
    verified.grant.check_group().map_err(Problem::from)?;
    Ok(verified)
}

/// The prologue of fetch and done: a service, a well-named group, a body of the right shape
/// naming the group's channel or pattern, which the caller's grant must cover.
async fn group_request<T: serde::de::DeserializeOwned>(
    ingest: &Ingest,
    headers: &HeaderMap,
    group: &str,
    bytes: &[u8],
    shape: &str,
    channel: impl Fn(&T) -> &str,
) -> Result<(Verified, T), Problem> {
    let verified = service(ingest, headers).await?;
    check_name(group)?;
    let request: T = body(bytes, shape)?;
    covers(&verified, channel(&request))?;
    Ok((verified, request))
}

/// Whether the caller's subscribe grant covers `channel` (a channel or a pattern).
fn covers(verified: &Verified, channel: &str) -> Result<(), Problem> {
    verified
        .grant
        .check_subscribe(channel)
        .map_err(|denied| Problem::from(denied).with("channel", channel))
}

fn check_name(group: &str) -> Result<(), Problem> {
    eventbus_model::names::validate_group(group)
        .map_err(|err| invalid("group", format!("a group's name {err}")))
}

pub async fn fetch(
    State(ingest): State<Arc<Ingest>>,
    Path(group): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, Problem> {
    let (verified, request) = group_request(
        &ingest,
        &headers,
        &group,
        &bytes,
        r#"a fetch is {"channel":…, "max":N, "wait_s":N, "member":…}"#,
        |r: &Fetch| r.channel.as_str(),
    )
    .await?;
    let max = request.max.unwrap_or(10);
    if !(1..=MAX_FETCH).contains(&max) {
        return Err(invalid("max", format!("max must be 1-{MAX_FETCH}")));
    }
    let wait_s = request.wait_s.unwrap_or(0);
    if wait_s > MAX_WAIT_S {
        return Err(invalid("wait_s", format!("wait_s must be 0-{MAX_WAIT_S}")));
    }
    // Without a name, each request is its own member: its prefetch is its `max`.
    let member = match request.member {
        Some(member) if !member.is_empty() && member.len() <= 128 => {
            format!("{}/{member}", verified.grant.identity)
        }
        Some(_) => return Err(invalid("member", "member must be 1-128 characters")),
        None => format!("http/{}", uuid::Uuid::now_v7().simple()),
    };
    let settings = GroupSettings {
        visibility_ms: request.visibility_ms,
        max_deliveries: request.max_deliveries,
        prefetch: request.prefetch,
    };
    let events = ingest
        .store
        .group_fetch(
            &group,
            &request.channel,
            &member,
            max,
            Duration::from_secs(wait_s),
            settings,
        )
        .await
        .map_err(Problem::from)?;
    let messages: Vec<Value> = events
        .into_iter()
        .filter_map(|e| {
            let event = RawValue::from_string(String::from_utf8(e.json.to_vec()).ok()?).ok()?;
            Some(json!({"event": event, "delivery": e.deliveries}))
        })
        .collect();
    Ok(axum::Json(json!({"group": group, "messages": messages})).into_response())
}

pub async fn done(
    State(ingest): State<Arc<Ingest>>,
    Path(group): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, Problem> {
    let (verified, request) = group_request(
        &ingest,
        &headers,
        &group,
        &bytes,
        r#"done is {"channel":<the group's>, "done":[{"channel":…,"seq":N}, …]}"#,
        |r: &Done| r.channel.as_str(),
    )
    .await?;
    if request.done.is_empty() || request.done.len() > MAX_FETCH as usize {
        return Err(invalid("done", format!("done lists 1-{MAX_FETCH} events")));
    }
    for position in &request.done {
        covers(&verified, &position.channel)?;
    }
    let done: Vec<(String, u64)> = request
        .done
        .into_iter()
        .map(|p| (p.channel, p.seq))
        .collect();
    let changed = ingest
        .store
        .group_done(&group, Some(&request.channel), &done)
        .await
        .map_err(Problem::from)?;
    Ok(axum::Json(json!({"group": group, "done": changed})).into_response())
}

fn info_json(info: &GroupInfo) -> Value {
    json!({
        "group": info.name,
        "channel": info.pattern,
        "visibility_ms": info.visibility_ms,
        "max_deliveries": info.max_deliveries,
        "prefetch": info.prefetch,
        "backlog": info.backlog,
        "in_flight": info.in_flight,
        "dead": info.dead,
        "members": info.members,
        "dead_letter_channel": eventbus_model::names::dead_letters_of(&info.name),
        "channels": info.channels.iter().map(|c| json!({
            "channel": c.channel, "position": c.position, "head": c.head,
        })).collect::<Vec<_>>(),
    })
}

/// The group `group` if the caller may see it.
async fn visible(ingest: &Ingest, verified: &Verified, group: &str) -> Result<GroupInfo, Problem> {
    check_name(group)?;
    let all = ingest.store.groups().await.map_err(Problem::from)?;
    let info = all
        .into_iter()
        .find(|g| g.name == group)
        .ok_or_else(|| Problem::new(Kind::NotFound, format!("no group {group:?}")))?;
    verified
        .grant
        .check_subscribe(&info.pattern)
        .map_err(|denied| Problem::from(denied).with("group", group))?;
    Ok(info)
}

pub async fn list(
    State(ingest): State<Arc<Ingest>>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let verified = service(&ingest, &headers).await?;
    let all = ingest.store.groups().await.map_err(Problem::from)?;
    let groups: Vec<Value> = all
        .iter()
        .filter(|g| verified.grant.check_subscribe(&g.pattern).is_ok())
        .map(info_json)
        .collect();
    Ok(axum::Json(json!({"groups": groups})).into_response())
}

pub async fn get(
    State(ingest): State<Arc<Ingest>>,
    Path(group): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let verified = service(&ingest, &headers).await?;
    let info = visible(&ingest, &verified, &group).await?;
    Ok(axum::Json(info_json(&info)).into_response())
}

pub async fn reset(
    State(ingest): State<Arc<Ingest>>,
    Path(group): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, Problem> {
    let verified = service(&ingest, &headers).await?;
    let request: Reset = body(&bytes, r#"a reset is {"to":"head"|N, "channel":…}"#)?;
    let info = visible(&ingest, &verified, &group).await?;
    let to = match &request.to {
        Value::String(s) if s == "head" => None,
        Value::Number(n) => Some(
            eventbus_model::whole::of(n).ok_or_else(|| invalid("to", "to is \"head\" or a seq"))?,
        ),
        _ => return Err(invalid("to", "to is \"head\" or a seq")),
    };
    if let Some(channel) = &request.channel {
        eventbus_model::names::validate_channel(channel)
            .map_err(|err| invalid("channel", format!("channel {err}")))?;
    }
    if to.is_some() && request.channel.is_none() && info.channels.len() > 1 {
        return Err(invalid(
            "channel",
            "a reset to a seq names its channel (the group follows several)",
        ));
    }
    let channel = request
        .channel
        .or_else(|| to.and(info.channels.first().map(|c| c.channel.clone())));
    ingest
        .store
        .reset_group(&group, channel.as_deref(), to)
        .await
        .map_err(Problem::from)?;
    let info = visible(&ingest, &verified, &group).await?;
    Ok(axum::Json(info_json(&info)).into_response())
}

pub async fn delete(
    State(ingest): State<Arc<Ingest>>,
    Path(group): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let verified = service(&ingest, &headers).await?;
    visible(&ingest, &verified, &group).await?;
    ingest
        .store
        .delete_group(&group)
        .await
        .map_err(Problem::from)?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}
