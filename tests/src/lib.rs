//! Test kit for Recheck's end-to-end suites (`tests/tests/*.rs`): real RabbitMQ, real PostgreSQL.
//!
//! ```no_run
//! # async fn a_test() -> anyhow::Result<()> {
//! let kit = recheck_tests::kit().await; // &'static Kit, servers shared by the process
//! let vhost = kit.rabbit.fresh_vhost().await?; // Vhost { name, url }, derefs to the URL
//! let db = kit.postgres.fresh_database().await?; // Database { name, url }, derefs to the URL
//! let conn = lapin::Connection::connect(&vhost, lapin::ConnectionProperties::default()).await?;
//! let pool = sqlx::PgPool::connect(&db).await?;
//! # Ok(()) }
//! ```
//!
//! - [`rabbit`] — the broker: a private node or one from the environment; vhosts, `rabbitmqctl`,
//!   `stop_app` / `start_app`; `RabbitCluster`, private nodes clustered (kill -9, restart).
//! - [`postgres`] — the database server: a private cluster or one from the environment; databases.
//! - [`pki`] — test certificates (rcgen): a CA, a server and a client certificate, as PEM files.
//! - [`proxy`] — `FaultProxy`, a TCP proxy that cuts, stalls or refuses connections on command.
//! - `watchdog` — runs each private server under a `sh` watchdog that stops it and deletes its
//!   files once the owning process is gone (statics are never dropped).
//! - [`deploy`] — the service binaries as processes, one downstream-demo per consumer (kill -9,
//!   restart, CPU / RSS), the load, and the verdict from the stores (exactly once per consumer);
//!   used by the demo, the fault matrix and the benchmark.
//! - [`faults`] — the fault matrix: one fault injected mid-load into a deployment, the outcome from
//!   the stores; shared by the `faults` suite and `bin/chaos.rs` (`scripts/chaos`).
//! - [`demo`] — the demo flow (the services, two consumers, a load with faults, the report), shared by
//!   `bin/demo.rs` (`scripts/demo`) and the `demo_flow` suite.
//! - [`definitions`] — `compose/rabbitmq-definitions.json` (least-privilege broker users) and the
//!   user each compose service connects as; read by the `compose` and `permissions` suites.
//! - `ports` — free TCP ports; `urls` — the little URL editing the kit needs.
//! - `bin/testkit.rs` — `testkit up --env-file F`: one broker and one cluster for a whole
//!   `scripts/test` run, announced to every test process through the environment below.
//!
//! Environment contract (each server independently; unset = start a private one per process):
//! - `RECHECK_TEST_AMQP_URL` — `amqp://user:password@host:port` of a broker (any vhost path is
//!   ignored); needs `RECHECK_TEST_RABBITMQCTL`, an executable that runs `rabbitmqctl` against
//!   that broker (the kit appends the arguments) — the kit creates vhosts with it.
//! - `RECHECK_TEST_DATABASE_URL` — `postgres://user@host:port/db` of a database on a server
//!   where that user may `CREATE DATABASE`.
//! - `TEST_LOG` — show tracing output ([`init_tracing`]), filtered by `RUST_LOG` (default `info`).

/// `Vhost` / `Database`: a name plus a URL, usable wherever a URL `&str` is expected.
macro_rules! url_newtype {
    ($ty:ident) => {
        impl $ty {
            /// The URL.
            pub fn as_str(&self) -> &str {
                &self.url
            }
        }
        impl std::ops::Deref for $ty {
            type Target = str;
            fn deref(&self) -> &str {
                &self.url
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.url
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.url)
            }
        }
        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.url
            }
        }
    };
}

pub mod bench;
pub mod definitions;
pub mod demo;
pub mod deploy;
pub mod faults;
pub mod metrics;
pub mod pki;
mod ports;
pub mod postgres;
pub mod proxy;
pub mod rabbit;
mod urls;
mod watchdog;

use std::io::Write as _;
use std::path::Path;
use std::sync::{Once, OnceLock};

use anyhow::{Context, Result};

pub use ports::free_port;
pub use postgres::{Database, Postgres};
pub use proxy::FaultProxy;
pub use rabbit::{ClusterVhost, Rabbit, RabbitCluster, Vhost};
pub use watchdog::parent_exit;

pub const AMQP_URL_ENV: &str = "RECHECK_TEST_AMQP_URL";
pub const RABBITMQCTL_ENV: &str = "RECHECK_TEST_RABBITMQCTL";
pub const DATABASE_URL_ENV: &str = "RECHECK_TEST_DATABASE_URL";

