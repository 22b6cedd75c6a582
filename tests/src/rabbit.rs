//! The RabbitMQ broker under test: a private node, or an existing one named by the environment;
//! and a private cluster of several nodes for the suites that kill a node.
//!
//! A private node runs from the installed binaries as a foreground process under a watchdog, with
//! its own node name, AMQP / distribution / epmd ports and everything (mnesia, logs, config,
//! cookie) in a temp dir, so it never meets a system broker or another test run. Tests reach it
//! through AMQP and through `rabbitmqctl` (a generated wrapper script that carries the node's
//! environment), one fresh vhost per test.
//!
//! - `node` — one private node (files, ports, watchdog, kill -9 and restart), for both below.
//! - [`Rabbit`] — one broker: a private node or one from the environment.
//! - [`RabbitCluster`] — private nodes joined into one cluster (`cluster`).

mod cluster;
mod node;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::Semaphore;

use crate::{AMQP_URL_ENV, RABBITMQCTL_ENV, free_port, urls};
pub use cluster::{ClusterVhost, RabbitCluster};
use node::{BOOT_DEADLINE, Node};
pub use node::{NodeOptions, TlsListener};

/// Upper bound for one `rabbitmqctl` call.
const CTL_DEADLINE: Duration = Duration::from_secs(120);

/// A RabbitMQ broker and a way to run `rabbitmqctl` against it.
pub struct Rabbit {
    /// `amqp://user:password@host:port`, without a vhost.
    base_url: String,
    /// `amqps://user:password@127.0.0.1:port` of a TLS listener, without a vhost.
    amqps_base_url: Option<String>,
    /// Executable that runs `rabbitmqctl` against this broker; arguments are appended.
    ctl: PathBuf,
    /// Set when this process started the node.
    server: Option<Node>,
}

/// A vhost created for one test. Derefs to its AMQP URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vhost {
    pub name: String,
    /// `amqp://guest:guest@127.0.0.1:<port>/<name>`
    pub url: String,
}

url_newtype!(Vhost);

impl Rabbit {
    /// The broker named by `RECHECK_TEST_AMQP_URL` + `RECHECK_TEST_RABBITMQCTL`, if set.
    pub fn from_env() -> Result<Option<Self>> {
        let url = std::env::var(AMQP_URL_ENV).ok().filter(|s| !s.is_empty());
        let ctl = std::env::var(RABBITMQCTL_ENV).ok().filter(|s| !s.is_empty());
        match (url, ctl) {
            (None, None) => Ok(None),
            (Some(url), Some(ctl)) => {
                let base_url = urls::origin(&url).to_owned();
                Ok(Some(Self { base_url, amqps_base_url: None, ctl: ctl.into(), server: None }))
            }
            _ => bail!(
                "set both {AMQP_URL_ENV} and {RABBITMQCTL_ENV} (an executable running rabbitmqctl \
                 against that broker), or neither"
            ),
        }
    }

    /// Starts a private node and waits until it accepts AMQP connections. Blocking.
    pub fn start_private() -> Result<Self> {
        Self::start_private_with(&NodeOptions::default())
    }

    /// [`Rabbit::start_private`] with `options` (e.g. a TLS listener: [`Rabbit::amqps_url`]).
    pub fn start_private_with(options: &NodeOptions) -> Result<Self> {
        let bin = find_bin().context(crate::INSTALL_HINT)?;
        let name = format!("recheck-test-{}@localhost", std::process::id());
        let node = Node::create_with(&bin, name, free_port()?, &new_cookie(), options)?;
        node.spawn()?;
        if let Err(e) = node.await_boot() {
            let _ = node.stop(Duration::from_secs(30));
            return Err(e);
        }
        tracing::info!(node = %node.name, url = %node.base_url(), dir = %node.dir.display(), "private RabbitMQ up");
        let amqps_base_url = node.amqps_port.map(|port| format!("amqps://guest:guest@127.0.0.1:{port}"));
        Ok(Self { base_url: node.base_url(), amqps_base_url, ctl: node.ctl_path(), server: Some(node) })
    }

    /// The AMQP URL of `vhost` on this broker.
    pub fn url(&self, vhost: &str) -> String {
        format!("{}/{}", self.base_url, urls::encode_segment(vhost))
    }

