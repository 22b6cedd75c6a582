//! A server process that cannot outlive its owner.
//!
//! Statics are never dropped, so a test process that starts a server cannot stop it from Rust.
//! Instead every server runs under a small `sh` watchdog in its own process group (so a Ctrl-C
//! aimed at `cargo test` does not kill the server halfway): the watchdog polls the owner pid and,
//! once the owner is gone or the watchdog gets SIGTERM, stops the server gracefully, runs a cleanup
//! snippet and removes the server's temp dir. If the server dies by itself the watchdog writes the
//! exit status to `<dir>/exited` and keeps the logs until the owner is gone, so startup code can
//! report the failure with the log tail.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// `$1` owner pid, `$2` stop signal, `$3` temp dir, `$4` server log, `$5` cleanup snippet,
/// then the server command.
const SCRIPT: &str = r#"
owner=$1 sig=$2 dir=$3 log=$4 cleanup=$5
shift 5
stopping=
trap 'stopping=1' TERM INT HUP
"$@" >"$log" 2>&1 </dev/null &
server=$!
( while kill -0 "$owner" 2>/dev/null; do sleep 0.5; done; kill -TERM $$ ) >/dev/null 2>&1 &
poller=$!
wait "$server"
rc=$?
if [ -z "$stopping" ]; then
  echo "$rc" >"$dir/exited"
  wait "$poller"
else
  while kill -0 "$server" 2>/dev/null; do
    kill -"$sig" "$server" 2>/dev/null
    wait "$server"
  done
fi
kill "$poller" 2>/dev/null
eval "$cleanup"
rm -rf "$dir"
"#;

/// What to run and how to stop it.
pub struct Spec<'a> {
    /// The server command (it must stay in the foreground).
    pub command: Command,
    /// Signal name for a graceful stop (`TERM` for RabbitMQ, `INT` = fast shutdown for Postgres).
    pub stop_signal: &'a str,
    /// The server's temp dir, removed after it stops.
    pub dir: &'a Path,
    /// Where the server's stdout and stderr go.
    pub log: &'a Path,
    /// Shell snippet run after the server stopped (e.g. kill the private epmd).
    pub cleanup: String,
}

/// A running watchdog (and through it, the server).
pub struct Watchdog {
    child: Child,
    dir: PathBuf,
}

impl Watchdog {
    /// Starts the server under a watchdog owned by the current process.
    pub fn spawn(spec: Spec<'_>) -> Result<Self> {
        let program = spec.command.get_program().to_owned();
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(SCRIPT)
            .arg("recheck-watchdog")
            .arg(std::process::id().to_string())
            .arg(spec.stop_signal)
            .arg(spec.dir)
            .arg(spec.log)
            .arg(&spec.cleanup)
            .arg(&program)
            .args(spec.command.get_args());
        for (key, value) in spec.command.get_envs() {
            match value {
                Some(value) => sh.env(key, value),
                None => sh.env_remove(key),
            };
        }
        if let Some(dir) = spec.command.get_current_dir() {
            sh.current_dir(dir);
        }
        // Own process group: a terminal SIGINT to the test run must not hit the server directly;
        // the watchdog sees the owner go and stops it in order. No inherited pipes either, so
        // nothing keeps cargo's output pipes open after the test process exits.
        sh.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = sh.spawn().with_context(|| format!("spawning watchdog for {program:?}"))?;
        Ok(Self { child, dir: spec.dir.to_owned() })
    }

    /// `Some(status)` once the server has exited on its own.
    pub fn server_exit(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("exited")).ok().map(|s| s.trim().to_owned())
    }

    /// Stops the server, cleans up and waits for the watchdog (at most `deadline`).
    pub fn stop(mut self, deadline: Duration) -> Result<()> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("watchdog {pid} did not stop the server within {deadline:?}")
    }
}

/// Resolves once the process that started this one has exited (this one was re-parented), so a
/// long-running helper does not outlive a killed `scripts/test`.
pub async fn parent_exit() {
    let parent = std::os::unix::process::parent_id();
    while std::os::unix::process::parent_id() == parent {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            format!("--- {} ---\n{}", path.display(), all[start..].join("\n"))
        }
        Err(e) => format!("--- {}: {e} ---", path.display()),
    }
}
