//! compose's PostgreSQL users, tried for real: `compose/postgres-init.sql` runs on a private
//! cluster as the image runs it (psql, as the superuser), then each `postgres://` URL compose.yaml
//! gives a service, pointed at that cluster. Each service's user is no superuser, opens its own
//! store (its migrations create the tables) and is refused by every other database; the load
//! generator's user reads the points the consumer stores and may neither write them nor reach
//! another database. (The kit's cluster trusts local logins, so the passwords are not tried here;
//! `scripts/compose-check` runs the stack with them.)

use std::{collections::BTreeMap, path::Path, time::Duration};

use recheck_tests::{
    definitions::{compose_database_urls, compose_path},
    postgres::Postgres,
};
use sqlx::AnyPool;

/// The databases `compose/postgres-init.sql` creates.
const DATABASES: [&str; 3] = ["callback", "orders", "points"];

/// What opening a pool at `url` ends with, within a bound.
async fn open(url: &str) -> Result<AnyPool, String> {
    match tokio::time::timeout(Duration::from_secs(20), recheck::db::connect(url)).await {
        Ok(Ok((pool, _))) => Ok(pool),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// `url` with its database replaced by `database`.
fn on_database(url: &str, database: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("a database URL has a path");
    format!("{base}/{database}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_reaches_only_its_own_database() {
    recheck_tests::init_tracing();
    let pg = tokio::task::spawn_blocking(Postgres::start_private).await.unwrap().unwrap();
    let result = suite(&pg).await;
    tokio::task::spawn_blocking(move || pg.shutdown()).await.unwrap().unwrap();
    result.unwrap();
}

async fn suite(pg: &Postgres) -> anyhow::Result<()> {
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/postgres-init.sql");
    tokio::task::block_in_place(|| pg.run_sql_file(&init))?;

    // compose's host and port, pointed at this cluster.
    let here = pg.admin_url().rsplit_once('@').and_then(|(_, rest)| rest.split_once('/')).unwrap().0;
    let text = std::fs::read_to_string(compose_path())?;
    let urls: BTreeMap<String, String> = compose_database_urls(&text)?
        .into_iter()
        .map(|u| {
            (format!("{} {}", u.service, u.variable), u.url.replace("@postgres:5432/", &format!("@{here}/")))
        })
        .collect();
    let keys: Vec<&str> = urls.keys().map(String::as_str).collect();
    anyhow::ensure!(
        keys == [
            "callback DATABASE_URL",
            "downstream DATABASE_URL",
            "load RECHECK_POINTS_DATABASE_URL",
            "upstream DATABASE_URL"
        ],
        "compose's database URLs changed: {keys:?}"
    );

    // Each service opens its own store as it does at boot; the consumer's first, so the load
    // generator finds its tables.
    let callback = &urls["callback DATABASE_URL"];
    callback_service::store::Store::connect(callback).await?.pool().close().await;
    let upstream = &urls["upstream DATABASE_URL"];
    upstream_demo::Store::connect(upstream).await?.pool().close().await;
    let downstream = &urls["downstream DATABASE_URL"];
    downstream_demo::store::connect(downstream).await?.close().await;

    let mut users = BTreeMap::new();
    for (service, url) in &urls {
        let pool = open(url).await.map_err(|e| anyhow::anyhow!("{service}: {e}"))?;
        let (user, superuser): (String, bool) = sqlx::query_as(
            "SELECT CAST(current_user AS TEXT), rolsuper FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&pool)
        .await?;
        anyhow::ensure!(!superuser, "{service} connects as the superuser {user}");
        if let Some(other) = users.insert(user.clone(), service.clone()) {
            anyhow::bail!("{service} and {other} share the user {user}");
        }
        pool.close().await;
        let own = url.rsplit_once('/').unwrap().1;
        for database in DATABASES.iter().filter(|d| **d != own) {
            match open(&on_database(url, database)).await {
                Ok(_) => anyhow::bail!("{service} ({user}) may connect to {database}"),
                Err(e) => anyhow::ensure!(
                    e.contains("permission denied for database"),
                    "{service} → {database}: {e}"
                ),
            }
        }
    }

    // The load generator: reads the points, writes nothing, creates nothing.
    let load = open(&urls["load RECHECK_POINTS_DATABASE_URL"]).await.map_err(anyhow::Error::msg)?;
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM points").fetch_one(&load).await?;
    anyhow::ensure!(count == 0, "{count} points in a fresh store");
    for statement in [
        "INSERT INTO points (message_id, order_id, customer, points, awarded_at) VALUES ('m', 'o', 'c', 1, 0)",
        "DELETE FROM points",
        "CREATE TABLE intruder (id BIGINT)",
    ] {
        match sqlx::query(statement).execute(&load).await {
            Ok(_) => anyhow::bail!("the load generator may run {statement}"),
            Err(e) => anyhow::ensure!(e.to_string().contains("permission denied"), "{statement}: {e}"),
        }
    }
    load.close().await;
    Ok(())
}
