//! The one lookup Recheck asks of a producer: message id → the payload that was
//! committed with it. The SDK's `ResendHookService` does the rest (republish with
//! the same id, typed outcome, grace period for transactions still committing).

use recheck::{Lookup, ResendSource, hook::BoxError};
use uuid::Uuid;

use crate::Store;

impl ResendSource for Store {
    async fn load(&self, message_id: Uuid, _business_key: &str) -> Result<Lookup, BoxError> {
        Ok(match self.payload(message_id).await? {
            Some(payload) => Lookup::Found(payload.into_bytes()),
            None => Lookup::NotCommitted,
        })
    }
}
