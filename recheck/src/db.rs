//! Opening a service's store the one way every Recheck component does:
//! sqlx `Any` over SQLite (WAL, a busy timeout) or PostgreSQL, same SQL; and the
//! `$n` placeholders of set-based statements (inbox claims, the callback store).

use sqlx::{AnyPool, any::AnyPoolOptions};

use crate::error::{Error, Result};

/// Which backend a database URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A `sqlite:` URL: an embedded file (or memory).
    Sqlite,
    /// A `postgres:` or `postgresql:` URL.
    Postgres,
}

impl Backend {
    /// The backend `url`'s scheme names; `None` for any other scheme.
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

/// `$first, $first+1, …`: `n` placeholders. Batched statements format only placeholders into
/// their SQL and bind every value. (sqlx's `QueryBuilder<Any>` writes `?`, which PostgreSQL
/// refuses: sqlx issue #3000.)
pub fn placeholders(n: usize, first: usize) -> String {
    (first..first + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// `(…), (…)`: `rows` tuples of `columns`, each `None` a new placeholder (numbered on from
/// `first`) and each `Some` that SQL (a literal, or a placeholder shared by every row).
pub fn tuples(rows: usize, first: usize, columns: &[Option<&str>]) -> String {
    let width = columns.iter().filter(|c| c.is_none()).count();
    let mut sql = String::with_capacity(rows * columns.len() * 8);
    for row in 0..rows {
        let mut next = first + row * width;
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for (i, column) in columns.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            match column {
                Some(text) => sql.push_str(text),
                None => {
                    sql.push_str(&format!("${next}"));
                    next += 1;
                }
            }
        }
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_tuples_number_on() {
        assert_eq!(placeholders(3, 2), "$2, $3, $4");
        assert_eq!(
            tuples(2, 4, &[Some("$1"), None, Some("'x'"), None]),
            "($1, $4, 'x', $5), ($1, $6, 'x', $7)"
        );
    }
}
