//! The producer's side: publish the CHECK first, commit, then publish the
//! business message (`prepare` → commit → `Prepared::publish`).

use std::{sync::Arc, time::Duration};

use lapin::BasicProperties;
use uuid::Uuid;

use crate::{
    Error, GroupCommit, GroupCommitConfig, Outgoing, Publisher, Result, Topology,
    group_commit::Weight,
    message::{BusinessHeaders, CONTENT_TYPE_JSON, Check, CheckBatch, now_ms},
    telemetry, trace,
};

/// What a producer publishes after its business transaction.
#[derive(Debug, Clone)]
pub struct Event {
    /// Event type, the routing key on the events exchange (`order.created`).
    pub routing_key: String,
    /// The producer's own key for the record (an order id); handed back on resend.
    pub business_key: String,
    /// The business message's body. A resend publishes what the
    /// [`ResendSource`](crate::ResendSource) finds instead: store these bytes with the record.
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
}

impl ProducerConfig {
    /// Defaults for `name`: the first check after 30 s, the default CHECK batching.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            check_delay: Duration::from_secs(30),
            group_commit: GroupCommitConfig::default(),
        }
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
}

/// A message whose CHECK is durable; store [`Prepared::message_id`] with the
/// business row, commit, then call [`Prepared::publish`].
#[derive(Debug)]
pub struct Prepared {
    producer: Producer,
    /// The business message's id: store it with the business row, for the resend hook's lookup.
    pub message_id: Uuid,
    /// The event as prepared.
    pub event: Event,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("config", &self.inner.config).finish()
    }
}

impl Producer {
    /// A producer named `config.name`, publishing through `publisher` into `topology`. It starts
    /// its CHECK batcher as a task, so call it inside a Tokio runtime.
    pub fn new(publisher: Publisher, topology: Topology, config: ProducerConfig) -> Self {
        let (p, t, name, delay) =
            (publisher.clone(), topology.clone(), config.name.clone(), config.check_delay);
        // Weighed as the CHECK is encoded, so no batch exceeds what the callback service accepts.
        let weight = Weight::json(&CheckBatch::new(name.clone(), Vec::new()));
        let checks = GroupCommit::spawn_weighed(config.group_commit, weight, move |checks| {
            let (p, t, batch) = (p.clone(), t.clone(), CheckBatch::new(name.clone(), checks));
            async move { publish_checks(&p, &t, &batch, delay).await }
        });
        Self { inner: Arc::new(Inner { config, publisher, topology, checks }) }
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
        let message_id = Uuid::now_v7();
        tracing::Span::current().record("message_id", tracing::field::display(message_id));
        let check = self.check_for(message_id, &event);
        check.validate().map_err(Error::Invalid)?;
        self.inner.checks.submit(check).await?;
        metrics::counter!(telemetry::PREPARED, "producer" => self.name().to_owned()).increment(1);
        tracing::debug!("check prepared");
        Ok(Prepared { producer: self.clone(), message_id, event })
    }

    /// The seed order (business message, then check): loses the message if the
    /// process dies in between. Kept for comparison and for producers without a
    /// transaction to wrap.
    pub async fn publish_with_check(&self, event: Event) -> Result<Uuid> {
        let message_id = Uuid::now_v7();
        self.publish_business(message_id, &event.routing_key, &event.business_key, &event.payload, 0).await?;
        self.inner.checks.submit(self.check_for(message_id, &event)).await?;
        Ok(message_id)
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
        }
    }
}

impl Prepared {
    /// Step 3: publishes the business message after the caller committed. An
    /// error here is safe to log and move on from: the CHECK drives a resend.
    #[tracing::instrument(skip_all, fields(message_id = %self.message_id), err)]
    pub async fn publish(self) -> Result<()> {
        let e = &self.event;
        self.producer.publish_business(self.message_id, &e.routing_key, &e.business_key, &e.payload, 0).await
    }
}

/// Publishes one CHECK message into the delay tier for `delay`. Also used by
/// the callback service to schedule the next check.
pub async fn publish_checks(
    publisher: &Publisher,
    topology: &Topology,
    batch: &CheckBatch,
    delay: Duration,
) -> Result<()> {
    let body = serde_json::to_vec(batch)?;
    let exchange = topology.delay_exchange();
    let routing_key = topology.tier_routing_key(topology.tier_for(delay));
    publisher
        .publish(Outgoing {
            exchange: &exchange,
            routing_key: &routing_key,
            body: &body,
            properties: json_properties(),
        })
        .await?;
    metrics::histogram!(telemetry::CHECK_BATCH_SIZE, "producer" => batch.producer.clone())
        .record(batch.checks.len() as f64);
    Ok(())
}

/// Properties of a CHECK / CONFIRM message: JSON, its own batch id.
pub(crate) fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE_JSON.into())
        .with_message_id(Uuid::now_v7().to_string().into())
        .with_timestamp(now_secs())
}

fn now_secs() -> u64 {
    u64::try_from(now_ms() / 1000).unwrap_or_default()
}
