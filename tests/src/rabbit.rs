//! The RabbitMQ broker under test: a private node, or an existing one named by the environment.
//!
//! A private node runs from the installed binaries as a foreground process under a watchdog, with
//! its own node name, AMQP / distribution / epmd ports and everything (mnesia, logs, config,
//! cookie) in a temp dir, so it never meets a system broker or another test run. Tests reach it
//! through AMQP and through `rabbitmqctl` (a generated wrapper script that carries the node's
//! environment), one fresh vhost per test.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::Semaphore;

use crate::watchdog::{self, Spec, Watchdog};
use crate::{AMQP_URL_ENV, RABBITMQCTL_ENV, free_port, urls};

/// How long a private node may take to boot (2 cores, cold caches: usually ~5 s).
const BOOT_DEADLINE: Duration = Duration::from_secs(90);
/// Upper bound for one `rabbitmqctl` call.
const CTL_DEADLINE: Duration = Duration::from_secs(120);

/// A RabbitMQ broker and a way to run `rabbitmqctl` against it.
pub struct Rabbit {
    /// `amqp://user:password@host:port`, without a vhost.
    base_url: String,
    /// Executable that runs `rabbitmqctl` against this broker; arguments are appended.
    ctl: PathBuf,
    /// Set when this process started the node.
    server: Option<Watchdog>,
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
                Ok(Some(Self { base_url: urls::origin(&url).to_owned(), ctl: ctl.into(), server: None }))
            }
            _ => bail!(
                "set both {AMQP_URL_ENV} and {RABBITMQCTL_ENV} (an executable running rabbitmqctl \
                 against that broker), or neither"
            ),
        }
    }

    /// Starts a private node and waits until it accepts AMQP connections. Blocking.
    pub fn start_private() -> Result<Self> {
        let bin = find_bin().context(crate::INSTALL_HINT)?;
        let dir = tempfile::Builder::new()
            .prefix("recheck-rabbit-")
            .tempdir()
            .context("creating a temp dir for RabbitMQ")?
            .keep();
        let node = format!("recheck-test-{}@localhost", std::process::id());
        let (amqp_port, dist_port, epmd_port) = (free_port()?, free_port()?, free_port()?);
        let env = node_env(&dir, &node, amqp_port, dist_port, epmd_port);
        write_files(&dir, &bin, &node, &env)?;

        let mut command = Command::new(bin.join("rabbitmq-server"));
        command.envs(env.iter().map(|(k, v)| (k, v))).current_dir(&dir);
        let server_log = dir.join("server.log");
        let server = Watchdog::spawn(Spec {
            command,
            stop_signal: "TERM",
            dir: &dir,
            log: &server_log,
            // erl starts epmd as a daemon on our port; it outlives the node unless killed.
            cleanup: format!(
                "for i in 1 2 3; do ERL_EPMD_PORT={epmd_port} epmd -kill >/dev/null 2>&1 && break; \
                 sleep 1; done"
            ),
        })?;
        let rabbit = Self {
            base_url: format!("amqp://guest:guest@127.0.0.1:{amqp_port}"),
            ctl: dir.join("rabbitmqctl"),
            server: Some(server),
        };
        match rabbit.await_boot(&node) {
            Ok(()) => {
                tracing::info!(%node, url = %rabbit.base_url, dir = %dir.display(), "private RabbitMQ up");
                Ok(rabbit)
            }
            Err(e) => {
                let logs = format!(
                    "{}\n{}",
                    watchdog::tail(&server_log, 20),
                    watchdog::tail(&dir.join("log").join(format!("{node}.log")), 40)
                );
                if let Some(server) = rabbit.server {
                    let _ = server.stop(Duration::from_secs(30));
                }
                Err(anyhow!("private RabbitMQ node {node} did not start: {e:#}\n{logs}"))
            }
        }
    }

    /// Polls until the node's AMQP port answers, then lets `rabbitmqctl await_startup` confirm.
    fn await_boot(&self, node: &str) -> Result<()> {
        let started = Instant::now();
        let address = urls::host_port(&self.base_url, 5672);
        loop {
            if let Some(status) = self.server.as_ref().and_then(Watchdog::server_exit) {
                bail!("rabbitmq-server exited with status {status}");
            }
            if started.elapsed() > BOOT_DEADLINE {
                bail!("{node} not accepting AMQP on {address} after {BOOT_DEADLINE:?}");
            }
            if TcpStream::connect(&address).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let output = Command::new(&self.ctl)
            .args(["await_startup", "--timeout", "60"])
            .output()
            .context("running rabbitmqctl await_startup")?;
        if !output.status.success() {
            bail!(
                "rabbitmqctl await_startup failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// The AMQP URL of `vhost` on this broker.
    pub fn url(&self, vhost: &str) -> String {
        format!("{}/{}", self.base_url, urls::encode_segment(vhost))
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
        // Each call boots an Erlang VM (~1 s of CPU); many parallel tests would starve each other
        // (and the broker) on a small machine. tokio's semaphore works across test runtimes.
        static SLOTS: Semaphore = Semaphore::const_new(4);
        let _slot = SLOTS.acquire().await.expect("semaphore never closed");
        let mut command = tokio::process::Command::new(&self.ctl);
        command.args(args).stdin(std::process::Stdio::null()).kill_on_drop(true);
        let output = tokio::time::timeout(CTL_DEADLINE, command.output())
            .await
            .with_context(|| format!("rabbitmqctl {args:?} took longer than {CTL_DEADLINE:?}"))?
            .with_context(|| format!("running {} {args:?}", self.ctl.display()))?;
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
            Some(server) => server.stop(Duration::from_secs(60)),
            None => Ok(()),
        }
    }
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

/// The environment of the node and of `rabbitmqctl` (both need HOME for the cookie and the epmd
/// port to find each other).
fn node_env(dir: &Path, node: &str, amqp_port: u16, dist_port: u16, epmd_port: u16) -> Vec<(String, String)> {
    let path = |name: &str| dir.join(name).display().to_string();
    [
        ("HOME", path("")),
        ("RABBITMQ_NODENAME", node.to_owned()),
        ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_owned()),
        ("RABBITMQ_NODE_PORT", amqp_port.to_string()),
        ("RABBITMQ_DIST_PORT", dist_port.to_string()),
        ("ERL_EPMD_PORT", epmd_port.to_string()),
        ("ERL_EPMD_ADDRESS", "127.0.0.1".to_owned()),
        ("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}".to_owned()),
        // Keeps /etc/rabbitmq/rabbitmq-env.conf (the system node's settings) out.
        ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf")),
        ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
        ("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config")),
        ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
        ("RABBITMQ_MNESIA_BASE", path("mnesia")),
        ("RABBITMQ_LOG_BASE", path("log")),
        ("RABBITMQ_PID_FILE", path("rabbitmq.pid")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Config, empty plugin list, cookie and the `rabbitmqctl` wrapper.
fn write_files(dir: &Path, bin: &Path, node: &str, env: &[(String, String)]) -> Result<()> {
    let write = |name: &str, text: &str, mode: u32| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))
    };
    write("rabbitmq-env.conf", "", 0o644)?;
    // guest may connect from anywhere (it is only reachable on 127.0.0.1 anyway); a low disk
    // limit so a nearly full /tmp does not raise the disk alarm and block publishers.
    write(
        "rabbitmq.conf",
        "loopback_users = none\ndisk_free_limit.absolute = 10MB\nlog.console = false\n",
        0o644,
    )?;
    write("enabled_plugins", "[].\n", 0o644)?;
    // Erlang refuses a cookie readable by others.
    write(".erlang.cookie", &uuid::Uuid::now_v7().simple().to_string(), 0o400)?;
    let mut script = format!("#!/bin/sh\n# rabbitmqctl against the private test node {node}\n");
    for (key, value) in env {
        writeln!(script, "export {key}='{value}'").expect("write to String");
    }
    writeln!(script, "exec '{}' -n '{node}' \"$@\"", bin.join("rabbitmqctl").display())
        .expect("write to String");
    write("rabbitmqctl", &script, 0o755)
}
