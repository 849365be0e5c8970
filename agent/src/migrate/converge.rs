//! When to stop copying: a pure function of the rounds so far and the policy.
//!
//! After each pre-copy round the engine asks [`decide`]:
//!
//! - **StopAndCopy** when nothing is dirty, or when the pages dirtied during the last round
//!   could be sent within the downtime target at the rate the last round achieved, counting
//!   the switchover's fixed cost (pausing, state, three handshakes):
//!   `dirty_after / pages_per_second + switchover_overhead <= downtime_target`.
//! - **GiveUp** when the migration has run longer than `max_time` (or `max_rounds` rounds):
//!   the guest stays on the source and the reason says which limit was hit.
//! - **Throttle(p)** when the dirty set has stopped shrinking for `stall_rounds` rounds and
//!   auto-converge is on: the guest's vCPUs are held back `p` % of the time, starting at
//!   `throttle_initial` and growing by `throttle_step` up to `throttle_max` (QEMU's
//!   auto-converge; vMotion's Stun During Page Send).
//! - **Continue** otherwise.
//!
//! The default downtime target is 5 ms: on the lab's migration link the sender moves about
//! 2.5 GB/s, so 5 ms is ~3,000 pages; a guest dirtying 64 MiB/s re-dirties that many in under
//! 200 ms, a round the engine finishes quickly after round 0. QEMU's default (300 ms) would let
//! a guest notice.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The convergence policy of one migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Estimated final transfer must fit this, in milliseconds.
    pub downtime_target_ms: f64,
    /// What the switchover costs besides the pages (pause, state, handshakes), in ms.
    pub switchover_overhead_ms: f64,
    /// Give up after this long, in seconds.
    pub max_time_s: f64,
    /// Give up after this many rounds (0 = no limit).
    pub max_rounds: u32,
    /// Throttle the guest when rounds stop shrinking.
    pub auto_converge: bool,
    pub throttle_initial: u8,
    pub throttle_step: u8,
    pub throttle_max: u8,
    /// Rounds without shrinking (by at least 10 %) before throttling more.
    pub stall_rounds: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            downtime_target_ms: 5.0,
            switchover_overhead_ms: 2.0,
            max_time_s: 300.0,
            max_rounds: 0,
            auto_converge: true,
            throttle_initial: 20,
            throttle_step: 10,
            throttle_max: 99,
            stall_rounds: 2,
        }
    }
}

impl Policy {
    pub fn downtime_target(&self) -> Duration {
        Duration::from_secs_f64(self.downtime_target_ms.max(0.0) / 1000.0)
    }
    /// Refuse values that make no sense.
    pub fn validate(&self) -> Result<(), super::OptionError> {
        use super::OptionError;
        if self.downtime_target_ms.is_nan()
            || self.downtime_target_ms <= 0.0
            || self.downtime_target_ms > 60_000.0
        {
            return Err(OptionError::DowntimeTarget(self.downtime_target_ms));
        }
        if self.max_time_s.is_nan() || self.max_time_s <= 0.0 {
            return Err(OptionError::MaxTime(self.max_time_s));
        }
        if self.throttle_max > 99 || self.throttle_initial > self.throttle_max {
            return Err(OptionError::Throttle);
        }
        Ok(())
    }
}

/// What one pre-copy round did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct RoundStats {
    pub round: u32,
    /// Pages sent in the round.
    pub pages: u64,
    /// Bytes put on the wire.
    pub wire_bytes: u64,
    /// How long the round took, in seconds.
    pub secs: f64,
    /// Pages dirtied while the round ran (what the next round must send).
    pub dirty_after: u64,
    /// Throttle in force during the round, in percent.
    pub throttle: u8,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Continue,
    Throttle(u8),
    StopAndCopy { estimated: Duration },
    GiveUp(String),
}

/// The sending rate the last round achieved, in pages per second (None when unknown).
pub fn page_rate(rounds: &[RoundStats]) -> Option<f64> {
    // The last round with enough work to time; fall back to the totals.
    let r = rounds.iter().rev().find(|r| r.pages >= 64 && r.secs > 0.0);
    match r {
        Some(r) => Some(r.pages as f64 / r.secs),
        None => {
            let pages: u64 = rounds.iter().map(|r| r.pages).sum();
            let secs: f64 = rounds.iter().map(|r| r.secs).sum();
            (pages > 0 && secs > 0.0).then(|| pages as f64 / secs)
        }
    }
}

