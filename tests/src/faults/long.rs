//! The long rows (`chaos --long`): an outage of many minutes under a steady load, and what a row
//! measures around it — hook calls made while it lasted, `failed` rows when it ended, and how long
//! the store took to settle every message prepared before it ended (the drain).

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    time::Duration,
};

use anyhow::Result;
use serde::Serialize;
use tokio::time::{Instant, sleep};

use super::{Fault, Scenario};
use crate::deploy::{Deployment, Role, Usage};

/// Load before the outage starts and after it ends.
const WARMUP: Duration = Duration::from_secs(30);
const AFTER: Duration = Duration::from_secs(30);
/// The production delay tiers (callback-service's default): the deferral's backoff and the breaker
/// behave over a long outage as they would deployed.
const DEFAULT_TIERS: &str = "5s,30s,2m,10m,1h";

/// The three long rows: `shipping` down and the producer's hook down for `outage`, the node every
/// service is connected to down for `node_outage`, each under `rate` orders/s from [`WARMUP`]
/// before the outage to [`AFTER`] after it.
pub fn scenarios(outage: Duration, node_outage: Duration, rate: u64, dir: &Path) -> Vec<Scenario> {
    [(Fault::ConsumerDown, outage), (Fault::HookDown, outage), (Fault::NodeKilled, node_outage)]
        .into_iter()
        .map(|(fault, outage)| {
            let secs = (WARMUP + outage + AFTER).as_secs_f64();
            let orders = (secs * rate as f64).round() as u64;
            let mut s = Scenario::new(fault, orders, dir.join(format!("long-{fault:?}")));
            s.rate = rate;
            s.at = WARMUP.as_secs_f64() / secs;
            s.outage = outage;
            s.tiers = Some(DEFAULT_TIERS.into());
            s.long = true;
            // Past the outage: a check the breaker or a failed call put on a 2 min or 10 min tier
            // comes due within it; longer is a stuck row, reported as such.
            s.settle_within = Duration::from_secs(720);
            s
        })
        .collect()
}

/// What a long row measured around its outage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LongMeasures {
    pub outage_s: f64,
    /// Hook RPCs the callback made while the outage lasted (`recheck_hook_rpc_seconds_count`).
    pub hook_calls_in_outage: u64,
    /// `failed` rows in the callback store when the outage ended.
    pub failed_at_outage_end: u64,
    /// From the end of the outage until no order committed by then was still open (`None`: not
    /// within the row's settle bound).
    pub drain_s: Option<f64>,
}

/// Hook RPCs the first callback instance has made so far.
pub(super) async fn hook_calls(deployment: &Deployment) -> Result<f64> {
    let metrics = deployment.scrape(Role::Callback(0)).await?;
    Ok(metrics.sum(&format!("{}_count", recheck::telemetry::HOOK_RPC_SECONDS), &[]))
}

/// `failed` rows in the callback store now.
pub(super) async fn failed_now(deployment: &Deployment) -> Result<u64> {
    let (store, _) = recheck::db::connect(&deployment.callback_db).await?;
    let (n,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM messages WHERE status = 'failed'").fetch_one(&store).await?;
    store.close().await;
    Ok(n as u64)
}

/// Waits until no order committed by `ended` is open in the callback store; the time that took
/// from `ended`, or `None` after `within`. Reserved ids never used are left out: they are open
/// too (until their check settles them `unused`), and a backlog defers their checks like any.
pub(super) async fn drain(
    deployment: &Deployment,
    ended: Instant,
    ended_ms: i64,
    within: Duration,
) -> Result<Option<f64>> {
    let (orders, _) = recheck::db::connect(&deployment.orders_db).await?;
    let committed: HashSet<String> =
        sqlx::query_scalar("SELECT message_id FROM orders").fetch_all(&orders).await?.into_iter().collect();
    orders.close().await;
    let (store, _) = recheck::db::connect(&deployment.callback_db).await?;
    let open = "SELECT message_id FROM messages WHERE status IN ('pending', 'resent') \
                AND published_at > 0 AND published_at <= $1";
    let drained = loop {
        let ids: Vec<String> = sqlx::query_scalar(open).bind(ended_ms).fetch_all(&store).await?;
        if !ids.iter().any(|id| committed.contains(id)) {
            break Some(ended.elapsed().as_secs_f64());
        }
        if ended.elapsed() > within {
            break None;
        }
        sleep(Duration::from_secs(1)).await;
    };
    store.close().await;
    Ok(drained)
}

/// Peak RSS per process name, in bytes.
pub(super) fn peak_rss(usage: &std::collections::HashMap<Role, Usage>) -> BTreeMap<String, u64> {
    usage.iter().map(|(role, u)| (role.to_string(), u.peak_rss_bytes)).collect()
}
