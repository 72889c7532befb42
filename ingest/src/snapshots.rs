//! `PUT /v1/channels/{channel}/snapshot` and `GET /v1/channels/{channel}/snapshot`: a service
//! stores its state of a channel as of a seq; a consumer reads the latest snapshot together with the
//! events after it, and rebuilds state without replaying from seq 1.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use eventbus_runtime::problem::{Kind, Problem};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::Ingest;
use crate::history::{check_readable, page_json};
use crate::publish::store_problem;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutSnapshot {
    #[serde(deserialize_with = "eventbus_model::whole::required")]
    seq: u64,
    data: Box<RawValue>,
}

pub async fn put(
    State(ingest): State<Arc<Ingest>>,
    Path(channel): Path<String>,
    request: Request,
) -> Result<Response, Problem> {
    let verified = ingest.authenticate(request.headers()).await?;
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        });
    if !json {
        return Err(Problem::new(
            Kind::UnsupportedMediaType,
            "send the snapshot as application/json",
        ));
    }
    eventbus_model::validate_channel(&channel).map_err(|err| {
        Problem::new(Kind::InvalidRequest, format!("channel {err}")).with("field", "channel")
    })?;
    // The state every later reader starts from is written by the application's backend, never by
    // a client that may merely publish to the channel.
    if verified.grant.role != eventbus_router::Role::Service {
        return Err(Problem::new(
            Kind::Forbidden,
            "snapshots are written by services; a client token may read them, not write them",
        )
        .with("channel", channel.as_str()));
    }
    // Writing a channel's state is publishing about it.
    verified
        .grant
        .check_publish(&channel)
        .map_err(|denied| Problem::from(denied).with("channel", channel.as_str()))?;
    let body = axum::body::to_bytes(Body::new(request.into_body()), ingest.max_body_bytes)
        .await
        .map_err(|_| {
            Problem::new(
                Kind::TooLarge,
                format!("the snapshot is over {} bytes", ingest.max_body_bytes),
            )
        })?;
    let snapshot: PutSnapshot = Problem::json_body(&body, "a snapshot is {\"seq\":N,\"data\":…}")?;
    ingest
        .store
        .put_snapshot(
            &channel,
            snapshot.seq,
            snapshot.data.get().as_bytes().to_vec(),
        )
        .await
        .map_err(store_problem)?;
    Ok(axum::Json(json!({"channel": channel, "seq": snapshot.seq})).into_response())
}

pub async fn get(
    State(ingest): State<Arc<Ingest>>,
    Path(channel): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> Result<Response, Problem> {
    let verified = ingest.authenticate(&headers).await?;
    let mut limit = 100u32;
    for (name, value) in &query {
        match name.as_str() {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|l| (1..=1000).contains(l))
                    .ok_or_else(|| {
                        Problem::new(Kind::InvalidRequest, "limit must be 1-1000")
                            .with("field", "limit")
                    })?
            }
            other => {
                return Err(Problem::new(
                    Kind::InvalidRequest,
                    format!("unknown query parameter {other:?}"),
                )
                .with("field", other));
            }
        }
    }
    check_readable(&ingest, &verified.grant, &channel).await?;
    let snapshot = ingest
        .store
        .snapshot(&channel)
        .await
        .map_err(store_problem)?;
    let (after, prefix) = match &snapshot {
        Some((seq, data)) => {
            let data = std::str::from_utf8(data)
                .map_err(|_| Problem::new(Kind::Internal, "stored snapshot is not UTF-8"))?;
            (
                *seq,
                format!("\"snapshot\":{{\"seq\":{seq},\"data\":{data}}},"),
            )
        }
        None => (0, "\"snapshot\":null,".to_owned()),
    };
    let page = ingest
        .store
        .read(&channel, after, limit, false)
        .await
        .map_err(store_problem)?;
    let body = page_json(&prefix, &page.events, after, page.head);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}
