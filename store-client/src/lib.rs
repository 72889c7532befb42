//! The store as its callers (ingest, gateway) see it: a typed gRPC client whose errors say what the
//! caller should do (retry later, or fix the request); and what services build on it: the bus's
//! own events ([`StoreClient::append_own`]) and a [`lease::Lease`] that lets one replica of many
//! act at a time.

mod coalesce;
pub mod lease;

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use eventbus_model::{Accepted, Appended, StoredEvent};
use eventbus_proto::store as pb;
use eventbus_proto::store::store_client::StoreClient as GrpcClient;
use eventbus_runtime::internal::Credential;
use eventbus_runtime::tls::Trust;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use eventbus_proto::store::{FIRST_SEQ_METADATA, MAX_HEADS, MAX_MESSAGE_BYTES, QUOTA_METADATA};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Not stored (or not read): the store is unreachable or overloaded; retrying is safe.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    OutOfRange(String),
    /// The events asked for are no longer retained; `first` is the first one that is.
    #[error("{message}")]
    Truncated { first: u64, message: String },
    #[error("the store refused the request: {0}")]
    Invalid(String),
    /// What the request names does not exist (a durable group).
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts what exists (a group's pattern).
    #[error("{0}")]
    Conflict(String),
    #[error("store error: {0}")]
    Internal(String),
    /// Not stored: the store refused it for now (its disk is nearly full); retrying later is safe.
    #[error("{0}")]
    Refused(String),
    /// Not stored: the publisher is at its quota of channels; retrying will not help.
    #[error("{0}")]
    Quota(String),
    /// An append whose answer never came (timeout, lost connection, a writer that failed mid-write):
    /// the events may or may not be stored. Retrying with the same ids is safe and tells which.
    #[error(
        "the outcome is unknown ({0}): the events may or may not be stored; retry with the same ids (a stored event is answered as a duplicate)"
    )]
    Unknown(String),
}

impl From<tonic::Status> for StoreError {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_owned();
        let first = status
            .metadata()
            .get(FIRST_SEQ_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        if status.code() == tonic::Code::ResourceExhausted
            && status.metadata().contains_key(QUOTA_METADATA)
        {
            return StoreError::Quota(message);
        }
        match (status.code(), first) {
            (tonic::Code::FailedPrecondition, Some(first)) => {
                StoreError::Truncated { first, message }
            }
            _ => Self::from_code(status.code(), message),
        }
    }
}

impl StoreError {
    fn from_code(code: tonic::Code, message: String) -> Self {
        match code {
            tonic::Code::OutOfRange => StoreError::OutOfRange(message),
            tonic::Code::NotFound => StoreError::NotFound(message),
            tonic::Code::FailedPrecondition => StoreError::Conflict(message),
            tonic::Code::InvalidArgument => StoreError::Invalid(message),
            tonic::Code::ResourceExhausted | tonic::Code::Unauthenticated => {
                StoreError::Refused(message)
            }
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                StoreError::Unavailable(message)
            }
            _ => StoreError::Internal(message),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Page {
    pub events: Vec<StoredEvent>,
    pub head: u64,
    /// The first retained seq of the channel.
    pub first: u64,
}

/// The source of the events the bus writes itself.
pub const OWN_SOURCE: &str = "eventbus";

/// The generated gRPC client, with the internal credential on every call.
pub type Grpc = GrpcClient<InterceptedService<Channel, Credential>>;

#[derive(Clone)]
pub struct StoreClient {
    transport: Transport,
}

// A few clients per process: the size of the network variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Transport {
    Network {
        inner: Grpc,
        /// For calls that wait by design (a group fetch long-polls), past the usual timeout.
        waiting: Grpc,
        /// Appends go through one task that combines those made at the same time
        /// ([`coalesce`]); started at the first append, shared by every clone.
        appends: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<coalesce::Waiting>>>,
        /// The longest an append waits for its answer, queued or on the wire.
        timeout: Duration,
    },
    InProcess {
        store: InProcess,
        timeout: Duration,
    },
}

/// One call of the store's gRPC API, over the network or in this process: the same request, the
/// same answer and the same errors either way. `waiting` for calls that long-poll.
macro_rules! rpc {
    ($client:expr, $method:ident, $request:expr) => {
        rpc!($client, $method, $request, false)
    };
    ($client:expr, $method:ident, $request:expr, $waiting:expr) => {{
        let request = $request;
        match &$client.transport {
            Transport::Network { inner, waiting, .. } => {
                let mut grpc = if $waiting {
                    waiting.clone()
                } else {
                    inner.clone()
                };
                grpc.$method(request).await
            }
            Transport::InProcess { store, timeout } => {
                let limit = if $waiting {
                    MAX_GROUP_WAIT + *timeout
                } else {
                    *timeout
                };
                store
                    .call(limit, move |service| async move {
                        service.$method(tonic::Request::new(request)).await
                    })
                    .await
            }
        }
    }};
}

/// The store's gRPC service running in this process (the all-in-one bus), for clients that call
/// it directly: no encoding, no loopback connection, no hop between tasks, and still the one API
/// with its checks and error mapping, so both deployments behave alike.
///
/// The store opens it once it serves and closes it when it stops; calls outside that time are
/// refused as unavailable, like calls to a store that is down.
#[derive(Clone, Default)]
pub struct InProcess(Arc<InProcessState>);

#[derive(Default)]
struct InProcessState {
    service: RwLock<Option<Arc<dyn pb::store_server::Store>>>,
    calls: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InProcess")
    }
}

