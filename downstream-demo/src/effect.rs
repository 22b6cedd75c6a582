//! The business effect: award points for orders. The SDK calls it inside the
//! inbox transaction, only for message ids seen for the first time, so this
//! code needs no dedup of its own. A micro-batch is awarded in two multi-row
//! statements (`apply_batch`); `apply`, one order, is what the SDK falls back
//! to when a batch fails, to find the message at fault.

use std::sync::Arc;

use recheck::{Applied, Effect, Incoming, Transient, message::now_ms};
use sqlx::AnyConnection;

use crate::{faults::Faults, order::Order, store};

pub struct AwardPoints {
    faults: Arc<Faults>,
}

impl AwardPoints {
    pub fn new(faults: Arc<Faults>) -> Self {
        Self { faults }
    }

    /// The order to award, or the reason it is refused. A body we cannot read will not get
    /// better on redelivery: refuse it visibly (a `rejected` CONFIRM the callback service
    /// surfaces), never crash.
    fn order(&self, msg: &Incoming<'_>) -> Result<Order, String> {
        let order = Order::parse(msg.body).map_err(|e| format!("malformed order: {e}"))?;
        if self.faults.rejects(msg.headers.message_id) {
            return Err("customer blocked".into());
        }
        Ok(order)
    }
}

impl Effect for AwardPoints {
    // Debug: an INFO span per message would cost an OpenTelemetry span each (the SDK's `process`
    // span, when anyone looks, already names the message).
    #[tracing::instrument(level = "debug", skip_all, fields(message_id = %msg.headers.message_id, order = %msg.headers.business_key))]
    async fn apply(&self, tx: &mut AnyConnection, msg: &Incoming<'_>) -> Result<Applied, Transient> {
        Ok(self.apply_batch(tx, std::slice::from_ref(msg)).await?.remove(0))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(n = msgs.len()))]
    async fn apply_batch(
        &self,
        tx: &mut AnyConnection,
        msgs: &[Incoming<'_>],
    ) -> Result<Vec<Applied>, Transient> {
        if !self.faults.slow().is_zero() {
            tokio::time::sleep(self.faults.slow() * msgs.len() as u32).await;
        }
        let mut applied = Vec::with_capacity(msgs.len());
        let mut awards = Vec::with_capacity(msgs.len());
        for msg in msgs {
            match self.order(msg) {
                Ok(order) => {
                    awards.push((msg.headers.message_id.to_string(), order));
                    applied.push(Applied::Processed);
                }
                Err(reason) => applied.push(Applied::Rejected(reason)),
            }
        }
        store::award(tx, &awards, now_ms()).await?;
        // After the insert, so the rollback visibly undoes a real write. Each order rolls its
        // own dice; one failure fails the batch, which the SDK redoes order by order.
        if awards.iter().filter(|_| self.faults.fail_now()).count() > 0 {
            return Err("injected failure (--fail-rate); rolled back, retried in place".into());
        }
        tracing::debug!(orders = awards.len(), "points awarded");
        Ok(applied)
    }
}
