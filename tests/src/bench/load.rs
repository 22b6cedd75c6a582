//! The order workload, as a client of a `demo.v1.Orders` service (upstream-demo for Recheck, the
//! bench's outbox service for the baseline): the same requests, concurrency and latency
//! recording for both, so their create latencies compare like for like.

use std::{future::Future, time::Duration};

use anyhow::{Context, Result};
use futures_util::{StreamExt, stream};
use hdrhistogram::Histogram;
use recheck_proto::demo::v1::{CreateOrderRequest, Fault, orders_client::OrdersClient};
use serde::Serialize;
use tokio::time::{Instant, sleep_until};

/// Latency percentiles, µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self { p50: h.value_at_quantile(0.5), p99: h.value_at_quantile(0.99), max: h.max() }
    }
}

/// A latency histogram: 1 µs .. 1 h, 3 significant digits (slower values are clamped).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds")
}

/// Records one call's duration.
pub fn record(h: &mut Histogram<u64>, took: Duration) {
    h.saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
}

/// What one load phase saw.
pub struct Driven {
    /// Wall-clock ms when the first call was made.
    pub started_ms: i64,
    pub elapsed: Duration,
    /// Calls that succeeded.
    pub done: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Latency of the successful calls.
    pub latency: Histogram<u64>,
}

impl Driven {
    /// Fails unless every call succeeded.
    pub fn ensure_ok(&self, what: &str) -> Result<()> {
        anyhow::ensure!(
            self.errors == 0,
            "{what}: {} calls failed, the first: {:?}",
            self.errors,
            self.first_error
        );
        Ok(())
    }
}

/// Makes `count` calls `call(i)`, at most `concurrency` in flight; when `rate` > 0 the i-th is
/// released at `i / rate` seconds (an open-loop offered load), else as fast as they complete.
pub async fn drive<F, Fut>(count: u64, rate: u64, concurrency: usize, call: F) -> Driven
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let start = Instant::now();
    let started_ms = recheck::message::now_ms();
    let interval = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
    let calls = stream::iter(0..count)
        .then(|i| async move {
            if let Some(interval) = interval {
                sleep_until(start + interval.mul_f64(i as f64)).await;
            }
            i
        })
        .map(|i| {
            let call = call(i);
            async move {
                let sent = Instant::now();
                let result = call.await;
                (sent.elapsed(), result)
            }
        })
        .buffer_unordered(concurrency.max(1));
    let mut calls = std::pin::pin!(calls);
    let mut driven = Driven {
        started_ms,
        elapsed: Duration::ZERO,
        done: 0,
        errors: 0,
        first_error: None,
        latency: histogram(),
    };
    while let Some((took, result)) = calls.next().await {
        match result {
            Ok(()) => {
                driven.done += 1;
                record(&mut driven.latency, took);
            }
            Err(e) => {
                driven.errors += 1;
                driven.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    driven.elapsed = start.elapsed();
    driven
}

/// `count` `CreateOrder` calls to the order service at `addr` (see [`drive`]); a call counts
/// as done when the order committed.
pub async fn create_orders(addr: &str, count: u64, rate: u64, concurrency: usize) -> Result<Driven> {
    let client = OrdersClient::connect(addr.to_owned())
        .await
        .with_context(|| format!("connecting to the order service at {addr}"))?;
    let driven = drive(count, rate, concurrency, |i| {
        let mut client = client.clone();
        async move {
            let request = CreateOrderRequest {
                customer: format!("customer-{}", i % 100),
                amount_cents: 100 + (i.wrapping_mul(7919) % 99_900) as i64,
                fault: Fault::None.into(),
            };
            let response = client.create_order(request).await?;
            anyhow::ensure!(response.get_ref().committed, "the order did not commit");
            Ok(())
        }
    })
    .await;
    Ok(driven)
}
