//! What processes cost, read from `/proc`: CPU seconds (user + system) and resident memory of the
//! bench itself, of the service processes it starts, and of the servers (found by the port they
//! listen on). A [`Meter`] takes a baseline, samples RSS in the background, and reports the
//! difference when the measured work is done.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Which process(es) a measured name stands for.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// One process started for this measurement: its peak RSS is the kernel's `VmHWM`.
    Fresh(u32),
    /// A process that lived before (the bench, the broker): peak RSS from samples.
    Shared(u32),
    /// A server that forks a process per connection (PostgreSQL): the parent with its reaped
    /// children plus the live children. No RSS (shared buffers would be counted many times).
    Forking(u32),
}

/// One process's share of a measured run.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessCost {
    pub name: String,
    pub cpu_seconds: f64,
    /// CPU seconds per 1000 business messages.
    pub cpu_s_per_1k: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// A running measurement over named targets.
pub struct Meter {
    targets: Vec<(String, Target, f64)>,
    peaks: Arc<Mutex<HashMap<u32, u64>>>,
    stop: CancellationToken,
    sampler: tokio::task::JoinHandle<()>,
}

impl Meter {
    /// Takes the CPU baseline of every target now and samples their RSS every 100 ms.
    pub fn start(targets: Vec<(String, Target)>) -> Self {
        let targets: Vec<(String, Target, f64)> =
            targets.into_iter().map(|(name, t)| (name, t, cpu_seconds(t).unwrap_or(0.0))).collect();
        let pids: Vec<u32> = targets
            .iter()
            .filter_map(|(_, t, _)| match t {
                Target::Fresh(pid) | Target::Shared(pid) => Some(*pid),
                Target::Forking(_) => None,
            })
            .collect();
        let peaks = Arc::new(Mutex::new(HashMap::new()));
        let stop = CancellationToken::new();
        let sampler = tokio::spawn(sample_rss(pids, peaks.clone(), stop.clone()));
        Self { targets, peaks, stop, sampler }
    }

    /// CPU used since [`Meter::start`] and peak RSS, per target; `messages` scales CPU per 1000.
    /// Call it while the processes still run.
    pub async fn finish(self, messages: u64) -> Vec<ProcessCost> {
        self.stop.cancel();
        let _ = self.sampler.await;
        let peaks = self.peaks.lock().expect("peaks lock").clone();
        self.targets
            .into_iter()
            .map(|(name, target, baseline)| {
                let cpu = cpu_seconds(target).map_or(0.0, |now| (now - baseline).max(0.0));
                let peak_rss_bytes = match target {
                    Target::Fresh(pid) => {
                        status_kb(pid, "VmHWM:").map(|kb| kb * 1024).or_else(|| peaks.get(&pid).copied())
                    }
                    Target::Shared(pid) => peaks.get(&pid).copied(),
                    Target::Forking(_) => None,
                };
                ProcessCost {
                    name,
                    cpu_seconds: cpu,
                    cpu_s_per_1k: cpu * 1000.0 / messages.max(1) as f64,
                    peak_rss_bytes,
                }
            })
            .collect()
    }
}

async fn sample_rss(pids: Vec<u32>, peaks: Arc<Mutex<HashMap<u32, u64>>>, stop: CancellationToken) {
    loop {
        for &pid in &pids {
            if let Some(kb) = status_kb(pid, "VmRSS:") {
                let mut peaks = peaks.lock().expect("peaks lock");
                let peak = peaks.entry(pid).or_default();
                *peak = (*peak).max(kb * 1024);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// CPU seconds a target has used so far.
pub fn cpu_seconds(target: Target) -> Option<f64> {
    match target {
        Target::Fresh(pid) | Target::Shared(pid) => stat_ticks(pid, false),
        Target::Forking(parent) => {
            let own = stat_ticks(parent, true)?;
            let children: f64 = child_pids(parent).into_iter().filter_map(|c| stat_ticks(c, false)).sum();
            Some(own + children)
        }
    }
}

/// Current resident set size of a process, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS:").map(|kb| kb * 1024)
}

/// Peak resident set size of a process since it started, bytes.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:").map(|kb| kb * 1024)
}

/// utime + stime (+ cutime + cstime: children already reaped), in seconds.
fn stat_ticks(pid: u32, with_children: bool) -> Option<f64> {
    let fields = stat_fields(pid)?;
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let mut ticks = field(11)? + field(12)?;
    if with_children {
        ticks += field(13)? + field(14)?;
    }
    Some(ticks as f64 / clock_ticks() as f64)
}

/// `/proc/<pid>/stat` fields after the command name (which may hold spaces): state is index 0.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(") ")?.1.split_whitespace().map(str::to_owned).collect())
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(key))?.trim().trim_end_matches("kB").trim().parse().ok()
}

fn child_pids(parent: u32) -> Vec<u32> {
    all_pids()
        .filter(|&pid| stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(parent))
        .collect()
}

fn all_pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// The process listening on TCP `port` (any local address), from `/proc/net/tcp{,6}` and the
/// processes' socket file descriptors.
pub fn listener_pid(port: u16) -> Option<u32> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    let local_port = u16::from_str_radix(cols.get(1)?.rsplit_once(':')?.1, 16).ok()?;
                    // State 0A = LISTEN.
                    (local_port == port && *cols.get(3)? == "0A")
                        .then(|| cols.get(9).map(|s| s.to_string()))?
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    all_pids().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| l.to_str().map(|l| wanted.iter().any(|w| w == l)))
                .unwrap_or(false)
        })
    })
}

/// `sysconf(_SC_CLK_TCK)`, asked of `getconf` once (100 on every Linux we know).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_finds_a_listener() {
        let me = std::process::id();
        assert!(cpu_seconds(Target::Shared(me)).is_some());
        assert!(rss_bytes(me).unwrap() > 0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(me));
    }
}
