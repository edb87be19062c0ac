//! Hybrid logical clock: 48 bits of wall-clock milliseconds and 16 bits of logical counter in one
//! `u64`, so timestamps order like integers. Sans-IO: callers pass the wall clock in.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Result, StorageError};

/// One HLC timestamp.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Hlc(pub u64);

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

impl Hlc {
    pub fn new(wall_ms: u64, logical: u16) -> Self {
        Hlc((wall_ms << LOGICAL_BITS) | u64::from(logical))
    }

    pub fn wall_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub fn logical(self) -> u16 {
        // The mask keeps the value within 16 bits.
        (self.0 & LOGICAL_MASK) as u16
    }

    /// The smallest timestamp greater than `self`.
    pub fn successor(self) -> Self {
        Hlc(self.0.saturating_add(1))
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A clock that never goes backwards, and refuses remote timestamps too far in the future.
#[derive(Debug)]
pub struct HlcClock {
    last: Mutex<Hlc>,
    max_skew_ms: u64,
}

impl HlcClock {
    pub fn new(max_skew_ms: u64) -> Self {
        Self {
            last: Mutex::new(Hlc::default()),
            max_skew_ms,
        }
    }

    /// A fresh timestamp for a local event.
    pub fn tick(&self, wall_ms: u64) -> Hlc {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let next = if wall_ms > last.wall_ms() {
            Hlc::new(wall_ms, 0)
        } else {
            last.successor()
        };
        *last = next;
        next
    }

    /// Whether `seen` is acceptable at `wall_ms` (not more than `max_skew_ms` ahead), without
    /// moving the clock.
    pub fn check(&self, seen: Hlc, wall_ms: u64) -> Result<()> {
        let ahead = seen.wall_ms().saturating_sub(wall_ms);
        if ahead > self.max_skew_ms {
            return Err(StorageError::ClockSkew {
                ahead_ms: ahead,
                max_ms: self.max_skew_ms,
            });
        }
        Ok(())
    }

    /// The largest accepted lead of a remote timestamp.
    pub fn max_skew_ms(&self) -> u64 {
        self.max_skew_ms
    }

    /// Merge a timestamp seen from elsewhere (a peer or a stored record), so later ticks exceed it.
    /// Refuses timestamps more than `max_skew_ms` ahead of `wall_ms`.
    pub fn observe(&self, seen: Hlc, wall_ms: u64) -> Result<()> {
        self.check(seen, wall_ms)?;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if seen > *last {
            *last = seen;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout() {
        let h = Hlc::new(1_700_000_000_000, 7);
        assert_eq!(h.wall_ms(), 1_700_000_000_000);
        assert_eq!(h.logical(), 7);
    }

    #[test]
    fn skew_is_refused() {
        let c = HlcClock::new(1000);
        assert!(c.observe(Hlc::new(5_000, 0), 4_500).is_ok());
        let e = c.observe(Hlc::new(10_000, 0), 4_500).expect_err("skew");
        assert_eq!(e.kind(), "clock_skew");
    }

    proptest! {
        #[test]
        fn ticks_strictly_increase(walls in proptest::collection::vec(0u64..1_000_000, 1..200)) {
            let c = HlcClock::new(u64::MAX);
            let mut prev = Hlc::default();
            for w in walls {
                let t = c.tick(w);
                prop_assert!(t > prev);
                prev = t;
            }
        }

        #[test]
        fn tick_after_observe_exceeds_it(seen in 0u64..1_000_000, wall in 0u64..1_000_000, l in any::<u16>()) {
            let c = HlcClock::new(u64::MAX);
            let s = Hlc::new(seen, l.min(u16::MAX - 1));
            c.observe(s, wall).expect("observe");
            prop_assert!(c.tick(wall) > s);
        }
    }
}
