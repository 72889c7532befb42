//! `POST /v1/events`: one event or a batch, answered 200 only once every event is durable.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use eventbus_auth_client::app_hooks::AppHooks;
use eventbus_model::EventError;
use eventbus_runtime::problem::{Kind, Problem};
use eventbus_store_client::StoreError;
use serde::Serialize;

use crate::{Ingest, binary_mode};

fn event_problem(index: Option<usize>, err: EventError) -> Problem {
    let kind = match err {
        EventError::TooLarge { .. } => Kind::TooLarge,
        _ => Kind::InvalidRequest,
    };
    let detail = match index {
        Some(i) => format!("event {i}: {err}"),
        None => err.to_string(),
    };
    let mut problem = Problem::new(kind, detail);
    if let Some(field) = err.field() {
        problem = problem.with("field", field);
    }
    if let Some(i) = index {
        problem = problem.with("index", i);
    }
    problem
}

/// What a publisher is told for a store error (one mapping, in the store client).
pub fn store_problem(err: StoreError) -> Problem {
    Problem::from(err)
}

fn rate_problem(limited: eventbus_runtime::rate::Limited) -> Problem {
    use eventbus_runtime::rate::Limited;
    match limited {
        Limited::Wait(wait) => {
            let mut problem = Problem::new(
                Kind::Overloaded,
                format!(
                    "this identity publishes faster than EVENTBUS_PUBLISH_RATE allows; retry in {} ms",
                    wait.as_millis()
                ),
            );
            problem.retry_after_s = Some(wait.as_secs_f64().ceil().max(1.0) as u32);
            problem
        }
        Limited::TooMany { burst } => Problem::new(
            Kind::Overloaded,
            format!(
                "at most {burst} events at once for this identity (EVENTBUS_PUBLISH_BURST): send smaller batches"
            ),
        ),
    }
}

fn media_type(request: &Request) -> Option<String> {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

/// The answer to a publish, serialised as it is: built as a `serde_json::Value`, each event's
/// answer was a map of four keys inserted, compared, sorted and dropped, about a tenth of the
/// batched path's CPU (perf, docs/benchmarks.md). Fields in the order that map gave them.
#[derive(Serialize)]
pub struct Published {
    events: Vec<Answer>,
}

#[derive(Serialize)]
struct Answer {
    channel: String,
    duplicate: bool,
    id: String,
    seq: u64,
}

pub async fn publish(
    State(ingest): State<Arc<Ingest>>,
    request: Request,
) -> Result<Json<Published>, Problem> {
    let started = std::time::Instant::now();
    let answer = publish_durably(ingest, request).await;
    eventbus_runtime::metrics::metrics()
        .publish_seconds
        .observe(started.elapsed().as_secs_f64());
    answer
}

async fn publish_durably(
    ingest: Arc<Ingest>,
    request: Request,
) -> Result<Json<Published>, Problem> {
    let verified = ingest.authenticate(request.headers()).await?;
    let binary = binary_mode::is_binary(request.headers());
    let media = media_type(&request);
    let raw_content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let structured = matches!(
        media.as_deref(),
        Some(
            "application/json"
                | "application/cloudevents+json"
                | "application/cloudevents-batch+json"
        )
    );
    if !binary && !structured {
        return Err(Problem::new(
            Kind::UnsupportedMediaType,
            "send application/json (or application/cloudevents+json, application/cloudevents-batch+json, or a binary-mode CloudEvent with ce-* headers)",
        ));
    }
    let headers = request.headers().clone();
    let body = axum::body::to_bytes(Body::new(request.into_body()), ingest.max_body_bytes)
        .await
        .map_err(|_| {
            Problem::new(
                Kind::TooLarge,
                format!("the request body is over {} bytes", ingest.max_body_bytes),
            )
        })?;

    let source = &verified.grant.identity;
    let events = if binary {
        let json = binary_mode::to_structured(&headers, raw_content_type.as_deref(), &body)
            .map_err(|detail| Problem::new(Kind::InvalidRequest, detail))?;
        vec![
            eventbus_model::parse_event(&json, source, &ingest.limits)
                .map_err(|err| event_problem(None, err))?,
        ]
    } else {
        eventbus_model::parse_events(&body, source, &ingest.limits)
            .map_err(|(index, err)| event_problem(index, err))?
    };
    if events.len() > ingest.max_batch_events {
        return Err(Problem::new(
            Kind::TooLarge,
            format!(
                "a request holds at most {} events, got {}",
                ingest.max_batch_events,
                events.len()
            ),
        ));
    }
    let grant = &verified.grant;
    let app = ingest.app.as_deref();
    let asks_app = |channel: &str| app.is_some_and(|app| app.decides_publish(grant, channel));
    // The grant first, for every event the app does not decide (a batch is all or nothing)...
    for (index, event) in events.iter().enumerate() {
        if asks_app(&event.channel) {
            continue;
        }
        grant.check_publish(&event.channel).map_err(|denied| {
            Problem::from(denied)
                .with("index", index)
                .with("channel", event.channel.as_str())
        })?;
    }
    // ...then the rate, before the app is asked: a client over its rate does not get to make the
    // bus call the app...
    ingest
        .rate
        .check(&grant.identity, events.len())
        .map_err(rate_problem)?;
    // ...then the application's publish hook, which decides (and may rewrite) a client's events
    // on its channels.
    let events = if events.iter().any(|event| asks_app(&event.channel)) {
        let mut checked = Vec::with_capacity(events.len());
        for (index, event) in events.into_iter().enumerate() {
            if !asks_app(&event.channel) {
                checked.push(event);
                continue;
            }
            let channel = event.channel.clone();
            let event = AppHooks::check_publish(app, grant, event, &ingest.limits)
                .await
                .map_err(|refusal| {
                    Problem::from(refusal)
                        .with("index", index)
                        .with("channel", channel)
                })?;
            checked.push(event);
        }
        checked
    } else {
        events
    };
    let appended = ingest.store.append(events).await.map_err(store_problem)?;
    let duplicates = appended.iter().filter(|a| a.duplicate).count() as u64;
    let m = eventbus_runtime::metrics::metrics();
    m.events_in.inc_by(appended.len() as u64 - duplicates);
    m.duplicates.inc_by(duplicates);
    Ok(Json(Published {
        events: appended
            .into_iter()
            .map(|a| Answer {
                channel: a.channel,
                duplicate: a.duplicate,
                id: a.id,
                seq: a.seq,
            })
            .collect(),
    }))
}
