//! No resend storms: a check that comes due while its consumer's queue still
//! holds a backlog is deferred, not resent — resending into a lagging consumer
//! only doubles its backlog. Depths come from passive queue declares, cached
//! briefly so a burst of due checks costs one broker round trip per queue.
//!
//! The deferral is bounded by `max_deferral`, counted from the later of two moments: when the
//! message was prepared, and when its queue was last seen *stalled* (no consumer attached, or
//! more ready messages than at the probe before). A resend into a queue nobody reads, or one
//! that still grows, cannot be delivered sooner than the original and only doubles the backlog;
//! the bound is there for a consumer that is draining but never quite catches up, where a
//! message really lost would otherwise wait forever.

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
    /// When each queue was last seen stalled: no consumer, or growing between two probes.
    last_stalled: Mutex<HashMap<String, Instant>>,
}

/// A consumer's queue that is behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    pub queue: String,
    pub depth: u32,
    /// How long since the queue was last seen stalled (`None`: not since this process started).
    pub stalled_ago: Option<Duration>,
}

impl Behind {
    /// Whether a check of a message prepared `age` ago still defers: within `max_deferral` of
    /// its preparation or of the queue's last stall.
    pub fn holds(&self, age: Duration, max_deferral: Duration) -> bool {
        age < max_deferral || self.stalled_ago.is_some_and(|ago| ago < max_deferral)
    }
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
            last_stalled: Default::default(),
        }
    }

    /// The deepest backlog among the queues of `expect` (every configured consumer when
    /// `None`) that is over the threshold and still [`Behind::holds`] a message prepared `age`
    /// ago.
    pub async fn behind(
        &self,
        expect: Option<&[String]>,
        age: Duration,
        max_deferral: Duration,
    ) -> Option<Behind> {
        let queues: Vec<&String> = match expect {
            Some(consumers) => consumers.iter().filter_map(|c| self.queues.get(c)).collect(),
            None => self.queues.values().collect(),
        };
        let mut worst: Option<Behind> = None;
        for queue in queues {
            let Some(depth) = self.behind_by(queue, self.depth(queue).await) else { continue };
            let stalled_ago =
                self.last_stalled.lock().expect("last_stalled lock").get(queue).map(Instant::elapsed);
            let behind = Behind { queue: queue.clone(), depth, stalled_ago };
            if behind.holds(age, max_deferral) && worst.as_ref().is_none_or(|w| depth > w.depth) {
                worst = Some(behind);
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
            Ok(Some(Ok(q))) => {
                self.note_stall(queue, q.message_count(), q.consumer_count());
                q.message_count()
            }
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

    /// Records a stall: a queue over the threshold with no consumer, or deeper than at its
    /// previous probe (read before this probe's depth replaces it).
    fn note_stall(&self, queue: &str, depth: u32, consumers: u32) {
        if depth <= self.threshold {
            return;
        }
        let previous = self.depths.lock().expect("depths lock").get(queue).map(|(_, d)| *d);
        if consumers == 0 || previous.is_some_and(|p| depth > p) {
            self.last_stalled.lock().expect("last_stalled lock").insert(queue.to_owned(), Instant::now());
        }
    }

    fn cached(&self, queue: &str) -> Option<u32> {
        let depths = self.depths.lock().expect("depths lock");
        depths.get(queue).filter(|(at, _)| at.elapsed() < FRESH).map(|(_, depth)| *depth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(600);

    fn behind(stalled_ago: Option<Duration>) -> Behind {
        Behind { queue: "q".into(), depth: 1_000, stalled_ago }
    }

    #[test]
    fn a_young_message_defers_whatever_the_queue_did() {
        assert!(behind(None).holds(Duration::from_secs(599), MAX));
        assert!(!behind(None).holds(MAX, MAX));
    }

    /// Past the bound counted from preparation, a queue that stalled within the bound (its
    /// consumer down, or growing) still holds the check: a resend could not be read sooner.
    #[test]
    fn an_old_message_defers_only_while_its_queue_stalled_recently() {
        let age = Duration::from_secs(900);
        assert!(behind(Some(Duration::from_secs(1))).holds(age, MAX));
        assert!(behind(Some(Duration::from_secs(599))).holds(age, MAX));
        assert!(!behind(Some(MAX)).holds(age, MAX));
        assert!(!behind(None).holds(age, MAX));
    }
}
