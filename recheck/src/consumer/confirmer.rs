//! Publishing CONFIRMs, group-committed: concurrent confirms share one CONFIRM
//! message, and each caller returns once the broker confirmed it.

use crate::{
    broker::{
        control::json_properties,
        group_commit::{GroupCommit, GroupCommitConfig, Weight},
        publisher::{Outgoing, Publisher},
        topology::Topology,
    },
    error::Result,
    security::signing::SigningKey,
    telemetry,
    wire::message::{Confirm, ConfirmBatch, Outcome},
};

/// A CONFIRM carries each id once (receivers refuse repeats): when a message and
/// its duplicate land in one batch, the first real outcome wins over `duplicate`.
fn one_per_id(confirms: Vec<Confirm>) -> Vec<Confirm> {
    let mut out: Vec<Confirm> = Vec::with_capacity(confirms.len());
    let mut index = std::collections::HashMap::with_capacity(confirms.len());
    for c in confirms {
        match index.get(&c.message_id) {
            None => {
                index.insert(c.message_id, out.len());
                out.push(c);
            }
            Some(&i) if out[i].outcome == Outcome::Duplicate && c.outcome != Outcome::Duplicate => out[i] = c,
            Some(_) => {}
        }
    }
    out
}

/// Publishes one consumer's CONFIRMs to the confirms exchange. [`ConsumerLoop`](crate::consumer::consume::ConsumerLoop)
/// confirms through one; a consumer with a loop of its own calls [`Confirmer::confirm`] once
/// the transaction that applied the effect has committed.
pub struct Confirmer {
    consumer: String,
    batches: GroupCommit<Confirm>,
}

impl Confirmer {
    /// An unsigned confirmer for `consumer`: the name a CHECK's `expect` lists and the inbox
    /// keys rows by. `config` caps each CONFIRM (the default fits the callback service's
    /// default limits).
    pub fn new(
        publisher: Publisher,
        topology: Topology,
        consumer: impl Into<String>,
        config: GroupCommitConfig,
    ) -> Self {
        Self::signed(publisher, topology, consumer, config, None)
    }

    /// A confirmer whose CONFIRMs carry an HMAC-SHA256 signature under `key` (when the callback
    /// service requires signed confirms: see [`crate::security::signing`]).
    pub fn signed(
        publisher: Publisher,
        topology: Topology,
        consumer: impl Into<String>,
        config: GroupCommitConfig,
        key: Option<SigningKey>,
    ) -> Self {
        let consumer = consumer.into();
        let name = consumer.clone();
        let exchange = topology.confirms_exchange();
        // Weighed as the CONFIRM is encoded, so no batch exceeds what the callback service accepts.
        let weight = Weight::json(&ConfirmBatch::new(name.clone(), Vec::new()));
        let batches = GroupCommit::spawn_weighed(config, weight, move |confirms| {
            let (publisher, exchange, key) = (publisher.clone(), exchange.clone(), key.clone());
            let batch = ConfirmBatch::new(name.clone(), one_per_id(confirms));
            let (ids, body) = (batch.confirms.len(), serde_json::to_vec(&batch));
            let consumer = name.clone();
            async move {
                let body = body?;
                let properties = match &key {
                    Some(key) => key.sign_properties(&body, json_properties()),
                    None => json_properties(),
                };
                publisher
                    .publish(Outgoing { exchange: &exchange, routing_key: "", body: &body, properties })
                    .await?;
                metrics::histogram!(telemetry::CONFIRM_BATCH_SIZE, "consumer" => consumer).record(ids as f64);
                Ok(())
            }
        });
        Self { consumer, batches }
    }

    /// The consumer name every CONFIRM of this confirmer carries.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Confirms one message, sharing a CONFIRM with concurrent callers; returns once the broker
    /// confirmed that CONFIRM. Only after the effect committed: a confirm stops the resends.
    pub async fn confirm(&self, confirm: Confirm) -> Result<()> {
        self.batches.submit(confirm).await
    }

    /// Confirms of a consumer's micro-batch: one CONFIRM when they fit its caps, else as few
    /// as do (a bigger micro-batch must not be refused whole). Refused with
    /// [`crate::error::Error::Invalid`], nothing sent, if one confirm alone is too big.
    pub async fn confirm_all(&self, confirms: Vec<Confirm>) -> Result<()> {
        self.batches.submit_split(confirms).await
    }

    /// Publishes what is pending and waits for it.
    pub async fn close(self) {
        self.batches.close().await;
    }
}