impl InProcess {
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls made from now on reach `service`.
    pub fn open(&self, service: Arc<dyn pb::store_server::Store>) {
        *self
            .0
            .service
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(service);
    }

    /// Calls made from now on are refused; returns once the calls in flight are answered (and
    /// so no longer hold the service, or the log behind it).
    pub async fn close(&self) {
        self.0
            .service
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.0.calls.close();
        self.0.calls.wait().await;
    }

    async fn call<T, F, A>(
        &self,
        limit: Duration,
        call: F,
    ) -> Result<tonic::Response<T>, tonic::Status>
    where
        F: FnOnce(Arc<dyn pb::store_server::Store>) -> A,
        A: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        // Counted before the service is taken, so that `close` cannot miss a call that has it.
        let _in_flight = self.0.calls.token();
        let service = self
            .0
            .service
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(service) = service else {
            return Err(tonic::Status::unavailable("the store is not serving"));
        };
        tokio::time::timeout(limit, call(service))
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(format!(
                    "the store did not answer within {} ms",
                    limit.as_millis()
                )))
            })
    }
}

/// Longest a group fetch may wait (the store caps it too).
pub const MAX_GROUP_WAIT: Duration = Duration::from_secs(60);

/// An event handed to a member of a durable group.
#[derive(Debug, Clone)]
pub struct GroupEvent {
    pub channel: String,
    pub seq: u64,
    /// The stored event's JSON, with its seq.
    pub json: bytes::Bytes,
    /// 1 the first time it is handed out.
    pub deliveries: u32,
}

/// A group's settings a fetch may change (None: keep the group's).
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupSettings {
    pub visibility_ms: Option<u64>,
    pub max_deliveries: Option<u32>,
    pub prefetch: Option<u32>,
}

pub use pb::GroupInfo;

impl StoreClient {
    /// A client of the store at `url` (e.g. `http://127.0.0.1:7001`); it dials lazily and redials
    /// after failures, so callers start even while the store is down.
    /// Every call carries `credential`, the internal credential the store demands.
    /// An `https://` URL is dialled over TLS, trusting `trust`.
    pub fn new(url: &str, credential: Credential, trust: &Trust) -> Result<Self, StoreError> {
        Self::with_timeout(url, credential, trust, Duration::from_secs(10))
    }

    /// The store as a service reaches it: the URL, credential, trust and timeout of its upstream
    /// settings.
    /// With `in_process`, the store serving in this process instead (same timeout).
    pub fn for_upstream(
        upstream: &eventbus_runtime::upstream::Args,
        in_process: Option<&InProcess>,
    ) -> Result<Self, StoreError> {
        if let Some(store) = in_process {
            return Ok(Self::in_process(store.clone(), upstream.store_timeout()));
        }
        let credential = upstream.credential().map_err(StoreError::Invalid)?;
        Self::with_timeout(
            &upstream.store_url,
            credential,
            &upstream.trust,
            upstream.store_timeout(),
        )
    }

