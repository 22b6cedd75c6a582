//! The consumers' stores, read-only: how often each message id's effect was applied
//! in each of them (rows in the demo consumer's `points` ledger). The ground truth for
//! "delivered": a confirm says a consumer processed a message, the row shows the effect
//! is there, and a second row shows it is there twice.

use std::{collections::HashMap, str::FromStr};

use recheck::SecretUrl;
use sqlx::{AnyPool, any::AnyPoolOptions};

/// One `--consumer-database-url NAME=URL`: a consumer's name (as in `--expect`) and its store.
#[derive(Debug, Clone)]
pub struct ConsumerDb {
    pub consumer: String,
    pub url: SecretUrl,
}

impl FromStr for ConsumerDb {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        // Only the redacted input in errors: the URL may hold a password, and clap prints them.
        let invalid = || format!("{:?} is not NAME=URL", recheck::secret::redact_url(s));
        let (name, url) = s.split_once('=').ok_or_else(invalid)?;
        let consumer = crate::config::parse_consumer_name(name).map_err(|_| invalid())?;
        if url.trim().is_empty() {
            return Err("the store URL after NAME= is empty".into());
        }
        Ok(Self { consumer, url: SecretUrl::new(url.trim()) })
    }
}

/// Applications of the effect per message id, in one consumer's store.
pub type Effects = HashMap<String, u64>;

pub struct ConsumerStore {
    pub consumer: String,
    pool: AnyPool,
}

impl ConsumerStore {
    pub async fn connect(db: &ConsumerDb) -> Result<Self, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new().max_connections(2).connect(&db.url).await?;
        Ok(Self { consumer: db.consumer.clone(), pool })
    }

    /// Every message id in `points`, with its number of rows.
    pub async fn effects(&self) -> Result<Effects, sqlx::Error> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT message_id, COUNT(*) FROM points GROUP BY message_id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(id, n)| (id, n as u64)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_equals_url() {
        let db: ConsumerDb = "shipping=postgres://u:s3cret@db/shipping".parse().unwrap();
        assert_eq!((db.consumer.as_str(), db.url.expose()), ("shipping", "postgres://u:s3cret@db/shipping"));
        // The first `=` splits: URLs may hold more.
        let db: ConsumerDb = "points=sqlite://p.db?mode=rwc".parse().unwrap();
        assert_eq!(db.url.expose(), "sqlite://p.db?mode=rwc");
        for bad in ["sqlite://p.db", "=sqlite://p.db", "points=", "a b=sqlite://p.db"] {
            assert!(bad.parse::<ConsumerDb>().is_err(), "{bad:?} accepted");
        }
        for bad in ["postgres://u:s3cret@db/x", "postgres://u:s3cret@db/x?password=s3cret"] {
            let err = bad.parse::<ConsumerDb>().unwrap_err();
            assert!(!err.contains("s3cret"), "{err}");
        }
    }
}
