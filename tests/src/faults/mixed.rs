//! The mixed run: background faults on, and the disruptive faults fired at random moments.

use std::time::Duration;

use anyhow::Result;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use tokio::time::{Instant, sleep};

use super::{Broker, Fault, Outcome, Proxies, Scenario, consumers, inject};
use crate::{
    deploy::{ConsumerFaults, DeployOptions, Deployment, LoadOptions},
    proxy::FaultProxy,
};

/// A long run with background faults on and the disruptive ones fired at random moments.
pub async fn run_mixed(
    broker: &Broker<'_>,
    bin_dir: &std::path::Path,
    scenario: &Scenario,
    seed: u64,
) -> Result<Outcome> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let vhost = broker.rabbit.fresh_vhost().await?;
    let proxy = FaultProxy::start_for(&vhost.url)?;
    let mut opts = DeployOptions::new(&scenario.dir, proxy.url_for(&vhost.url));
    // Failures and rejections on both (rejections by message id, so both reject the same orders).
    let both = ConsumerFaults { fail_rate: 0.02, reject_rate: 0.01, ..ConsumerFaults::default() };
    opts.consumers =
        consumers(ConsumerFaults { drop_confirm_rate: 0.02, drop_message_rate: 0.01, ..both.clone() });
    opts.consumers[0].faults = both;
    let load = LoadOptions {
        rate: scenario.rate,
        skip_publish_rate: 0.02,
        abort_after_check_rate: 0.02,
        ..LoadOptions::new(scenario.orders)
    };
    let mut deployment = Deployment::start(bin_dir, &opts).await?;
    let running = deployment.spawn_load(&load)?;
    let duration = Duration::from_secs_f64(scenario.orders as f64 / scenario.rate.max(1) as f64);
    let disruptive = [
        Fault::ConsumerKilled,
        Fault::CallbackKilled,
        Fault::BrokerRestart,
        Fault::MemoryAlarm,
        Fault::ConnectionsCut,
    ];
    let mut at = Duration::ZERO;
    let mut fired = 0;
    loop {
        at += Duration::from_secs_f64(rng.random_range(0.1..0.25) * duration.as_secs_f64());
        if at >= duration {
            break;
        }
        sleep(at.saturating_sub(started.elapsed())).await;
        let fault = disruptive[rng.random_range(0..disruptive.len())];
        let outage = Duration::from_millis(rng.random_range(1_000..5_000));
        tracing::info!(?fault, ?outage, "chaos: injecting");
        eprintln!("chaos: {:>6.1}s {fault:?} for {outage:?}", started.elapsed().as_secs_f64());
        let proxies = Proxies { amqp: Some(&proxy), hook: None, store: None };
        inject(&mut deployment, broker, &proxies, fault, outage).await?;
        fired += 1;
    }
    let recovered = Instant::now();
    let load = crate::deploy::finish_load(running).await?;
    let verdict = deployment.wait_settled(scenario.settle_within).await?;
    let reconcile_s = recovered.elapsed().as_secs_f64();
    let parked = deployment.parked().await?;
    let usage = deployment.stop().await?;
    tracing::info!(fired, "chaos run done");
    Ok(Outcome {
        fault: Fault::Mixed,
        orders: scenario.orders,
        deferral: true,
        verdict,
        load,
        committed_at_fault: 0,
        reconcile_s,
        parked,
        elapsed_s: started.elapsed().as_secs_f64(),
        peak_rss_bytes: super::long::peak_rss(&usage),
        long: None,
    })
}
