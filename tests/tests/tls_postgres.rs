//! TLS to PostgreSQL: a private cluster that accepts TCP connections over TLS only (`hostssl`),
//! serving a certificate from a CA generated here. Every Recheck store opens through
//! `recheck::db::connect`, so a URL with `sslmode=verify-full&sslrootcert=<ca>` is all a service
//! needs: the callback store migrates and works over it; the wrong CA, plaintext, and a server
//! name the certificate does not carry are refused.

use std::{path::PathBuf, time::Duration};

use recheck::message::{Confirm, Outcome};
use recheck_tests::{
    pki::Pki,
    postgres::{PgTls, Postgres},
};

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// `url` with `sslmode` and, if given, `sslrootcert`.
fn with_tls(url: &str, mode: &str, ca: Option<&std::path::Path>) -> String {
    let mut url = format!("{url}?sslmode={mode}");
    if let Some(ca) = ca {
        url.push_str(&format!("&sslrootcert={}", ca.display()));
    }
    url
}

/// What opening a store at `url` ends with, within a bound (a pool may retry a refused connect).
async fn open(url: &str) -> Result<sqlx::AnyPool, String> {
    match tokio::time::timeout(Duration::from_secs(20), recheck::db::connect(url)).await {
        Ok(Ok((pool, _))) => Ok(pool),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_connect_with_verify_full_and_refuse_the_wrong_ca_and_plaintext() {
    recheck_tests::init_tracing();
    let pki = Pki::generate(&tmp("tls-pg-pki"), "good").unwrap();
    let wrong = Pki::generate(&tmp("tls-pg-pki"), "wrong").unwrap();
    let tls = PgTls { cert: pki.server_cert.clone(), key: pki.server_key.clone(), required: true };
    let pg =
        tokio::task::spawn_blocking(move || Postgres::start_private_with(Some(&tls))).await.unwrap().unwrap();
    let result = suite(&pg, &pki, &wrong).await;
    tokio::task::spawn_blocking(move || pg.shutdown()).await.unwrap().unwrap();
    result.unwrap();
}

async fn suite(pg: &Postgres, pki: &Pki, wrong: &Pki) -> anyhow::Result<()> {
    let db = pg.fresh_database().await?;

    // verify-full with the CA: the connection is encrypted, as the server itself reports.
    let url = with_tls(&db, "verify-full", Some(&pki.ca));
    let pool = open(&url).await.map_err(anyhow::Error::msg)?;
    let (version,): (String,) =
        sqlx::query_as("SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl")
            .fetch_one(&pool)
            .await?;
    anyhow::ensure!(version.starts_with("TLS"), "{version}");
    pool.close().await;

    // A service's store over it: the callback store migrates, records a confirm and reads it back.
    let store = callback_service::store::Store::connect(&url).await?;
    let confirm = Confirm {
        message_id: uuid::Uuid::now_v7(),
        outcome: Outcome::Processed,
        detail: None,
        processed_at: recheck::message::now_ms(),
    };
    store.ingest_confirms(&[("points".to_owned(), confirm)]).await?;
    anyhow::ensure!(store.counts().await?.total() == 1, "the confirm's row is not there");
    store.pool().close().await;

    // The certificate names localhost and 127.0.0.1; verify-full holds the host to it.
    let localhost = url.replace("@127.0.0.1:", "@localhost:");
    open(&localhost).await.map_err(|e| anyhow::anyhow!("localhost: {e}"))?.close().await;

    let refusals = [
        ("the wrong CA", with_tls(&db, "verify-full", Some(&wrong.ca)), "certificate"),
        ("no CA (webpki roots only)", with_tls(&db, "verify-full", None), "certificate"),
        ("plaintext", with_tls(&db, "disable", None), "no encryption"),
    ];
    for (case, url, expected) in refusals {
        match open(&url).await {
            Ok(_) => anyhow::bail!("{case}: connected"),
            Err(e) => anyhow::ensure!(e.contains(expected), "{case}: refused, but not for {expected:?}: {e}"),
        }
    }
    Ok(())
}
