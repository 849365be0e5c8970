//! Rate-limited warnings for events a remote party can cause (a peer without the key, a stray
//! connection to a data port): at most one line per interval, and that line says how many
//! were suppressed since the last one (as firecracker's `logger/rate_limited.rs`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one event through per `every`; counts the rest.
pub struct RateLimit {
    every: Duration,
    state: Mutex<State>,
}

struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(every: Duration) -> RateLimit {
        RateLimit {
            every,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether to log this event now: `Some(n)` with the number of events suppressed since
    /// the last one logged, `None` to stay quiet (the event is counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`RateLimit::allow`] at a given time (tests).
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match s.last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                s.suppressed += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

/// `tracing::warn!` through a [`RateLimit`]: the line gains a `suppressed` field.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.allow() {
            tracing::warn!(suppressed, $($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval_and_counts_the_rest() {
        let l = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow_at(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(l.allow_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(l.allow_at(t0 + Duration::from_secs(9)), None);
        assert_eq!(l.allow_at(t0 + Duration::from_secs(10)), Some(1001));
        assert_eq!(l.allow_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(l.allow_at(t0 + Duration::from_secs(25)), Some(1));
        assert_eq!(l.allow_at(t0 + Duration::from_secs(40)), Some(0));
    }
}
