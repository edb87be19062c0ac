//! The in-memory network of the replication and task messages, in the gossip simulator's
//! virtual time, with the same partitions and cut links as gossip.
//!
//! Two kinds of traffic:
//! - **Datagrams** (delta pushes and their acknowledgements, forwarded submissions and their
//!   answers, stage requests and results): each one may be lost, duplicated, or held back so it
//!   arrives after later ones. Everything they carry must survive that (deltas are idempotent
//!   merges, results are fenced by epoch).
//! - **Streams** (one per anti-entropy round): ordered and reliable, as QUIC streams are, until
//!   they break; a loss breaks the stream, and both ends hear of it.
//!
//! Nothing passes between the two sides of a partition or over a cut link, whether it is sent
//! then or was in flight when the partition began.

use std::collections::{BTreeMap, BTreeSet};

use rand::RngExt;
use rand::rngs::StdRng;
use swarm_actors::replication::protocol::{Ae, Push};
use swarm_actors::tasks::TaskRecord;
use swarm_actors::tasks::dispatcher::{RunStage, StageOutcome};

/// One message between two nodes' processes.
#[derive(Debug, Clone)]
pub(crate) enum Msg {
    /// A batch of a delta stream: deltas and erasures, or the replies to them.
    Push(Vec<Push>),
    /// A message of anti-entropy round `round`, for its responder or its initiator.
    Ae {
        round: u64,
        to_responder: bool,
        msg: Ae,
    },
    /// The stream of round `round` broke.
    AeReset { round: u64 },
    /// A submission forwarded to the owner of its hash at `sent_ms` (the sender's clock);
    /// `call` names the answer.
    Submit {
        call: u64,
        rec: Box<TaskRecord>,
        sent_ms: u64,
        /// Refused when read this much later.
        stale_ms: u64,
    },
    /// The owner's answer: (task id, deduplicated), or the refusal's code.
    Submitted {
        call: u64,
        answer: Result<(String, bool), String>,
    },
    /// A stage for an agent this node hosts; `run` names the run.
    RunStage { run: u64, stage: Box<RunStage> },
    /// What came of a stage, for the dispatcher that sent it.
    StageResult(Box<StageOutcome>),
}

impl Msg {
    /// A short name for the trace.
    pub(crate) fn tag(&self) -> u8 {
        match self {
            Msg::Push(_) => 1,
            Msg::Ae { .. } => 2,
            Msg::AeReset { .. } => 3,
            Msg::Submit { .. } => 4,
            Msg::Submitted { .. } => 5,
            Msg::RunStage { .. } => 6,
            Msg::StageResult(_) => 7,
        }
    }
}

/// A message on its way: from node `from` to node `to`; `to_boot` pins the receiving process
/// (a reply to a request is lost when the process that asked is gone).
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    pub(crate) from: u32,
    pub(crate) from_boot: u64,
    pub(crate) to: u32,
    pub(crate) to_boot: Option<u64>,
    pub(crate) msg: Msg,
}

/// How a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Datagram,
    /// The stream of anti-entropy round `.0`.
    Stream(u64),
}

/// Fault rates of the datagrams (streams only break).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Faults {
    pub(crate) loss: f64,
    pub(crate) duplicate: f64,
    /// Probability that a datagram is held back by up to [`HOLD_BACK_US`].
    pub(crate) reorder: f64,
}

impl Faults {
    pub(crate) const NONE: Faults = Faults {
        loss: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
    };
}

/// One-way delay of every message, uniform in this range (µs).
const DELAY_US: (u64, u64) = (200, 5_000);
/// Longest extra delay of a held-back datagram (µs).
const HOLD_BACK_US: u64 = 400_000;
/// How long a broken stream takes to be noticed by its ends (µs).
const BREAK_NOTICED_US: u64 = 1_000_000;

/// Counters over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NetStats {
    pub(crate) sent: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) held_back: u64,
    pub(crate) streams_broken: u64,
}

/// The network's state: fault rates, the partition, cut links, and the streams' order.
#[derive(Debug)]
pub(crate) struct Net {
    pub(crate) faults: Faults,
    /// One side of the partition (empty: none).
    side: BTreeSet<u32>,
    cuts: BTreeSet<(u32, u32)>,
    /// Per open stream, when its last message arrives (a later one never overtakes it).
    streams: BTreeMap<u64, u64>,
    /// Streams that broke: what is still sent on them is dropped.
    broken: BTreeSet<u64>,
    pub(crate) stats: NetStats,
}

