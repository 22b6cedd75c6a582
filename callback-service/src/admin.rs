//! The `recheck.v1.Admin` gRPC service: inspect, list, redrive, stats.

use std::sync::{Arc, atomic::Ordering};

use recheck::{Publisher, Topology, message::now_ms};
use recheck_proto::v1::{
    self as pb, GetMessageRequest, GetMessageResponse, ListMessagesRequest, ListMessagesResponse,
    RecheckRequest, RecheckResponse, RedriveManyRequest, RedriveManyResponse, RedriveRequest,
    RedriveResponse, StatsRequest, StatsResponse, admin_server,
};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status as GrpcStatus};

use crate::{
    failure::HandleError,
    reconcile::CheckCounters,
    store::{MessageRow, Status, Store, StoreError},
    sweeper::publish_rows,
};

pub struct AdminService {
    pub store: Arc<Store>,
    pub publisher: Publisher,
    pub topology: Topology,
    pub checks: Arc<CheckCounters>,
}

impl AdminService {
    /// The server, answering `UNAUTHENTICATED` unless the caller presents one of `auth`'s tokens
    /// (every call passes when `auth` has none).
    pub fn into_server(
        self,
        auth: recheck::BearerAuth,
    ) -> InterceptedService<admin_server::AdminServer<Self>, recheck::BearerAuth> {
        admin_server::AdminServer::with_interceptor(self, auth)
    }
}

/// Why a redrive (one or many) or a recheck did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("{0} is not failed or rejected, or its CHECK has not arrived (or it is unknown)")]
    NotRedrivable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The row is redriven and due; the sweeper publishes its CHECK if nobody else does.
    #[error("publishing the redrive's CHECK: {0} (the sweeper publishes it later)")]
    Publish(#[from] HandleError),
}

/// Redrive, for the `Redrive` RPC and the dashboard alike: `failed` / `rejected` → `pending` at a
/// new attempt with a fresh resend budget, due now, then that attempt's CHECK (shortest tier),
/// whose resend does the rest. Committed before the publish: if the publish fails, the row is
/// overdue and the sweeper publishes its CHECK, so a failed publish strands nothing.
#[tracing::instrument(skip(store, publisher, topology))]
pub async fn redrive(
    store: &Store,
    publisher: &Publisher,
    topology: &Topology,
    message_id: &str,
) -> Result<MessageRow, RedriveError> {
    let row =
        store.redrive(message_id).await?.ok_or_else(|| RedriveError::NotRedrivable(message_id.into()))?;
    publish_rows(publisher, topology, std::slice::from_ref(&row)).await?;
    tracing::info!(attempt = row.attempt, "redriven");
    Ok(row)
}

/// Most messages one bulk redrive or recheck takes, and how many when none is given.
pub const MAX_BULK: u32 = 10_000;
pub const DEFAULT_BULK: u32 = 1_000;

/// What a bulk redrive or recheck did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bulk {
    /// The messages it took (redriven, or their CHECK published now).
    pub ids: Vec<String>,
    /// More matched than its limit: run it again.
    pub more: bool,
}

/// Redrive of every `status` message (failed or rejected; of `producer` if given, changed at or
/// after `since` ms), at most `limit`: each as [`redrive`] does it (a message that a confirm or
/// another redrive took meanwhile is skipped), then their CHECKs in a few messages. Idempotent:
/// what was redriven is pending, so running it again takes only what is still in `status`.
#[tracing::instrument(skip(store, publisher, topology))]
pub async fn redrive_many(
    store: &Store,
    publisher: &Publisher,
    topology: &Topology,
    status: Status,
    producer: Option<&str>,
    since: i64,
    limit: u32,
) -> Result<Bulk, RedriveError> {
    let limit = limit as usize;
    let mut ids = store.redrivable(status, producer, since, limit + 1).await?;
    let more = ids.len() > limit;
    ids.truncate(limit);
    let mut rows = Vec::with_capacity(ids.len());
    for id in &ids {
        rows.extend(store.redrive(id).await?);
    }
    // Committed and due now: if this publish fails, the sweeper publishes them.
    publish_rows(publisher, topology, &rows).await?;
    tracing::info!(redriven = rows.len(), more, "bulk redrive");
    Ok(Bulk { ids: rows.into_iter().map(|r| r.message_id).collect(), more })
}

