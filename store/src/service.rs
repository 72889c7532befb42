//! The gRPC face of the log.

use std::sync::Arc;

use eventbus_model::names::validate_channel;
use eventbus_proto::store as pb;
use eventbus_proto::store::store_server::{Store, StoreServer};
use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::groups::route::{Route, Routes};
use crate::groups::{Changes, GroupError, Groups};
use crate::log::{Entry, LogError};

use eventbus_proto::store::{
    FIRST_SEQ_METADATA, MAX_APPEND_EVENTS, MAX_HEADS, MAX_MESSAGE_BYTES, QUOTA_METADATA,
};

/// The gRPC service over `log`, and its server (which shares it).
pub fn server(log: Arc<dyn Engine>, groups: Routes) -> (Arc<Service>, StoreServer<Service>) {
    let service = Arc::new(Service { log, groups });
    let server = StoreServer::from_arc(service.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    (service, server)
}

pub struct Service {
    log: Arc<dyn Engine>,
    groups: Routes,
}

/// Where a group call goes: served here, or passed on as it is to the replica serving groups.
enum Serve {
    Here(Arc<Groups>),
    /// The replica serving groups: its usual and its long-polling client.
    There(Box<(eventbus_store_client::Grpc, eventbus_store_client::Grpc)>),
}

impl Service {
    fn route(&self) -> Result<Serve, Status> {
        match &*self.groups.borrow() {
            Route::Here(groups) => Ok(Serve::Here(groups.clone())),
            Route::Leader { client, .. } => match (client.grpc(false), client.grpc(true)) {
                (Some(usual), Some(waiting)) => Ok(Serve::There(Box::new((usual, waiting)))),
                // A leader is always another process.
                _ => Err(Status::internal("the groups' leader has no network client")),
            },
            Route::Nobody(why) => Err(Status::unavailable(format!(
                "durable groups are not served right now ({why}); retry"
            ))),
        }
    }
}

fn group_status(err: GroupError) -> Status {
    match err {
        GroupError::Invalid(_) => Status::invalid_argument(err.to_string()),
        GroupError::Mismatch { .. } => Status::failed_precondition(err.to_string()),
        GroupError::NotFound(_) => Status::not_found(err.to_string()),
        GroupError::Log(err) => status(err),
    }
}

fn nonzero<T: Default + PartialEq>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

fn status(err: LogError) -> Status {
    match err {
        LogError::AfterBeyondHead { .. } => Status::out_of_range(err.to_string()),
        LogError::Truncated { first } => {
            let mut status = Status::failed_precondition(err.to_string());
            status
                .metadata_mut()
                .insert(FIRST_SEQ_METADATA, first.into());
            status
        }
        LogError::Invalid(_) => Status::invalid_argument(err.to_string()),
        LogError::Failed | LogError::Unavailable(_) => Status::unavailable(err.to_string()),
        LogError::LowSpace { .. } => Status::resource_exhausted(err.to_string()),
        LogError::Quota { .. } => {
            let mut status = Status::resource_exhausted(err.to_string());
            status
                .metadata_mut()
                .insert(QUOTA_METADATA, "channels".parse().expect("ascii"));
            status
        }
        LogError::Io { .. } | LogError::Corrupt { .. } => Status::internal(err.to_string()),
    }
}

fn check_channel(channel: &str) -> Result<(), Status> {
    validate_channel(channel)
        .map_err(|err| Status::invalid_argument(format!("channel {channel:?}: {err}")))
}

#[tonic::async_trait]
impl Store for Service {
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let events = request.into_inner().events;
        if events.is_empty() {
            return Err(Status::invalid_argument(
                "an append needs at least one event",
            ));
        }
        if events.len() > MAX_APPEND_EVENTS {
            return Err(Status::invalid_argument(format!(
                "an append holds at most {MAX_APPEND_EVENTS} events, got {}",
                events.len()
            )));
        }
        let mut entries = Vec::with_capacity(events.len());
        for (i, event) in events.into_iter().enumerate() {
            check_channel(&event.channel)?;
            if event.id.is_empty() || event.id.len() > 128 {
                return Err(Status::invalid_argument(format!(
                    "event {i}: id must be 1-128 characters"
                )));
            }
            // (channel, source, id) is one key: no part of it may hold the separator.
            if event.id.contains('\n') || event.source.contains('\n') || event.source.len() > 128 {
                return Err(Status::invalid_argument(format!(
                    "event {i}: id and source are single lines, source at most 128 characters"
                )));
            }
            if !(event.body.starts_with(b"{") && event.body.ends_with(b"}")) {
                return Err(Status::invalid_argument(format!(
                    "event {i}: body must be a JSON object"
                )));
            }
            entries.push(Entry {
                channel: event.channel,
                id: event.id,
                source: event.source,
                key: event.key,
                deleted: event.deleted,
                body: event.body,
            });
        }
        let results = self.log.append(entries).await.map_err(status)?;
        Ok(Response::new(pb::AppendResponse {
            results: results
                .into_iter()
                .map(|r| pb::Appended {
                    channel: r.channel,
                    id: r.id,
                    seq: r.seq,
                    duplicate: r.duplicate,
                })
                .collect(),
        }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let request = request.into_inner();
        check_channel(&request.channel)?;
        let limit = if request.limit == 0 {
            100
        } else {
            request.limit as usize
        };
        let result = self
            .log
            .read(&request.channel, request.after, limit, request.compact)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ReadResponse {
            events: result
                .events
                .into_iter()
                .map(|e| pb::StoredEvent {
                    seq: e.seq,
                    json: e.json,
                })
                .collect(),
            head: result.head,
            first: result.first,
        }))
    }

    async fn put_snapshot(
        &self,
        request: Request<pb::PutSnapshotRequest>,
    ) -> Result<Response<pb::PutSnapshotResponse>, Status> {
        let request = request.into_inner();
        check_channel(&request.channel)?;
        if serde_json::from_slice::<serde::de::IgnoredAny>(&request.data).is_err() {
            return Err(Status::invalid_argument("snapshot data must be JSON"));
        }
        self.log
            .put_snapshot(&request.channel, request.seq, request.data)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PutSnapshotResponse {}))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let request = request.into_inner();
        check_channel(&request.channel)?;
        let snapshot = self.log.snapshot(&request.channel).await.map_err(status)?;
        Ok(Response::new(match snapshot {
            Some(snapshot) => pb::GetSnapshotResponse {
                found: true,
                seq: snapshot.seq,
                data: snapshot.data,
            },
            None => pb::GetSnapshotResponse::default(),
        }))
    }

    async fn list_channels(
        &self,
        request: Request<pb::ListChannelsRequest>,
    ) -> Result<Response<pb::ListChannelsResponse>, Status> {
        let request = request.into_inner();
        let limit = (request.limit as usize).clamp(1, 10_000);
        let channels = self
            .log
            .channels(&request.prefix, &request.after, limit)
            .await
            .map_err(status)?
            .into_iter()
            .map(|(channel, head)| pb::ChannelHead { channel, head })
            .collect();
        Ok(Response::new(pb::ListChannelsResponse { channels }))
    }

    async fn group_fetch(
        &self,
        request: Request<pb::GroupFetchRequest>,
    ) -> Result<Response<pb::GroupFetchResponse>, Status> {
        let groups = match self.route()? {
            Serve::Here(groups) => groups,
            Serve::There(clients) => {
                return clients.1.clone().group_fetch(request.into_inner()).await;
            }
        };
        let request = request.into_inner();
        let changes = Changes {
            visibility_ms: nonzero(request.visibility_ms),
            max_deliveries: nonzero(request.max_deliveries),
            prefetch: nonzero(request.prefetch),
        };
        if request.max == 0 {
            groups
                .join(&request.group, &request.pattern, changes)
                .await
                .map_err(group_status)?;
            return Ok(Response::new(pb::GroupFetchResponse { events: Vec::new() }));
        }
        let delivered = groups
            .fetch(
                &request.group,
                &request.pattern,
                &request.member,
                request.max as usize,
                std::time::Duration::from_millis(request.wait_ms),
                changes,
            )
            .await
            .map_err(group_status)?;
        Ok(Response::new(pb::GroupFetchResponse {
            events: delivered
                .into_iter()
                .map(|d| pb::GroupEvent {
                    channel: d.channel,
                    seq: d.seq,
                    json: d.json,
                    deliveries: d.deliveries,
                })
                .collect(),
        }))
    }

    async fn group_done(
        &self,
        request: Request<pb::GroupDoneRequest>,
    ) -> Result<Response<pb::GroupDoneResponse>, Status> {
        let groups = match self.route()? {
            Serve::Here(groups) => groups,
            Serve::There(clients) => {
                return clients.0.clone().group_done(request.into_inner()).await;
            }
        };
        let request = request.into_inner();
        let done: Vec<(String, u64)> = request
            .done
            .into_iter()
            .map(|p| (p.channel, p.seq))
            .collect();
        let pattern = (!request.pattern.is_empty()).then_some(request.pattern.as_str());
        let changed = groups
            .done(&request.group, pattern, &done)
            .map_err(group_status)?;
        Ok(Response::new(pb::GroupDoneResponse {
            done: changed as u32,
        }))
    }

    async fn group_leave(
        &self,
        request: Request<pb::GroupLeaveRequest>,
    ) -> Result<Response<pb::GroupLeaveResponse>, Status> {
        let groups = match self.route()? {
            Serve::Here(groups) => groups,
            Serve::There(clients) => {
                return clients.0.clone().group_leave(request.into_inner()).await;
            }
        };
        let request = request.into_inner();
        groups.leave(&request.group, &request.member);
        Ok(Response::new(pb::GroupLeaveResponse {}))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let groups = match self.route()? {
            Serve::Here(groups) => groups,
            Serve::There(clients) => {
                return clients.0.clone().list_groups(request.into_inner()).await;
            }
        };
        let groups = groups
            .list()
            .await
            .map_err(group_status)?
            .into_iter()
            .map(|g| pb::GroupInfo {
                name: g.name,
                pattern: g.pattern,
                visibility_ms: g.settings.visibility_ms,
                max_deliveries: g.settings.max_deliveries,
                prefetch: g.settings.prefetch,
                backlog: g.stats.backlog,
                in_flight: g.stats.in_flight,
                dead: g.stats.dead,
                members: g.stats.members as u32,
                channels: g
                    .positions
                    .into_iter()
                    .map(|(channel, position, head)| pb::ChannelPosition {
                        channel,
                        position,
                        head,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn reset_group(
        &self,
        request: Request<pb::ResetGroupRequest>,
    ) -> Result<Response<pb::ResetGroupResponse>, Status> {
        let groups = match self.route()? {
            Serve::Here(groups) => groups,
            Serve::There(clients) => {
                return clients.0.clone().reset_group(request.into_inner()).await;
            }
        };
        let request = request.into_inner();
        let channel = (!request.channel.is_empty()).then_some(request.channel.as_str());
        let to = request.to_seq.then_some(request.seq);
        groups
            .reset(&request.group, channel, to)
            .await
            .map_err(group_status)?;
        Ok(Response::new(pb::ResetGroupResponse {}))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let groups = match self.route()? {
            Serve::Here(groups) => groups,
            Serve::There(clients) => {
                return clients.0.clone().delete_group(request.into_inner()).await;
            }
        };
        groups
            .delete(&request.into_inner().group)
            .await
            .map_err(group_status)?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn head(
        &self,
        request: Request<pb::HeadRequest>,
    ) -> Result<Response<pb::HeadResponse>, Status> {
        let request = request.into_inner();
        check_channel(&request.channel)?;
        let (first, head) = self.log.bounds(&request.channel).await.map_err(status)?;
        Ok(Response::new(pb::HeadResponse { head, first }))
    }

    async fn heads(
        &self,
        request: Request<pb::HeadsRequest>,
    ) -> Result<Response<pb::HeadsResponse>, Status> {
        let channels = request.into_inner().channels;
        if channels.len() > MAX_HEADS {
            return Err(Status::invalid_argument(format!(
                "a heads request names at most {MAX_HEADS} channels, got {}",
                channels.len()
            )));
        }
        for channel in &channels {
            check_channel(channel)?;
        }
        let heads = self.log.heads(&channels).await.map_err(status)?;
        Ok(Response::new(pb::HeadsResponse { heads }))
    }
}
