//! Whether this node has just come back from a stall (a SIGSTOP, a VM paused, a starved
//! runtime) and should take no task ownership yet.
//!
//! While a node is stopped its view of the cluster freezes. The others stop hearing from it:
//! their forwarded submissions go unanswered and they pass it over for the next choice, and
//! after a few seconds they declare it down. When it resumes, its own view still names itself
//! owner of its hashes: a submission it reads then (one its own clients sent during the stall)
//! would be accepted here as well as by the next choice. So a node whose heartbeat is late by
//! more than [`STALL_AFTER`] (under the time a forwarded submission may wait to be read, so
//! every stall that made a sender pass it over is caught) holds off ownership: it routes new
//! submissions as if it were not a member (to the node the others picked), and refuses those
//! forwarded to it, whose senders then take the same next choice. The hold lasts
//! [`HOLD_FOR`] (time for gossip to tell this node it was declared down and for its rejoin to
//! reach the others), and then until an anti-entropy round with every live peer has begun
//! since the resume (what the next choice accepted meanwhile is in this replica, where
//! deduplication finds it), [`HOLD_MAX`] at most.
//!
//! Sans-IO: the caller passes `now` (monotonic and wall clock) and whether the replica has
//! caught up.

use std::time::{Duration, Instant};

/// How often the service beats.
pub(crate) const BEAT_EVERY: Duration = Duration::from_millis(250);
/// A beat this late is a stall.
pub(crate) const STALL_AFTER: Duration = Duration::from_millis(700);
/// How long ownership is held off after a stall at least.
pub(crate) const HOLD_FOR: Duration = Duration::from_secs(10);
/// ... and at most, should a peer never complete a round.
pub(crate) const HOLD_MAX: Duration = Duration::from_secs(60);

/// The heartbeat and the hold it sets.
#[derive(Debug, Clone)]
pub(crate) struct Stall {
    last_beat: Instant,
    hold: Option<Hold>,
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    /// When the stall was found.
    from: Instant,
    /// The same, by the wall clock (ms), for the replica's rounds.
    from_ms: u64,
}

impl Stall {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            last_beat: now,
            hold: None,
        }
    }

    /// A beat at `now` (`now_ms` by the wall clock): how long the stall it ends lasted, if it
    /// ends one.
    pub(crate) fn beat(&mut self, now: Instant, now_ms: u64) -> Option<Duration> {
        let stalled = self.check(now, now_ms);
        self.last_beat = now;
        stalled
    }

    /// Whether ownership is held off at `now`. A beat overdue now counts (the beat task may
    /// not have run yet after a resume). Past [`HOLD_FOR`], `caught_up(since_ms)` says
    /// whether the replica has had a round with every live peer since the stall.
    pub(crate) fn holding(
        &mut self,
        now: Instant,
        now_ms: u64,
        caught_up: impl FnOnce(u64) -> bool,
    ) -> bool {
        self.check(now, now_ms);
        let Some(h) = self.hold else {
            return false;
        };
        let held = now.saturating_duration_since(h.from);
        if held < HOLD_FOR {
            return true;
        }
        if held >= HOLD_MAX || caught_up(h.from_ms) {
            tracing::info!(
                held_ms = held.as_millis() as u64,
                "back from the stall: task ownership resumes"
            );
            self.hold = None;
            return false;
        }
        true
    }

    fn check(&mut self, now: Instant, now_ms: u64) -> Option<Duration> {
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
        self.hold = Some(Hold {
            from: now,
            from_ms: now_ms,
        });
        Some(gap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn ms(t0: Instant, t: Instant) -> u64 {
        MS + t.duration_since(t0).as_millis() as u64
    }

    #[test]
    fn regular_beats_never_hold() {
        let t0 = Instant::now();
        let mut s = Stall::new(t0);
        for i in 1..100 {
            let t = t0 + BEAT_EVERY * i;
            assert_eq!(s.beat(t, ms(t0, t)), None);
            assert!(!s.holding(t, ms(t0, t), |_| panic!("no hold, no question")));
        }
    }

    #[test]
    fn a_late_beat_holds_ownership_off_until_the_replica_has_caught_up() {
        let t0 = Instant::now();
        let mut s = Stall::new(t0);
        let resumed = t0 + Duration::from_secs(12);
        let resumed_ms = ms(t0, resumed);
        assert_eq!(s.beat(resumed, resumed_ms), Some(Duration::from_secs(12)));
        let mut t = resumed;
        while t + BEAT_EVERY < resumed + HOLD_FOR {
            t += BEAT_EVERY;
            assert_eq!(
                s.beat(t, ms(t0, t)),
                None,
                "beats after the stall are on time"
            );
            assert!(
                s.holding(t, ms(t0, t), |_| true),
                "held for {HOLD_FOR:?} at least"
            );
        }
        // Past the minimum: held until a round with every peer began after the resume.
        t += BEAT_EVERY;
        assert_eq!(s.beat(t, ms(t0, t)), None);
        let mut asked = None;
        assert!(s.holding(t, ms(t0, t), |since| {
            asked = Some(since);
            false
        }));
        assert_eq!(asked, Some(resumed_ms), "caught up since the resume");
        assert!(!s.holding(t, ms(t0, t), |_| true));
        assert!(!s.holding(t, ms(t0, t), |_| panic!("released")));
    }

    #[test]
    fn a_hold_ends_at_its_maximum_even_without_a_round() {
        let t0 = Instant::now();
        let mut s = Stall::new(t0);
        let resumed = t0 + STALL_AFTER * 2;
        s.beat(resumed, ms(t0, resumed));
        let mut t = resumed;
        while t + BEAT_EVERY < resumed + HOLD_MAX {
            t += BEAT_EVERY;
            s.beat(t, ms(t0, t));
            assert!(s.holding(t, ms(t0, t), |_| false));
        }
        t += BEAT_EVERY;
        s.beat(t, ms(t0, t));
        assert!(!s.holding(t, ms(t0, t), |_| false));
    }

    #[test]
    fn a_stall_is_seen_before_the_beat_that_ends_it() {
        // A submission read on resume, before the beat task has run.
        let t0 = Instant::now();
        let mut s = Stall::new(t0);
        let resumed = t0 + STALL_AFTER + Duration::from_millis(1);
        assert!(s.holding(resumed, ms(t0, resumed), |_| true));
        assert_eq!(
            s.beat(resumed, ms(t0, resumed)),
            None,
            "the stall is counted once"
        );
        let later = resumed + HOLD_FOR / 2;
        assert!(s.holding(later, ms(t0, later), |_| true));
    }
}
