//! Opening a service's store the one way every Recheck component does:
//! sqlx `Any` over SQLite (WAL, a busy timeout) or PostgreSQL, same SQL.

use sqlx::{AnyPool, any::AnyPoolOptions};

use crate::{Error, Result};

/// Which backend a database URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// Connects a pool. On SQLite: WAL, so readers never wait for the writer, and
/// a busy timeout, so a writer waits for the lock instead of failing; few
/// connections, since SQLite has one writer anyway.
pub async fn connect(url: &str) -> Result<(AnyPool, Backend)> {
    sqlx::any::install_default_drivers();
    let backend = Backend::of(url).ok_or_else(|| Error::UnsupportedDatabase(url.to_owned()))?;
    let sqlite = backend == Backend::Sqlite;
    let pool = AnyPoolOptions::new()
        .max_connections(if sqlite { 4 } else { 16 })
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if sqlite {
                    sqlx::query("PRAGMA journal_mode=WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA synchronous=NORMAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA busy_timeout=10000").execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?;
    Ok((pool, backend))
}
