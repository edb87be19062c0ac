//! Whether this node has just come back from a stall (a SIGSTOP, a VM paused, a starved
//! runtime) and should take no task ownership yet.
//!
//! While a node is stopped its view of the cluster freezes, and the others, which stopped
//! hearing from it, declare it down and route its hashes to the next owner. When it resumes,
//! its own view still names itself owner of those hashes: a submission it reads then would be
//! accepted on both sides. So a node that finds its heartbeat late by more than
//! [`STALL_AFTER`] holds off ownership for [`HOLD_FOR`]: it routes as if it were not a member
//! (to the node the others picked), and refuses submissions forwarded to it, whose senders
//! then take the same next choice. Gossip has refreshed both views by the end of the hold.
//!
//! Sans-IO: the caller passes `now`.

use std::time::{Duration, Instant};

/// How often the service beats.
pub(crate) const BEAT_EVERY: Duration = Duration::from_millis(250);
/// A beat this late is a stall. Under the time the others take to declare a silent member
/// down (a probe and 5 s of suspicion), so every stall that changed their view is caught.
pub(crate) const STALL_AFTER: Duration = Duration::from_secs(2);
/// How long ownership is held off after a stall: time for gossip to tell this node it was
/// declared down and for its rejoin to reach the others, and for the members that died
/// during the stall to be found down here.
pub(crate) const HOLD_FOR: Duration = Duration::from_secs(10);

/// The heartbeat and the hold it sets.
#[derive(Debug, Clone)]
pub(crate) struct Stall {
    last_beat: Instant,
    hold_until: Option<Instant>,
}

impl Stall {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            last_beat: now,
            hold_until: None,
        }
    }

    /// A beat at `now`: how long the stall it ends lasted, if it ends one.
    pub(crate) fn beat(&mut self, now: Instant) -> Option<Duration> {
        let stalled = self.check(now);
        self.last_beat = now;
        stalled
    }

    /// Whether ownership is held off at `now`. A beat overdue now counts (the beat task may
    /// not have run yet after a resume).
    pub(crate) fn holding(&mut self, now: Instant) -> bool {
        self.check(now);
        self.hold_until.is_some_and(|t| now < t)
    }

    fn check(&mut self, now: Instant) -> Option<Duration> {
        let gap = now.saturating_duration_since(self.last_beat);
        if gap <= STALL_AFTER {
            return None;
        }
        tracing::warn!(
            stalled_ms = gap.as_millis() as u64,
            "this node was stalled; it takes no task ownership while its view refreshes"
        );
        // Counted from the first sign of it, so a late beat does not extend the hold.
        self.last_beat = now;
        self.hold_until = Some(now + HOLD_FOR);
        Some(gap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_beats_never_hold() {
        let t0 = Instant::now();
        let mut s = Stall::new(t0);
        for i in 1..100 {
            assert_eq!(s.beat(t0 + BEAT_EVERY * i), None);
            assert!(!s.holding(t0 + BEAT_EVERY * i));
        }
    }

    #[test]
    fn a_late_beat_holds_ownership_off_for_the_hold() {
        let t0 = Instant::now();
        let mut s = Stall::new(t0);
        let resumed = t0 + Duration::from_secs(12);
        assert_eq!(s.beat(resumed), Some(Duration::from_secs(12)));
        assert!(s.holding(resumed));
        let mut t = resumed;
        while t + BEAT_EVERY < resumed + HOLD_FOR {
            t += BEAT_EVERY;
            assert_eq!(s.beat(t), None, "beats after the stall are on time");
            assert!(s.holding(t));
        }
        t += BEAT_EVERY;
        assert_eq!(s.beat(t), None);
        assert!(!s.holding(t), "the hold ends {HOLD_FOR:?} after the resume");
    }

    #[test]
    fn a_stall_is_seen_before_the_beat_that_ends_it() {
        // A submission read on resume, before the beat task has run.
        let t0 = Instant::now();
        let mut s = Stall::new(t0);
        let resumed = t0 + STALL_AFTER + Duration::from_millis(1);
        assert!(s.holding(resumed));
        assert_eq!(s.beat(resumed), None, "the stall is counted once");
        assert!(s.holding(resumed + HOLD_FOR / 2));
    }
}
