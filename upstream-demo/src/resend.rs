//! The one lookup Recheck asks of a producer: message id → the payload that was
//! committed with it. The SDK's `ResendHookService` does the rest (republish with
//! the same id, typed outcome, grace period for transactions still committing).
//! [`AuditedHook`] also records every call in `hook_calls` (one row per id of a `ResendBatch`).

use std::collections::HashMap;

use recheck::{BearerAuth, Lookup, ResendHookService, ResendSource, hook::BoxError};
use recheck_proto::v1::{
    ResendBatchRequest, ResendBatchResponse, ResendRequest, ResendResponse,
    resend_hook_server::{ResendHook, ResendHookServer},
};
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};
use tracing::Instrument;
use uuid::Uuid;

use crate::Store;

impl ResendSource for Store {
    async fn load(&self, message_id: Uuid, _business_key: &str) -> Result<Lookup, BoxError> {
        Ok(match self.payload(message_id).await? {
            Some(payload) => Lookup::Found(payload.into_bytes()),
            None => Lookup::NotCommitted,
        })
    }

    /// A `ResendBatch`'s ids in one `SELECT … IN`.
    async fn load_many(&self, ids: &[(Uuid, String)]) -> Result<HashMap<Uuid, Vec<u8>>, BoxError> {
        let ids: Vec<Uuid> = ids.iter().map(|(id, _)| *id).collect();
        let found = self.payloads(&ids).await?;
        Ok(found.into_iter().map(|(id, payload)| (id, payload.into_bytes())).collect())
    }
}

/// The SDK's hook, with each answered call written to the store's `hook_calls` table.
pub struct AuditedHook {
    inner: ResendHookService<Store>,
    store: Store,
}

impl AuditedHook {
    pub fn new(inner: ResendHookService<Store>, store: Store) -> Self {
        Self { inner, store }
    }

    /// The server, answering `UNAUTHENTICATED` unless the caller presents one of `auth`'s tokens.
    pub fn into_server(self, auth: BearerAuth) -> InterceptedService<ResendHookServer<Self>, BearerAuth> {
        ResendHookServer::with_interceptor(self, auth)
    }
}

#[tonic::async_trait]
impl ResendHook for AuditedHook {
    async fn resend(&self, request: Request<ResendRequest>) -> Result<Response<ResendResponse>, Status> {
        // The callback service's trace (gRPC metadata) continues here and into the republish.
        let span = recheck::hook::resend_span(&request);
        let req = request.get_ref();
        async {
            let (outcome, reason) = self.inner.handle(req).await?;
            tracing::info!(outcome = outcome.as_str_name(), %reason, "resend");
            // The audit never decides the answer: a failed insert is logged, not returned.
            if let Err(e) =
                self.store.record_hook_call(&req.message_id, req.attempt, outcome.as_str_name()).await
            {
                tracing::warn!(error = %e, "recording the hook call");
            }
            Ok(Response::new(ResendResponse { outcome: outcome.into(), reason }))
        }
        .instrument(span)
        .await
    }

    async fn resend_batch(
        &self,
        request: Request<ResendBatchRequest>,
    ) -> Result<Response<ResendBatchResponse>, Status> {
        // Each entry's span and log line are the SDK's (one `resend` span per id).
        let entries = &request.get_ref().entries;
        let results = self.inner.handle_batch(entries, request.metadata()).await?;
        let calls: Vec<(&str, u32, &str)> = entries
            .iter()
            .zip(&results)
            .map(|(entry, result)| (entry.message_id.as_str(), entry.attempt, result.outcome().as_str_name()))
            .collect();
        if let Err(e) = self.store.record_hook_calls(&calls).await {
            tracing::warn!(error = %e, "recording the hook calls");
        }
        Ok(Response::new(ResendBatchResponse { results }))
    }
}
