//! `downstream-demo stats`: what the store says this consumer did.

use serde::Serialize;
use sqlx::AnyPool;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub consumer: String,
    /// Distinct orders in `points`: orders that earned points.
    pub orders_with_points: i64,
    /// Rows in `points`: applications of the effect. More than `orders_with_points` means an
    /// effect was applied twice.
    pub effects_applied: i64,
    pub points_awarded: i64,
    /// The per-customer balances summed: equal to `points_awarded` and `effects_applied` when
    /// every application also moved a balance once.
    pub balance_points: i64,
    pub balance_orders: i64,
    /// Distinct message ids the inbox took in (processed or rejected).
    pub messages: i64,
    pub rejected: i64,
    /// Extra deliveries of an id already taken in (redeliveries, resends).
    pub duplicates_absorbed: i64,
}

type Row = (i64, i64, i64, i64, i64, i64, i64, i64);

impl Stats {
    pub async fn load(pool: &AnyPool, consumer: &str) -> anyhow::Result<Self> {
        // One statement, one snapshot: points, balances and inbox rows commit together, so
        // separate reads could straddle a batch and disagree. CAST: PostgreSQL sums BIGINT as
        // NUMERIC, which the `Any` driver cannot decode.
        let row: Row = sqlx::query_as(
            "SELECT (SELECT COUNT(DISTINCT message_id) FROM points),
                    (SELECT COUNT(*) FROM points),
                    (SELECT CAST(COALESCE(SUM(points), 0) AS BIGINT) FROM points),
                    (SELECT CAST(COALESCE(SUM(points), 0) AS BIGINT) FROM balances),
                    (SELECT CAST(COALESCE(SUM(orders), 0) AS BIGINT) FROM balances),
                    (SELECT COUNT(*) FROM recheck_inbox WHERE consumer = $1),
                    (SELECT COUNT(*) FROM recheck_inbox WHERE consumer = $1 AND outcome = 'rejected'),
                    (SELECT CAST(COALESCE(SUM(seen - 1), 0) AS BIGINT) FROM recheck_inbox WHERE consumer = $1)",
        )
        .bind(consumer)
        .fetch_one(pool)
        .await?;
        let (orders_with_points, effects_applied, points_awarded, balance_points, balance_orders) =
            (row.0, row.1, row.2, row.3, row.4);
        Ok(Self {
            consumer: consumer.to_owned(),
            orders_with_points,
            effects_applied,
            points_awarded,
            balance_points,
            balance_orders,
            messages: row.5,
            rejected: row.6,
            duplicates_absorbed: row.7,
        })
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "consumer             {}", self.consumer)?;
        writeln!(f, "orders with points   {}", self.orders_with_points)?;
        writeln!(f, "effects applied      {}", self.effects_applied)?;
        writeln!(f, "points awarded       {}", self.points_awarded)?;
        writeln!(f, "balances (points)    {}", self.balance_points)?;
        writeln!(f, "balances (orders)    {}", self.balance_orders)?;
        writeln!(f, "messages processed   {}", self.messages)?;
        writeln!(f, "rejected             {}", self.rejected)?;
        write!(f, "duplicates absorbed  {}", self.duplicates_absorbed)
    }
}
