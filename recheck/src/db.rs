//! Opening a service's store the one way every Recheck component does:
//! sqlx `Any` over SQLite (WAL, a busy timeout) or PostgreSQL, same SQL; and the
//! placeholders of set-based statements (inbox claims, the callback store): [`Binds`].

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

/// How a set-based statement writes its placeholders. Batched statements format only
/// placeholders into their SQL and bind every value, **the values that vary first** (one per
/// `None` column of each row, or one per listed id) **and the values every row shares after
/// them** ([`Binds::shared`]).
///
/// - PostgreSQL: `$1, $2, …` for the varying values, `$n+1, …` for the shared ones.
/// - SQLite: an anonymous `?` for each varying value. sqlx binds every parameter by asking
///   SQLite its name, and SQLite finds a name by a linear scan of the statement's named
///   parameters, so `$n` names cost the square of a statement's binds: 25 % of the callback
///   service's SQLite worker at 100 rows a statement (perf). Anonymous ones are not in that list,
///   and sqlx numbers them in order; the shared values keep their `$n` names, a short list.
///
/// (sqlx's `QueryBuilder<Any>` writes `?` everywhere, which PostgreSQL refuses: sqlx issue #3000.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binds {
    sqlite: bool,
}

impl Binds {
    /// For `backend`.
    pub fn new(backend: Backend) -> Self {
        Self { sqlite: backend == Backend::Sqlite }
    }

    /// For the database `conn` talks to.
    pub fn of(conn: &sqlx::AnyConnection) -> Self {
        Self { sqlite: conn.backend_name() == "SQLite" }
    }

    /// `n` varying placeholders, numbered from 1: `$1, $2, …` or `?, ?, …`.
    pub fn list(self, n: usize) -> String {
        (1..=n).map(|i| self.varying(i)).collect::<Vec<_>>().join(", ")
    }

    /// `(…), (…)`: `rows` tuples of `columns`, each `None` a varying placeholder (numbered on from
    /// 1, row by row) and each `Some` that SQL: a literal, or a [`Binds::shared`] placeholder.
    pub fn tuples(self, rows: usize, columns: &[Option<&str>]) -> String {
        let mut next = 1;
        let mut sql = String::with_capacity(rows * columns.len() * 8);
        for row in 0..rows {
            sql.push_str(if row == 0 { "(" } else { ", (" });
            for (i, column) in columns.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                match column {
                    Some(text) => sql.push_str(text),
                    None => {
                        sql.push_str(&self.varying(next));
                        next += 1;
                    }
                }
            }
            sql.push(')');
        }
        sql
    }

    /// The placeholder of the `k`-th shared value (from 1) of a statement with `varying` varying
    /// values: `$varying+k` on both backends, bound after the varying ones.
    pub fn shared(varying: usize, k: usize) -> String {
        format!("${}", varying + k)
    }

    fn varying(self, i: usize) -> String {
        if self.sqlite { "?".to_owned() } else { format!("${i}") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varying_values_first_then_the_shared_ones() {
        let pg = Binds::new(Backend::Postgres);
        let lite = Binds::new(Backend::Sqlite);
        assert_eq!(pg.list(3), "$1, $2, $3");
        assert_eq!(lite.list(3), "?, ?, ?");
        let now = Binds::shared(4, 1);
        assert_eq!(now, "$5");
        let columns = [Some(now.as_str()), None, Some("'x'"), None];
        assert_eq!(pg.tuples(2, &columns), "($5, $1, 'x', $2), ($5, $3, 'x', $4)");
        assert_eq!(lite.tuples(2, &columns), "($5, ?, 'x', ?), ($5, ?, 'x', ?)");
    }
}
