//! The command-line client: `eventbus token`, `eventbus pub`, `eventbus tail`.
//!
//! Exit codes scripts can rely on (sysexits): 0 done, 64 bad usage, 65 bad input data (not JSON,
//! an event the bus refuses as invalid), 69 the bus is unreachable or unavailable, 77 not allowed
//! (no or bad credentials, forbidden channel), 1 anything else.

use std::io::BufRead;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

pub const EXIT_DATA: i32 = 65;
pub const EXIT_UNAVAILABLE: i32 = 69;
pub const EXIT_NOPERM: i32 = 77;

/// Where the bus is and who we are; flags or environment.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Base URL of the bus (ingest and auth; the gateway for tail).
    #[arg(long, env = "EVENTBUS_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A token to use as is.
    #[arg(long, env = "EVENTBUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// An API key secret to get a service token with (none: development mode).
    #[arg(long, env = "EVENTBUS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Whom an `https://` bus is trusted as (the system's roots plus --ca-file).
    #[command(flatten)]
    pub trust: eventbus_runtime::tls::Trust,
}

impl Target {
    fn tls(&self) -> Result<std::sync::Arc<rustls::ClientConfig>, Failure> {
        self.trust
            .client_config()
            .map(std::sync::Arc::new)
            .map_err(|why| fail(eventbus_runtime::EXIT_CONFIG, why))
    }

    /// The HTTP client for this bus (https with [`Target::trust`]).
    pub(crate) fn http(&self) -> Result<reqwest::Client, Failure> {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .use_preconfigured_tls((*self.tls()?).clone())
            .build()
            .map_err(|err| fail(1, format!("cannot make an HTTP client: {err}")))
    }
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub check: Option<TokenCheck>,
    #[command(flatten)]
    pub target: Target,
    /// Sign the token here with the newest key of this directory, without a running bus.
    #[arg(long)]
    pub keys_dir: Option<std::path::PathBuf>,
    /// A client token for this identity (default: a service token for the API key).
    #[arg(long)]
    pub sub: Option<String>,
    /// `service` or `client` (default: client with --sub, else service).
    #[arg(long, value_parser = parse_role)]
    pub role: Option<eventbus_router::Role>,
    /// Channels (patterns) the token may subscribe to, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub subscribe: Option<Vec<String>>,
    /// Channels (patterns) the token may publish to, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub publish: Option<Vec<String>>,
    #[arg(long)]
    pub ttl_s: Option<u64>,
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenCheck {
    /// Verifies a token (against --keys-dir or the bus at --url) and prints its claims and time
    /// left; exit 0 valid, 1 invalid, 2 expired, 69 keys unavailable.
    Check(crate::offline::CheckArgs),
}

fn parse_role(text: &str) -> Result<eventbus_router::Role, String> {
    match text {
        "service" => Ok(eventbus_router::Role::Service),
        "client" => Ok(eventbus_router::Role::Client),
        other => Err(format!("{other:?}: expected service or client")),
    }
}

#[derive(clap::Args, Debug)]
pub struct PubArgs {
    #[command(flatten)]
    pub target: Target,
    pub channel: String,
    #[arg(name = "type")]
    pub event_type: String,
    /// The event's data as JSON; `-` (or nothing) reads stdin, one event per line.
    pub data: Option<String>,
    /// Key of the event (compaction).
    #[arg(long)]
    pub key: Option<String>,
    /// The event's id (with stdin, each line gets this id plus `-<line number>`). By default a new
    /// UUID v7: every event is sent with an id, so a retry can never store it twice.
    #[arg(long)]
    pub id: Option<String>,
    /// Attempts after the first when the bus is unreachable or answers 429/503 (whose outcome
    /// may be unknown): the same event, same id, after 0.25 s, 0.5 s, 1 s, ...
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
}

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    pub target: Target,
    pub channel: String,
    /// Print the history after this seq first (0: from the start).
    #[arg(long)]
    pub after: Option<u64>,
    /// With --after: only the latest event per key.
    #[arg(long)]
    pub compact: bool,
    /// Stop after this many events (default: follow for ever).
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(clap::Args, Debug)]
pub struct WebhooksArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(subcommand)]
    pub action: WebhookAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum WebhookAction {
    /// Your webhooks, one JSON line each.
    List,
    /// Registers a webhook; prints it (with its id).
    Add {
        /// Where to POST events.
        url: String,
        /// Channels or patterns, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        channels: Vec<String>,
        /// The signing secret (16 characters or more).
        #[arg(long, env = "EVENTBUS_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
    },
    /// One webhook: state, last error, positions.
    Show { id: String },
    /// Deletes a webhook.
    Delete { id: String },
}

/// A failure with the exit code it maps to.
pub struct Failure {
    pub code: i32,
    pub message: String,
}

