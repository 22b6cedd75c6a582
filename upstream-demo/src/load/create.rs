//! Creating the orders: a seeded plan of requests (which ones get a fault), sent
//! at a target rate with bounded concurrency, each call's latency recorded.

use std::time::Duration;

use futures_util::{StreamExt, stream};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use recheck_proto::demo::v1::{CreateOrderRequest, Fault, orders_client::OrdersClient};
use tokio::time::{Instant, sleep_until};
use tonic::transport::Channel;

use super::{LoadConfig, report::Created, report::Latency};

/// What the create phase saw.
pub struct CreatePhase {
    /// Answered calls (committed or rolled back), in completion order.
    pub orders: Vec<Created>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// µs per answered call.
    pub latency: Histogram<u64>,
}

impl CreatePhase {
    pub fn throughput_per_s(&self) -> f64 {
        self.orders.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn latency(&self) -> Latency {
        if self.latency.is_empty() {
            return Latency::default();
        }
        let q = |q: f64| self.latency.value_at_quantile(q);
        Latency { p50: q(0.5), p99: q(0.99), max: self.latency.max() }
    }
}

/// The requests of one run; the same seed gives the same faults and amounts.
pub fn plan(config: &LoadConfig) -> Vec<CreateOrderRequest> {
    let mut rng = StdRng::seed_from_u64(config.seed);
    (0..config.count)
        .map(|i| {
            let roll: f64 = rng.random();
            let fault = if roll < config.abort_after_check_rate {
                Fault::AbortAfterCheck
            } else if roll < config.abort_after_check_rate + config.skip_publish_rate {
                Fault::SkipPublish
            } else {
                Fault::None
            };
            CreateOrderRequest {
                customer: format!("customer-{}", i % 100),
                amount_cents: rng.random_range(100..100_000),
                fault: fault.into(),
            }
        })
        .collect()
}

/// Sends `requests`: the i-th is released at `i / rate` seconds (when `rate` > 0),
/// at most `concurrency` in flight.
pub async fn create_orders(
    client: OrdersClient<Channel>,
    requests: Vec<CreateOrderRequest>,
    rate: f64,
    concurrency: usize,
    bar: ProgressBar,
) -> CreatePhase {
    let start = Instant::now();
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let calls = stream::iter(requests.into_iter().enumerate())
        .then(|(i, request)| async move {
            if let Some(interval) = interval {
                sleep_until(start + interval.mul_f64(i as f64)).await;
            }
            request
        })
        .map(|request| {
            let mut client = client.clone();
            async move {
                let fault = request.fault();
                let sent = Instant::now();
                let answer = client.create_order(request).await;
                (fault, sent.elapsed(), answer)
            }
        })
        .buffer_unordered(concurrency);
    let mut calls = std::pin::pin!(calls);

    let mut phase = CreatePhase {
        orders: Vec::new(),
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        // 1 µs .. 1 h, 3 significant digits; slower calls are clamped to the top.
        latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds"),
    };
    while let Some((fault, took, answer)) = calls.next().await {
        bar.inc(1);
        match answer {
            Ok(response) => {
                let r = response.into_inner();
                let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                phase.latency.saturating_record(micros.max(1));
                phase.orders.push(Created {
                    message_id: r.message_id,
                    fault,
                    committed: r.committed,
                    published: r.published,
                });
            }
            Err(status) => {
                phase.errors += 1;
                phase.first_error.get_or_insert_with(|| format!("{}: {}", status.code(), status.message()));
            }
        }
    }
    phase.elapsed = start.elapsed();
    bar.finish();
    phase
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn load_config(args: &[&str]) -> LoadConfig {
        let args = ["upstream-demo", "load"].iter().chain(args);
        match Cli::try_parse_from(args).unwrap().command {
            Some(Command::Load(config)) => *config,
            other => panic!("not a load command: {other:?}"),
        }
    }

    #[test]
    fn the_plan_is_seeded_and_honours_the_fault_rates() {
        let config = load_config(&[
            "--count",
            "2000",
            "--skip-publish-rate",
            "0.2",
            "--abort-after-check-rate",
            "0.1",
        ]);
        let plan = plan(&config);
        assert_eq!(plan, super::plan(&config), "same seed, same plan");
        let share = |f: Fault| plan.iter().filter(|r| r.fault() == f).count() as f64 / 2000.0;
        assert!((share(Fault::SkipPublish) - 0.2).abs() < 0.04, "{}", share(Fault::SkipPublish));
        assert!((share(Fault::AbortAfterCheck) - 0.1).abs() < 0.03, "{}", share(Fault::AbortAfterCheck));
        let other = load_config(&["--count", "2000", "--seed", "7", "--skip-publish-rate", "0.2"]);
        assert_ne!(plan, super::plan(&other));
    }
}
