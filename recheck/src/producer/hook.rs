//! Serving `recheck.v1.ResendHook`: the producer implements [`ResendSource`]
//! (message id → payload); the SDK republishes and answers with a typed outcome, for one id
//! (`Resend`) or many (`ResendBatch`: [`ResendHookService::handle_batch`]).

mod batch;

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

pub use batch::MAX_BATCH_ENTRIES;
use recheck_proto::v1::{
    ResendBatchRequest, ResendBatchResponse, ResendOutcome, ResendRequest, ResendResponse,
    resend_hook_server::{ResendHook, ResendHookServer},
};
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};
use tracing::Instrument;
use uuid::Uuid;

use crate::{producer::Producer, security::auth::BearerAuth, telemetry::trace, wire::message::now_ms};

pub use crate::error::BoxError;

/// What the producer's store knows of a message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Committed: this is the payload to publish again.
    Found(Vec<u8>),
    /// No committed record (yet, or ever: the grace period decides).
    NotCommitted,
}

/// The one lookup a producer team writes.
pub trait ResendSource: Send + Sync + 'static {
    /// Finds `message_id` (prepared with `business_key`) in the producer's store:
    /// [`Lookup::Found`] with the payload committed with it, else [`Lookup::NotCommitted`]. An
    /// `Err` is answered RETRY_LATER, so the callback service asks again later.
    fn load(
        &self,
        message_id: Uuid,
        business_key: &str,
    ) -> impl Future<Output = Result<Lookup, BoxError>> + Send;

    /// Many ids at once (a `ResendBatch` call), each with its `business_key`: the payloads of
    /// those committed, by id; an id absent from the map is not committed. An `Err` is answered
    /// RETRY_LATER for every id. The default asks [`Self::load`] for each id in turn; a store
    /// that can should answer in one query (`SELECT … WHERE message_id IN (…)`).
    fn load_many(
        &self,
        ids: &[(Uuid, String)],
    ) -> impl Future<Output = Result<HashMap<Uuid, Vec<u8>>, BoxError>> + Send {
        async move {
            let mut found = HashMap::with_capacity(ids.len());
            for (message_id, business_key) in ids {
                if let Lookup::Found(payload) = self.load(*message_id, business_key).await? {
                    found.insert(*message_id, payload);
                }
            }
            Ok(found)
        }
    }
}

/// The gRPC service; wrap with [`ResendHookService::into_server`].
pub struct ResendHookService<S> {
    source: Arc<S>,
    producer: Producer,
    /// A missing record younger than this may still be committing: retry later.
    grace: Duration,
}

impl<S: ResendSource> ResendHookService<S> {
    /// The hook of `producer`, republishing what `source` finds; a request naming another
    /// producer is refused (INVALID_ARGUMENT). `grace`: how long after `prepare` a message not
    /// found may still be committing, answered RETRY_LATER until then and NOT_FOUND after (the
    /// callback service then marks it `void`). Make it longer than the slowest business
    /// transaction: see `docs/contract.md` in the repository.
    pub fn new(source: Arc<S>, producer: Producer, grace: Duration) -> Self {
        Self { source, producer, grace }
    }

    /// The tonic service, open to every caller (see [`Self::into_authenticated_server`]).
    pub fn into_server(self) -> ResendHookServer<Self> {
        ResendHookServer::new(self)
    }

    /// The server, answering `UNAUTHENTICATED` unless the caller presents one of `auth`'s tokens.
    pub fn into_authenticated_server(
        self,
        auth: BearerAuth,
    ) -> InterceptedService<ResendHookServer<Self>, BearerAuth> {
        ResendHookServer::with_interceptor(self, auth)
    }

    /// The decision, callable without gRPC.
    pub async fn handle(&self, req: &ResendRequest) -> Result<(ResendOutcome, String), Status> {
        let message_id = self.validate(&req.message_id, &req.routing_key, &req.producer)?;
        let payload = match self.source.load(message_id, &req.business_key).await {
            Ok(Lookup::Found(payload)) => payload,
            Ok(Lookup::NotCommitted) => return Ok(self.not_committed(message_id, req.published_at)),
            Err(e) => return Ok((ResendOutcome::RetryLater, format!("lookup failed: {e}"))),
        };
        Ok(self.republish(message_id, &req.routing_key, &req.business_key, &payload, req.attempt).await)
    }

    /// What `Resend` refuses (INVALID_ARGUMENT), and `ResendBatch` for any of its entries.
    fn validate(&self, message_id: &str, routing_key: &str, producer: &str) -> Result<Uuid, Status> {
        let id = Uuid::parse_str(message_id)
            .map_err(|_| Status::invalid_argument(format!("message_id {message_id:?} is not a UUID")))?;
        crate::wire::message::check_routing_key(routing_key)
            .map_err(|e| Status::invalid_argument(format!("routing_key: {e}")))?;
        if producer != self.producer.name() {
            return Err(Status::invalid_argument(format!(
                "this hook serves producer {:?}, not {producer:?}",
                self.producer.name(),
            )));
        }
        Ok(id)
    }

    /// Publishes a found message again; RESENT once the broker confirmed it.
    async fn republish(
        &self,
        message_id: Uuid,
        routing_key: &str,
        business_key: &str,
        payload: &[u8],
        attempt: u32,
    ) -> (ResendOutcome, String) {
        match self.producer.publish_business(message_id, routing_key, business_key, payload, attempt).await {
            Ok(()) => (ResendOutcome::Resent, String::new()),
            Err(e) => (ResendOutcome::RetryLater, format!("republish failed: {e}")),
        }
    }

    fn not_committed(&self, message_id: Uuid, published_at: i64) -> (ResendOutcome, String) {
        // Fall back to the UUIDv7 timestamp if the caller did not send one.
        let born = if published_at > 0 { published_at } else { uuid_ms(message_id).unwrap_or(0) };
        let age = Duration::from_millis(u64::try_from(now_ms() - born).unwrap_or(0));
        if age < self.grace {
            (ResendOutcome::RetryLater, format!("not committed yet ({age:?} old, grace {:?})", self.grace))
        } else {
            (ResendOutcome::NotFound, format!("not committed after {age:?}"))
        }
    }
}

/// The span of one `Resend` call, continuing the caller's trace (gRPC metadata `traceparent`):
/// the republished message carries it on to the consumer. Wrappers of the service use it too.
pub fn resend_span(request: &Request<ResendRequest>) -> tracing::Span {
    let req = request.get_ref();
    let span = tracing::info_span!("resend", message_id = %req.message_id, attempt = req.attempt);
    trace::set_parent_from_metadata(&span, request.metadata());
    span
}

fn uuid_ms(id: Uuid) -> Option<i64> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    i64::try_from(secs).ok().map(|s| s * 1000 + i64::from(nanos / 1_000_000))
}

#[tonic::async_trait]
impl<S: ResendSource> ResendHook for ResendHookService<S> {
    async fn resend(&self, request: Request<ResendRequest>) -> Result<Response<ResendResponse>, Status> {
        let span = resend_span(&request);
        async {
            let (outcome, reason) = self.handle(request.get_ref()).await?;
            tracing::info!(outcome = outcome.as_str_name(), %reason, "resend");
            Ok(Response::new(ResendResponse { outcome: outcome.into(), reason }))
        }
        .instrument(span)
        .await
    }

    async fn resend_batch(
        &self,
        request: Request<ResendBatchRequest>,
    ) -> Result<Response<ResendBatchResponse>, Status> {
        let results = self.handle_batch(&request.get_ref().entries, request.metadata()).await?;
        Ok(Response::new(ResendBatchResponse { results }))
    }
}
