//! Per-producer circuit breaker (DESIGN.md "no resend storms"): a producer whose hook keeps
//! failing is backed off as a whole, not message by message. After `threshold` consecutive
//! failed RPCs the circuit opens: checks of that producer are deferred without a call until the
//! open period ends; then one check probes (half-open). A probe that fails reopens the circuit
//! for twice as long (up to `max_open`); any answer from the hook closes it.
//!
//! Only transport-level failures count (unreachable, timeout, refused, unauthenticated): a
//! `RETRY_LATER` answer is the hook working, about one message.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use recheck::message::now_ms;

#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive failed RPCs that open the circuit; 0 disables the breaker.
    pub threshold: u32,
    /// First open period; doubles after each failed probe.
    pub min_open: Duration,
    pub max_open: Duration,
    /// A probe that has not reported after this long lets another one through.
    pub probe_lease: Duration,
}

/// What a check of this producer may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Call the hook (`probe`: the one call of a half-open circuit).
    Pass { probe: bool },
    /// Do not call; look again in `retry_in`. Failing since `failing_since` (ms).
    Open { retry_in: Duration, failing_since: i64 },
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    /// First failure of the current streak (ms).
    failing_since: Option<i64>,
    /// While open: until when (ms). 0 = closed.
    open_until: i64,
    open_for: Duration,
    /// When the current half-open probe was let through (ms), 0 = none.
    probe_at: i64,
}

#[derive(Debug)]
pub struct Breakers {
    config: BreakerConfig,
    states: Mutex<HashMap<String, State>>,
}

impl Breakers {
    pub fn new(config: BreakerConfig) -> Self {
        Self { config, states: Mutex::default() }
    }

    pub fn gate(&self, producer: &str) -> Gate {
        self.gate_at(producer, now_ms())
    }

    pub fn success(&self, producer: &str) {
        let mut states = self.states.lock().expect("breaker lock");
        if let Some(state) = states.remove(producer)
            && state.open_until != 0
        {
            tracing::info!(%producer, "producer hook answers again; circuit closed");
        }
    }

    pub fn failure(&self, producer: &str) {
        self.failure_at(producer, now_ms());
    }

    /// Producers whose circuit is open now (for Stats / logs).
    pub fn open(&self) -> Vec<String> {
        let now = now_ms();
        let states = self.states.lock().expect("breaker lock");
        states.iter().filter(|(_, s)| s.open_until > now).map(|(p, _)| p.clone()).collect()
    }

    fn gate_at(&self, producer: &str, now: i64) -> Gate {
        if self.config.threshold == 0 {
            return Gate::Pass { probe: false };
        }
        let mut states = self.states.lock().expect("breaker lock");
        let Some(state) = states.get_mut(producer) else { return Gate::Pass { probe: false } };
        if state.open_until == 0 {
            return Gate::Pass { probe: false };
        }
        let failing_since = state.failing_since.unwrap_or(now);
        if now < state.open_until {
            return Gate::Open { retry_in: ms(state.open_until - now), failing_since };
        }
        if state.probe_at != 0 && now - state.probe_at < millis(self.config.probe_lease) {
            return Gate::Open { retry_in: self.config.min_open, failing_since };
        }
        state.probe_at = now;
        Gate::Pass { probe: true }
    }

    fn failure_at(&self, producer: &str, now: i64) {
        if self.config.threshold == 0 {
            return;
        }
        let mut states = self.states.lock().expect("breaker lock");
        let state = states.entry(producer.to_owned()).or_default();
        state.failures += 1;
        state.failing_since.get_or_insert(now);
        let reopen = if state.open_until != 0 {
            // Half-open and the probe (or a call let through before the circuit opened) failed.
            (now >= state.open_until).then(|| (state.open_for * 2).min(self.config.max_open))
        } else {
            (state.failures >= self.config.threshold).then_some(self.config.min_open)
        };
        if let Some(open_for) = reopen {
            state.open_for = open_for;
            state.open_until = now + millis(open_for);
            state.probe_at = 0;
            tracing::warn!(
                %producer,
                failures = state.failures,
                ?open_for,
                "producer hook keeps failing; circuit open, its checks are deferred"
            );
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn ms(n: i64) -> Duration {
    Duration::from_millis(u64::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers() -> Breakers {
        Breakers::new(BreakerConfig {
            threshold: 3,
            min_open: Duration::from_secs(1),
            max_open: Duration::from_secs(4),
            probe_lease: Duration::from_secs(10),
        })
    }

    #[test]
    fn opens_after_threshold_then_probes_once_and_backs_off() {
        let b = breakers();
        for t in [0, 10] {
            b.failure_at("p", t);
            assert_eq!(b.gate_at("p", t), Gate::Pass { probe: false });
        }
        b.failure_at("p", 20);
        assert_eq!(
            b.gate_at("p", 520),
            Gate::Open { retry_in: Duration::from_millis(500), failing_since: 0 }
        );
        assert_eq!(b.gate_at("other", 520), Gate::Pass { probe: false }, "other producers unaffected");
        // Half-open: exactly one probe.
        assert_eq!(b.gate_at("p", 1_020), Gate::Pass { probe: true });
        assert!(matches!(b.gate_at("p", 1_030), Gate::Open { .. }));
        // The probe fails: open twice as long.
        b.failure_at("p", 1_100);
        assert_eq!(b.gate_at("p", 1_100), Gate::Open { retry_in: Duration::from_secs(2), failing_since: 0 });
        b.failure_at("p", 3_000); // a failure reported while open does not extend it
        assert_eq!(b.gate_at("p", 3_100), Gate::Pass { probe: true });
        b.failure_at("p", 3_200);
        b.failure_at("p", 3_200 + 4_000);
        assert_eq!(b.gate_at("p", 7_200), Gate::Open { retry_in: Duration::from_secs(4), failing_since: 0 });
        // The cap holds.
        assert_eq!(b.gate_at("p", 11_200), Gate::Pass { probe: true });
        b.failure_at("p", 11_200);
        assert_eq!(b.gate_at("p", 11_200), Gate::Open { retry_in: Duration::from_secs(4), failing_since: 0 });
    }

    #[test]
    fn an_answer_closes_the_circuit() {
        let b = breakers();
        for t in 0..3 {
            b.failure_at("p", t);
        }
        assert!(matches!(b.gate_at("p", 100), Gate::Open { .. }));
        assert_eq!(b.gate_at("p", 1_100), Gate::Pass { probe: true });
        b.success("p");
        assert_eq!(b.gate_at("p", 1_100), Gate::Pass { probe: false });
        // The streak starts over.
        b.failure_at("p", 2_000);
        assert_eq!(b.gate_at("p", 2_000), Gate::Pass { probe: false });
    }

    #[test]
    fn a_probe_that_never_reports_is_replaced_after_its_lease() {
        let b = breakers();
        for t in 0..3 {
            b.failure_at("p", t);
        }
        assert_eq!(b.gate_at("p", 1_100), Gate::Pass { probe: true });
        assert!(matches!(b.gate_at("p", 5_000), Gate::Open { .. }));
        assert_eq!(b.gate_at("p", 11_200), Gate::Pass { probe: true });
    }

    #[test]
    fn threshold_zero_disables() {
        let b = Breakers::new(BreakerConfig { threshold: 0, ..breakers().config });
        for t in 0..100 {
            b.failure_at("p", t);
        }
        assert_eq!(b.gate_at("p", 100), Gate::Pass { probe: false });
    }
}
