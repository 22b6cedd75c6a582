//! Firing one fault of the matrix, and the mechanics the rows share (an endpoint refused or
//! black-holed for a while, a service killed and started again).

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::{Instant, sleep};

use super::{Broker, Fault, POINTS, SHIPPING};
use crate::{
    deploy::{Deployment, Role},
    proxy::FaultProxy,
};

/// The fault proxies of a run, where it has them.
pub(super) struct Proxies<'a> {
    pub amqp: Option<&'a FaultProxy>,
    pub hook: Option<&'a FaultProxy>,
    pub store: Option<&'a FaultProxy>,
}

/// Fires `fault` and returns once it is over (`outage` later, for the lasting ones). Faults that
/// are settings of the run (dropped publishes or confirms, two instances) do nothing here.
pub(super) async fn inject(
    deployment: &mut Deployment,
    broker: &Broker<'_>,
    proxies: &Proxies<'_>,
    fault: Fault,
    outage: Duration,
) -> Result<()> {
    match fault {
        Fault::None | Fault::BusinessDropped | Fault::ConfirmDropped | Fault::TwoCallbacks | Fault::Mixed => {
        }
        Fault::ConsumerKilled => bounce(deployment, deployment.consumer_role(POINTS)?, outage).await?,
        Fault::ConsumerDown => bounce(deployment, deployment.consumer_role(SHIPPING)?, outage).await?,
        Fault::CallbackKilled => bounce(deployment, Role::Callback(0), outage).await?,
        Fault::ProducerKilled => bounce(deployment, Role::Upstream, outage).await?,
        Fault::HookDown => refused(proxies.hook.context("no proxy in front of the hook")?, outage).await,
        Fault::HookHangs => stalled(proxies.hook.context("no proxy in front of the hook")?, outage).await,
        Fault::StoreDown => refused(proxies.store.context("no proxy in front of the store")?, outage).await,
        Fault::ChecksParked => checks_parked_by_the_limit(deployment).await?,
        Fault::BrokerRestart => {
            broker.rabbit.stop_app().await?;
            sleep(outage).await;
            broker.rabbit.start_app().await?;
        }
        Fault::MemoryAlarm => {
            broker.rabbit.ctl(&["set_vm_memory_high_watermark", "absolute", "1"]).await?;
            sleep(outage).await;
            broker.rabbit.ctl(&["set_vm_memory_high_watermark", "0.4"]).await?;
        }
        Fault::ConnectionsCut => proxies.amqp.context("no proxy in front of the broker")?.cut(),
        Fault::ConnectionsStalled => {
            stalled(proxies.amqp.context("no proxy in front of the broker")?, outage).await
        }
        Fault::NodeKilled => {
            // Every service connects to the first address first.
            let cluster = broker.cluster.context("a node can be killed only in a cluster")?;
            cluster.kill(0).await?;
            sleep(outage).await;
            cluster.restart(0).await?;
        }
    }
    Ok(())
}

/// A down endpoint for `outage`: live connections reset, new ones refused.
async fn refused(proxy: &FaultProxy, outage: Duration) {
    proxy.refuse(true);
    proxy.cut();
    sleep(outage).await;
    proxy.refuse(false);
}

/// A black hole for `outage`: connections stay open, no byte goes through.
async fn stalled(proxy: &FaultProxy, outage: Duration) {
    proxy.stall();
    sleep(outage).await;
    proxy.resume();
}

/// kill -9, a pause, start again.
async fn bounce(deployment: &mut Deployment, role: Role, outage: Duration) -> Result<()> {
    deployment.kill(role).await?;
    sleep(outage).await;
    deployment.start_service(role).await
}

/// The callback's `messages` table renamed away: every check and confirm delivery fails and is
/// held in hand, its rows never recorded, while the process stays up (its migrations are done).
/// The callback is killed each time it holds CHECKs again and started again, until the broker has
/// had them back more than `x-delivery-limit` times and parked them; then the table comes back.
async fn checks_parked_by_the_limit(deployment: &mut Deployment) -> Result<()> {
    let callback = Role::Callback(0);
    let (store, _) = recheck::db::connect(&deployment.callback_db).await?;
    sqlx::query("ALTER TABLE messages RENAME TO messages_away").execute(&store).await?;
    let returns = recheck::Topology::default().delivery_limit + 1;
    let mut before = check_retries(deployment, callback).await?;
    for round in 1..=returns {
        // Held: a CHECK delivery failed in this process (the ones handed back come first). A
        // scrape may fail at first: the ops port is bound just after the gRPC port the start
        // waits for.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !check_retries(deployment, callback).await.is_ok_and(|n| n > before) {
            anyhow::ensure!(Instant::now() < deadline, "round {round}: the callback holds no CHECK");
            sleep(Duration::from_millis(100)).await;
        }
        deployment.kill(callback).await?;
        if round < returns {
            deployment.start_service(callback).await?;
            before = 0.0;
        }
    }
    // Down, so nothing takes them out of parking before they are seen there.
    let deadline = Instant::now() + Duration::from_secs(30);
    while deployment.parked().await? == 0 {
        anyhow::ensure!(Instant::now() < deadline, "nothing parked after {returns} returns");
        sleep(Duration::from_millis(200)).await;
    }
    deployment.start_service(callback).await?;
    sqlx::query("ALTER TABLE messages_away RENAME TO messages").execute(&store).await?;
    store.close().await;
    Ok(())
}

/// CHECK deliveries `role` has retried in place since it started.
async fn check_retries(deployment: &Deployment, role: Role) -> Result<f64> {
    let metrics = deployment.scrape(role).await?;
    Ok(metrics.sum(recheck::telemetry::DELIVERY_RETRIES, &[("queue", "recheck.checks")]))
}