/// "Check now": publishes the CHECKs of up to `limit` open messages of `producer` on the shortest
/// tier, so a message waiting out a long backoff (after the producer's outage, say) is checked in
/// seconds. Each check that arrives is handled as usual; the one still waiting in its tier then
/// finds its attempt taken and does nothing.
#[tracing::instrument(skip(store, publisher, topology))]
pub async fn recheck(
    store: &Store,
    publisher: &Publisher,
    topology: &Topology,
    producer: &str,
    limit: u32,
) -> Result<Bulk, RedriveError> {
    // Due now: if the CHECKs never come, the sweeper publishes them again.
    let rows = store.claim_producer(producer, now_ms(), limit as usize).await?;
    publish_rows(publisher, topology, &rows).await?;
    tracing::info!(rechecked = rows.len(), "recheck");
    let more = rows.len() == limit as usize;
    Ok(Bulk { ids: rows.into_iter().map(|r| r.message_id).collect(), more })
}

/// Most messages one `ListMessages` page holds.
pub const MAX_PAGE: u32 = 1_000;

/// A request's message id must be a UUID (any version): anything else is the caller's mistake,
/// not an unknown message.
fn message_id(id: &str) -> Result<(), GrpcStatus> {
    uuid::Uuid::parse_str(id)
        .map(|_| ())
        .map_err(|_| GrpcStatus::invalid_argument(format!("message_id {id:?} is not a UUID")))
}

/// A bulk request's limit: 0 is the default, above [`MAX_BULK`] is refused.
fn bulk_limit(limit: u32) -> Result<u32, GrpcStatus> {
    match limit {
        0 => Ok(DEFAULT_BULK),
        n if n > MAX_BULK => Err(GrpcStatus::invalid_argument(format!("limit {n} is over {MAX_BULK}"))),
        n => Ok(n),
    }
}

fn internal(e: impl std::fmt::Display) -> GrpcStatus {
    GrpcStatus::internal(e.to_string())
}

pub fn status_to_pb(s: Status) -> pb::MessageStatus {
    match s {
        Status::Pending => pb::MessageStatus::Pending,
        Status::Confirmed => pb::MessageStatus::Confirmed,
        Status::Resent => pb::MessageStatus::Resent,
        Status::Void => pb::MessageStatus::Void,
        Status::Failed => pb::MessageStatus::Failed,
        Status::Rejected => pb::MessageStatus::Rejected,
        Status::Unused => pb::MessageStatus::Unused,
    }
}

fn status_from_pb(s: pb::MessageStatus) -> Option<Status> {
    Status::ALL.into_iter().find(|st| status_to_pb(*st) == s)
}

