//! The contract, not the Rust SDK, is the integration surface: the Python producer and consumer
//! of `examples/python/` (aio-pika + grpcio, stubs generated from `proto/`) run against the real
//! `callback-service` binary on a fresh vhost. The producer creates orders and drops every 5th
//! business message after its commit (a crash between commit and publish); every message must
//! end `confirmed`, the dropped ones through the producer's Python `ResendHook`, and the
//! consumer's effect table must hold each order exactly once. The Python hook serves only
//! `Resend` (it was written before `ResendBatch`): the callback service's fallback keeps it
//! working unchanged.
//!
//! Python comes from `target/python-venv` (created by `scripts/test` from
//! `examples/python/requirements.txt`), or `RECHECK_TEST_PYTHON`. Without it the test fails.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use recheck_proto::v1::{GetMessageRequest, MessageStatus, admin_client::AdminClient};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};

const ORDERS: i64 = 50;
/// Every 5th: orders go 16 at a time, so one CHECK message holds several dropped ones, which the
/// callback service first offers the Python hook as one `ResendBatch` (it serves only `Resend`).
const DROP_EVERY: i64 = 5;
const PRODUCER: &str = "orders";
const CONSUMER: &str = "shipping";
const QUEUE: &str = "shipping.order-created";
/// Short tiers and check delay, so the dropped messages are resent within seconds.
const TIERS: &str = "1s,2s";
const CHECK_DELAY: &str = "2s";
/// Longest wait for any one condition (start-up, orders committed, everything confirmed).
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_and_consumer_reconcile_through_the_callback_service() {
    recheck_tests::init_tracing();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python-example");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let started = Instant::now();
    // Every process is killed when `run` returns, also on failure (kill_on_drop).
    if let Err(e) = run(&dir).await {
        panic!("{e:#}\n{}", logs(&dir));
    }
    eprintln!("python example: {ORDERS} orders reconciled in {:.1?}", started.elapsed());
}

