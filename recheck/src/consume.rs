//! The consumer step in the one safe order: inbox + effect in one transaction
//! → commit → CONFIRM (broker-confirmed) → ack. Deliveries are taken in
//! micro-batches: one transaction and one CONFIRM for many messages, acked
//! with `multiple`, because a transaction per message caps a consumer at a few
//! thousand messages per second.

use std::{collections::HashMap, future::Future, time::Duration};

use lapin::message::Delivery;
use sqlx::{Acquire, Any, AnyConnection, AnyPool, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, level_filters::LevelFilter};
use uuid::Uuid;

use crate::{
    Confirmer, Inbox, Publisher, Result, Subscription, SubscriptionConfig, Topology,
    hook::BoxError,
    inbox::Prior,
    message::{BusinessHeaders, Confirm, DecodeError, Outcome, now_ms},
    parking::park_and_ack,
    retry::{self, Settled},
    subscription::{self, Consuming},
    telemetry, trace,
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
    /// The broker's flag: this copy was delivered before and not acked (its transaction may
    /// have rolled back). Not a duplicate test: the inbox decides that before the effect runs.
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

/// A transient failure: the batch's transaction rolls back and the message is nacked back to the
/// queue for redelivery (the rest of the batch is redone without it). Before RabbitMQ 4.3 each
/// requeue counts toward the queue's delivery limit, which parks a message that keeps failing;
/// from 4.3 it does not (see [`crate::retry`]), so a failure that will never pass is
/// [`Applied::Rejected`], not `Transient`.
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

/// The consumer's business effect, applied inside the inbox transaction.
///
/// The SDK calls it only for a message id this consumer has no committed inbox row for, so it
/// needs no deduplication of its own. It must write through `tx` only: a transient failure of another
/// message in the batch rolls the transaction back and the batch is redone, so an effect can run
/// twice for one delivery and only what commits may count.
pub trait Effect: Send + Sync + 'static {
    /// Applies the effect of `msg` inside `tx`, the transaction holding its inbox claim: both
    /// commit together or neither. `Err(Transient)` for a failure that may pass (rolled back and
    /// redelivered); [`Applied::Rejected`] for one that never will.
    fn apply(
        &self,
        tx: &mut AnyConnection,
        msg: &Incoming<'_>,
    ) -> impl Future<Output = Result<Applied, Transient>> + Send;
}

/// How a [`ConsumerLoop`] names itself and reads its queue; [`ConsumerConfig::new`] gives the
/// defaults.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The consumer's name in CONFIRMs and in the inbox key (`points`).
    pub consumer: String,
    /// The queue it reads (declared with `Topology::declare_consumer_queue`).
    pub queue: String,
    /// Unacked deliveries the broker hands over at once (AMQP `basic.qos`).
    pub prefetch: u16,
    /// Most deliveries handled in one transaction.
    pub batch_size: usize,
    /// How long to wait for more deliveries before handling a partial batch.
    pub batch_linger: Duration,
    /// Largest business body accepted; a larger one is parked. `None`: the broker's limit only.
    pub max_body_bytes: Option<usize>,
    /// Cleared while the queue is not being consumed (for readiness).
    pub consuming: Consuming,
}

impl ConsumerConfig {
    /// Defaults for `consumer` reading `queue`: prefetch 256, batches of up to 128 gathered for
    /// 5 ms, no body limit but the broker's.
    pub fn new(consumer: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            consumer: consumer.into(),
            queue: queue.into(),
            prefetch: 256,
            batch_size: 128,
            batch_linger: Duration::from_millis(5),
            max_body_bytes: None,
            consuming: Consuming::default(),
        }
    }

    /// How the queue is read: this consumer's prefetch and batch shape.
    pub fn subscription(&self) -> SubscriptionConfig {
        SubscriptionConfig {
            prefetch: self.prefetch,
            batch_size: self.batch_size,
            batch_linger: self.batch_linger,
            consuming: self.consuming.clone(),
            ..SubscriptionConfig::new(&self.queue, &self.consumer)
        }
    }
}

/// What one batch did, for counters and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchReport {
    /// First-seen messages whose effect committed.
    pub processed: usize,
    /// Deliveries of ids claimed before: confirmed again, the effect not applied.
    pub duplicates: usize,
    /// First-seen messages the effect rejected.
    pub rejected: usize,
    /// Deliveries parked before the effect: headers the SDK cannot read, or a body over
    /// [`ConsumerConfig::max_body_bytes`].
    pub parked: usize,
    /// Transient effect failures, nacked for redelivery.
    pub retried: usize,
}

