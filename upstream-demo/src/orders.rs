//! `demo.v1.Orders/CreateOrder`: the producer side of Recheck in three steps —
//! `prepare` (the CHECK is durable) → insert + commit (with the message id) →
//! `publish` (the business message). The caller gets its answer at the commit, as
//! with an outbox: the publish goes on in the background, since the CHECK repairs
//! a lost one anyway. Faults from the request skip a step so load runs can show
//! that the CHECK repairs them.

use std::sync::Arc;

use recheck::{Event, Producer};
use recheck_proto::demo::v1::{CreateOrderRequest, CreateOrderResponse, Fault, orders_server::Orders};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::store::{Order, Store, StoreError};

/// The event type consumers bind to.
pub const ORDER_CREATED: &str = "order.created";

#[derive(Debug, Clone)]
pub struct OrdersService {
    store: Store,
    producer: Producer,
    /// One permit per business publish still waiting for its broker confirm. Bounded: past it a
    /// caller waits for a slot, so a producer faster than the broker is held back instead of
    /// piling up publishes (which would come late, after their checks).
    publish_slots: Arc<Semaphore>,
    /// The consumers each order's CHECK expects (`--expect`).
    expect: Arc<[String]>,
}

/// Business publishes in flight after their orders were answered.
const MAX_BACKGROUND_PUBLISHES: usize = 256;

impl OrdersService {
    pub fn new(store: Store, producer: Producer, expect: Vec<String>) -> Self {
        let publish_slots = Arc::new(Semaphore::new(MAX_BACKGROUND_PUBLISHES));
        Self { store, producer, publish_slots, expect: expect.into() }
    }

    /// Waits for the business publishes under way (before the broker connection closes): every
    /// slot free again.
    pub async fn flush(&self) {
        let _all = self.publish_slots.acquire_many(MAX_BACKGROUND_PUBLISHES as u32).await;
    }

    /// One order, callable without gRPC.
    pub async fn create(&self, req: &CreateOrderRequest) -> Result<CreateOrderResponse, Status> {
        if req.customer.is_empty() || req.amount_cents < 0 {
            return Err(Status::invalid_argument("customer must be set and amount_cents must be ≥ 0"));
        }
        let fault = req.fault();
        let order_id = Uuid::now_v7().to_string();
        let payload = serde_json::json!({
            "order_id": order_id, "customer": req.customer, "amount_cents": req.amount_cents,
        })
        .to_string();

        // 1. Recheck: the CHECK is broker-confirmed before anything commits, so a crash
        //    from here on is repaired (resent if committed, void if not).
        let prepared = self
            .producer
            .prepare(Event {
                routing_key: ORDER_CREATED.into(),
                business_key: order_id.clone(),
                payload: payload.clone().into_bytes(),
                expect: Some(self.expect.to_vec()),
            })
            .await
            .map_err(|e| Status::unavailable(format!("publishing the CHECK: {e}")))?;
        let message_id = prepared.message_id;
        tracing::Span::current().record("message_id", tracing::field::display(message_id));

        // 2. The business transaction stores the message id with the order.
        let order = Order {
            order_id: order_id.clone(),
            message_id,
            customer: req.customer.clone(),
            amount_cents: req.amount_cents,
            payload,
            created_at: recheck::message::now_ms(),
        };
        let mut tx = self.store.begin().await?;
        Store::insert(&mut tx, &order).await?;
        if fault == Fault::AbortAfterCheck {
            tx.rollback().await.map_err(StoreError::from)?;
            let message_id = message_id.to_string();
            return Ok(CreateOrderResponse {
                order_id: String::new(),
                message_id,
                committed: false,
                published: false,
            });
        }
        if fault == Fault::CommitLate {
            tokio::time::sleep_until(prepared.deadline() + std::time::Duration::from_millis(1)).await;
        }
        // Past its deadline the check may already have found no order and settled the id:
        // committing now could lose the message silently, so the order is refused instead.
        if let Err(e) = prepared.ensure_fresh() {
            tx.rollback().await.map_err(StoreError::from)?;
            return Err(Status::deadline_exceeded(e.to_string()));
        }
        tx.commit().await.map_err(StoreError::from)?;

        // 3. Recheck: the business message, off the caller's path. A failure is logged, not
        //    returned: the order is committed and its CHECK will have it resent.
        let published = fault != Fault::SkipPublish;
        if published {
            let slot = self.publish_slots.clone().acquire_owned().await.expect("never closed");
            let publish = async move {
                let _slot = slot;
                if let Err(e) = prepared.publish().await {
                    tracing::warn!(%message_id, error = %e, "publish failed after commit; the CHECK will resend it");
                }
            };
            tokio::spawn(publish.in_current_span());
        }
        tracing::debug!(%order_id, published, "order created");
        Ok(CreateOrderResponse { order_id, message_id: message_id.to_string(), committed: true, published })
    }
}

#[tonic::async_trait]
impl Orders for OrdersService {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        // The order's root span — or the caller's trace, if it sent one (`traceparent`). The
        // CHECK, the business message and any resend of this order continue it.
        let customer = &request.get_ref().customer;
        let span = tracing::info_span!("create_order", %customer, message_id = tracing::field::Empty);
        recheck::trace::set_parent_from_metadata(&span, request.metadata());
        async {
            let created = self.create(request.get_ref()).await;
            if let Err(status) = &created {
                tracing::error!(error = %status.message(), code = ?status.code(), "order not created");
            }
            created.map(Response::new)
        }
        .instrument(span)
        .await
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        // Safe to fail: the CHECK settles the message either way (resent if the order
        // committed after all, `void` once the grace period shows it did not).
        Status::unavailable(format!("order store: {e}"))
    }
}
