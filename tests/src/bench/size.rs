//! **Cost against size** (`--only size`, not in the default run: 10 M rows take minutes to write):
//! the callback service's confirm ingest and check rates, measured as [`super::callback`]'s rates
//! row measures them, with `--size-rows` rows already in its store; and confirm ingest while the
//! retention purge deletes `--purge-rows` old terminal rows, against the same store without it.
//!
//! The stores are pre-filled with set-based SQL (a recursive CTE on SQLite, `generate_series` on
//! PostgreSQL), a million rows per transaction, in the mix of a store that has run a while: 94 %
//! `confirmed` (with their confirm), 2 % `void`, 1 % `failed`, 3 % `pending` (due tomorrow, so no
//! sweep touches them), one history line per terminal row. Their ids sort before the measured
//! messages' (UUIDv7 of now), as older messages' ids do.

use std::time::Duration;

use anyhow::{Context, Result};
use recheck::message::now_ms;
use sqlx::{AnyPool, AssertSqlSafe};
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    Env,
    callback::{Stage, check_pass, queue_empty},
    process::Process,
    recheck_flow::CallbackStore,
    report::{PurgeIngest, SizeRates},
};

/// Rows written per pre-fill transaction.
const PREFILL_CHUNK: u64 = 1_000_000;
const DAY_MS: i64 = 86_400_000;

/// What the size part measured, and what failed (the other measurements still run).
#[derive(Default)]
pub struct Measured {
    pub rates: Vec<SizeRates>,
    pub purges: Vec<PurgeIngest>,
    pub failed: Vec<(String, anyhow::Error)>,
}

/// Every store, every `--size-rows`, then the purge case on every store.
pub async fn run(env: &Env<'_>) -> Measured {
    let mut measured = Measured::default();
    for store in [CallbackStore::Sqlite, CallbackStore::Postgres] {
        for &rows in &env.options.size_rows {
            eprintln!("bench: callback rates with {rows} stored rows ({})", store.label());
            let started = Instant::now();
            let result = at_size(env, store, rows).await;
            env.release_vhosts().await;
            eprintln!("bench: {rows} stored rows ({}) took {:.0?}", store.label(), started.elapsed());
            match result {
                Ok(rates) => measured.rates.push(rates),
                Err(e) => measured.failed.push((format!("{rows} stored rows ({})", store.label()), e)),
            }
        }
        let rows = env.options.purge_rows;
        eprintln!("bench: confirm ingest while {rows} rows are purged ({})", store.label());
        let result = while_purging(env, store, rows).await;
        env.release_vhosts().await;
        match result {
            Ok(purge) => measured.purges.push(purge),
            Err(e) => measured.failed.push((format!("ingest while purging ({})", store.label()), e)),
        }
    }
    measured
}

/// Confirm ingest and the first checks of `--callback-messages` new messages, `rows` stored.
async fn at_size(env: &Env<'_>, store: CallbackStore, rows: u64) -> Result<SizeRates> {
    let stage = Stage::new(env, store, &format!("size-{rows}"), "1s").await?;
    let started = Instant::now();
    // A day old: within the default retention, so no purge runs meanwhile.
    prefill(&stage.database_url, store, rows, now_ms() - DAY_MS).await?;
    let prefill_s = started.elapsed().as_secs_f64();
    let ids: Vec<Uuid> = (0..env.options.callback_messages).map(|_| Uuid::now_v7()).collect();
    let (confirms_per_s, service) = ingest(env, &stage, &ids, "ingest.log").await?;
    service.terminate(Duration::from_secs(30)).await?;
    let stage = &stage;
    let checks = check_pass(env, stage, &ids, "checks.log", |deadline| async move {
        queue_empty(env, stage, deadline).await
    })
    .await
    .context("checks")?;
    stage.publisher.close().await;
    drop_store(env, stage, store).await;
    Ok(SizeRates {
        store: store.label().into(),
        stored_rows: rows,
        prefill_s,
        confirms: ids.len() as u64,
        confirms_per_s,
        checks_per_s: checks.per_s,
        checks_timing: checks.timing,
    })
}

