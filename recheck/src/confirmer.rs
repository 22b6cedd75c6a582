//! Publishing CONFIRMs, group-committed: concurrent confirms share one CONFIRM
//! message, and each caller returns once the broker confirmed it.

use crate::{
    GroupCommit, GroupCommitConfig, Outgoing, Publisher, Result, Topology,
    message::{Confirm, ConfirmBatch},
    producer::json_properties,
};

pub struct Confirmer {
    consumer: String,
    batches: GroupCommit<Confirm>,
}

impl Confirmer {
    pub fn new(
        publisher: Publisher,
        topology: Topology,
        consumer: impl Into<String>,
        config: GroupCommitConfig,
    ) -> Self {
        let consumer = consumer.into();
        let name = consumer.clone();
        let exchange = topology.confirms_exchange();
        let batches = GroupCommit::spawn(config, move |confirms| {
            let (publisher, exchange) = (publisher.clone(), exchange.clone());
            let body = serde_json::to_vec(&ConfirmBatch::new(name.clone(), confirms));
            async move {
                let body = body?;
                publisher
                    .publish(Outgoing {
                        exchange: &exchange,
                        routing_key: "",
                        body: &body,
                        properties: json_properties(),
                    })
                    .await
            }
        });
        Self { consumer, batches }
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    pub async fn confirm(&self, confirm: Confirm) -> Result<()> {
        self.batches.submit(confirm).await
    }

    /// Confirms that travel in one CONFIRM message (a consumer's micro-batch).
    pub async fn confirm_all(&self, confirms: Vec<Confirm>) -> Result<()> {
        self.batches.submit_many(confirms).await
    }

    /// Publishes what is pending and waits for it.
    pub async fn close(self) {
        self.batches.close().await;
    }
}