impl BatchReport {
    /// Adds the outcomes of a committed batch to `recheck_consumer_messages_total`.
    fn record(&self, consumer: &str) {
        let outcomes = [
            ("processed", self.processed),
            ("duplicate", self.duplicates),
            ("rejected", self.rejected),
            ("retried", self.retried),
        ];
        for (outcome, n) in outcomes.into_iter().filter(|(_, n)| *n > 0) {
            metrics::counter!(telemetry::CONSUMED, "consumer" => consumer.to_owned(), "outcome" => outcome)
                .increment(n as u64);
        }
    }
}

impl std::ops::AddAssign for BatchReport {
    fn add_assign(&mut self, o: Self) {
        self.processed += o.processed;
        self.duplicates += o.duplicates;
        self.rejected += o.rejected;
        self.parked += o.parked;
        self.retried += o.retried;
    }
}

/// Decides, per confirm, that it is lost on the way (fault injection).
type DropConfirm = Box<dyn Fn(&Confirm) -> bool + Send + Sync>;

/// The consumer step. Reads the queue in micro-batches; per batch, one transaction claims each
/// message in the [`Inbox`] and applies the [`Effect`] to the first-seen ones, then commits;
/// one CONFIRM (broker-confirmed) reports every outcome, and one ack settles the batch.
pub struct ConsumerLoop<E> {
    pool: AnyPool,
    drop_confirm: Option<DropConfirm>,
    inbox: Inbox,
    confirmer: Confirmer,
    publisher: Publisher,
    topology: Topology,
    effect: E,
    config: ConsumerConfig,
}

impl<E: Effect> ConsumerLoop<E> {
    /// A loop over `config.queue`. `pool` holds the inbox table ([`Inbox::migrate`]) and the
    /// effect's own tables, so that they commit together; `publisher` reads the queue and parks
    /// poison; `confirmer` sends the CONFIRMs under the same consumer name as `config`.
    pub fn new(
        pool: AnyPool,
        publisher: Publisher,
        topology: Topology,
        confirmer: Confirmer,
        effect: E,
        config: ConsumerConfig,
    ) -> Self {
        let inbox = Inbox::new(config.consumer.clone());
        Self { pool, drop_confirm: None, inbox, confirmer, publisher, topology, effect, config }
    }

    /// Fault injection for demos and tests: confirms for which `drop` is true
    /// are never published (as if lost), though the effect committed. The
    /// callback service must then resend, and the inbox absorb the duplicate.
    pub fn dropping_confirms(mut self, drop: impl Fn(&Confirm) -> bool + Send + Sync + 'static) -> Self {
        self.drop_confirm = Some(Box::new(drop));
        self
    }

    /// Consumes until `shutdown`; the batch in hand is finished first.
    pub async fn run(self, shutdown: CancellationToken) -> Result<BatchReport> {
        let c = &self.config;
        let mut subscription = Subscription::new(self.publisher.clone(), c.subscription()).await?;
        let mut total = BatchReport::default();
        while let Some(batch) = subscription.next_batch(&shutdown).await? {
            match self.handle_batch(batch, &shutdown).await {
                Ok(report) => total += report,
                Err(e) => tracing::warn!(consumer = %c.consumer, error = %e, "batch failed; redelivering"),
            }
        }
        subscription.close().await;
        Ok(total)
    }

    /// Handles one micro-batch of deliveries from one channel, in tag order. A transient
    /// failure of the transaction or of the CONFIRM (the database or the broker away) is tried
    /// again in place with a growing delay ([`crate::retry`]): no redelivery counts toward the
    /// queue's delivery limit. At `shutdown`, or on a failure that would repeat, every delivery
    /// not yet settled is nacked for redelivery and the error returned.
    #[tracing::instrument(skip_all, fields(consumer = %self.config.consumer, n = deliveries.len()))]
    pub async fn handle_batch(
        &self,
        deliveries: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> Result<BatchReport> {
        let mut report = BatchReport::default();
        metrics::histogram!(telemetry::CONSUMER_BATCH_SIZE, "consumer" => self.config.consumer.clone())
            .record(deliveries.len() as f64);
        let mut pending = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            match self.validate(&d) {
                Ok(h) => pending.push((d, h)),
                Err(e) => {
                    if park_and_ack(&self.publisher, &self.topology, &self.config.queue, &d, &e).await {
                        report.parked += 1;
                    }
                }
            }
        }
        // Each try takes the batch (and counts afresh: only the try that succeeds is reported).
        let tries = tokio::sync::Mutex::new((pending, BatchReport::default()));
        let settled = retry::until_settled(&self.config.queue, shutdown, || async {
            let mut guard = tries.lock().await;
            let (pending, committed) = &mut *guard;
            *committed = BatchReport::default();
            let mut confirms = self.commit(pending, committed).await?;
            // Committed: the effects are durable whatever becomes of the CONFIRM (a retry finds
            // them claimed and confirms them as duplicates).
            if let Some(drop) = &self.drop_confirm {
                confirms.retain(|c| !drop(c));
            }
            self.confirmer.confirm_all(confirms).await
        })
        .await;
        let (pending, committed) = tries.into_inner();
        let e = match settled {
            Settled::Done(()) => {
                report += committed;
                report.record(&self.config.consumer);
                if let Some((last, _)) = pending.iter().max_by_key(|(d, _)| d.delivery_tag) {
                    subscription::ack(last, true).await?;
                }
                return Ok(report);
            }
            Settled::Poison(e) | Settled::Stopped(e) => e,
        };
        for (d, _) in &pending {
            let _ = subscription::nack(d).await;
        }
        Err(e)
    }