async fn run(dir: &Path) -> Result<()> {
    let python = python()?;
    let kit = recheck_tests::kit().await;
    let vhost = kit.rabbit.fresh_vhost().await?;
    let callback_bin = recheck_tests::demo::bin_dir()?.join("callback-service");
    ensure!(
        callback_bin.exists(),
        "{} is missing: build the workspace binaries first (scripts/test does)",
        callback_bin.display()
    );
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python");
    let (admin_port, hook_port) = (recheck_tests::free_port()?, recheck_tests::free_port()?);

    // The callback service first: it declares the topology the Python side declares again.
    let callback_db = format!("sqlite://{}?mode=rwc", dir.join("callback.db").display());
    let mut callback = Proc::spawn(
        Command::new(&callback_bin)
            .env("RECHECK_AMQP_URL", vhost.as_str())
            .env("DATABASE_URL", &callback_db)
            .env("RECHECK_GRPC_ADDR", format!("127.0.0.1:{admin_port}"))
            .env("RECHECK_PRODUCERS", format!("{PRODUCER}=http://127.0.0.1:{hook_port}"))
            .env("RECHECK_DELAY_TIERS", TIERS)
            // Any free port for the ops listener: tests run in parallel.
            .env("RECHECK_OPS_ADDR", "127.0.0.1:0"),
        dir,
        "callback-service",
    )?;
    wait_for_port(admin_port, &mut callback).await?;

    // The consumer next, so its queue is bound before the first business message.
    let shipping_db = dir.join("shipping.db");
    let mut consumer = Proc::spawn(
        Command::new(&python)
            .current_dir(&examples)
            .arg("consumer.py")
            .args(["--amqp-url", vhost.as_str(), "--delay-tiers", TIERS])
            .args(["--consumer", CONSUMER, "--queue", QUEUE])
            .arg("--db")
            .arg(&shipping_db),
        dir,
        "consumer",
    )?;
    wait_for_consumer(vhost.as_str(), &mut consumer).await?;

    let orders_db = dir.join("orders.db");
    let mut producer = Proc::spawn(
        Command::new(&python)
            .current_dir(&examples)
            .arg("producer.py")
            .args(["--amqp-url", vhost.as_str(), "--delay-tiers", TIERS, "--check-delay", CHECK_DELAY])
            .args(["--producer", PRODUCER, "--grpc-addr", &format!("127.0.0.1:{hook_port}")])
            .args(["--expect", CONSUMER, "--orders", &ORDERS.to_string()])
            .args(["--drop-every", &DROP_EVERY.to_string(), "--grace", "5s"])
            .arg("--db")
            .arg(&orders_db),
        dir,
        "producer",
    )?;

    // The producer's order table: order number → message id, once all are committed.
    let orders_url = format!("sqlite://{}?mode=rw", orders_db.display());
    let deadline = Instant::now() + WAIT;
    let orders: BTreeMap<i64, String> = loop {
        // Not there yet, or the table not created yet: nothing committed.
        let rows: Vec<(i64, String)> = if orders_db.exists() {
            query(&orders_url, "SELECT seq, message_id FROM orders").await.unwrap_or_default()
        } else {
            Vec::new()
        };
        if rows.len() as i64 >= ORDERS {
            break rows.into_iter().collect();
        }
        ensure!(Instant::now() < deadline, "only {} of {ORDERS} orders committed after {WAIT:?}", rows.len());
        producer.ensure_running()?;
        sleep(Duration::from_millis(100)).await;
    };
    ensure!(orders.keys().copied().eq(1..=ORDERS), "unexpected order numbers {:?}", orders.keys());

    // Every message confirmed, as the callback service's Admin API tells it.
    let mut admin = AdminClient::connect(format!("http://127.0.0.1:{admin_port}")).await?;
    let mut unconfirmed: BTreeMap<i64, String> = orders.clone();
    let mut resends: HashMap<i64, u32> = HashMap::new();
    let deadline = Instant::now() + WAIT;
    while !unconfirmed.is_empty() {
        let mut statuses = Vec::new();
        for (seq, id) in unconfirmed.clone() {
            let status = match admin.get_message(GetMessageRequest { message_id: id.clone() }).await {
                Ok(response) => response.into_inner().message.context("GetMessage without a message")?,
                Err(s) if s.code() == tonic::Code::NotFound => {
                    statuses.push(format!("order-{seq}: not known yet"));
                    continue;
                }
                Err(s) => bail!("GetMessage {id}: {s}"),
            };
            if status.status() == MessageStatus::Confirmed {
                resends.insert(seq, status.resend_count);
                unconfirmed.remove(&seq);
            } else {
                statuses.push(format!("order-{seq}: {:?} ({})", status.status(), status.last_error));
            }
        }
        if Instant::now() >= deadline {
            bail!("{} of {ORDERS} messages not confirmed after {WAIT:?}: {statuses:?}", unconfirmed.len());
        }
        for proc in [&mut callback, &mut consumer, &mut producer] {
            proc.ensure_running()?;
        }
        if !unconfirmed.is_empty() {
            sleep(Duration::from_millis(250)).await;
        }
    }

    // Each dropped message was confirmed only thanks to a resend by the Python hook.
    let dropped: Vec<i64> = orders.keys().copied().filter(|seq| seq % DROP_EVERY == 0).collect();
    for seq in &dropped {
        ensure!(resends[seq] >= 1, "order-{seq} was dropped but confirmed without a resend");
    }

    // The consumer's effect: each order exactly once; a dropped one from a resend (attempt ≥ 1),
    // so the attempt header travelled from the CHECK through the hook to the consumer.
    let shipping_url = format!("sqlite://{}?mode=rw", shipping_db.display());
    let shipped: Vec<(String, i64, i64)> = query(
        &shipping_url,
        "SELECT order_id, COUNT(*), MIN(attempt) FROM shipments GROUP BY order_id ORDER BY order_id",
    )
    .await?;
    let shipped: HashMap<String, (i64, i64)> = shipped.into_iter().map(|(o, n, a)| (o, (n, a))).collect();
    for seq in orders.keys() {
        let order = format!("order-{seq}");
        match shipped.get(&order) {
            None => bail!("{order} confirmed but never shipped"),
            Some((n, _)) if *n != 1 => bail!("{order} shipped {n} times"),
            Some((_, attempt)) if seq % DROP_EVERY == 0 && *attempt < 1 => {
                bail!("{order} was dropped but shipped from attempt {attempt}")
            }
            Some(_) => {}
        }
    }
    ensure!(shipped.len() as i64 == ORDERS, "{} orders shipped, {ORDERS} created", shipped.len());
    let inbox: Vec<(i64,)> =
        query(&shipping_url, "SELECT COUNT(*) FROM recheck_inbox WHERE outcome = 'processed'").await?;
    ensure!(inbox[0].0 == ORDERS, "{} processed rows in the inbox, {ORDERS} orders", inbox[0].0);
    eprintln!(
        "confirmed {ORDERS}, dropped {} (resends {:?}), shipped each once",
        dropped.len(),
        dropped.iter().map(|s| resends[s]).collect::<Vec<_>>()
    );

    // The Python hook predates ResendBatch: the callback service asked for one, got
    // UNIMPLEMENTED, and resent every dropped order through Resend (checked above).
    let callback_log = std::fs::read_to_string(dir.join("callback-service.log"))?;
    ensure!(
        callback_log.contains("does not serve ResendBatch"),
        "no ResendBatch fell back to Resend: were no two dropped orders' checks in one CHECK message?"
    );

    // SIGTERM: the Python services stop cleanly (exit 0), then the callback service.
    for proc in [&mut producer, &mut consumer, &mut callback] {
        proc.terminate().await?;
    }
    Ok(())
}

