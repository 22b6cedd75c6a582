//! No resend storms: a check that comes due while its consumer's queue still
//! holds a backlog is deferred, not resent — resending into a lagging consumer
//! only doubles its backlog. Depths come from passive queue declares, cached
//! briefly so a burst of due checks costs one broker round trip per queue.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use lapin::{Channel, options::QueueDeclareOptions, types::FieldTable};
use recheck::Publisher;

/// How long a measured depth is trusted.
const FRESH: Duration = Duration::from_secs(1);
/// Longest wait for one depth probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a queue seen behind still counts as behind once its ready count is back under the
/// threshold: the ready count does not show what its consumers hold unacked (a prefetch of 256
/// drains in a second or two), and a check of one of those would resend what is being processed.
const CAUGHT_UP_HOLD: Duration = Duration::from_secs(5);

pub struct Backlog {
    publisher: Publisher,
    /// consumer name → its queue.
    queues: HashMap<String, String>,
    /// More ready messages than this is a backlog.
    threshold: u32,
    channel: tokio::sync::Mutex<Option<Channel>>,
    depths: Mutex<HashMap<String, (Instant, u32)>>,
    /// When each queue was last seen over the threshold.
    last_behind: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Backlog {
    pub fn new(publisher: Publisher, queues: HashMap<String, String>, threshold: u32) -> Self {
        Self {
            publisher,
            queues,
            threshold,
            channel: Default::default(),
            depths: Default::default(),
            last_behind: Default::default(),
        }
    }

    /// The deepest backlog among the queues of `expect` (every configured
    /// consumer when `None`), if any is over the threshold: `(queue, depth)`.
    pub async fn behind(&self, expect: Option<&[String]>) -> Option<(String, u32)> {
        let queues: Vec<&String> = match expect {
            Some(consumers) => consumers.iter().filter_map(|c| self.queues.get(c)).collect(),
            None => self.queues.values().collect(),
        };
        let mut worst: Option<(String, u32)> = None;
        for queue in queues {
            let Some(depth) = self.behind_by(queue, self.depth(queue).await) else { continue };
            if worst.as_ref().is_none_or(|(_, d)| depth > *d) {
                worst = Some((queue.clone(), depth));
            }
        }
        worst
    }

    /// `depth` if the queue is behind now, or was within [`CAUGHT_UP_HOLD`] (then the depth it
    /// had); `None` once it has kept up that long.
    fn behind_by(&self, queue: &str, depth: u32) -> Option<u32> {
        let mut last = self.last_behind.lock().expect("last_behind lock");
        if depth > self.threshold {
            last.insert(queue.to_owned(), (Instant::now(), depth));
            return Some(depth);
        }
        last.get(queue).filter(|(at, _)| at.elapsed() < CAUGHT_UP_HOLD).map(|(_, d)| *d)
    }

    /// Ready messages in `queue`; 0 when it cannot be measured (never defer blind).
    /// Single-flight: a burst of due checks waits for one probe per queue and round (the cache
    /// is read again under the lock), and a probe is bounded by [`PROBE_TIMEOUT`], so a stalled
    /// connection delays deferral decisions by that much, never blocks them.
    pub async fn depth(&self, queue: &str) -> u32 {
        if let Some(depth) = self.cached(queue) {
            return depth;
        }
        let mut channel = self.channel.lock().await;
        if let Some(depth) = self.cached(queue) {
            return depth;
        }
        let probe = async {
            if channel.as_ref().is_none_or(|c| !c.status().connected()) {
                *channel = self.publisher.create_channel().await.ok();
            }
            let ch = channel.as_ref()?;
            let passive = QueueDeclareOptions::durable().passive();
            Some(ch.queue_declare(queue.into(), passive, FieldTable::default()).await)
        };
        let depth = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Some(Ok(q))) => q.message_count(),
            Ok(Some(Err(e))) => {
                // A missing queue closes the channel (404): reopen next time.
                tracing::warn!(queue, error = %e, "cannot measure the consumer queue");
                *channel = None;
                0
            }
            Ok(None) => 0,
            Err(_) => {
                tracing::warn!(queue, timeout = ?PROBE_TIMEOUT, "measuring the consumer queue timed out");
                *channel = None;
                0
            }
        };
        self.depths.lock().expect("depths lock").insert(queue.to_owned(), (Instant::now(), depth));
        depth
    }

    fn cached(&self, queue: &str) -> Option<u32> {
        let depths = self.depths.lock().expect("depths lock");
        depths.get(queue).filter(|(at, _)| at.elapsed() < FRESH).map(|(_, depth)| *depth)
    }
}