    /// As [`StoreClient::new`], waiting at most `timeout` for each answer.
    pub fn with_timeout(
        url: &str,
        credential: Credential,
        trust: &Trust,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let client = |timeout: Duration| -> Result<Grpc, StoreError> {
            let endpoint = eventbus_runtime::tls::grpc_endpoint(url, trust)
                .map_err(|err| StoreError::Invalid(format!("store url {url:?}: {err}")))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(timeout)
                .tcp_nodelay(true);
            Ok(
                GrpcClient::with_interceptor(endpoint.connect_lazy(), credential.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
        };
        Ok(Self {
            transport: Transport::Network {
                inner: client(timeout)?,
                waiting: client(MAX_GROUP_WAIT + timeout)?,
                appends: Default::default(),
                timeout,
            },
        })
    }

    /// A client of the store serving in this process through `store`, waiting at most `timeout`
    /// for each answer (as over the network).
    pub fn in_process(store: InProcess, timeout: Duration) -> Self {
        Self {
            transport: Transport::InProcess { store, timeout },
        }
    }

    /// The gRPC client itself, for passing requests on as they are (a store replica forwarding
    /// group calls to the one serving the groups); `waiting` for calls that long-poll. None for
    /// a client of the store in this process.
    pub fn grpc(&self, waiting: bool) -> Option<Grpc> {
        match &self.transport {
            Transport::Network {
                inner, waiting: w, ..
            } => Some(if waiting { w.clone() } else { inner.clone() }),
            Transport::InProcess { .. } => None,
        }
    }

    /// Appends validated events; resolves once every one is durable.
    pub async fn append(&self, events: Vec<Accepted>) -> Result<Vec<Appended>, StoreError> {
        let events: Vec<pb::EventRecord> = events
            .into_iter()
            .map(|e| pb::EventRecord {
                channel: e.channel,
                id: e.id,
                body: e.body.into(),
                key: e.key,
                deleted: e.deleted,
                source: e.source,
            })
            .collect();
        let results = match &self.transport {
            // Batches are already worth their call: only small appends wait to be combined.
            Transport::Network {
                inner,
                appends,
                timeout,
                ..
            } if events.len() <= coalesce::SMALL => {
                let queue = appends.get_or_init(|| {
                    let (queue, waiting) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(coalesce::run(inner.clone(), waiting));
                    queue
                });
                let (answer, answered) = tokio::sync::oneshot::channel();
                queue
                    .send(coalesce::Waiting { events, answer })
                    .map_err(|_| StoreError::Unavailable("the append queue is gone".into()))?;
                // Queued behind busy calls or on the wire: either way no longer than one call
                // may take; it may still be stored later, so the outcome is unknown.
                match tokio::time::timeout(*timeout, answered).await {
                    Ok(Ok(answer)) => answer?,
                    Ok(Err(_)) => {
                        return Err(StoreError::Unknown(
                            "the append was dropped before its answer".into(),
                        ));
                    }
                    Err(_) => {
                        return Err(StoreError::Unknown(format!(
                            "no answer within {} ms",
                            timeout.as_millis()
                        )));
                    }
                }
            }
            _ => {
                rpc!(self, append, pb::AppendRequest { events })
                    .map_err(append_error)?
                    .into_inner()
                    .results
            }
        };
        Ok(results
            .into_iter()
            .map(|r| Appended {
                channel: r.channel,
                id: r.id,
                seq: r.seq,
                duplicate: r.duplicate,
            })
            .collect())
    }

    /// Appends one of the bus's own events (source `eventbus`) to `channel`: the state of the
    /// services kept in the store, and the events they write (presence). Returns its seq.
    pub async fn append_own(
        &self,
        channel: &str,
        kind: &str,
        key: Option<&str>,
        data: serde_json::Value,
        deleted: bool,
    ) -> Result<u64, StoreError> {
        let mut event = serde_json::json!({"channel": channel, "type": kind, "data": data});
        if let Some(key) = key {
            event["key"] = key.into();
        }
        if deleted {
            event["deleted"] = true.into();
        }
        // The bus's own state may be larger than what publishers are allowed.
        let limits = eventbus_model::Limits {
            max_event_bytes: 1024 * 1024,
        };
        let accepted =
            eventbus_model::parse_event(event.to_string().as_bytes(), OWN_SOURCE, &limits)
                .map_err(|err| StoreError::Invalid(err.to_string()))?;
        let appended = self.append(vec![accepted]).await?;
        Ok(appended.first().map_or(0, |a| a.seq))
    }

    /// Up to `max` events for `member` of durable group `group` (created over `pattern` when
    /// new), waiting up to `wait` for some.
    pub async fn group_fetch(
        &self,
        group: &str,
        pattern: &str,
        member: &str,
        max: u32,
        wait: Duration,
        settings: GroupSettings,
    ) -> Result<Vec<GroupEvent>, StoreError> {
        let wait = wait.min(MAX_GROUP_WAIT);
        let response = rpc!(
            self,
            group_fetch,
            pb::GroupFetchRequest {
                group: group.to_owned(),
                pattern: pattern.to_owned(),
                member: member.to_owned(),
                max,
                wait_ms: wait.as_millis() as u64,
                visibility_ms: settings.visibility_ms.unwrap_or(0),
                max_deliveries: settings.max_deliveries.unwrap_or(0),
                prefetch: settings.prefetch.unwrap_or(0),
            },
            true
        )?
        .into_inner();
        Ok(response
            .events
            .into_iter()
            .map(|e| GroupEvent {
                channel: e.channel,
                seq: e.seq,
                json: e.json,
                deliveries: e.deliveries,
            })
            .collect())
    }

    /// A member of `group` (which must follow `pattern`, when given) is done with these events;
    /// how many were not done before.
    pub async fn group_done(
        &self,
        group: &str,
        pattern: Option<&str>,
        done: &[(String, u64)],
    ) -> Result<u32, StoreError> {
        let response = rpc!(
            self,
            group_done,
            pb::GroupDoneRequest {
                group: group.to_owned(),
                pattern: pattern.unwrap_or_default().to_owned(),
                done: done
                    .iter()
                    .map(|(channel, seq)| pb::Position {
                        channel: channel.clone(),
                        seq: *seq,
                    })
                    .collect(),
            }
        )?
        .into_inner();
        Ok(response.done)
    }

    /// `member` of `group` is gone: what it held goes to the others.
    pub async fn group_leave(&self, group: &str, member: &str) -> Result<(), StoreError> {
        rpc!(
            self,
            group_leave,
            pb::GroupLeaveRequest {
                group: group.to_owned(),
                member: member.to_owned(),
            }
        )?;
        Ok(())
    }

    pub async fn groups(&self) -> Result<Vec<GroupInfo>, StoreError> {
        Ok(rpc!(self, list_groups, pb::ListGroupsRequest {})?
            .into_inner()
            .groups)
    }

    /// Moves `group`'s position in `channel` (every channel when `None`) to `to` (the head when
    /// `None`).
    pub async fn reset_group(
        &self,
        group: &str,
        channel: Option<&str>,
        to: Option<u64>,
    ) -> Result<(), StoreError> {
        rpc!(
            self,
            reset_group,
            pb::ResetGroupRequest {
                group: group.to_owned(),
                channel: channel.unwrap_or_default().to_owned(),
                to_seq: to.is_some(),
                seq: to.unwrap_or(0),
            }
        )?;
        Ok(())
    }

    pub async fn delete_group(&self, group: &str) -> Result<(), StoreError> {
        rpc!(
            self,
            delete_group,
            pb::DeleteGroupRequest {
                group: group.to_owned(),
            }
        )?;
        Ok(())
    }

    pub async fn read(
        &self,
        channel: &str,
        after: u64,
        limit: u32,
        compact: bool,
    ) -> Result<Page, StoreError> {
        let response = rpc!(
            self,
            read,
            pb::ReadRequest {
                channel: channel.to_owned(),
                after,
                limit,
                compact,
            }
        )?
        .into_inner();
        Ok(Page {
            head: response.head,
            first: response.first,
            events: response
                .events
                .into_iter()
                .map(|e| StoredEvent {
                    channel: channel.to_owned(),
                    seq: e.seq,
                    json: e.json,
                    committed_ms: 0,
                })
                .collect(),
        })
    }

    /// Up to `limit` channels starting with `prefix` after `after` (name order), with heads.
    pub async fn channels(
        &self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let response = rpc!(
            self,
            list_channels,
            pb::ListChannelsRequest {
                prefix: prefix.to_owned(),
                after: after.to_owned(),
                limit,
            }
        )?
        .into_inner();
        Ok(response
            .channels
            .into_iter()
            .map(|c| (c.channel, c.head))
            .collect())
    }

    pub async fn head(&self, channel: &str) -> Result<u64, StoreError> {
        Ok(self.bounds(channel).await?.1)
    }

    /// The heads of `channels`, in their order (0 for a channel with no events): one call per
    /// [`MAX_HEADS`] channels rather than one per channel.
    pub async fn heads(&self, channels: &[String]) -> Result<Vec<u64>, StoreError> {
        let mut heads = Vec::with_capacity(channels.len());
        for chunk in channels.chunks(MAX_HEADS) {
            let response = rpc!(
                self,
                heads,
                pb::HeadsRequest {
                    channels: chunk.to_vec(),
                }
            )?
            .into_inner();
            if response.heads.len() != chunk.len() {
                return Err(StoreError::Internal(format!(
                    "asked for the heads of {} channels, got {}",
                    chunk.len(),
                    response.heads.len()
                )));
            }
            heads.extend(response.heads);
        }
        Ok(heads)
    }

    /// The first retained seq and the head of a channel.
    pub async fn bounds(&self, channel: &str) -> Result<(u64, u64), StoreError> {
        let response = rpc!(
            self,
            head,
            pb::HeadRequest {
                channel: channel.to_owned(),
            }
        )?
        .into_inner();
        Ok((response.first, response.head))
    }

    /// Stores `data` (JSON text) as the state of `channel` as of `seq`.
    pub async fn put_snapshot(
        &self,
        channel: &str,
        seq: u64,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        rpc!(
            self,
            put_snapshot,
            pb::PutSnapshotRequest {
                channel: channel.to_owned(),
                seq,
                data: data.into(),
            }
        )?;
        Ok(())
    }

    /// The latest snapshot of `channel`: its seq and JSON text.
    pub async fn snapshot(&self, channel: &str) -> Result<Option<(u64, bytes::Bytes)>, StoreError> {
        let response = rpc!(
            self,
            get_snapshot,
            pb::GetSnapshotRequest {
                channel: channel.to_owned(),
            }
        )?
        .into_inner();
        Ok(response.found.then_some((response.seq, response.data)))
    }
}

/// An append's error: one that may have happened after the events were written is an unknown
/// outcome, not a refusal.
fn append_error(status: tonic::Status) -> StoreError {
    match StoreError::from(status) {
        StoreError::Unavailable(cause) | StoreError::Internal(cause) => StoreError::Unknown(cause),
        known => known,
    }
}

/// What a caller of the HTTP API is told for a store error, the same everywhere: retry later (503,
/// with `outcome` when an append may or may not be stored), over quota (429), or the request's
/// fault (400), or history let go (410 with `first_seq`).
impl From<StoreError> for eventbus_runtime::problem::Problem {
    fn from(err: StoreError) -> Self {
        use eventbus_runtime::problem::{Kind, Problem};
        match err {
            StoreError::Unavailable(_) | StoreError::Internal(_) => {
                tracing::warn!(cause = %err, "store call failed");
                Problem::new(
                    Kind::Unavailable,
                    format!("the store could not answer; retry: {err}"),
                )
            }
            StoreError::Quota(message) => {
                let mut problem =
                    Problem::new(Kind::Overloaded, message).with("outcome", "not-stored");
                problem.retry_after_s = None;
                problem
            }
            StoreError::Refused(message) => {
                tracing::warn!(cause = %message, "store refused the append");
                Problem::new(Kind::Unavailable, message).with("outcome", "not-stored")
            }
            StoreError::Unknown(_) => {
                tracing::warn!(cause = %err, "append outcome unknown");
                Problem::new(Kind::Unavailable, err.to_string()).with("outcome", "unknown")
            }
            StoreError::OutOfRange(message) => Problem::new(Kind::InvalidRequest, message),
            StoreError::Truncated { first, message } => {
                Problem::new(Kind::Truncated, message).with("first_seq", first)
            }
            StoreError::Invalid(message) => Problem::new(Kind::InvalidRequest, message),
            StoreError::NotFound(message) => Problem::new(Kind::NotFound, message),
            StoreError::Conflict(message) => Problem::new(Kind::Conflict, message),
        }
    }
}
