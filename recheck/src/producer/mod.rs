//! The producer's side: publish the CHECK first, commit, then publish the
//! business message (`prepare` → commit → `Prepared::publish`).

pub mod hook;
mod reserve;

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

pub use reserve::ReserveConfig;

use crate::{
    broker::control::{now_secs, publish_checks},
    broker::{
        group_commit::{GroupCommit, GroupCommitConfig, Weight},
        publisher::{Outgoing, Publisher},
        topology::Topology,
    },
    error::{Error, Result},
    producer::reserve::{Kind, Pool},
    telemetry::{self, trace},
    wire::message::{BusinessHeaders, Check, CheckBatch, now_ms},
};

/// What a producer publishes after its business transaction.
#[derive(Debug, Clone)]
pub struct Event {
    /// Event type, the routing key on the events exchange (`order.created`).
    pub routing_key: String,
    /// The producer's own key for the record (an order id); handed back on resend.
    pub business_key: String,
    /// The business message's body. A resend publishes what the
    /// [`ResendSource`](crate::producer::hook::ResendSource) finds instead: store these bytes with the record.
    pub payload: Vec<u8>,
    /// Consumers that must confirm; `None` = any one confirm suffices.
    pub expect: Option<Vec<String>>,
}

/// A producer's name, check delay and CHECK batching; [`ProducerConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// The producer's name, as registered in the callback service.
    pub name: String,
    /// Delay before the first check (rounded up to a tier).
    pub check_delay: Duration,
    /// How CHECKs are batched: concurrent `prepare` calls share one CHECK message.
    pub group_commit: GroupCommitConfig,
    /// How long a business transaction may take from `prepare` to its commit: the grace its
    /// [`ResendHookService`](crate::producer::hook::ResendHookService) is given (the same value). A
    /// [`Prepared`] past it is refused by [`Prepared::ensure_fresh`].
    pub grace: Duration,
    /// Reserved CHECKs: `prepare` without a broker round trip (see [`ReserveConfig`]); `None`
    /// publishes every CHECK by the group commit.
    pub reserve: Option<ReserveConfig>,
}

impl ProducerConfig {
    /// Defaults for `name`: the first check after 30 s, a grace of 10 s, the default CHECK
    /// batching, no reservations (their rule ties them to your grace: turn them on with
    /// [`ProducerConfig::reserving`]).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            check_delay: Duration::from_secs(30),
            group_commit: GroupCommitConfig::default(),
            grace: Duration::from_secs(10),
            reserve: None,
        }
    }

    /// The same, with reserved CHECKs (the default [`ReserveConfig`]).
    pub fn reserving(self) -> Self {
        Self { reserve: Some(ReserveConfig::default()), ..self }
    }

    /// Refuses a configuration whose reservations could be handed out too late: a transaction
    /// must have its whole grace before the check can find its record missing, so
    /// `max_age + grace ≤ check_delay`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let Some(reserve) = &self.reserve else { return Ok(()) };
        if reserve.max_age + self.grace > self.check_delay {
            return Err(format!(
                "reserved checks need max_age + grace <= check_delay, but {:?} + {:?} > {:?}: \
                 shorten the reservations' max age or the grace, lengthen the check delay, or turn \
                 reservations off",
                reserve.max_age, self.grace, self.check_delay
            ));
        }
        if reserve.max_pool == 0 || reserve.ahead.is_zero() {
            return Err("reserved checks need max_pool >= 1 and ahead > 0".into());
        }
        Ok(())
    }
}

/// The producer side: [`Producer::prepare`] publishes a message's delayed CHECK,
/// [`Prepared::publish`] its business message once the caller committed.
///
/// Cheap to clone; all clones share one check batcher.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProducerConfig,
    publisher: Publisher,
    topology: Topology,
    checks: GroupCommit<Check>,
    /// The reserved CHECKs, and their refiller (stopped by [`Producer::close`]).
    pool: Option<Arc<Pool>>,
    refiller: CancellationToken,
    tasks: TaskTracker,
}