/// Confirm ingest on a store holding `rows` rows a month old, first with a retention that keeps
/// them, then with one that purges them (the purge starts with the service).
async fn while_purging(env: &Env<'_>, store: CallbackStore, rows: u64) -> Result<PurgeIngest> {
    let n = env.options.callback_messages;
    let mut stage = Stage::new(env, store, "purge", "1s").await?;
    prefill(&stage.database_url, store, rows, now_ms() - 30 * DAY_MS).await?;
    let (pool, _) = recheck::db::connect(&stage.database_url).await?;
    let cutoff = now_ms() - DAY_MS;
    let purgeable = |pool: AnyPool| async move {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM messages
             WHERE status IN ('confirmed', 'void', 'rejected', 'failed') AND updated_at < $1",
        )
        .bind(cutoff)
        .fetch_one(&pool)
        .await?;
        anyhow::Ok(n as u64)
    };
    let purgeable_rows = purgeable(pool.clone()).await?;

    stage.service_env = vec![("RECHECK_RETENTION", "3650d".into())];
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let (without_per_s, service) = ingest(env, &stage, &ids, "ingest-kept.log").await?;
    service.terminate(Duration::from_secs(30)).await?;
    anyhow::ensure!(purgeable(pool.clone()).await? == purgeable_rows, "rows purged with a 10-year retention");

    // The first purge runs at start; the interval only keeps a second one away.
    stage.service_env = vec![("RECHECK_RETENTION", "1d".into()), ("RECHECK_PURGE_INTERVAL", "1h".into())];
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let (with_per_s, service) = ingest(env, &stage, &ids, "ingest-purged.log").await?;
    let left = purgeable(pool.clone()).await?;
    // The purge alone, over a fixed window once ingest is done.
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let later = purgeable(pool.clone()).await?;
    service.terminate(Duration::from_secs(30)).await?;
    pool.close().await;
    stage.publisher.close().await;
    drop_store(env, &stage, store).await;
    Ok(PurgeIngest {
        store: store.label().into(),
        stored_rows: rows,
        purgeable_rows,
        confirms: n,
        without_per_s,
        with_per_s,
        purged_during_ingest: purgeable_rows - left,
        ingest_s: n as f64 / with_per_s.max(1e-9),
        purge_per_s_alone: left.saturating_sub(later) as f64 / window.as_secs_f64(),
        purge_left_after_ingest: left,
    })
}

