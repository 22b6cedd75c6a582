//! The callback service's store over sqlx `Any`: SQLite by default, PostgreSQL
//! for production and for several instances. Same SQL for both (`$n` binds,
//! `ON CONFLICT`), two migration folders.
//!
//! - this file: connecting, migrations, row types;
//! - [`settle`]: when a message counts as confirmed, for every arrival order;
//! - [`confirms`]: batched confirm ingest;
//! - [`first_checks`]: a CHECK batch meeting rows that lack their CHECK, and their confirms;
//! - [`checks`]: the per-attempt transitions of the state machine, each a
//!   conditional update on `(message_id, attempt)`;
//! - [`queries`]: what the admin API reads and redrives, stats;
//! - [`purge`]: retention, in bounded batches;
//! - [`sweep`]: overdue checks claimed for the sweeper, and deferred checks' due times.

mod checks;
mod confirms;
mod first_checks;
mod purge;
mod queries;
mod settle;
mod sweep;
mod unused;

use std::sync::atomic::{AtomicU64, Ordering};

use recheck::{db::Binds, message::Outcome};
use sqlx::{AnyPool, migrate::Migrator};
use uuid::Uuid;

pub use checks::AttemptOutcome;
pub use confirms::IngestReport;
pub use queries::Counts;

static SQLITE: Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("../migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Url(String),
    #[error("corrupt row for {0}: {1}")]
    Corrupt(String, String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Where a message stands (DESIGN.md state machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Pending,
    Confirmed,
    Resent,
    Void,
    Failed,
    Rejected,
    /// A reserved id nobody used: settled without a `void`, purged after a short retention.
    Unused,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Pending,
        Status::Confirmed,
        Status::Resent,
        Status::Void,
        Status::Failed,
        Status::Rejected,
        Status::Unused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Confirmed => "confirmed",
            Status::Resent => "resent",
            Status::Void => "void",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
            Status::Unused => "unused",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No more checks act on it (a redrive or a late confirm still can).
    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Pending | Status::Resent)
    }
}

/// One row of `messages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    pub message_id: String,
    pub producer: String,
    pub routing_key: String,
    pub business_key: String,
    pub expect: Option<Vec<String>>,
    pub status: Status,
    pub attempt: u32,
    pub scheduled_attempt: u32,
    pub resend_count: u32,
    pub next_check_at: i64,
    pub last_error: Option<String>,
    pub published_at: i64,
    pub first_failure_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl MessageRow {
    /// Open and known only from confirms: a confirm cannot settle it (it may expect more
    /// consumers); its CHECK, when it comes, weighs the confirms stored meanwhile.
    pub fn awaiting_check(&self) -> bool {
        !self.status.is_terminal() && !self.checked()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmRow {
    pub consumer: String,
    pub outcome: Outcome,
    pub detail: Option<String>,
    pub processed_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub at: i64,
    pub from: Option<Status>,
    pub to: Status,
    pub attempt: u32,
    pub reason: String,
}

pub struct Store {
    pool: AnyPool,
    sqlite: bool,
    /// Write transactions committed by this process (tests assert batching on it).
    transactions: AtomicU64,
}

impl Store {
    /// Connects and applies the migrations for the URL's backend.
    pub async fn connect(url: &str) -> Result<Self> {
        let (pool, backend) = recheck::db::connect(url).await.map_err(|e| match e {
            recheck::Error::Db(e) => StoreError::Db(e),
            other => StoreError::Url(other.to_string()),
        })?;
        let sqlite = backend == recheck::db::Backend::Sqlite;
        let migrator = if sqlite { &SQLITE } else { &POSTGRES };
        migrator.run(&pool).await?;
        Ok(Self { pool, sqlite, transactions: AtomicU64::new(0) })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Write transactions committed so far by this process.
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    /// A write transaction. On SQLite it takes the write lock up front (`BEGIN
    /// IMMEDIATE`): a deferred one that reads first and writes later fails at
    /// once with SQLITE_BUSY(_SNAPSHOT) when another writer got in between,
    /// whatever the busy timeout.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(if self.sqlite {
            self.pool.begin_with("BEGIN IMMEDIATE").await?
        } else {
            self.pool.begin().await?
        })
    }

    fn committed(&self) {
        self.transactions.fetch_add(1, Ordering::Relaxed);
    }
}

