//! The consumer's store, read-only: which message ids were awarded points. The
//! ground truth for "delivered": a confirm says the consumer processed a message,
//! the points row shows the effect is there.

use std::collections::HashSet;

use sqlx::{AnyPool, any::AnyPoolOptions};

pub struct PointsStore {
    pool: AnyPool,
}

impl PointsStore {
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new().max_connections(2).connect(url).await?;
        Ok(Self { pool })
    }

    /// Every message id in `points`.
    pub async fn awarded(&self) -> Result<HashSet<String>, sqlx::Error> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT message_id FROM points").fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }
}