/// Fills the confirms queue for `ids`, starts the service (with the stage's settings) and waits
/// until every confirm is committed: confirms/s from the moment it listens, as the rates row
/// times it, and the service, still running.
async fn ingest(env: &Env<'_>, stage: &Stage, ids: &[Uuid], log: &str) -> Result<(f64, Process)> {
    let n = ids.len() as u64;
    stage.fill_confirms(ids, env.options.ids_per_message).await?;
    // Each confirm of an unknown id creates its `pending` row in the same transaction. The
    // pre-filled rows are older: counting from here counts the new ones, by the index on
    // (status, updated_at) (a `COUNT(*)` of 10 M rows every 20 ms would be the bench's own load).
    let since = now_ms();
    let mut service = stage.start_service(env, log).await?;
    let started_ms = now_ms();
    let (pool, _) = recheck::db::connect(&stage.database_url).await?;
    let deadline = Instant::now() + env.options.deadline;
    let last_ms = loop {
        let stored: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE status = 'pending' AND updated_at >= $1")
                .bind(since)
                .fetch_one(&pool)
                .await?;
        if stored as u64 >= n {
            break now_ms();
        }
        service.ensure_running()?;
        anyhow::ensure!(Instant::now() < deadline, "{stored} of {n} confirms stored at the deadline");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    pool.close().await;
    Ok((n as f64 * 1000.0 / (last_ms - started_ms).max(1) as f64, service))
}

/// Message id `i` as SQL text over `seq(i)`, and the rows `$1 ≤ i < $2` as `seq(i)`: the
/// prefix of the statement and its `FROM`.
fn dialect(store: CallbackStore) -> (&'static str, &'static str, &'static str) {
    match store {
        CallbackStore::Sqlite => (
            "printf('00000000-0000-7000-8000-%012x', i)",
            "WITH RECURSIVE seq(i) AS (SELECT $1 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < $2) ",
            "seq",
        ),
        CallbackStore::Postgres => (
            "'00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0')",
            "",
            "generate_series($1::bigint, $2::bigint - 1) AS seq(i)",
        ),
    }
}

/// The status mix by `i % 100`; the first 94 are confirmed, the first 97 terminal.
const STATUS: &str = "CASE WHEN i % 100 < 94 THEN 'confirmed' WHEN i % 100 < 96 THEN 'void' \
                      WHEN i % 100 < 97 THEN 'failed' ELSE 'pending' END";

/// Writes `rows` messages into the (migrated) store, updated from `since_ms` on (100 per ms),
/// with their confirms and history.
async fn prefill(url: &str, store: CallbackStore, rows: u64, since_ms: i64) -> Result<()> {
    let migrated = callback_service::store::Store::connect(url).await?;
    let pool = migrated.pool();
    let (id, with, from) = dialect(store);
    let at = "$3 + i / 100";
    let statements = [
        format!(
            "{with}INSERT INTO messages (message_id, producer, routing_key, business_key, expect, status,
                 attempt, scheduled_attempt, next_check_at, published_at, created_at, updated_at)
             SELECT {id}, 'orders', 'order.created', 'bench', 'points', {STATUS}, 0, 0,
                 CASE WHEN i % 100 < 97 THEN 0 ELSE $4 END, {at}, {at}, {at} FROM {from}"
        ),
        format!(
            "{with}INSERT INTO confirms (message_id, consumer, outcome, processed_at, received_at)
             SELECT {id}, 'points', 'processed', {at}, {at} FROM {from} WHERE i % 100 < 94"
        ),
        format!(
            "{with}INSERT INTO history (message_id, at, from_status, to_status, attempt, reason)
             SELECT {id}, {at}, 'pending', {STATUS}, 0, 'bench' FROM {from} WHERE i % 100 < 97"
        ),
    ];
    let started = Instant::now();
    let mut first = 0;
    while first < rows {
        let end = (first + PREFILL_CHUNK).min(rows);
        let mut tx = pool.begin().await?;
        for (n, sql) in statements.iter().enumerate() {
            let mut query =
                sqlx::query(AssertSqlSafe(sql.as_str())).bind(first as i64).bind(end as i64).bind(since_ms);
            if n == 0 {
                query = query.bind(now_ms() + DAY_MS);
            }
            query.execute(&mut *tx).await.with_context(|| format!("pre-filling rows {first}..{end}"))?;
        }
        tx.commit().await?;
        first = end;
        if rows > PREFILL_CHUNK {
            eprintln!("bench: {first} of {rows} rows written ({:.0?})", started.elapsed());
        }
    }
    // As a store that has run a while: statistics and the visibility map (PostgreSQL), a
    // checkpointed write-ahead log (SQLite).
    let settle = match store {
        CallbackStore::Sqlite => "PRAGMA wal_checkpoint(TRUNCATE)",
        CallbackStore::Postgres => "VACUUM ANALYZE",
    };
    sqlx::query(settle).execute(pool).await.context(settle)?;
    pool.close().await;
    Ok(())
}

/// Frees the disk a large store took (its logs stay): the SQLite files, or the database.
async fn drop_store(env: &Env<'_>, stage: &Stage, store: CallbackStore) {
    let dropped = match store {
        CallbackStore::Sqlite => ["callback.db", "callback.db-wal", "callback.db-shm"]
            .into_iter()
            .map(|f| stage.dir.join(f))
            .filter(|f| f.exists())
            .try_for_each(std::fs::remove_file)
            .map_err(anyhow::Error::from),
        CallbackStore::Postgres => drop_database(env, &stage.database_url).await,
    };
    if let Err(e) = dropped {
        eprintln!("bench: freeing the store {}: {e:#}", stage.database_url);
    }
}

async fn drop_database(env: &Env<'_>, url: &str) -> Result<()> {
    let name = url.rsplit('/').next().and_then(|n| n.split('?').next()).context("no database name")?;
    let (admin, _) = recheck::db::connect(env.postgres.admin_url()).await?;
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE \"{name}\" WITH (FORCE)"))).execute(&admin).await?;
    admin.close().await;
    Ok(())
}