/// Most rows (or ids) one set-based statement carries on PostgreSQL: its binds stay far below its
/// 65 535, and few round trips keep a transaction short.
const CHUNK_ROWS: usize = 1000;

/// The same on SQLite, which has no round trip to amortize. Its varying binds are anonymous
/// ([`Binds`]): named ones cost the square of a statement's binds (74 % of confirm ingest's CPU at
/// 1 000 rows, 25 % of the SQLite worker's at 100, perf).
const SQLITE_CHUNK_ROWS: usize = 128;

/// Rows per set-based statement on `conn`'s database.
pub(super) fn chunk_rows(conn: &sqlx::AnyConnection) -> usize {
    if conn.backend_name() == "SQLite" { SQLITE_CHUNK_ROWS } else { CHUNK_ROWS }
}

impl Store {
    /// Rows per set-based statement on this store's database.
    fn chunk_rows(&self) -> usize {
        if self.sqlite { SQLITE_CHUNK_ROWS } else { CHUNK_ROWS }
    }

    /// Placeholders for this store's database.
    fn binds(&self) -> Binds {
        Binds::new(if self.sqlite { recheck::db::Backend::Sqlite } else { recheck::db::Backend::Postgres })
    }
}

pub(crate) fn id_text(id: Uuid) -> String {
    id.to_string()
}

pub(crate) fn expect_text(expect: &Option<Vec<String>>) -> Option<String> {
    expect.as_ref().filter(|e| !e.is_empty()).map(|e| e.join(","))
}

/// `SELECT <every message column> FROM messages <rest>`, as a literal (sqlx wants static SQL).
/// Every column of `messages`, in [`RawMessage`]'s order (a `RETURNING` list uses it too).
const MESSAGE_COLUMNS: &str = "message_id, producer, routing_key, business_key, expect, status, attempt, \
     scheduled_attempt, resend_count, next_check_at, last_error, published_at, first_failure_at, \
     created_at, updated_at";

macro_rules! select_messages {
    ($rest:literal) => {
        concat!(
            "SELECT message_id, producer, routing_key, business_key, expect, status, attempt, ",
            "scheduled_attempt, resend_count, next_check_at, last_error, published_at, first_failure_at, ",
            "created_at, updated_at FROM messages ",
            $rest
        )
    };
}
use select_messages;

type RawMessage = (
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    i64,
    Option<i64>,
    i64,
    i64,
);

fn message_from(raw: RawMessage) -> Result<MessageRow> {
    let status = Status::parse(&raw.5).ok_or_else(|| StoreError::Corrupt(raw.0.clone(), raw.5.clone()))?;
    let n = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(MessageRow {
        expect: raw.4.map(|e| e.split(',').map(str::to_owned).collect()),
        status,
        attempt: n(raw.6),
        scheduled_attempt: n(raw.7),
        resend_count: n(raw.8),
        next_check_at: raw.9,
        last_error: raw.10,
        published_at: raw.11,
        first_failure_at: raw.12,
        created_at: raw.13,
        updated_at: raw.14,
        message_id: raw.0,
        producer: raw.1,
        routing_key: raw.2,
        business_key: raw.3,
    })
}

/// Appends one history row inside the caller's transaction.
async fn record_transition(
    tx: &mut sqlx::AnyConnection,
    message_id: &str,
    from: Option<Status>,
    to: Status,
    attempt: u32,
    reason: &str,
    at: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO history (message_id, at, from_status, to_status, attempt, reason)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(message_id)
    .bind(at)
    .bind(from.map(Status::as_str))
    .bind(to.as_str())
    .bind(i64::from(attempt))
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
