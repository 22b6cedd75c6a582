//! One private RabbitMQ node: its temp dir (mnesia, logs, config, cookie, `rabbitmqctl`
//! wrapper), its ports, and the watchdog running `rabbitmq-server`. [`Rabbit`](super::Rabbit)
//! runs one alone; [`RabbitCluster`](super::RabbitCluster) runs several that share a cookie and
//! an epmd port.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::free_port;
use crate::watchdog::{self, Spec, Watchdog};

/// How long a private node may take to boot (2 cores, cold caches: usually ~5 s).
pub(super) const BOOT_DEADLINE: Duration = Duration::from_secs(90);

/// What a private node has besides the defaults.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// An `amqps://` listener on a port of its own, besides the plain AMQP one.
    pub tls: Option<TlsListener>,
}

/// The TLS listener's PEM files (RabbitMQ's `ssl_options`).
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Clients must present a certificate signed by the CA (`verify_peer`, `fail_if_no_peer_cert`).
    pub verify_peer: bool,
}

pub(super) struct Node {
    /// `name@localhost`
    pub name: String,
    pub dir: PathBuf,
    pub amqp_port: u16,
    /// The TLS listener's port, if it has one.
    pub amqps_port: Option<u16>,
    epmd_port: u16,
    bin: PathBuf,
    env: Vec<(String, String)>,
    runs: Mutex<Runs>,
}

/// The watchdogs of this node's server processes.
#[derive(Default)]
struct Runs {
    current: Option<Watchdog>,
    /// Watchdogs of killed runs: each waits for the owner to go and then deletes the node's dir,
    /// so they are stopped only after the current run.
    killed: Vec<Watchdog>,
}

impl Node {
    /// Makes the node's temp dir and files; nothing runs yet. Nodes that are to cluster share the
    /// `cookie` and the `epmd_port`.
    pub fn create(bin: &Path, name: String, epmd_port: u16, cookie: &str) -> Result<Self> {
        Self::create_with(bin, name, epmd_port, cookie, &NodeOptions::default())
    }

    /// [`Node::create`] with `options`.
    pub fn create_with(
        bin: &Path,
        name: String,
        epmd_port: u16,
        cookie: &str,
        options: &NodeOptions,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("recheck-rabbit-")
            .tempdir()
            .context("creating a temp dir for RabbitMQ")?
            .keep();
        let (amqp_port, dist_port) = (free_port()?, free_port()?);
        let amqps_port = options.tls.as_ref().map(|_| free_port()).transpose()?;
        let env = node_env(&dir, &name, amqp_port, dist_port, epmd_port);
        let mut conf = String::new();
        if let (Some(tls), Some(port)) = (&options.tls, amqps_port) {
            conf = tls_conf(tls, port);
        }
        write_files(&dir, bin, &name, &env, cookie, &conf)?;
        let bin = bin.to_owned();
        Ok(Self { name, dir, amqp_port, amqps_port, epmd_port, bin, env, runs: Mutex::default() })
    }

