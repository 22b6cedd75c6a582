//! The business effect: award points for one order. The SDK calls it inside the
//! inbox transaction, only for a message id seen for the first time, so this
//! code needs no dedup of its own.

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
}

impl Effect for AwardPoints {
    // Debug: an INFO span per message would cost an OpenTelemetry span each (the SDK's `process`
    // span, when anyone looks, already names the message).
    #[tracing::instrument(level = "debug", skip_all, fields(message_id = %msg.headers.message_id, order = %msg.headers.business_key))]
    async fn apply(&self, tx: &mut AnyConnection, msg: &Incoming<'_>) -> Result<Applied, Transient> {
        if !self.faults.slow().is_zero() {
            tokio::time::sleep(self.faults.slow()).await;
        }
        // A body we cannot read will not get better on redelivery: refuse it
        // visibly (a `rejected` CONFIRM the callback service surfaces), never crash.
        let order = match Order::parse(msg.body) {
            Ok(order) => order,
            Err(e) => return Ok(Applied::Rejected(format!("malformed order: {e}"))),
        };
        if self.faults.rejects(msg.headers.message_id) {
            return Ok(Applied::Rejected("customer blocked".into()));
        }
        store::award(tx, &msg.headers.message_id.to_string(), &order, now_ms()).await?;
        // After the insert, so the rollback visibly undoes a real write.
        if self.faults.fail_now() {
            return Err("injected failure (--fail-rate); rolled back for redelivery".into());
        }
        tracing::debug!(points = order.points(), "points awarded");
        Ok(Applied::Processed)
    }
}