fn message_to_pb(row: MessageRow) -> pb::Message {
    pb::Message {
        status: status_to_pb(row.status).into(),
        awaiting_check: row.awaiting_check(),
        message_id: row.message_id,
        producer: row.producer,
        routing_key: row.routing_key,
        business_key: row.business_key,
        expect: row.expect.unwrap_or_default(),
        attempt: row.attempt,
        resend_count: row.resend_count,
        next_check_at: row.next_check_at,
        last_error: row.last_error.unwrap_or_default(),
        published_at: row.published_at,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

fn outcome_to_pb(o: recheck::message::Outcome) -> pb::ConfirmOutcome {
    match o {
        recheck::message::Outcome::Processed => pb::ConfirmOutcome::Processed,
        recheck::message::Outcome::Duplicate => pb::ConfirmOutcome::Duplicate,
        recheck::message::Outcome::Rejected => pb::ConfirmOutcome::Rejected,
    }
}

#[tonic::async_trait]
impl admin_server::Admin for AdminService {
    #[tracing::instrument(skip_all, fields(message_id = %request.get_ref().message_id))]
    async fn get_message(
        &self,
        request: Request<GetMessageRequest>,
    ) -> Result<Response<GetMessageResponse>, GrpcStatus> {
        let id = &request.get_ref().message_id;
        message_id(id)?;
        let (row, confirms, history) = self
            .store
            .details(id)
            .await
            .map_err(internal)?
            .ok_or_else(|| GrpcStatus::not_found(format!("no message {id}")))?;
        Ok(Response::new(GetMessageResponse {
            message: Some(message_to_pb(row)),
            confirms: confirms
                .into_iter()
                .map(|c| pb::ConfirmRecord {
                    consumer: c.consumer,
                    outcome: outcome_to_pb(c.outcome).into(),
                    detail: c.detail.unwrap_or_default(),
                    processed_at: c.processed_at,
                })
                .collect(),
            history: history
                .into_iter()
                .map(|t| pb::Transition {
                    at: t.at,
                    from: t.from.map_or(pb::MessageStatus::Unspecified, status_to_pb).into(),
                    to: status_to_pb(t.to).into(),
                    attempt: t.attempt,
                    reason: t.reason,
                })
                .collect(),
        }))
    }

    async fn list_messages(
        &self,
        request: Request<ListMessagesRequest>,
    ) -> Result<Response<ListMessagesResponse>, GrpcStatus> {
        let req = request.into_inner();
        let status = match pb::MessageStatus::try_from(req.status) {
            Ok(pb::MessageStatus::Unspecified) => None,
            Ok(s) => status_from_pb(s),
            Err(_) => {
                return Err(GrpcStatus::invalid_argument(format!(
                    "status {} is not a MessageStatus",
                    req.status
                )));
            }
        };
        let page_size = match req.page_size {
            0 => 100,
            n if n > MAX_PAGE => {
                return Err(GrpcStatus::invalid_argument(format!("page_size {n} is over {MAX_PAGE}")));
            }
            n => n,
        };
        let (rows, next) = self.store.list(status, page_size, &req.page_token).await.map_err(internal)?;
        Ok(Response::new(ListMessagesResponse {
            messages: rows.into_iter().map(message_to_pb).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all, fields(message_id = %request.get_ref().message_id))]
    async fn redrive(
        &self,
        request: Request<RedriveRequest>,
    ) -> Result<Response<RedriveResponse>, GrpcStatus> {
        let id = &request.get_ref().message_id;
        message_id(id)?;
        let row = redrive(&self.store, &self.publisher, &self.topology, id).await.map_err(|e| match e {
            RedriveError::NotRedrivable(_) => GrpcStatus::failed_precondition(e.to_string()),
            e => internal(e),
        })?;
        Ok(Response::new(RedriveResponse { message: Some(message_to_pb(row)) }))
    }

    async fn redrive_many(
        &self,
        request: Request<RedriveManyRequest>,
    ) -> Result<Response<RedriveManyResponse>, GrpcStatus> {
        let req = request.into_inner();
        let status = match req.status() {
            pb::MessageStatus::Failed => Status::Failed,
            pb::MessageStatus::Rejected => Status::Rejected,
            other => {
                let name = other.as_str_name();
                return Err(GrpcStatus::invalid_argument(format!(
                    "status {name}: only MESSAGE_STATUS_FAILED or MESSAGE_STATUS_REJECTED can be redriven"
                )));
            }
        };
        let limit = bulk_limit(req.limit)?;
        let producer = Some(req.producer.as_str()).filter(|p| !p.is_empty());
        let bulk =
            redrive_many(&self.store, &self.publisher, &self.topology, status, producer, req.since, limit)
                .await
                .map_err(internal)?;
        Ok(Response::new(RedriveManyResponse { message_ids: bulk.ids, more: bulk.more }))
    }

    async fn recheck(
        &self,
        request: Request<RecheckRequest>,
    ) -> Result<Response<RecheckResponse>, GrpcStatus> {
        let req = request.into_inner();
        if req.producer.is_empty() {
            return Err(GrpcStatus::invalid_argument("producer is required"));
        }
        let limit = bulk_limit(req.limit)?;
        let bulk = recheck(&self.store, &self.publisher, &self.topology, &req.producer, limit)
            .await
            .map_err(internal)?;
        Ok(Response::new(RecheckResponse { message_ids: bulk.ids, more: bulk.more }))
    }

    async fn stats(&self, _request: Request<StatsRequest>) -> Result<Response<StatsResponse>, GrpcStatus> {
        let counts = self.store.counts().await.map_err(internal)?;
        let (confirms, resends) = self.store.activity_since(now_ms() - 60_000).await.map_err(internal)?;
        Ok(Response::new(StatsResponse {
            total: counts.total(),
            awaiting_check: counts.awaiting_check,
            counts: counts
                .by_status
                .into_iter()
                .map(|(s, count)| pb::StatusCount { status: status_to_pb(s).into(), count })
                .collect(),
            confirms_per_second: confirms as f64 / 60.0,
            resends_per_second: resends as f64 / 60.0,
            // Checks are counted by this instance since it started.
            checks_per_second: self.checks.checks.load(Ordering::Relaxed) as f64
                / self.checks.started.elapsed().as_secs_f64().max(1.0),
        }))
    }
}