/// A message whose CHECK is durable; store [`Prepared::message_id`] with the
/// business row, call [`Prepared::ensure_fresh`], commit, then call [`Prepared::publish`].
#[derive(Debug)]
pub struct Prepared {
    producer: Producer,
    /// The business message's id: store it with the business row, for the resend hook's lookup.
    pub message_id: Uuid,
    /// The event as prepared.
    pub event: Event,
    /// Whether the id came from the pool of reserved CHECKs.
    pub reserved: bool,
    /// Commit before this, or the check may find no record and settle the id.
    deadline: Instant,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("config", &self.inner.config).finish()
    }
}

impl Producer {
    /// A producer named `config.name`, publishing through `publisher` into `topology`. It starts
    /// its CHECK batcher (and the refiller of its reserved CHECKs) as tasks, so call it inside a
    /// Tokio runtime. Panics on a configuration [`ProducerConfig::validate`] refuses: see
    /// [`Producer::try_new`].
    pub fn new(publisher: Publisher, topology: Topology, config: ProducerConfig) -> Self {
        Self::try_new(publisher, topology, config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Producer::new`], refusing a configuration [`ProducerConfig::validate`] refuses.
    pub fn try_new(publisher: Publisher, topology: Topology, config: ProducerConfig) -> Result<Self> {
        config.validate().map_err(Error::Config)?;
        let (p, t, name, delay) =
            (publisher.clone(), topology.clone(), config.name.clone(), config.check_delay);
        // Weighed as the CHECK is encoded, so no batch exceeds what the callback service accepts.
        let weight = Weight::json(&CheckBatch::new(name.clone(), Vec::new()));
        let checks = GroupCommit::spawn_weighed(config.group_commit, weight, move |checks| {
            let (p, t, batch) = (p.clone(), t.clone(), CheckBatch::new(name.clone(), checks));
            async move { publish_checks(&p, &t, &batch, delay).await }
        });
        let (refiller, tasks) = (CancellationToken::new(), TaskTracker::new());
        let pool = config.reserve.clone().map(|reserve| {
            let pool = Arc::new(Pool::new(reserve));
            let target = reserve::Target {
                publisher: publisher.clone(),
                topology: topology.clone(),
                producer: config.name.clone(),
                check_delay: config.check_delay,
                max_ids: config.group_commit.max_items,
                max_bytes: config.group_commit.max_bytes,
            };
            tasks.spawn(reserve::refill_loop(pool.clone(), target, refiller.clone()));
            pool
        });
        tasks.close();
        Ok(Self { inner: Arc::new(Inner { config, publisher, topology, checks, pool, refiller, tasks }) })
    }

    /// Stops reserving and gives back the unused reservations in one RELEASE, so none of them
    /// costs the callback service a hook call. Call it at shutdown, after the last `prepare`
    /// and before closing the publisher; a `prepare` after it falls back to the group commit.
    pub async fn close(&self) {
        self.inner.refiller.cancel();
        self.inner.tasks.wait().await;
    }

    /// Reservations held now (0 without reservations).
    pub fn reserved(&self) -> usize {
        self.inner.pool.as_ref().map_or(0, |p| p.len())
    }

    /// The producer's name, as CHECKs, headers and the hook's requests carry it.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// The publisher it publishes through (for readiness, or to close it at shutdown).
    pub fn publisher(&self) -> &Publisher {
        &self.inner.publisher
    }

    /// The topology it publishes into.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Step 1 of the safe order: publishes (group-committed) the delayed CHECK. The check
    /// carries this span's `traceparent`, so the callback service continues the caller's trace.
    /// An event the callback service would refuse ([`Check::validate`], or too big for one CHECK
    /// within [`GroupCommitConfig::max_bytes`]) is refused with [`Error::Invalid`], unpublished.
    #[tracing::instrument(
        skip_all,
        fields(producer = %self.name(), business_key = %event.business_key, message_id),
        err
    )]
    pub async fn prepare(&self, event: Event) -> Result<Prepared> {
        let fresh_id = Uuid::now_v7();
        let check = self.check_for(fresh_id, &event);
        check.validate().map_err(Error::Invalid)?;
        let config = &self.inner.config;
        let reservation =
            self.inner.pool.as_ref().filter(|_| !self.inner.refiller.is_cancelled()).and_then(|pool| {
                pool.take(&Kind { routing_key: event.routing_key.clone(), expect: event.expect.clone() })
            });
        // The check finds a missing record no sooner than `check_delay` after its CHECK was
        // published, and the hook answers NOT_FOUND no sooner than `grace` after it.
        let after = config.check_delay.max(config.grace);
        let (message_id, deadline, path) = match reservation {
            Some(r) => (r.id, r.born + after, "reserved"),
            None => {
                let started = Instant::now();
                self.inner.checks.submit(check).await?;
                (fresh_id, started + after, "group_commit")
            }
        };
        tracing::Span::current().record("message_id", tracing::field::display(message_id));
        metrics::counter!(telemetry::PREPARED, "producer" => self.name().to_owned(), "path" => path)
            .increment(1);
        tracing::debug!(path, "check prepared");
        Ok(Prepared { producer: self.clone(), message_id, event, reserved: path == "reserved", deadline })
    }

    /// Publishes a business message with Recheck headers and the current span's trace context
    /// (`traceparent`); `attempt` 0 is the original, n the n-th resend. Waits for the broker's
    /// confirm.
    pub async fn publish_business(
        &self,
        message_id: Uuid,
        routing_key: &str,
        business_key: &str,
        payload: &[u8],
        attempt: u32,
    ) -> Result<()> {
        let headers = BusinessHeaders {
            message_id,
            producer: self.name().to_owned(),
            business_key: business_key.to_owned(),
            attempt,
        };
        let exchange = self.inner.topology.events_exchange();
        let properties = headers.to_properties();
        let mut table = properties.headers().clone().unwrap_or_default();
        trace::inject_headers(&mut table);
        self.inner
            .publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key,
                body: payload,
                properties: properties.with_headers(table).with_timestamp(now_secs()),
            })
            .await?;
        tracing::debug!(%message_id, attempt, "business message published");
        let kind = if attempt == 0 { "original" } else { "resend" };
        metrics::counter!(telemetry::BUSINESS_PUBLISHED, "producer" => self.name().to_owned(), "kind" => kind)
            .increment(1);
        Ok(())
    }

    fn check_for(&self, message_id: Uuid, event: &Event) -> Check {
        Check {
            message_id,
            routing_key: event.routing_key.clone(),
            business_key: event.business_key.clone(),
            attempt: 0,
            published_at: now_ms(),
            expect: event.expect.clone(),
            traceparent: trace::current_traceparent(),
            reserved: false,
        }
    }
}

impl Prepared {
    /// The latest moment the business record may commit: after it, the message's check may
    /// already have found no record and settled the id (`unused` or `void`), and nothing would
    /// resend a message lost later. At least the configured grace after `prepare`.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Refuses ([`Error::Expired`]) a prepared message past its [`Prepared::deadline`]: call it
    /// right before the commit, and roll back on the error (then `prepare` again if you retry).
    pub fn ensure_fresh(&self) -> Result<()> {
        let now = Instant::now();
        if now > self.deadline {
            return Err(Error::Expired { message_id: self.message_id, by: now - self.deadline });
        }
        Ok(())
    }

    /// Step 3: publishes the business message after the caller committed. An
    /// error here is safe to log and move on from: the CHECK drives a resend.
    #[tracing::instrument(skip_all, fields(message_id = %self.message_id), err)]
    pub async fn publish(self) -> Result<()> {
        let e = &self.event;
        self.producer.publish_business(self.message_id, &e.routing_key, &e.business_key, &e.payload, 0).await
    }
}
