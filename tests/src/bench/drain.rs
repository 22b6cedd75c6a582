//! **Drain after a hook outage**: N committed orders whose business messages were never
//! published, their checks due while upstream-demo (the hook) is down. The callback service
//! records them, its circuit breaker opens and keeps deferring them for `--drain-outage` after
//! the last one is recorded; then the hook comes back,
//! and the figure is the time from its return until the callback store says all N are
//! `confirmed` (resent, consumed by downstream-demo, confirmed). Run twice: with `ResendBatch`
//! (the default) and with one `Resend` per message (`RECHECK_RESEND_BATCH=false`).
//!
//! Both runs use the same three release binaries, the callback store on SQLite or PostgreSQL, CHECK messages of
//! `--ids-per-message` checks, and `RECHECK_BREAKER_MAX_OPEN=1s` so that the circuit's probe
//! comes within a second of the return in either run (the default, 1 min, would time the
//! breaker, not the drain).

use std::time::Duration;

use anyhow::{Context, Result};
use lapin::BasicProperties;
use recheck::message::{CONTENT_TYPE_JSON, Check, CheckBatch, now_ms};
use sqlx::AssertSqlSafe;
use tokio::time::Instant;
use uuid::Uuid;

use super::{Env, POLL, broker, count_rows, recheck_flow::CallbackStore, report::Drain, wait_rows};
use crate::deploy::{CONSUMER, DeployOptions, Deployment, Role};

/// The two ways the callback service calls the hook.
const VARIANTS: [(&str, bool); 2] = [("ResendBatch", true), ("one Resend per message", false)];

const CONFIRMED: &str = "SELECT COUNT(*) FROM messages WHERE status = 'confirmed'";
const RECORDED: &str = "SELECT COUNT(*) FROM messages";

/// Both variants on `store`, batch first.
pub async fn run(env: &Env<'_>, store: CallbackStore) -> Result<Vec<Drain>> {
    let mut rows = Vec::new();
    for (variant, batch) in VARIANTS {
        let label = format!("{variant} ({})", store.label());
        eprintln!("bench: drain after a hook outage, {label}");
        let row = once(env, store, &label, batch).await.with_context(|| format!("drain, {label}"));
        env.release_vhosts().await;
        rows.push(row?);
    }
    Ok(rows)
}

async fn once(env: &Env<'_>, store: CallbackStore, label: &str, batch: bool) -> Result<Drain> {
    let o = &env.options;
    let n = o.drain_messages;
    let vhost = env.fresh_vhost().await?;
    let variant = if batch { "batch" } else { "per-id" };
    let dir = o.out.join(format!("drain-{variant}-{}", store.label().to_lowercase()));
    let callback_database_url = match store {
        CallbackStore::Sqlite => None,
        CallbackStore::Postgres => Some(env.postgres.fresh_database().await?.url),
    };
    let deploy = DeployOptions {
        callback_database_url,
        tiers: o.tiers.clone(),
        // Nothing to reserve for: no order is created through the service.
        reserve: false,
        // Deferring for the consumer's backlog would pace the drain by the deferral, not the hook.
        deferral: false,
        callback_env: vec![
            ("RECHECK_RESEND_BATCH".into(), batch.to_string()),
            ("RECHECK_BREAKER_MAX_OPEN".into(), "1s".into()),
        ],
        ..DeployOptions::new(dir, vhost.url.clone())
    };
    let mut deployment = Deployment::start(&env.bin_dir, &deploy).await?;
    let result = measure(env, &mut deployment, &vhost.url, label, n).await;
    let stopped = deployment.stop().await;
    let row = result?;
    stopped?;
    Ok(row)
}

