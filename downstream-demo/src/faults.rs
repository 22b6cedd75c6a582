//! Fault injection for the demo, all off by default. Each fault is one Recheck
//! is built to repair, so a run with faults on must still end with every order
//! awarded exactly once or visibly rejected.
//!
//! - fail: the effect fails after the points insert and rolls back (a batch is
//!   then redone order by order, each rolling again); a failed order's delivery
//!   is held unacked and retried in place after a growing delay, never requeued.
//!   Each try rolls its own dice, so a message is not failed forever.
//! - reject: a business refusal, decided by the message id alone (see
//!   [`blocked`]): a redelivery or a resend after a rollback decides the same.
//!   Once committed, the inbox re-confirms the stored rejection anyway.
//! - drop-confirm: points committed, CONFIRM never sent; the callback service's
//!   check resends and the inbox absorbs the copy as a duplicate.
//! - slow: a pause per message inside the transaction (a lagging consumer).
//! - drop-message: a business message lost on its way to this consumer only —
//!   acked unseen, no inbox row, no effect, no CONFIRM. Decided by message id
//!   and seed, for originals only (`x-recheck-attempt` 0): the resend the
//!   callback service sends (attempt ≥ 1) gets through, so a consumer whose
//!   CONFIRM is missing must be waited for even when another one confirmed.

use std::{
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::{RngExt, SeedableRng, rngs::StdRng};
use uuid::Uuid;

use crate::config::FaultArgs;

pub struct Faults {
    fail_rate: f64,
    reject_rate: f64,
    slow: Duration,
    drop_confirm_rate: f64,
    drop_message_rate: f64,
    seed: u64,
    dice: Mutex<StdRng>,
}

impl Faults {
    pub fn new(args: &FaultArgs) -> Self {
        // No OS entropy feature in the workspace's `rand`; the clock is plenty for dice.
        let seed = args.seed.unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        Self {
            fail_rate: args.fail_rate,
            reject_rate: args.reject_rate,
            slow: Duration::from_millis(args.slow_ms),
            drop_confirm_rate: args.drop_confirm_rate,
            drop_message_rate: args.drop_message_rate,
            seed,
            dice: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    /// Logged at start so a run can be repeated with `--seed`.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn any(&self) -> bool {
        self.fail_rate > 0.0
            || self.reject_rate > 0.0
            || !self.slow.is_zero()
            || self.drops_confirms()
            || self.drops_messages()
    }

    pub fn slow(&self) -> Duration {
        self.slow
    }

    /// Should this order's effect fail? Rolled anew for every try.
    pub fn fail_now(&self) -> bool {
        self.roll(self.fail_rate)
    }

    /// Is this order's customer blocked? The same answer for every copy of the message.
    pub fn rejects(&self, message_id: Uuid) -> bool {
        blocked(message_id, self.reject_rate)
    }

    pub fn drops_confirms(&self) -> bool {
        self.drop_confirm_rate > 0.0
    }

    /// Should this CONFIRM be lost? Rolled per confirm.
    pub fn drop_confirm_now(&self) -> bool {
        self.roll(self.drop_confirm_rate)
    }

    pub fn drops_messages(&self) -> bool {
        self.drop_message_rate > 0.0
    }

    /// Is this delivery lost before the consumer sees it? Originals only, and the same answer
    /// for every copy of one original (a redelivery, a publisher's republish).
    pub fn drop_message(&self, message_id: Uuid, attempt: u32) -> bool {
        attempt == 0 && unit_interval_seeded(message_id, self.seed) < self.drop_message_rate
    }

    fn roll(&self, rate: f64) -> bool {
        // `random::<f64>()` is in [0, 1): rate 0 never fires, rate 1 always does.
        rate > 0.0 && self.dice.lock().unwrap_or_else(|e| e.into_inner()).random::<f64>() < rate
    }
}

/// The reject decision: a fixed function of the message id, not of the dice, so
/// every delivery and every resend of one message agrees (and tests can predict it).
pub fn blocked(message_id: Uuid, rate: f64) -> bool {
    unit_interval(message_id) < rate
}

/// [`unit_interval`] of the id mixed with a seed: two consumers with different seeds lose
/// different messages.
fn unit_interval_seeded(id: Uuid, seed: u64) -> f64 {
    unit_interval(Uuid::from_u128(id.as_u128() ^ u128::from(seed).rotate_left(64)))
}

/// Maps an id to [0, 1) evenly. UUIDv7 ids share their leading timestamp bits,
/// so all 128 bits are folded and mixed (SplitMix64's finalizer) first.
fn unit_interval(id: Uuid) -> f64 {
    let bits = id.as_u128();
    let mut z = (bits as u64) ^ ((bits >> 64) as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(args: FaultArgs) -> Faults {
        Faults::new(&FaultArgs { seed: Some(42), ..args })
    }

    #[test]
    fn the_reject_decision_depends_on_the_id_only() {
        let ids: Vec<Uuid> = (0..10_000).map(|_| Uuid::now_v7()).collect();
        let a = faults(FaultArgs { reject_rate: 0.2, ..Default::default() });
        let b = Faults::new(&FaultArgs { reject_rate: 0.2, seed: Some(7), ..Default::default() });
        for id in &ids {
            assert_eq!(a.rejects(*id), a.rejects(*id));
            assert_eq!(a.rejects(*id), b.rejects(*id), "the seed must not matter");
        }
        // Ids minted in one millisecond differ only in their random tail; still spread evenly.
        let share = ids.iter().filter(|id| blocked(**id, 0.2)).count() as f64 / ids.len() as f64;
        assert!((0.17..0.23).contains(&share), "{share}");
        assert!(ids.iter().all(|id| !blocked(*id, 0.0) && blocked(*id, 1.0)));
    }

    #[test]
    fn dice_follow_the_rate_and_the_seed() {
        let a = faults(FaultArgs { fail_rate: 0.3, ..Default::default() });
        let b = faults(FaultArgs { fail_rate: 0.3, ..Default::default() });
        let rolls: Vec<bool> = (0..10_000).map(|_| a.fail_now()).collect();
        assert_eq!(rolls, (0..10_000).map(|_| b.fail_now()).collect::<Vec<_>>(), "same seed, same run");
        let share = rolls.iter().filter(|f| **f).count() as f64 / rolls.len() as f64;
        assert!((0.27..0.33).contains(&share), "{share}");
    }

    #[test]
    fn dropped_messages_are_originals_chosen_by_id_and_seed() {
        let ids: Vec<Uuid> = (0..10_000).map(|_| Uuid::now_v7()).collect();
        let a = faults(FaultArgs { drop_message_rate: 0.1, ..Default::default() });
        let b = Faults::new(&FaultArgs { drop_message_rate: 0.1, seed: Some(7), ..Default::default() });
        let dropped: Vec<&Uuid> = ids.iter().filter(|id| a.drop_message(**id, 0)).collect();
        let share = dropped.len() as f64 / ids.len() as f64;
        assert!((0.08..0.12).contains(&share), "{share}");
        // Every copy of an original agrees; a resend always gets through.
        assert!(dropped.iter().all(|id| a.drop_message(**id, 0) && !a.drop_message(**id, 1)));
        let both = dropped.iter().filter(|id| b.drop_message(***id, 0)).count();
        assert!(both < dropped.len() / 4, "another seed drops other messages ({both} in common)");
    }

    #[test]
    fn off_by_default() {
        let f = faults(FaultArgs::default());
        assert!(!f.any());
        assert!((0..1000).all(|_| !f.fail_now() && !f.drop_confirm_now()));
        assert!(!f.drop_message(Uuid::now_v7(), 0));
    }
}