impl Net {
    pub(crate) fn new(faults: Faults) -> Self {
        Self {
            faults,
            side: BTreeSet::new(),
            cuts: BTreeSet::new(),
            streams: BTreeMap::new(),
            broken: BTreeSet::new(),
            stats: NetStats::default(),
        }
    }

    pub(crate) fn reachable(&self, a: u32, b: u32) -> bool {
        a == b
            || (self.side.contains(&a) == self.side.contains(&b)
                && !self.cuts.contains(&(a.min(b), a.max(b))))
    }

    /// Split `side` from the other nodes (replacing any partition).
    pub(crate) fn partition(&mut self, side: &[u32]) {
        self.side = side.iter().copied().collect();
    }

    pub(crate) fn cut(&mut self, a: u32, b: u32) {
        self.cuts.insert((a.min(b), a.max(b)));
    }

    /// Undo every partition and cut.
    pub(crate) fn heal(&mut self) {
        self.side.clear();
        self.cuts.clear();
    }

    /// The stream of `round` is done with.
    pub(crate) fn close(&mut self, round: u64) {
        self.streams.remove(&round);
        self.broken.remove(&round);
    }

    /// Send `env` at `now`: the deliveries it makes, each with its arrival time (none when it
    /// is lost; two when it is duplicated; for a stream that breaks, the resets of both ends).
    pub(crate) fn send(
        &mut self,
        rng: &mut StdRng,
        now: u64,
        env: Envelope,
        class: Class,
    ) -> Vec<(u64, Envelope)> {
        self.stats.sent += 1;
        let reachable = self.reachable(env.from, env.to);
        match class {
            Class::Datagram => {
                if !reachable || rng.random_bool(self.faults.loss.clamp(0.0, 1.0)) {
                    self.stats.lost += 1;
                    return Vec::new();
                }
                let copies = if rng.random_bool(self.faults.duplicate.clamp(0.0, 1.0)) {
                    self.stats.duplicated += 1;
                    2
                } else {
                    1
                };
                let mut out = Vec::with_capacity(copies);
                for _ in 0..copies {
                    let mut at = now + rng.random_range(DELAY_US.0..DELAY_US.1);
                    if rng.random_bool(self.faults.reorder.clamp(0.0, 1.0)) {
                        self.stats.held_back += 1;
                        at += rng.random_range(0..HOLD_BACK_US);
                    }
                    out.push((at, env.clone()));
                }
                out
            }
            Class::Stream(round) => {
                if self.broken.contains(&round) {
                    self.stats.lost += 1;
                    return Vec::new();
                }
                if !reachable || rng.random_bool(self.faults.loss.clamp(0.0, 1.0)) {
                    self.stats.lost += 1;
                    return self.break_stream(now, &env, round);
                }
                let last = self.streams.get(&round).copied().unwrap_or(0);
                let at = (now + rng.random_range(DELAY_US.0..DELAY_US.1)).max(last);
                self.streams.insert(round, at);
                vec![(at, env)]
            }
        }
    }

    /// The stream of `round` (carrying `env`) broke: both ends hear of it.
    pub(crate) fn break_stream(
        &mut self,
        now: u64,
        env: &Envelope,
        round: u64,
    ) -> Vec<(u64, Envelope)> {
        if !self.broken.insert(round) {
            return Vec::new();
        }
        self.stats.streams_broken += 1;
        let at = now + BREAK_NOTICED_US;
        // The sender's end and the receiver's end: each learns the stream is gone.
        vec![
            (
                at,
                Envelope {
                    from: env.to,
                    from_boot: 0,
                    to: env.from,
                    to_boot: Some(env.from_boot),
                    msg: Msg::AeReset { round },
                },
            ),
            (
                at,
                Envelope {
                    from: env.from,
                    from_boot: env.from_boot,
                    to: env.to,
                    to_boot: env.to_boot,
                    msg: Msg::AeReset { round },
                },
            ),
        ]
    }
}