pub(crate) fn fail(code: i32, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// The exit code and message for an HTTP problem answer.
async fn problem(response: reqwest::Response, what: &str) -> Failure {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let detail = body["detail"].as_str().unwrap_or("").to_owned();
    let code = match status.as_u16() {
        400 | 413 | 415 => EXIT_DATA,
        401 | 403 => EXIT_NOPERM,
        s if s >= 500 => EXIT_UNAVAILABLE,
        _ => 1,
    };
    fail(code, format!("{what}: {status}: {detail}"))
}

fn unreachable(url: &str, err: reqwest::Error) -> Failure {
    fail(
        EXIT_UNAVAILABLE,
        format!("cannot reach the bus at {url}: {err}"),
    )
}

async fn mint(target: &Target, body: Value) -> Result<String, Failure> {
    let mut request = target
        .http()?
        .post(format!("{}/v1/tokens", target.url))
        .json(&body);
    if let Some(key) = &target.api_key {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .map_err(|err| unreachable(&target.url, err))?;
    if !response.status().is_success() {
        return Err(problem(response, "cannot get a token").await);
    }
    let body: Value = response
        .json()
        .await
        .map_err(|err| fail(1, format!("token answer: {err}")))?;
    body["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| fail(1, "the token answer holds no token"))
}

async fn token_for(target: &Target) -> Result<String, Failure> {
    match &target.token {
        Some(token) => Ok(token.clone()),
        None => mint(target, json!({})).await,
    }
}

pub async fn token(args: TokenArgs) -> Result<(), Failure> {
    if let Some(TokenCheck::Check(check)) = args.check {
        return crate::offline::check(check).await;
    }
    if let Some(dir) = &args.keys_dir {
        let request = crate::offline::Request {
            sub: args.sub,
            role: args.role,
            subscribe: args.subscribe,
            publish: args.publish,
            ttl_s: args.ttl_s,
        };
        println!("{}", crate::offline::mint(dir, request)?);
        return Ok(());
    }
    let mut body = serde_json::Map::new();
    if let Some(sub) = args.sub {
        body.insert("sub".into(), sub.into());
    }
    if let Some(role) = args.role {
        body.insert("role".into(), role.as_str().into());
    }
    if let Some(list) = args.subscribe {
        body.insert("subscribe".into(), list.into());
    }
    if let Some(list) = args.publish {
        body.insert("publish".into(), list.into());
    }
    if let Some(ttl) = args.ttl_s {
        body.insert("ttl_s".into(), ttl.into());
    }
    println!("{}", mint(&args.target, Value::Object(body)).await?);
    Ok(())
}

pub async fn publish(args: PubArgs) -> Result<(), Failure> {
    let token = token_for(&args.target).await?;
    let client = args.target.http()?;
    let send = async |data: Value, id: String| -> Result<(), Failure> {
        let mut event =
            json!({"id": id, "channel": args.channel, "type": args.event_type, "data": data});
        if let Some(key) = &args.key {
            event["key"] = key.clone().into();
        }
        let mut attempt = 0;
        loop {
            let outcome = client
                .post(format!("{}/v1/events", args.target.url))
                .bearer_auth(&token)
                .json(&event)
                .send()
                .await;
            let failure = match outcome {
                Ok(response) if response.status().is_success() => {
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    println!("{}", body["events"][0]);
                    return Ok(());
                }
                Ok(response) => {
                    let retry = matches!(response.status().as_u16(), 429 | 503);
                    let failure = problem(response, "not published").await;
                    if !retry {
                        return Err(failure);
                    }
                    failure
                }
                Err(err) => unreachable(&args.target.url, err),
            };
            if attempt >= args.retries {
                return Err(failure);
            }
            eprintln!("{}; retrying with the same id {id}", failure.message);
            tokio::time::sleep(Duration::from_millis(250 << attempt.min(6))).await;
            attempt += 1;
        }
    };
    let id_for = |line: Option<usize>| match (&args.id, line) {
        (Some(id), None) => id.clone(),
        (Some(id), Some(n)) => format!("{id}-{n}"),
        (None, _) => uuid::Uuid::now_v7().to_string(),
    };
    let parse = |text: &str| -> Result<Value, Failure> {
        serde_json::from_str(text)
            .map_err(|err| fail(EXIT_DATA, format!("data is not JSON ({err}): {text}")))
    };
    match args.data.as_deref() {
        Some(text) if text != "-" => send(parse(text)?, id_for(None)).await,
        _ => {
            for (n, line) in std::io::stdin().lock().lines().enumerate() {
                let line = line.map_err(|err| fail(1, format!("stdin: {err}")))?;
                if line.trim().is_empty() {
                    continue;
                }
                send(parse(&line)?, id_for(Some(n + 1))).await?;
            }
            Ok(())
        }
    }
}

pub async fn webhooks(args: WebhooksArgs) -> Result<(), Failure> {
    let token = token_for(&args.target).await?;
    let base = format!("{}/v1/webhooks", args.target.url);
    let client = args.target.http()?;
    let request = match &args.action {
        WebhookAction::List => client.get(&base),
        WebhookAction::Add {
            url,
            channels,
            secret,
        } => client
            .post(&base)
            .json(&json!({"url": url, "channels": channels, "secret": secret})),
        WebhookAction::Show { id } => client.get(format!("{base}/{id}")),
        WebhookAction::Delete { id } => client.delete(format!("{base}/{id}")),
    };
    let response = request
        .bearer_auth(&token)
        .send()
        .await
        .map_err(|err| unreachable(&args.target.url, err))?;
    if !response.status().is_success() {
        return Err(problem(response, "webhooks").await);
    }
    match args.action {
        WebhookAction::Delete { .. } => Ok(()),
        WebhookAction::List => {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            for hook in body["webhooks"].as_array().into_iter().flatten() {
                println!("{hook}");
            }
            Ok(())
        }
        _ => {
            println!("{}", response.json::<Value>().await.unwrap_or(Value::Null));
            Ok(())
        }
    }
}

/// Prints the channel's events as JSON lines, following live; reconnects and resumes after the
/// last printed seq if the connection drops.
pub async fn tail(args: TailArgs) -> Result<(), Failure> {
    // http → ws, https → wss.
    let ws_url = format!("{}/v1/ws", args.target.url.replacen("http", "ws", 1));
    let tls = args.target.tls()?;
    let mut after = args.after;
    let mut printed = 0u64;
    let mut compact = args.compact;
    let mut failures = 0u32;
    loop {
        let token = token_for(&args.target).await?;
        match follow(
            (&ws_url, &tls),
            &token,
            &args.channel,
            &mut after,
            compact,
            &mut printed,
            args.count,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(Some(failure)) => return Err(failure),
            Err(None) => {
                // The connection dropped: resume after what was printed, no longer compacted.
                compact = false;
                failures += 1;
                if failures > 30 {
                    return Err(fail(EXIT_UNAVAILABLE, "the connection keeps dropping"));
                }
                tokio::time::sleep(Duration::from_millis(250 * u64::from(failures.min(8)))).await;
            }
        }
    }
}

/// `Err(None)`: dropped, try again; `Err(Some(_))`: give up with that failure.
async fn follow(
    (ws_url, tls): (&str, &std::sync::Arc<rustls::ClientConfig>),
    token: &str,
    channel: &str,
    after: &mut Option<u64>,
    compact: bool,
    printed: &mut u64,
    count: Option<u64>,
) -> Result<(), Option<Failure>> {
    let connector = tokio_tungstenite::Connector::Rustls(tls.clone());
    let (mut ws, _) = match tokio_tungstenite::connect_async_tls_with_config(
        ws_url,
        None,
        false,
        Some(connector),
    )
    .await
    {
        Ok(connected) => connected,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let code = if matches!(response.status().as_u16(), 401 | 403) {
                EXIT_NOPERM
            } else {
                EXIT_UNAVAILABLE
            };
            return Err(Some(fail(
                code,
                format!("WebSocket refused: {}", response.status()),
            )));
        }
        Err(_) if *printed > 0 => return Err(None),
        Err(err) => {
            return Err(Some(fail(
                EXIT_UNAVAILABLE,
                format!("cannot reach the bus at {ws_url}: {err}"),
            )));
        }
    };
    let mut subscribe = json!({"op": "subscribe", "channel": channel});
    if let Some(after) = *after {
        subscribe["after"] = after.into();
        if compact {
            subscribe["compact"] = true.into();
        }
    }
    for frame in [json!({"op": "hello", "token": token}), subscribe] {
        ws.send(Message::text(frame.to_string()))
            .await
            .map_err(|_| None)?;
    }
    while let Some(message) = ws.next().await {
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(frame)) => {
                let code = frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005);
                return match code {
                    4001 => Err(Some(fail(EXIT_NOPERM, "the token was refused or expired"))),
                    _ => Err(None),
                };
            }
            Ok(_) => continue,
            Err(_) => return Err(None),
        };
        let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
        match frame["op"].as_str() {
            Some("subscribed") if after.is_none() => *after = frame["head"].as_u64(),
            Some("event") => {
                let seq = frame["event"]["seq"].as_u64().unwrap_or(0);
                if after.is_some_and(|a| seq <= a) {
                    continue;
                }
                println!("{}", frame["event"]);
                *after = Some(seq);
                *printed += 1;
                if count.is_some_and(|c| *printed >= c) {
                    return Ok(());
                }
            }
            Some("error") => {
                let code = match frame["code"].as_str() {
                    Some("forbidden" | "unauthorized" | "token_expired") => EXIT_NOPERM,
                    Some("invalid_channel" | "after_beyond_head" | "invalid_frame") => EXIT_DATA,
                    Some("unavailable") => return Err(None),
                    _ => 1,
                };
                return Err(Some(fail(
                    code,
                    format!(
                        "{}: {}",
                        frame["code"],
                        frame["message"].as_str().unwrap_or("")
                    ),
                )));
            }
            _ => {}
        }
    }
    Err(None)
}
