//! `GET /v1/channels/{channel}/events?after=&limit=&compact=`: a page of a channel's history.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use eventbus_runtime::problem::{Kind, Problem};

use crate::Ingest;
use crate::publish::store_problem;

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

fn invalid(field: &str, detail: &str) -> Problem {
    Problem::new(Kind::InvalidRequest, detail).with("field", field)
}

/// A channel's history; a channel public to WebSub advertises the hub and itself as the topic in
/// `Link` (W3C WebSub §4: discovery), on refusals too, so that discovery needs no account.
pub async fn history(
    State(ingest): State<Arc<Ingest>>,
    Path(channel): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let links = ingest.websub.links(&headers, ingest.tls, &channel);
    let mut response = read(&ingest, &channel, &query, &headers)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    if let Some(value) = links.and_then(|l| header::HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(header::LINK, value);
    }
    response
}

async fn read(
    ingest: &Ingest,
    channel: &str,
    query: &HashMap<String, String>,
    headers: &axum::http::HeaderMap,
) -> Result<Response, Problem> {
    let channel = channel.to_owned();
    let verified = ingest.authenticate(headers).await?;
    let mut after = 0u64;
    let mut limit = DEFAULT_LIMIT;
    let mut compact = false;
    for (name, value) in query {
        match name.as_str() {
            "after" => {
                after = value
                    .parse()
                    .map_err(|_| invalid("after", "after must be a seq (a whole number)"))?
            }
            "limit" => limit = parse_limit(value)?,
            "compact" => {
                compact = value
                    .parse()
                    .map_err(|_| invalid("compact", "compact must be true or false"))?
            }
            other => {
                return Err(invalid(
                    other,
                    &format!("unknown query parameter {other:?}"),
                ));
            }
        }
    }
    check_readable(ingest, &verified.grant, &channel).await?;
    let page = ingest
        .store
        .read(&channel, after, limit, compact)
        .await
        .map_err(|err| match err {
            eventbus_store_client::StoreError::OutOfRange(message) => invalid("after", &message),
            other => Problem::from(other),
        })?;
    let body = page_json("", &page.events, after, page.head);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn parse_limit(value: &str) -> Result<u32, Problem> {
    value
        .parse()
        .ok()
        .filter(|l| (1..=MAX_LIMIT).contains(l))
        .ok_or_else(|| invalid("limit", "limit must be 1-1000"))
}

/// May this grant read `channel`'s history (a single channel, subscribe permission: the grant's,
/// or the application's subscribe hook's for its channels)?
pub async fn check_readable(
    ingest: &Ingest,
    grant: &eventbus_router::Grant,
    channel: &str,
) -> Result<(), Problem> {
    if eventbus_router::pattern::is_pattern(channel) {
        grant
            .check_subscribe(channel)
            .map_err(|denied| Problem::from(denied).with("channel", channel))?;
        return Err(invalid(
            "channel",
            "history is read one channel at a time, not by pattern",
        ));
    }
    eventbus_auth_client::app_hooks::AppHooks::check_subscribe(
        ingest.app.as_deref(),
        grant,
        channel,
    )
    .await
    .map_err(|refusal| Problem::from(refusal).with("channel", channel))
}

/// `{<prefix>"events":[...],"next_after":N,"head":H}`. The events are already JSON text; they are
/// joined, not re-encoded.
pub fn page_json(
    prefix: &str,
    events: &[eventbus_model::StoredEvent],
    after: u64,
    head: u64,
) -> Vec<u8> {
    let next_after = events.last().map_or(after, |e| e.seq);
    let mut body = Vec::with_capacity(
        events.iter().map(|e| e.json.len() + 1).sum::<usize>() + prefix.len() + 64,
    );
    body.push(b'{');
    body.extend_from_slice(prefix.as_bytes());
    body.extend_from_slice(b"\"events\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&event.json);
    }
    body.extend_from_slice(format!("],\"next_after\":{next_after},\"head\":{head}}}").as_bytes());
    body
}

/// `GET /v1/channels?prefix=&after=&limit=`: the channels the caller may read whose names start
/// with `prefix`, in name order, with their heads; `next_after` pages on.
pub async fn channels(
    State(ingest): State<Arc<Ingest>>,
    Query(query): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> Result<Response, Problem> {
    let verified = ingest.authenticate(&headers).await?;
    let mut prefix = String::new();
    let mut after = String::new();
    let mut limit = DEFAULT_LIMIT;
    for (name, value) in &query {
        match name.as_str() {
            "prefix" => prefix = value.clone(),
            "after" => after = value.clone(),
            "limit" => limit = parse_limit(value)?,
            other => {
                return Err(invalid(
                    other,
                    &format!("unknown query parameter {other:?} (prefix, after, limit)"),
                ));
            }
        }
    }
    // Scan in store pages until `limit` readable channels are found or the names run out: what
    // the caller may not read is skipped, not counted.
    let mut visible: Vec<serde_json::Value> = Vec::new();
    let mut cursor = after;
    let mut full = false;
    'scan: loop {
        let page = ingest
            .store
            .channels(&prefix, &cursor, MAX_LIMIT)
            .await
            .map_err(store_problem)?;
        let last_page = page.len() < MAX_LIMIT as usize;
        for (channel, head) in page {
            cursor = channel.clone();
            if verified.grant.check_subscribe(&channel).is_ok() {
                visible.push(serde_json::json!({"channel": channel, "head": head}));
                if visible.len() == limit as usize {
                    full = true;
                    break 'scan;
                }
            }
        }
        if last_page {
            break;
        }
    }
    // More may follow only when the page filled up.
    let next_after = if full {
        serde_json::Value::String(cursor)
    } else {
        serde_json::Value::Null
    };
    Ok(
        axum::Json(serde_json::json!({"channels": visible, "next_after": next_after}))
            .into_response(),
    )
}
