//! A service process the bench starts itself (the outbox baseline's producer and consumer, the
//! callback service alone): spawned with a log file, stopped with SIGTERM.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};
use tokio::time::Instant;

pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `binary args` with `env` added, stdout and stderr appended to `log`.
    pub fn spawn(binary: &Path, args: &[&str], env: &[(&str, String)], log: PathBuf) -> Result<Self> {
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: build the workspace binaries first",
            binary.display()
        );
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = Command::new(binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let name = binary.file_name().map_or("service".into(), |n| n.to_string_lossy().into_owned());
        Ok(Self { name, child, log })
    }

    pub fn pid(&self) -> Result<u32> {
        self.child.id().with_context(|| format!("{} is not running", self.name))
    }

    /// Waits until something listens on `port` (the service finished starting), or fails.
    pub async fn wait_for_port(&mut self, port: u16, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}) while starting; log:\n{}", self.name, self.tail());
            }
            if Instant::now() > deadline {
                bail!("{} does not listen on {port}; log:\n{}", self.name, self.tail());
            }
            // Often: the moment it listens is when a pre-filled queue starts to drain.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Fails if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); log:\n{}", self.name, self.tail());
        }
        Ok(())
    }

    /// SIGTERM, then a clean exit within `bound` (SIGKILL and an error after it).
    pub async fn terminate(mut self, bound: Duration) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                anyhow::ensure!(
                    status.success(),
                    "{} exited with {status}; log:\n{}",
                    self.name,
                    self.tail()
                );
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("{} did not stop within {bound:?} of SIGTERM", self.name)
            }
        }
    }

    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}