    /// The `amqps://` URL of `vhost` (host 127.0.0.1), if the node has a TLS listener.
    pub fn amqps_url(&self, vhost: &str) -> Option<String> {
        Some(format!("{}/{}", self.amqps_base_url.as_ref()?, urls::encode_segment(vhost)))
    }

    /// Path of the executable that runs `rabbitmqctl` against this broker.
    pub fn ctl_path(&self) -> &Path {
        &self.ctl
    }

    /// Lines for an env file that points other processes at this broker.
    pub fn env_lines(&self) -> Vec<(&'static str, String)> {
        vec![(AMQP_URL_ENV, self.base_url.clone()), (RABBITMQCTL_ENV, self.ctl.display().to_string())]
    }

    /// Creates a new vhost and gives the URL's user all permissions on it.
    pub async fn fresh_vhost(&self) -> Result<Vhost> {
        let name = format!("test-{}", uuid::Uuid::now_v7().simple());
        let user = urls::user(&self.base_url).unwrap_or("guest").to_owned();
        self.ctl(&["add_vhost", &name]).await?;
        self.ctl(&["set_permissions", "-p", &name, &user, ".*", ".*", ".*"]).await?;
        let url = self.url(&name);
        Ok(Vhost { name, url })
    }

    /// Runs `rabbitmqctl <args>` against the broker and returns its stdout.
    pub async fn ctl(&self, args: &[&str]) -> Result<String> {
        run_ctl(&self.ctl, args).await
    }

    /// `rabbitmqctl stop_app`: the broker drops every connection and stops accepting new ones.
    pub async fn stop_app(&self) -> Result<()> {
        self.ctl(&["stop_app"]).await.map(drop)
    }

    /// `rabbitmqctl start_app`, returning once the broker accepts AMQP connections again.
    pub async fn start_app(&self) -> Result<()> {
        self.ctl(&["start_app"]).await?;
        self.ctl(&["await_startup"]).await?;
        let address = urls::host_port(&self.base_url, 5672);
        let started = Instant::now();
        while tokio::net::TcpStream::connect(&address).await.is_err() {
            if started.elapsed() > BOOT_DEADLINE {
                bail!("broker not accepting AMQP on {address} after start_app");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Stops a private node and removes its files (no-op for a broker from the environment).
    pub fn shutdown(self) -> Result<()> {
        match self.server {
            Some(node) => node.stop(Duration::from_secs(60)),
            None => Ok(()),
        }
    }
}

/// Runs `<ctl> <args>` (a `rabbitmqctl` wrapper) and returns its stdout.
async fn run_ctl(ctl: &Path, args: &[&str]) -> Result<String> {
    // Each call boots an Erlang VM (~1 s of CPU); many parallel tests would starve each other
    // (and the broker) on a small machine. tokio's semaphore works across test runtimes.
    static SLOTS: Semaphore = Semaphore::const_new(4);
    let _slot = SLOTS.acquire().await.expect("semaphore never closed");
    let mut command = tokio::process::Command::new(ctl);
    command.args(args).stdin(std::process::Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(CTL_DEADLINE, command.output())
        .await
        .with_context(|| format!("rabbitmqctl {args:?} took longer than {CTL_DEADLINE:?}"))?
        .with_context(|| format!("running {} {args:?}", ctl.display()))?;
    if !output.status.success() {
        bail!(
            "rabbitmqctl {args:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// An Erlang cookie: nodes that share one may cluster.
fn new_cookie() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// The directory holding the real `rabbitmq-server` / `rabbitmqctl` scripts. Debian's
/// `/usr/sbin` ones are wrappers that `su` to the rabbitmq user and use /var/lib/rabbitmq.
fn find_bin() -> Result<PathBuf> {
    let debian = Path::new("/usr/lib/rabbitmq/bin");
    if debian.join("rabbitmq-server").exists() {
        return Ok(debian.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|dir| dir.join("rabbitmq-server").exists() && dir.join("rabbitmqctl").exists())
        .context("rabbitmq-server not found (looked in /usr/lib/rabbitmq/bin and PATH)")
}