    /// What the SDK can tell is wrong with a delivery before the effect sees it.
    fn validate(&self, d: &Delivery) -> Result<BusinessHeaders, DecodeError> {
        let headers = BusinessHeaders::from_properties(&d.properties)?;
        match self.config.max_body_bytes {
            Some(max) if d.data.len() > max => Err(DecodeError::TooLarge(d.data.len(), max)),
            _ => Ok(headers),
        }
    }

    /// One transaction for the batch. The happy path has no savepoints: one inbox claim
    /// statement, the effects, commit. After a transient failure the transaction is rolled
    /// back and the batch redone without that message, with a savepoint per message, so more
    /// failures cost only themselves and no effect runs more than twice for one delivery.
    /// Failed messages are nacked for redelivery once the transaction is over.
    async fn commit(
        &self,
        pending: &mut Vec<(Delivery, BusinessHeaders)>,
        report: &mut BatchReport,
    ) -> Result<Vec<Confirm>> {
        let spans = per_message_spans();
        let mut tx = self.pool.begin().await?;
        let mut done = BatchReport::default();
        let (confirms, failed) = match self.apply_all(&mut tx, pending, spans, &mut done).await? {
            Ok(confirms) => (confirms, Vec::new()),
            Err(first) => {
                tx.rollback().await?;
                tx = self.pool.begin().await?;
                done = BatchReport::default();
                self.apply_each(&mut tx, pending, first, spans, &mut done).await?
            }
        };
        tx.commit().await?;
        *report += done;
        // Only now: a redelivery must not find the batch's transaction still open.
        for i in failed.into_iter().rev() {
            let (d, _) = pending.remove(i);
            subscription::nack(&d).await?;
            report.retried += 1;
        }
        Ok(confirms)
    }

    /// The happy path: all claims in one statement, the prior outcomes of duplicates in one
    /// read, then the effects. `Err(i)`: message `i`'s effect failed; the caller rolls back.
    async fn apply_all(
        &self,
        tx: &mut AnyConnection,
        pending: &[(Delivery, BusinessHeaders)],
        spans: bool,
        report: &mut BatchReport,
    ) -> Result<Result<Vec<Confirm>, usize>> {
        let ids: Vec<Uuid> = pending.iter().map(|(_, h)| h.message_id).collect();
        let mut first = self.inbox.claim_many(tx, &ids).await?;
        // Ids claimed by an earlier batch: how they ended, in one read (none on the happy path).
        let earlier: Vec<Uuid> = ids.iter().filter(|id| !first.contains(id)).copied().collect();
        let mut prior =
            if earlier.is_empty() { HashMap::new() } else { self.inbox.prior_many(tx, &earlier).await? };
        let now = now_ms();
        let mut confirms = Vec::with_capacity(pending.len());
        for (i, (d, h)) in pending.iter().enumerate() {
            let id = h.message_id;
            let span = message_span(d, h, spans);
            // The first copy of a first-seen id applies the effect; later copies are duplicates.
            let (outcome, detail) = if first.remove(&id) {
                match self.apply(tx, d, h, &span, report).await? {
                    Ok((Outcome::Rejected, detail)) => {
                        // A later copy in this batch re-confirms the rejection, as a later batch would.
                        prior.insert(id, Prior { outcome: Outcome::Rejected, detail: detail.clone() });
                        (Outcome::Rejected, detail)
                    }
                    Ok(done) => done,
                    Err(e) => {
                        failed(d, h, span, &e);
                        return Ok(Err(i));
                    }
                }
            } else {
                duplicate(prior.get(&id).cloned(), report)
            };
            span.in_scope(|| tracing::debug!(outcome = outcome.as_str(), "message handled"));
            confirms.push(Confirm { message_id: id, outcome, detail, processed_at: now });
        }
        Ok(Ok(confirms))
    }

