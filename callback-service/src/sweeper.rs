//! No check left behind. A message's CHECK lives only in the broker between two checks; if it is
//! lost (a queue purged, a node's data lost) or parked (the delivery limit, a poison), nothing
//! would ever look at the message again. The store knows when each open message's check is due
//! (`next_check_at`); the sweeper republishes the CHECKs of those overdue by `after`, claimed in
//! the store so two instances never both do it. A republished CHECK that meets its original is
//! a duplicate the state machine already ignores (the attempt guards it).
//!
//! A CHECK parked by the delivery limit before the store recorded it has no row to be overdue:
//! each round also reads the parking queue for those ([`ParkingRecovery`]).

use std::{collections::BTreeMap, time::Duration};

use recheck::{
    GroupCommitConfig, Publisher, Topology,
    broker::control::publish_checks,
    group_commit::json_len,
    message::{Check, CheckBatch, DecodeError, now_ms},
    telemetry,
};
use tokio_util::sync::CancellationToken;

use crate::{
    backlog::Backlog, failure::HandleError, parking::ParkingRecovery, reconcile::millis, store::MessageRow,
    store::Store,
};

/// Rows claimed per store round trip, and checks per CHECK message published.
const SWEEP_BATCH: usize = 256;

pub struct Sweeper {
    pub store: std::sync::Arc<Store>,
    pub publisher: Publisher,
    pub topology: Topology,
    /// How long past due a check must be to count as lost.
    pub after: Duration,
    pub interval: Duration,
    /// While the checks queue holds more ready CHECKs than this, overdue rows are most likely
    /// waiting in it (the service was down or behind): no sweep then.
    pub max_backlog: u32,
    /// Measures the checks queue.
    pub backlog: Backlog,
    /// CHECKs (and CONFIRMs) the broker parked by the delivery limit, republished.
    pub parking: ParkingRecovery,
}

impl Sweeper {
    /// Sweeps every `interval` until `shutdown`.
    pub async fn run(&self, shutdown: &CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
            match self.parking.recover().await {
                Ok(done) if done.checks + done.confirms > 0 => {
                    tracing::warn!(?done, "republished messages parked by the delivery limit")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading the parking queue failed; trying again next round")
                }
            }
            match self.sweep().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(swept = n, "republished overdue checks (their CHECK was lost or parked)")
                }
                Err(e) => tracing::warn!(error = %e, "sweep failed; trying again next round"),
            }
        }
    }

    /// One pass: claims the overdue rows and republishes their CHECKs (shortest tier); returns
    /// how many. A claim whose publish fails is overdue again `after` from now.
    pub async fn sweep(&self) -> Result<usize, HandleError> {
        let depth = self.backlog.depth(&self.topology.checks_queue()).await;
        if depth > self.max_backlog {
            tracing::debug!(depth, "checks queue behind; no sweep this round");
            return Ok(0);
        }
        let mut swept = 0;
        loop {
            let now = now_ms();
            let rows = self
                .store
                .claim_overdue(now - millis(self.after), now + millis(self.after), SWEEP_BATCH)
                .await?;
            let n = rows.len();
            publish_rows(&self.publisher, &self.topology, &rows).await?;
            metrics::counter!(telemetry::CHECKS_SWEPT).increment(n as u64);
            swept += n;
            if n < SWEEP_BATCH {
                return Ok(swept);
            }
        }
    }
}

/// The CHECK a row's current attempt would have: what a redrive and the sweeper publish. It
/// carries the current span's trace context (the redrive's, the sweep's), not the original's.
pub fn row_check(row: &MessageRow) -> Result<Check, DecodeError> {
    Ok(Check {
        message_id: row.message_id.parse().map_err(|_| DecodeError::InvalidId(row.message_id.clone()))?,
        routing_key: row.routing_key.clone(),
        business_key: row.business_key.clone(),
        attempt: row.attempt,
        published_at: row.published_at,
        expect: row.expect.clone(),
        traceparent: recheck::trace::current_traceparent(),
        reserved: false,
    })
}

/// Publishes the CHECKs of `rows` into the shortest tier, one message per producer and
/// [`SWEEP_BATCH`] rows, split further so no body exceeds what a decoder accepts (the group
/// commit's byte cap: long business keys make big entries).
pub async fn publish_rows(
    publisher: &Publisher,
    topology: &Topology,
    rows: &[MessageRow],
) -> Result<(), HandleError> {
    let mut by_producer: BTreeMap<&str, Vec<Check>> = BTreeMap::new();
    for row in rows {
        by_producer.entry(row.producer.as_str()).or_default().push(row_check(row)?);
    }
    let delay = topology.tiers.first().copied().unwrap_or_default();
    let max_bytes = GroupCommitConfig::default().max_bytes;
    for (producer, checks) in by_producer {
        let envelope = json_len(&CheckBatch::new(producer, Vec::new()));
        let (mut batch, mut bytes) = (Vec::new(), envelope);
        for check in checks {
            let size = json_len(&check) + 1;
            if !batch.is_empty() && (batch.len() == SWEEP_BATCH || bytes + size > max_bytes) {
                let full = std::mem::take(&mut batch);
                publish_checks(publisher, topology, &CheckBatch::new(producer, full), delay).await?;
                bytes = envelope;
            }
            bytes += size;
            batch.push(check);
        }
        if !batch.is_empty() {
            publish_checks(publisher, topology, &CheckBatch::new(producer, batch), delay).await?;
        }
    }
    Ok(())
}