const INSTALL_HINT: &str = "the tests need RabbitMQ and PostgreSQL: run `scripts/test` (installs \
    them and starts shared servers), or `apt-get install rabbitmq-server postgresql`, or point \
    RECHECK_TEST_AMQP_URL + RECHECK_TEST_RABBITMQCTL and RECHECK_TEST_DATABASE_URL at running servers";

/// The servers every test in this process shares.
pub struct Kit {
    pub rabbit: Rabbit,
    pub postgres: Postgres,
}

/// The process-wide kit, started on first use. Panics (never skips) if the servers cannot be had.
///
/// The servers are plain processes, not tied to any tokio runtime, so tests with their own
/// runtimes can share them.
pub async fn kit() -> &'static Kit {
    // The failure is cached too: one clear message per test instead of a new boot attempt each.
    static KIT: OnceLock<Result<Kit, String>> = OnceLock::new();
    let kit = match KIT.get() {
        Some(kit) => kit,
        None => {
            tokio::task::spawn_blocking(|| KIT.get_or_init(|| Kit::start().map_err(|e| format!("{e:#}"))))
                .await
                .expect("test kit start-up panicked")
        }
    };
    match kit {
        Ok(kit) => kit,
        Err(message) => panic!("recheck test kit: {message}"),
    }
}

impl Kit {
    /// Servers from the environment where given, private ones otherwise. Blocking.
    pub fn start() -> Result<Self> {
        let rabbit = Rabbit::from_env()?;
        let postgres = Postgres::from_env();
        Self::start_missing(rabbit, postgres)
    }

    /// A private node and cluster, whatever the environment says. Blocking.
    pub fn start_private() -> Result<Self> {
        Self::start_missing(None, None)
    }

    /// Boots whatever is missing, both in parallel (the broker takes a few seconds).
    fn start_missing(rabbit: Option<Rabbit>, postgres: Option<Postgres>) -> Result<Self> {
        let (rabbit, postgres) = std::thread::scope(|scope| {
            let rabbit = scope.spawn(|| rabbit.map_or_else(Rabbit::start_private, Ok));
            let postgres = postgres.map_or_else(Postgres::start_private, Ok);
            (rabbit.join().expect("RabbitMQ start-up panicked"), postgres)
        });
        match (rabbit, postgres) {
            (Ok(rabbit), Ok(postgres)) => Ok(Self { rabbit, postgres }),
            (Err(e), other) => {
                let _ = other.map(Postgres::shutdown);
                Err(e)
            }
            (Ok(rabbit), Err(e)) => {
                let _ = rabbit.shutdown();
                Err(e)
            }
        }
    }

    /// Writes `export NAME='value'` lines for the environment contract, atomically (a reader
    /// polling for the file never sees half of it).
    pub fn write_env_file(&self, path: &Path) -> Result<()> {
        let mut text = Vec::new();
        for (key, value) in self.rabbit.env_lines().into_iter().chain(self.postgres.env_lines()) {
            writeln!(text, "export {key}='{value}'")?;
        }
        let partial = path.with_extension("partial");
        std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, path).with_context(|| format!("renaming to {}", path.display()))
    }

    /// Stops the servers this process started. Blocking.
    pub fn shutdown(self) -> Result<()> {
        let rabbit = self.rabbit.shutdown();
        self.postgres.shutdown().and(rabbit)
    }
}

/// Tracing for tests: silent unless `TEST_LOG` is set, then `RUST_LOG` (default `info`).
/// Idempotent; output goes through the test harness's capture.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if std::env::var_os("TEST_LOG").is_none() {
            return;
        }
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// A `processed` confirm of `id`, now: what a consumer sends for a message it applied. The suites'
/// and the bench's one way to write a CONFIRM by hand.
pub fn processed(id: uuid::Uuid) -> recheck::message::Confirm {
    recheck::message::Confirm {
        message_id: id,
        outcome: recheck::message::Outcome::Processed,
        detail: None,
        processed_at: recheck::message::now_ms(),
    }
}

/// A first check (attempt 0, prepared now) of `order.created` for `id`, as a producer sends it;
/// `expect` empty = any one confirm. The suites' one way to write a CHECK by hand.
pub fn first_check(id: uuid::Uuid, expect: &[&str]) -> recheck::message::Check {
    recheck::message::Check {
        message_id: id,
        routing_key: "order.created".into(),
        business_key: "o".into(),
        attempt: 0,
        published_at: recheck::message::now_ms(),
        expect: (!expect.is_empty()).then(|| expect.iter().map(|c| c.to_string()).collect()),
        traceparent: None,
        reserved: false,
    }
}