/// Decide after a round. `elapsed` is the migration's age, `throttle` the current throttle.
pub fn decide(rounds: &[RoundStats], policy: &Policy, elapsed: Duration, throttle: u8) -> Decision {
    let Some(last) = rounds.last() else {
        return Decision::Continue;
    };
    if last.dirty_after == 0 {
        return Decision::StopAndCopy {
            estimated: Duration::ZERO,
        };
    }
    if let Some(rate) = page_rate(rounds) {
        let est = Duration::from_secs_f64(
            last.dirty_after as f64 / rate + policy.switchover_overhead_ms.max(0.0) / 1000.0,
        );
        if est <= policy.downtime_target() {
            return Decision::StopAndCopy { estimated: est };
        }
    }
    if elapsed.as_secs_f64() >= policy.max_time_s {
        return Decision::GiveUp(format!(
            "did not converge within the {} s limit: {} pages still dirty after round {} (throttle {throttle} %); raise the downtime target, enable auto-converge, or migrate when the guest is quieter",
            policy.max_time_s, last.dirty_after, last.round
        ));
    }
    if policy.max_rounds > 0 && rounds.len() as u32 >= policy.max_rounds {
        return Decision::GiveUp(format!(
            "did not converge in {} rounds: {} pages still dirty (throttle {throttle} %)",
            policy.max_rounds, last.dirty_after
        ));
    }
    let n = policy.stall_rounds.max(1) as usize;
    // Round 0 sends all of memory; shrinking is judged from round 1 on.
    let later: Vec<&RoundStats> = rounds.iter().filter(|r| r.round >= 1).collect();
    if policy.auto_converge && later.len() > n {
        let window = &later[later.len() - n - 1..];
        let stalled = window
            .windows(2)
            .all(|w| w[1].dirty_after as f64 > 0.9 * w[0].dirty_after as f64);
        // Only step again once the current throttle has had its rounds to work.
        let settled = window.iter().all(|r| r.throttle == throttle);
        if stalled && settled && throttle < policy.throttle_max {
            let next = if throttle == 0 {
                policy.throttle_initial
            } else {
                throttle.saturating_add(policy.throttle_step)
            };
            return Decision::Throttle(next.min(policy.throttle_max));
        }
    }
    Decision::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(round: u32, pages: u64, secs: f64, dirty_after: u64, throttle: u8) -> RoundStats {
        RoundStats {
            round,
            pages,
            wire_bytes: pages * 4096,
            secs,
            dirty_after,
            throttle,
        }
    }

    #[test]
    fn idle_guest_stops_at_once() {
        let p = Policy::default();
        let d = decide(&[r(0, 1000, 0.1, 0, 0)], &p, Duration::from_secs(1), 0);
        assert_eq!(
            d,
            Decision::StopAndCopy {
                estimated: Duration::ZERO
            }
        );
    }

    #[test]
    fn stops_when_the_rest_fits_the_target() {
        // 5 ms target, of which 2 ms fixed switchover cost; at 100k pages/s 250 pages = 2.5 ms.
        let p = Policy::default();
        let d = decide(&[r(0, 100_000, 1.0, 250, 0)], &p, Duration::from_secs(1), 0);
        assert!(matches!(d, Decision::StopAndCopy { .. }), "{d:?}");
        let d = decide(&[r(0, 100_000, 1.0, 400, 0)], &p, Duration::from_secs(1), 0);
        assert_eq!(d, Decision::Continue);
    }

    #[test]
    fn stalled_rounds_throttle_step_by_step() {
        let p = Policy::default();
        let mut h = vec![r(0, 100_000, 1.0, 50_000, 0), r(1, 50_000, 0.5, 49_000, 0)];
        assert_eq!(
            decide(&h, &p, Duration::from_secs(2), 0),
            Decision::Continue
        );
        h.push(r(2, 49_000, 0.5, 48_500, 0));
        h.push(r(3, 48_500, 0.5, 48_000, 0));
        assert_eq!(
            decide(&h, &p, Duration::from_secs(3), 0),
            Decision::Throttle(20)
        );
        // Right after a change: give the throttle rounds to act.
        h.push(r(4, 48_000, 0.5, 47_900, 20));
        assert_eq!(
            decide(&h, &p, Duration::from_secs(3), 20),
            Decision::Continue
        );
        h.push(r(5, 47_900, 0.5, 47_800, 20));
        h.push(r(6, 47_800, 0.5, 47_700, 20));
        assert_eq!(
            decide(&h, &p, Duration::from_secs(4), 20),
            Decision::Throttle(30)
        );
        // Shrinking rounds are not stalled.
        let g = vec![
            r(0, 100_000, 1.0, 50_000, 0),
            r(1, 50_000, 0.5, 30_000, 0),
            r(2, 30_000, 0.3, 20_000, 0),
            r(3, 20_000, 0.2, 10_000, 0),
        ];
        assert_eq!(
            decide(&g, &p, Duration::from_secs(2), 0),
            Decision::Continue
        );
    }

    #[test]
    fn throttle_is_capped_and_policy_gives_up() {
        let p = Policy {
            max_time_s: 10.0,
            ..Policy::default()
        };
        let h: Vec<RoundStats> = (0..6).map(|i| r(i, 50_000, 0.5, 50_000, 99)).collect();
        assert_eq!(
            decide(&h, &p, Duration::from_secs(5), 99),
            Decision::Continue
        );
        assert!(matches!(
            decide(&h, &p, Duration::from_secs(11), 99),
            Decision::GiveUp(m) if m.contains("10 s")
        ));
        let off = Policy {
            auto_converge: false,
            max_rounds: 4,
            ..Policy::default()
        };
        let h: Vec<RoundStats> = (0..4).map(|i| r(i, 50_000, 0.5, 50_000, 0)).collect();
        assert!(matches!(
            decide(&h, &off, Duration::from_secs(1), 0),
            Decision::GiveUp(_)
        ));
        let h: Vec<RoundStats> = (0..3).map(|i| r(i, 50_000, 0.5, 50_000, 0)).collect();
        assert_eq!(
            decide(&h, &off, Duration::from_secs(1), 0),
            Decision::Continue
        );
    }

    #[test]
    fn rate_falls_back_to_totals() {
        assert_eq!(page_rate(&[]), None);
        assert_eq!(page_rate(&[r(0, 10, 0.5, 5, 0)]), Some(20.0));
        assert!(Policy::default().validate().is_ok());
        assert!(Policy {
            downtime_target_ms: 0.0,
            ..Policy::default()
        }
        .validate()
        .is_err());
    }
}
