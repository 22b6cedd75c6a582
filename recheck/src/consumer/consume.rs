//! The consumer step in the one safe order: inbox + effect in one transaction
//! → commit → CONFIRM (broker-confirmed) → ack. Deliveries are taken in
//! micro-batches: one transaction and one CONFIRM for many messages, acked
//! with `multiple`, because a transaction per message caps a consumer at a few
//! thousand messages per second; the effect, too, sees the batch at once
//! ([`Effect::apply_batch`]), so a batch costs a few statements, not a few per message.
//!
//! - [`effect`](Effect): what the business code implements.
//! - `batch`: one micro-batch — the set-based happy path, and the redo message by message
//!   that isolates a failed effect.
//! - `held`: a delivery whose effect failed transiently, retried in place until it settles.

mod batch;
mod effect;
mod held;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use lapin::message::Delivery;
use sqlx::AnyPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Span, level_filters::LevelFilter};

pub use effect::{Applied, Effect, Incoming, Transient};

use crate::{
    broker::{
        publisher::Publisher,
        subscription::{self, Consuming, Subscription, SubscriptionConfig},
        topology::Topology,
    },
    consumer::{confirmer::Confirmer, inbox::Inbox},
    error::Result,
    telemetry::{self, trace},
    wire::message::{BusinessHeaders, Confirm},
};

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
    /// Deliveries parked: headers the SDK cannot read, a body over
    /// [`ConsumerConfig::max_body_bytes`], or an effect failure that is poison ([`Transient`]).
    pub parked: usize,
    /// Transient effect failures: deliveries held unacked and retried in place (never requeued).
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
/// Decides, per delivery, that it is lost before the consumer sees it (fault injection).
type DropMessage = Box<dyn Fn(&BusinessHeaders) -> bool + Send + Sync>;

/// The consumer step. Reads the queue in micro-batches; per batch, one transaction claims each
/// message in the [`Inbox`] and applies the [`Effect`] to the first-seen ones, then commits;
/// one CONFIRM (broker-confirmed) reports every outcome, and one ack settles the batch.
pub struct ConsumerLoop<E> {
    pool: AnyPool,
    drop_confirm: Option<DropConfirm>,
    drop_message: Option<DropMessage>,
    inbox: Inbox,
    confirmer: Confirmer,
    publisher: Publisher,
    topology: Topology,
    effect: E,
    config: ConsumerConfig,
    /// Deliveries held for a retry in place right now: while there are any, a batch is acked
    /// delivery by delivery, since an `ack(multiple)` would settle them too.
    held: AtomicUsize,
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
        Self {
            pool,
            drop_confirm: None,
            drop_message: None,
            inbox,
            confirmer,
            publisher,
            topology,
            effect,
            config,
            held: AtomicUsize::new(0),
        }
    }

    /// Fault injection for demos and tests: confirms for which `drop` is true
    /// are never published (as if lost), though the effect committed. The
    /// callback service must then resend, and the inbox absorb the duplicate.
    pub fn dropping_confirms(mut self, drop: impl Fn(&Confirm) -> bool + Send + Sync + 'static) -> Self {
        self.drop_confirm = Some(Box::new(drop));
        self
    }

    /// Fault injection for demos and tests: deliveries whose headers `drop` picks are acked
    /// unseen — no inbox row, no effect, no CONFIRM — as if the broker had lost them for this
    /// consumer only. A delivery with unreadable headers is never dropped (it is parked).
    pub fn dropping_messages(
        mut self,
        drop: impl Fn(&BusinessHeaders) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.drop_message = Some(Box::new(drop));
        self
    }

    /// Consumes until `shutdown`; the batch in hand is finished first. A delivery whose effect
    /// failed transiently is retried in place beside the next batches; at `shutdown` it is
    /// handed back to the queue (nack) once its current try is over.
    pub async fn run(self, shutdown: CancellationToken) -> Result<BatchReport> {
        let this = Arc::new(self);
        let mut subscription = Subscription::new(this.publisher.clone(), this.config.subscription()).await?;
        let mut total = BatchReport::default();
        // Ends the held deliveries' retries at shutdown, or when the subscription is given up.
        let stop = shutdown.child_token();
        let mut retries = JoinSet::new();
        let ended = loop {
            let batch = match subscription.next_batch(&shutdown).await {
                Ok(Some(batch)) => batch,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            match this.batch(batch, &shutdown).await {
                Ok((report, held)) => {
                    total += report;
                    for h in held {
                        let (this, stop) = (this.clone(), stop.clone());
                        retries.spawn(async move { this.settle_held(h, &stop).await });
                    }
                }
                Err(e) => {
                    tracing::warn!(consumer = %this.config.consumer, error = %e, "batch failed; redelivering")
                }
            }
            while let Some(done) = retries.try_join_next() {
                total += settled(done);
            }
        };
        stop.cancel();
        while let Some(done) = retries.join_next().await {
            total += settled(done);
        }
        subscription.close().await;
        ended.map(|()| total)
    }

    /// Handles one micro-batch of deliveries from one channel, in tag order, and settles every
    /// one of them before it returns. A transient failure of the transaction or of the CONFIRM
    /// (the database or the broker away) is tried again in place with a growing delay
    /// ([`crate::retry`]): no redelivery counts toward the queue's delivery limit. So is a
    /// message whose effect failed transiently, in a transaction of its own, once the rest of
    /// the batch is committed, confirmed and acked. At `shutdown`, or on a failure that would
    /// repeat, every delivery not yet settled is nacked for redelivery (and, for the batch's
    /// transaction, the error returned).
    pub async fn handle_batch(
        &self,
        deliveries: Vec<Delivery>,
        shutdown: &CancellationToken,
    ) -> Result<BatchReport> {
        let (mut report, held) = self.batch(deliveries, shutdown).await?;
        for h in held {
            report += self.settle_held(h, shutdown).await;
        }
        Ok(report)
    }

    /// Acks a committed and confirmed batch: one `ack(multiple)`, or one ack each while other
    /// deliveries of the channel are held (a multiple ack would settle them unprocessed).
    async fn ack(&self, settled: &[(Delivery, BusinessHeaders)]) -> Result<()> {
        if self.held.load(Ordering::SeqCst) == 0 {
            if let Some((last, _)) = settled.iter().max_by_key(|(d, _)| d.delivery_tag) {
                subscription::ack(last, true).await?;
            }
            return Ok(());
        }
        for (d, _) in settled {
            subscription::ack(d, false).await?;
        }
        Ok(())
    }
}

/// What a held delivery's retry added up to; a retry that panicked added nothing.
fn settled(done: std::result::Result<BatchReport, tokio::task::JoinError>) -> BatchReport {
    done.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a held delivery's retry ended abnormally");
        BatchReport::default()
    })
}

/// Whether each message gets its own span: only when something can see it — spans are
/// exported, or per-message (debug) lines are logged. Otherwise the batch's span is all: a span
/// continued from the headers costs thousands of instructions a message for nothing.
pub(super) fn per_message_spans() -> bool {
    trace::exporting() || LevelFilter::current() >= LevelFilter::DEBUG
}

/// A message's span, continuing the producer's trace from its headers; `Span::none()` if not `wanted`.
pub(super) fn message_span(d: &Delivery, h: &BusinessHeaders, wanted: bool) -> Span {
    if !wanted {
        return Span::none();
    }
    let span = tracing::info_span!("process", message_id = %h.message_id, attempt = h.attempt);
    trace::set_parent_from_headers(&span, d.properties.headers().as_ref());
    span
}