    /// The redo after a transient failure: every message but `skip` in its own savepoint.
    /// Returns the confirms and the indices of the failed messages, `skip` among them.
    async fn apply_each(
        &self,
        tx: &mut Transaction<'static, Any>,
        pending: &[(Delivery, BusinessHeaders)],
        skip: usize,
        spans: bool,
        report: &mut BatchReport,
    ) -> Result<(Vec<Confirm>, Vec<usize>)> {
        let mut confirms = Vec::with_capacity(pending.len());
        let mut failed = vec![skip];
        for (i, (d, h)) in pending.iter().enumerate().filter(|(i, _)| *i != skip) {
            let span = message_span(d, h, spans);
            match self.process(tx, d, h, &span, report).await? {
                Some((outcome, detail)) => confirms.push(Confirm {
                    message_id: h.message_id,
                    outcome,
                    detail,
                    processed_at: now_ms(),
                }),
                None => failed.push(i),
            }
        }
        failed.sort_unstable();
        Ok((confirms, failed))
    }

    /// The effect of a first-seen message, counted; a rejection is written to the inbox too.
    /// `Err(Transient)`: nothing counted, the caller rolls back.
    async fn apply(
        &self,
        tx: &mut AnyConnection,
        d: &Delivery,
        h: &BusinessHeaders,
        span: &Span,
        report: &mut BatchReport,
    ) -> Result<Result<(Outcome, Option<String>), Transient>> {
        Ok(match self.effect.apply(tx, &incoming(d, h)).instrument(span.clone()).await {
            Ok(Applied::Processed) => {
                report.processed += 1;
                Ok((Outcome::Processed, None))
            }
            Ok(Applied::Rejected(reason)) => {
                self.inbox.mark_rejected(tx, h.message_id, &reason).await?;
                report.rejected += 1;
                Ok((Outcome::Rejected, Some(reason)))
            }
            Err(e) => Err(e),
        })
    }

    /// One message in its own savepoint: its confirm, or `None` after a transient failure
    /// (rolled back; the caller nacks it once the batch's transaction is over).
    async fn process(
        &self,
        tx: &mut Transaction<'static, Any>,
        d: &Delivery,
        h: &BusinessHeaders,
        span: &Span,
        report: &mut BatchReport,
    ) -> Result<Option<(Outcome, Option<String>)>> {
        let mut one = tx.begin().await?;
        let (outcome, detail) = if self.inbox.claim(&mut one, h.message_id).await? {
            match self.apply(&mut one, d, h, span, report).await? {
                Ok(done) => done,
                Err(e) => {
                    one.rollback().await?;
                    failed(d, h, span.clone(), &e);
                    return Ok(None);
                }
            }
        } else {
            duplicate(self.inbox.prior(&mut one, h.message_id).await?, report)
        };
        one.commit().await?;
        span.in_scope(|| tracing::debug!(outcome = outcome.as_str(), "message handled"));
        Ok(Some((outcome, detail)))
    }
}

/// The confirm of a message claimed before: a rejection is confirmed again as one, anything
/// else as `duplicate`.
fn duplicate(prior: Option<Prior>, report: &mut BatchReport) -> (Outcome, Option<String>) {
    report.duplicates += 1;
    match prior {
        Some(p) if p.outcome == Outcome::Rejected => (Outcome::Rejected, p.detail),
        _ => (Outcome::Duplicate, None),
    }
}

fn incoming<'a>(d: &'a Delivery, h: &'a BusinessHeaders) -> Incoming<'a> {
    Incoming { headers: h, routing_key: d.routing_key.as_str(), body: &d.data, redelivered: d.redelivered }
}

/// Whether each message gets its own span: only when something can see it — spans are
/// exported, or per-message (debug) lines are logged. Otherwise the batch's span is all: a span
/// continued from the headers costs thousands of instructions a message for nothing.
fn per_message_spans() -> bool {
    trace::exporting() || LevelFilter::current() >= LevelFilter::DEBUG
}

/// A message's span, continuing the producer's trace from its headers; `Span::none()` if not `wanted`.
fn message_span(d: &Delivery, h: &BusinessHeaders, wanted: bool) -> Span {
    if !wanted {
        return Span::none();
    }
    let span = tracing::info_span!("process", message_id = %h.message_id, attempt = h.attempt);
    trace::set_parent_from_headers(&span, d.properties.headers().as_ref());
    span
}

/// Logs a transient effect failure in the message's trace (a span made now if there was none: rare).
fn failed(d: &Delivery, h: &BusinessHeaders, span: Span, e: &Transient) {
    let span = if span.is_none() { message_span(d, h, true) } else { span };
    span.in_scope(|| tracing::warn!(message_id = %h.message_id, error = %e, "effect failed; redelivering"));
}