/// The venv's Python, checked to have the requirements.
fn python() -> Result<PathBuf> {
    let python = match std::env::var_os("RECHECK_TEST_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .context("CARGO_TARGET_TMPDIR has no parent")?
            .join("python-venv/bin/python"),
    };
    let hint = "scripts/test creates it; by hand: `python3 -m venv target/python-venv && \
        target/python-venv/bin/pip install -r examples/python/requirements.txt` (or set RECHECK_TEST_PYTHON)";
    ensure!(python.exists(), "no Python at {}: {hint}", python.display());
    let check = std::process::Command::new(&python)
        .args(["-c", "import grpc, grpc_tools, aio_pika"])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    ensure!(
        check.status.success(),
        "{} lacks the requirements ({}): {hint}",
        python.display(),
        String::from_utf8_lossy(&check.stderr).trim()
    );
    Ok(python)
}

/// A child process with its output in `<dir>/<name>.log`; killed when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(command: &mut Command, dir: &Path, name: &'static str) -> Result<Self> {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child })
    }

    /// An error if the process has exited.
    fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("{} exited early with {status}", self.name),
            None => Ok(()),
        }
    }

    /// SIGTERM, then a clean exit within 20 s.
    async fn terminate(&mut self) -> Result<()> {
        let pid = self.child.id().with_context(|| format!("{} already exited", self.name))?;
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        ensure!(status.success(), "kill -TERM {pid} failed");
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .with_context(|| format!("{} did not stop within 20 s of SIGTERM", self.name))??;
        ensure!(status.success(), "{} exited with {status} after SIGTERM", self.name);
        Ok(())
    }
}

async fn wait_for_port(port: u16, proc: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        proc.ensure_running()?;
        ensure!(Instant::now() < deadline, "{} does not listen on {port} after {WAIT:?}", proc.name);
        sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The consumer is up once its queue has a consumer (a passive declare per round: a missing
/// queue closes the channel).
async fn wait_for_consumer(amqp_url: &str, proc: &mut Proc) -> Result<()> {
    let connection = recheck::publisher::connect(amqp_url, "python-test-probe").await?;
    let deadline = Instant::now() + WAIT;
    let result = loop {
        let channel = connection.create_channel().await?;
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        if let Ok(queue) = channel.queue_declare(QUEUE.into(), passive, Default::default()).await
            && queue.consumer_count() > 0
        {
            break Ok(());
        }
        let _ = channel.close(200, "probe".into()).await;
        if let Err(e) = proc.ensure_running() {
            break Err(e);
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!("the Python consumer is not consuming {QUEUE} after {WAIT:?}"));
        }
        sleep(Duration::from_millis(100)).await;
    };
    let _ = connection.close(200, "probe done".into()).await;
    result
}

/// Rows of a query on one of the SQLite stores (opened and closed per call).
async fn query<T>(url: &str, sql: &'static str) -> Result<Vec<T>>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Send + Unpin,
{
    let (pool, _) = recheck::db::connect(url).await.with_context(|| format!("opening {url}"))?;
    let rows = sqlx::query_as::<_, T>(sql).fetch_all(&pool).await.with_context(|| format!("{sql} on {url}"));
    pool.close().await;
    rows
}

/// The last lines of every log in `dir`, for a failure message.
fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for name in ["callback-service", "producer", "consumer"] {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("{name}.log"))) else { continue };
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!("--- {name}.log (last 30 lines) ---\n"));
        for line in &lines[lines.len().saturating_sub(30)..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