    /// `amqp://guest:guest@127.0.0.1:<port>`, without a vhost.
    pub fn base_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}", self.amqp_port)
    }

    /// The executable that runs `rabbitmqctl` against this node.
    pub fn ctl_path(&self) -> PathBuf {
        self.dir.join("rabbitmqctl")
    }

    /// Starts `rabbitmq-server` under a watchdog (returns at once; see [`Node::await_boot`]).
    pub fn spawn(&self) -> Result<()> {
        let mut runs = self.runs.lock().expect("runs lock");
        if runs.current.is_some() {
            bail!("{} is already running", self.name);
        }
        let mut command = Command::new(self.bin.join("rabbitmq-server"));
        command.envs(self.env.iter().map(|(k, v)| (k, v))).current_dir(&self.dir);
        let epmd_port = self.epmd_port;
        runs.current = Some(Watchdog::spawn(Spec {
            command,
            stop_signal: "TERM",
            dir: &self.dir,
            log: &self.dir.join("server.log"),
            // erl starts epmd as a daemon on our port; it outlives the node unless killed. epmd
            // refuses while other nodes (of a cluster) are registered: the last one kills it.
            cleanup: format!(
                "for i in 1 2 3; do ERL_EPMD_PORT={epmd_port} epmd -kill >/dev/null 2>&1 && break; \
                 sleep 1; done"
            ),
        })?);
        Ok(())
    }

    /// Polls until the node's AMQP port answers, then lets `rabbitmqctl await_startup` confirm.
    /// The error carries the tails of the node's logs.
    pub fn await_boot(&self) -> Result<()> {
        self.try_await_boot().map_err(|e| {
            let logs = format!(
                "{}\n{}",
                watchdog::tail(&self.dir.join("server.log"), 20),
                watchdog::tail(&self.dir.join("log").join(format!("{}.log", self.name)), 40)
            );
            anyhow!("RabbitMQ node {} did not start: {e:#}\n{logs}", self.name)
        })
    }

    fn try_await_boot(&self) -> Result<()> {
        self.await_amqp()?;
        let output = Command::new(self.ctl_path())
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

    /// Polls until the node's AMQP port answers.
    pub fn await_amqp(&self) -> Result<()> {
        let started = Instant::now();
        let address = format!("127.0.0.1:{}", self.amqp_port);
        loop {
            if let Some(status) = self.server_exit() {
                bail!("rabbitmq-server exited with status {status}");
            }
            if started.elapsed() > BOOT_DEADLINE {
                bail!("not accepting AMQP on {address} after {BOOT_DEADLINE:?}");
            }
            if TcpStream::connect(&address).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    fn server_exit(&self) -> Option<String> {
        self.runs.lock().expect("runs lock").current.as_ref().and_then(Watchdog::server_exit)
    }

    /// `kill -9` of the node's Erlang VM (no goodbye to clients or peers), returning once the
    /// watchdog saw it exit. The node's files stay for [`Node::restart`].
    pub fn kill(&self) -> Result<()> {
        let mut runs = self.runs.lock().expect("runs lock");
        let run = runs.current.take().with_context(|| format!("{} is not running", self.name))?;
        let pid_file = self.dir.join("rabbitmq.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?
            .trim()
            .to_owned();
        let status = Command::new("kill").args(["-KILL", &pid]).status().context("running kill")?;
        if !status.success() {
            runs.current = Some(run);
            bail!("kill -KILL {pid} ({}) failed: {status}", self.name);
        }
        let until = Instant::now() + Duration::from_secs(30);
        // The watchdog writes `exited` once the server script is gone; a restart must not see it.
        while run.server_exit().is_none() {
            if Instant::now() > until {
                runs.current = Some(run);
                bail!("{} still running 30 s after kill -9 of {pid}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(&pid_file);
        runs.killed.push(run);
        Ok(())
    }

    /// Starts a killed node again on its old files and waits until it is up.
    pub fn restart(&self) -> Result<()> {
        let _ = std::fs::remove_file(self.dir.join("exited"));
        self.spawn()?;
        self.await_boot()
    }

    /// Stops the node and deletes its files. Blocking.
    pub fn stop(&self, deadline: Duration) -> Result<()> {
        let runs = std::mem::take(&mut *self.runs.lock().unwrap_or_else(|e| e.into_inner()));
        let current = runs.current.map_or(Ok(()), |run| run.stop(deadline));
        for run in runs.killed {
            let _ = run.stop(Duration::from_secs(10));
        }
        current
    }
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

/// `rabbitmq.conf` lines of a TLS listener on 127.0.0.1:`port` (RabbitMQ 3.10 on Erlang 25 speaks
/// TLS 1.2 and 1.3).
fn tls_conf(tls: &TlsListener, port: u16) -> String {
    let verify = if tls.verify_peer { "verify_peer" } else { "verify_none" };
    format!(
        "listeners.ssl.default = 127.0.0.1:{port}\nssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
         ssl_options.keyfile = {}\nssl_options.verify = {verify}\nssl_options.fail_if_no_peer_cert = {}\n",
        tls.ca_file.display(),
        tls.cert_file.display(),
        tls.key_file.display(),
        tls.verify_peer,
    )
}

/// Config (plus `extra_conf` lines), empty plugin list, cookie and the `rabbitmqctl` wrapper.
fn write_files(
    dir: &Path,
    bin: &Path,
    node: &str,
    env: &[(String, String)],
    cookie: &str,
    extra_conf: &str,
) -> Result<()> {
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
        &format!("loopback_users = none\ndisk_free_limit.absolute = 10MB\nlog.console = false\n{extra_conf}"),
        0o644,
    )?;
    write("enabled_plugins", "[].\n", 0o644)?;
    // Erlang refuses a cookie readable by others.
    write(".erlang.cookie", cookie, 0o400)?;
    let mut script = format!("#!/bin/sh\n# rabbitmqctl against the private test node {node}\n");
    for (key, value) in env {
        writeln!(script, "export {key}='{value}'").expect("write to String");
    }
    writeln!(script, "exec '{}' -n '{node}' \"$@\"", bin.join("rabbitmqctl").display())
        .expect("write to String");
    write("rabbitmqctl", &script, 0o755)
}