async fn measure(
    env: &Env<'_>,
    deployment: &mut Deployment,
    amqp_url: &str,
    label: &str,
    n: u64,
) -> Result<Drain> {
    let o = &env.options;
    // The outage: upstream-demo (the hook) goes away; its orders table stays.
    deployment.terminate(Role::Upstream, Duration::from_secs(30)).await?;
    let ids = fill_orders(&deployment.orders_db, n).await?;
    fill_checks(amqp_url, &ids, o.ids_per_message).await?;

    // Every check seen once and its row recorded while the hook is down: n messages waiting.
    let (callback_db, _) = recheck::db::connect(&deployment.callback_db).await?;
    wait_rows(&callback_db, RECORDED, n, POLL, o.deadline).await.context("checks recorded in the outage")?;
    // The outage lasts on: the checks claimed before the circuit opened come due again and are
    // deferred too, so the whole backlog waits in the circuit's rhythm, as after a real outage.
    tokio::time::sleep(o.drain_outage).await;
    let confirmed_before = count_rows(&callback_db, CONFIRMED).await?;
    anyhow::ensure!(confirmed_before == 0, "{confirmed_before} confirmed while the hook was down");

    // The hook comes back: timed from the moment it listens.
    deployment.start_service(Role::Upstream).await?;
    let back = Instant::now();
    let back_ms = now_ms();
    let done_ms = wait_rows(&callback_db, CONFIRMED, n, POLL, o.deadline).await.context("drain")?;
    let seconds = back.elapsed().as_secs_f64().min((done_ms - back_ms).max(1) as f64 / 1000.0);
    let metrics = deployment.scrape(Role::Callback(0)).await?;
    let rpcs = metrics.sum("recheck_hook_rpc_seconds_count", &[]) as u64;
    let verdict = deployment.verdict().await?;
    callback_db.close().await;
    Ok(Drain {
        variant: label.to_owned(),
        messages: n,
        seconds,
        per_s: n as f64 / seconds.max(1e-3),
        hook_rpcs: rpcs,
        lost: verdict.lost,
    })
}

/// `n` committed orders in upstream-demo's store (its own table), none ever published.
async fn fill_orders(orders_db: &str, n: u64) -> Result<Vec<(Uuid, String)>> {
    let (pool, backend) = recheck::db::connect(orders_db).await?;
    let ids: Vec<(Uuid, String)> = (0..n).map(|_| (Uuid::now_v7(), Uuid::now_v7().to_string())).collect();
    const ROWS: usize = 500;
    for chunk in ids.chunks(ROWS) {
        let sql = format!(
            "INSERT INTO orders (order_id, message_id, customer, amount_cents, payload, created_at) VALUES {}",
            recheck::db::Binds::new(backend)
                .tuples(chunk.len(), &[None, None, Some("'bench'"), Some("100"), None, None])
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (message_id, order_id) in chunk {
            let payload = serde_json::json!({"order_id": order_id, "customer": "bench", "amount_cents": 100});
            query =
                query.bind(order_id).bind(message_id.to_string()).bind(payload.to_string()).bind(now_ms());
        }
        query.execute(&pool).await?;
    }
    pool.close().await;
    Ok(ids)
}

/// Their checks, due now, `per_message` to a CHECK message as a producer's group commit sends them.
async fn fill_checks(amqp_url: &str, ids: &[(Uuid, String)], per_message: usize) -> Result<()> {
    let publisher = broker::publisher(amqp_url, "bench-drain").await?;
    let bodies = ids
        .chunks(per_message.max(1))
        .map(|chunk| {
            let checks = chunk
                .iter()
                .map(|(message_id, order_id)| Check {
                    message_id: *message_id,
                    routing_key: "order.created".into(),
                    business_key: order_id.clone(),
                    attempt: 0,
                    published_at: now_ms(),
                    expect: Some(vec![CONSUMER.into()]),
                    traceparent: None,
                    reserved: false,
                })
                .collect();
            serde_json::to_vec(&CheckBatch::new("orders", checks))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let json = BasicProperties::default().with_content_type(CONTENT_TYPE_JSON.into());
    // Straight into the checks queue: due now, as if their delay had passed during the outage.
    let exchange = recheck::Topology::new("recheck", Vec::new()).checks_exchange();
    broker::fill(&publisher, &exchange, "", &bodies, json, 256).await?;
    publisher.close().await;
    Ok(())
}
