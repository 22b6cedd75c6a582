//! A private RabbitMQ cluster on this machine, for the suites that kill a node mid-load.
//!
//! Every node is a private node of its own (name, AMQP and distribution ports, temp dir,
//! watchdog); they share the Erlang cookie and one epmd (started first, on a free port), which is
//! what lets them find each other. Nodes boot in parallel as standalone nodes, then every node
//! but the first does `stop_app`, `join_cluster <first>`, `start_app`. Quorum queues declared
//! afterwards get `min(3, size)` members (RabbitMQ's default initial group size).
//!
//! Only the tests that need a cluster start one (it takes a few CPU-heavy seconds more than a
//! node); `testkit up` does not.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Node, find_bin, new_cookie, run_ctl};
use crate::{free_port, urls};

/// Private nodes clustered together. Nodes are numbered from 0; node 0 is the one the others
/// joined.
pub struct RabbitCluster {
    nodes: Vec<Arc<Node>>,
}

/// A vhost created on a cluster for one test: its URL on every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterVhost {
    pub name: String,
    /// `amqp://guest:guest@127.0.0.1:<port of node i>/<name>`, by node.
    pub urls: Vec<String>,
}

impl ClusterVhost {
    /// The vhost's URL on `node`.
    pub fn url(&self, node: usize) -> &str {
        &self.urls[node]
    }

    /// Every node's URL, comma-separated: what `RECHECK_AMQP_URL` / `--amqp-url` take.
    pub fn joined(&self) -> String {
        self.urls.join(",")
    }
}

