//! What the consumer's business code implements: [`Effect`], and the types it sees and returns.

use std::future::Future;

use sqlx::AnyConnection;

use crate::{
    error::BoxError,
    retry::{Classify, Disposition, db_disposition},
    wire::message::BusinessHeaders,
};

/// A business message as the effect sees it.
#[derive(Debug)]
pub struct Incoming<'a> {
    /// Its Recheck identity: message id, producer, business key and attempt (0 = the original).
    pub headers: &'a BusinessHeaders,
    /// The routing key it was published with: the event type (`order.created`).
    pub routing_key: &'a str,
    /// The payload as the producer published it; a resend carries the same bytes.
    pub body: &'a [u8],
    /// The broker's flag: this copy was delivered before and not acked (a consumer died with it
    /// in hand). Not a duplicate test: the inbox decides that before the effect runs.
    pub redelivered: bool,
}

/// How the effect ended for a message seen for the first time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The effect is done: confirmed as `processed`.
    Processed,
    /// Refused for business reasons: confirmed as `rejected`, never resent.
    Rejected(String),
}

/// An effect that failed: rolled back, the message not confirmed. It is classified
/// ([`Classify`]): a database error the data causes (a constraint, a value the column cannot
/// take) or a poison [`crate::error::Error`] fails the same way every time, so the delivery is parked
/// with the error as its reason; anything else is transient, and the delivery is held unacked
/// and tried again in place with a growing delay ([`crate::retry`]) until it succeeds, never
/// requeued (a requeue burns the delivery limit before RabbitMQ 4.3 and loops hot from 4.3).
/// A failure that will never pass for business reasons is [`Applied::Rejected`], not an error.
#[derive(Debug)]
pub struct Transient(pub BoxError);

impl<E: Into<BoxError>> From<E> for Transient {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl std::fmt::Display for Transient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Classify for Transient {
    fn disposition(&self) -> Disposition {
        if let Some(e) = self.0.downcast_ref::<sqlx::Error>() {
            db_disposition(e)
        } else if let Some(e) = self.0.downcast_ref::<crate::error::Error>() {
            e.disposition()
        } else {
            Disposition::Transient
        }
    }
}

/// The consumer's business effect, applied inside the inbox transaction.
///
/// The SDK calls it only for message ids this consumer has no committed inbox row for, so it
/// needs no deduplication of its own. It must write through `tx` only: a failed batch is rolled
/// back and redone, so an effect can run twice for one delivery and only what commits may count.
pub trait Effect: Send + Sync + 'static {
    /// Applies the effect of `msg` inside `tx`, the transaction holding its inbox claim: both
    /// commit together or neither. `Err` for a failure ([`Transient`] says what becomes of it);
    /// [`Applied::Rejected`] for a business refusal.
    fn apply(
        &self,
        tx: &mut AnyConnection,
        msg: &Incoming<'_>,
    ) -> impl Future<Output = Result<Applied, Transient>> + Send;

    /// Applies the effects of a micro-batch inside `tx`: every first-seen message of the batch
    /// (each id once, in delivery order), one [`Applied`] per message in that order. The default
    /// calls [`apply`](Self::apply) for each; override it to write the batch in a few set-based
    /// statements, which is what makes a consumer transaction cheap.
    ///
    /// `Err` fails the batch: its transaction is rolled back and the batch redone message by
    /// message through [`apply`](Self::apply), each in a savepoint, so only the messages that
    /// fail on their own are held back (transient) or parked (poison). `apply` and `apply_batch`
    /// must therefore write the same.
    fn apply_batch(
        &self,
        tx: &mut AnyConnection,
        msgs: &[Incoming<'_>],
    ) -> impl Future<Output = Result<Vec<Applied>, Transient>> + Send {
        async move {
            let mut applied = Vec::with_capacity(msgs.len());
            for msg in msgs {
                applied.push(self.apply(&mut *tx, msg).await?);
            }
            Ok(applied)
        }
    }
}
