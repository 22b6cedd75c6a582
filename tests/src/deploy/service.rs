//! One service process of a deployment: its command line and environment, the running child,
//! and the CPU / memory it used over all its incarnations.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};

/// CPU and memory one service used over all its incarnations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub peak_rss_bytes: u64,
}

/// A service's command line and environment, and its current process if running.
pub(super) struct Service {
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub usage: Usage,
}

impl Service {
    pub fn new(binary: PathBuf, args: &[&str], env: Vec<(String, String)>, log: PathBuf) -> Self {
        let args = args.iter().map(|s| s.to_string()).collect();
        Self { binary, args, env, log, child: None, usage: Usage::default() }
    }

    pub fn spawn(&mut self) -> Result<()> {
        anyhow::ensure!(
            self.binary.exists(),
            "{} is missing: build the workspace binaries first",
            self.binary.display()
        );
        // Appended: a restarted service's log follows its previous incarnation's.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Adds the running process's CPU time and peak RSS to the totals (read just before it ends).
    fn sample(&mut self) {
        if let Some(usage) = self.child.as_ref().and_then(Child::id).and_then(proc_usage) {
            self.usage.cpu_seconds += usage.cpu_seconds;
            self.usage.peak_rss_bytes = self.usage.peak_rss_bytes.max(usage.peak_rss_bytes);
        }
    }

    pub async fn kill(&mut self) -> Result<()> {
        self.sample();
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit (SIGKILL and an error after `bound`).
    pub async fn terminate(&mut self, bound: Duration) -> Result<()> {
        self.sample();
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        match tokio::time::timeout(bound, child.wait()).await {
            Ok(status) => {
                let status = status?;
                anyhow::ensure!(status.success(), "{} exited with {status}", self.binary.display());
                Ok(())
            }
            Err(_) => {
                child.kill().await?;
                bail!("{} did not stop within {bound:?} of SIGTERM", self.binary.display())
            }
        }
    }
}

pub(super) async fn wait_for_port(port: u16, deadline: Instant, log: &Path) -> Result<()> {
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}; log:\n{}", crate::watchdog::tail(log, 20));
        }
        sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// CPU seconds (user + system) and peak RSS of a live process (the bench's `/proc` reader).
fn proc_usage(pid: u32) -> Option<Usage> {
    use crate::bench::procfs;
    Some(Usage {
        cpu_seconds: procfs::cpu_seconds(procfs::Target::Fresh(pid))?,
        peak_rss_bytes: procfs::peak_rss_bytes(pid)?,
    })
}