impl RabbitCluster {
    /// Starts `size` private nodes, clusters them and waits until all accept AMQP. Blocking.
    pub fn start_private(size: usize) -> Result<Self> {
        anyhow::ensure!(size >= 1, "a cluster needs a node");
        static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
        let started = Instant::now();
        let bin = find_bin().context(crate::INSTALL_HINT)?;
        let (cookie, epmd_port) = (new_cookie(), free_port()?);
        start_epmd(epmd_port)?;
        let cluster = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let name = format!("recheck-test-{}-c{cluster}-{i}@localhost", std::process::id());
            match Node::create(&bin, name, epmd_port, &cookie) {
                Ok(node) => nodes.push(Arc::new(node)),
                Err(e) => {
                    kill_epmd(epmd_port);
                    return Err(e);
                }
            }
        }
        let cluster = Self { nodes };
        match cluster.boot() {
            Ok(()) => {
                let names: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
                tracing::info!(?names, elapsed = ?started.elapsed(), "private RabbitMQ cluster up");
                Ok(cluster)
            }
            Err(e) => {
                let _ = cluster.shutdown();
                kill_epmd(epmd_port);
                Err(e)
            }
        }
    }

    /// All nodes boot in parallel as standalone brokers; then every node but the first joins it.
    fn boot(&self) -> Result<()> {
        for node in &self.nodes {
            node.spawn()?;
        }
        parallel(&self.nodes, |node| node.await_boot())?;
        tracing::debug!("cluster nodes booted, joining");
        let (first, others) = self.nodes.split_first().expect("a cluster has a node");
        // Joins one at a time: each changes the cluster's schema through the first node.
        let joining = Mutex::new(());
        parallel(others, |node| {
            ctl_blocking(&node.ctl_path(), &["stop_app"])?;
            {
                let _one = joining.lock().expect("join lock");
                ctl_blocking(&node.ctl_path(), &["join_cluster", &first.name])?;
            }
            // start_app returns once the broker runs (no await_startup: each CLI call is a VM).
            ctl_blocking(&node.ctl_path(), &["start_app"])?;
            node.await_amqp()
        })
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `name@localhost` of `node`.
    pub fn node_name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    /// `amqp://guest:guest@127.0.0.1:<port>` of `node`, without a vhost.
    pub fn base_url(&self, node: usize) -> String {
        self.nodes[node].base_url()
    }

    /// The AMQP listener of `node` (to put a [`FaultProxy`](crate::FaultProxy) in front of it).
    pub fn amqp_addr(&self, node: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[node].amqp_port))
    }

    /// The node whose AMQP listener `url` names, if any.
    pub fn node_of(&self, url: &str) -> Option<usize> {
        let address = urls::host_port(url, 5672);
        self.nodes.iter().position(|n| address == format!("127.0.0.1:{}", n.amqp_port))
    }

    /// Creates a vhost (through the first node that answers) with all permissions for guest.
    pub async fn fresh_vhost(&self) -> Result<ClusterVhost> {
        let name = format!("test-{}", uuid::Uuid::now_v7().simple());
        let mut last = None;
        for node in 0..self.len() {
            let created = async {
                self.ctl(node, &["add_vhost", &name]).await?;
                self.ctl(node, &["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]).await
            };
            match created.await {
                Ok(_) => {
                    let path = urls::encode_segment(&name);
                    let urls = self.nodes.iter().map(|n| format!("{}/{path}", n.base_url())).collect();
                    return Ok(ClusterVhost { name, urls });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("a cluster has a node"))
    }

    /// Runs `rabbitmqctl <args>` against `node` and returns its stdout.
    pub async fn ctl(&self, node: usize, args: &[&str]) -> Result<String> {
        run_ctl(&self.nodes[node].ctl_path(), args).await
    }

    /// The nodes holding a replica of quorum queue `queue` in `vhost`.
    pub async fn quorum_members(&self, node: usize, vhost: &str, queue: &str) -> Result<Vec<String>> {
        let args = ["list_queues", "-p", vhost, "name", "type", "members", "--formatter", "json", "-q"];
        let out = self.ctl(node, &args).await?;
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&out).with_context(|| format!("list_queues output: {out}"))?;
        let row = rows
            .iter()
            .find(|row| row["name"] == queue)
            .with_context(|| format!("no queue {queue} in vhost {vhost}: {out}"))?;
        if row["type"] != "quorum" {
            bail!("{queue} is not a quorum queue: {row}");
        }
        let members = row["members"].as_array().with_context(|| format!("no members: {row}"))?;
        Ok(members.iter().filter_map(|m| m.as_str().map(str::to_owned)).collect())
    }

    /// `kill -9` of `node`'s Erlang VM: its connections drop without a close, its peers see it
    /// vanish. Its files stay, for [`restart`](Self::restart).
    pub async fn kill(&self, node: usize) -> Result<()> {
        let node = self.nodes[node].clone();
        tokio::task::spawn_blocking(move || node.kill()).await.context("kill panicked")?
    }

    /// Starts a killed `node` again (it rejoins the cluster) and waits until it is up.
    pub async fn restart(&self, node: usize) -> Result<()> {
        let node = self.nodes[node].clone();
        tokio::task::spawn_blocking(move || node.restart()).await.context("restart panicked")?
    }

    /// Stops every node and removes their files. Blocking.
    pub fn shutdown(self) -> Result<()> {
        parallel(&self.nodes, |node| node.stop(Duration::from_secs(60)))
    }
}

/// Runs `f` on every node at once; the first error wins.
fn parallel(nodes: &[Arc<Node>], f: impl Fn(&Node) -> Result<()> + Sync) -> Result<()> {
    std::thread::scope(|scope| {
        let runs: Vec<_> = nodes.iter().map(|node| scope.spawn(|| f(node))).collect();
        // Threads not joined here (after an error) are joined by the scope.
        runs.into_iter().try_for_each(|run| run.join().expect("cluster node thread panicked"))
    })
}

/// `rabbitmqctl <args>`, blocking (for start-up, outside any runtime).
fn ctl_blocking(ctl: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(ctl).args(args).output().with_context(|| format!("rabbitmqctl {args:?}"))?;
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

/// The cluster's epmd, started before the nodes so that none races another to start it.
fn start_epmd(port: u16) -> Result<()> {
    let status = Command::new("epmd")
        .arg("-daemon")
        .env("ERL_EPMD_PORT", port.to_string())
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .status()
        .context("running epmd -daemon (part of Erlang, installed with rabbitmq-server)")?;
    if !status.success() {
        bail!("epmd -daemon on port {port} failed: {status}");
    }
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > until {
            bail!("epmd not listening on port {port} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Stops the epmd of a cluster that never got its nodes (the nodes' watchdogs do it otherwise).
fn kill_epmd(port: u16) {
    let _ = Command::new("epmd").arg("-kill").env("ERL_EPMD_PORT", port.to_string()).output();
}
