//! `ResendBatch`: many ids in one call. Each entry is validated as `Resend` validates its
//! request, and one bad entry refuses the whole call (INVALID_ARGUMENT): the callback service
//! never sends one, so it means a broken caller, and a refusal is the signal `Resend` gives it.
//! Then one [`ResendSource::load_many`] for every id, the found ones republished concurrently
//! (each broker-confirmed), and one result per entry, in order.

use std::collections::{HashMap, HashSet};

use futures_util::{StreamExt, stream};
use recheck_proto::v1::{ResendBatchEntry, ResendOutcome, ResendResult};
use tonic::{Status, metadata::MetadataMap};
use tracing::Instrument;

use uuid::Uuid;

use super::{BoxError, ResendHookService, ResendSource};
use crate::telemetry::trace;

/// Most entries the SDK's hook takes in one `ResendBatch`: the callback service's default
/// `--max-ids`, one CHECK message's worth.
pub const MAX_BATCH_ENTRIES: usize = 5_000;

/// Republishes of one batch awaiting their broker confirms at once: many in flight share the
/// broker's confirm rounds, which is where a batch wins over one call per id.
const REPUBLISH_CONCURRENCY: usize = 256;

impl<S: ResendSource> ResendHookService<S> {
    /// `ResendBatch`'s decision, callable without gRPC: one result per entry, in order, each
    /// decided (and logged) as [`Self::handle`] decides one request, in its own `resend` span.
    /// `metadata` is the call's: an entry without a `traceparent` continues its trace.
    pub async fn handle_batch(
        &self,
        entries: &[ResendBatchEntry],
        metadata: &MetadataMap,
    ) -> Result<Vec<ResendResult>, Status> {
        if entries.len() > MAX_BATCH_ENTRIES {
            return Err(Status::invalid_argument(format!(
                "{} entries exceed the limit of {MAX_BATCH_ENTRIES}",
                entries.len()
            )));
        }
        let mut seen = HashSet::with_capacity(entries.len());
        let mut ids = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let id = self
                .validate(&entry.message_id, &entry.routing_key, &entry.producer)
                .map_err(|status| Status::invalid_argument(format!("entry {i}: {}", status.message())))?;
            if !seen.insert(id) {
                return Err(Status::invalid_argument(format!("entry {i}: message_id {id} appears twice")));
            }
            ids.push((id, entry.business_key.clone()));
        }
        let found = self.source.load_many(&ids).await;
        // Built in a loop, not a closure in `map`: tonic's `Send` bound on the handler cannot see
        // through a closure that borrows per item (rustc's "FnOnce is not general enough").
        let mut pending = Vec::with_capacity(entries.len());
        for (entry, (id, _)) in entries.iter().zip(&ids) {
            pending.push(self.resolve(entry, *id, &found).instrument(entry_span(entry, metadata)));
        }
        let results = stream::iter(pending).buffered(REPUBLISH_CONCURRENCY).collect().await;
        Ok(results)
    }
}

impl<S: ResendSource> ResendHookService<S> {
    /// One entry, decided from the batch's lookup.
    async fn resolve(
        &self,
        entry: &ResendBatchEntry,
        id: Uuid,
        found: &Result<HashMap<Uuid, Vec<u8>>, BoxError>,
    ) -> ResendResult {
        let (outcome, reason) = match found {
            Err(e) => (ResendOutcome::RetryLater, format!("lookup failed: {e}")),
            Ok(found) => match found.get(&id) {
                Some(payload) => {
                    self.republish(id, &entry.routing_key, &entry.business_key, payload, entry.attempt).await
                }
                None => self.not_committed(id, entry.published_at),
            },
        };
        tracing::info!(outcome = outcome.as_str_name(), %reason, "resend");
        ResendResult { message_id: entry.message_id.clone(), outcome: outcome.into(), reason }
    }
}

/// One entry's `resend` span: it continues the entry's own trace (its `traceparent`), else the
/// call's, and the republished message carries it on to the consumer.
fn entry_span(entry: &ResendBatchEntry, metadata: &MetadataMap) -> tracing::Span {
    let span = tracing::info_span!("resend", message_id = %entry.message_id, attempt = entry.attempt);
    if entry.traceparent.is_empty() {
        trace::set_parent_from_metadata(&span, metadata);
    } else {
        trace::set_parent_from_traceparent(&span, Some(&entry.traceparent));
    }
    span
}
