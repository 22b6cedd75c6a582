//! `downstream-demo stats`: what the store says this consumer did.

use serde::Serialize;
use sqlx::AnyPool;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub consumer: String,
    /// Rows in `points`: orders that earned points, each once.
    pub orders_with_points: i64,
    pub points_awarded: i64,
    /// Distinct message ids the inbox took in (processed or rejected).
    pub messages: i64,
    pub rejected: i64,
    /// Extra deliveries of an id already taken in (redeliveries, resends).
    pub duplicates_absorbed: i64,
}

impl Stats {
    pub async fn load(pool: &AnyPool, consumer: &str) -> anyhow::Result<Self> {
        // One statement, one snapshot: points and inbox rows commit together, so
        // separate reads could straddle a batch and disagree. CAST: PostgreSQL
        // sums BIGINT as NUMERIC, which the `Any` driver cannot decode.
        let (orders_with_points, points_awarded, messages, rejected, duplicates_absorbed): (i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM points),
                        (SELECT CAST(COALESCE(SUM(points), 0) AS BIGINT) FROM points),
                        (SELECT COUNT(*) FROM recheck_inbox WHERE consumer = $1),
                        (SELECT COUNT(*) FROM recheck_inbox WHERE consumer = $1 AND outcome = 'rejected'),
                        (SELECT CAST(COALESCE(SUM(seen - 1), 0) AS BIGINT) FROM recheck_inbox WHERE consumer = $1)",
            )
            .bind(consumer)
            .fetch_one(pool)
            .await?;
        Ok(Self {
            consumer: consumer.to_owned(),
            orders_with_points,
            points_awarded,
            messages,
            rejected,
            duplicates_absorbed,
        })
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "consumer             {}", self.consumer)?;
        writeln!(f, "orders with points   {}", self.orders_with_points)?;
        writeln!(f, "points awarded       {}", self.points_awarded)?;
        writeln!(f, "messages processed   {}", self.messages)?;
        writeln!(f, "rejected             {}", self.rejected)?;
        write!(f, "duplicates absorbed  {}", self.duplicates_absorbed)
    }
}
