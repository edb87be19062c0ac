//! The seeded fault schedule and the client workload of a run.
//!
//! Faults start at random times (on average [`super::SimOptions::faults_per_min`] a minute)
//! during the faulty phase, each ended by its own step: a crash (the disk keeps what was
//! synced) or a graceful leave, restarted after a while; a partition into halves, one node
//! isolated, or one link cut, healed after a while (a new one replaces the old, in gossip and in
//! the network alike); a storm of loss, duplication and reordering on the network. At least two
//! nodes stay up. Node 0 is never stopped nor cut off with the smaller side: the gossip
//! simulator rejoins a restarted member through member 0 alone, and gives member 0 no seeds. The workload is a stream of client operations at random live nodes: writes
//! (some under a data subject), deletes, erasures of a subject, and task submissions, whose
//! objectives repeat so that deduplication is exercised.

use rand::RngExt;
use rand::seq::SliceRandom;

use super::net::Faults;
use super::node::name;
use super::swarm::workflow_names;
use super::world::{Ev, World};

/// Keys of the plain namespace, and of the namespace whose values belong to data subjects.
pub(crate) const NOTES: (&str, u32) = ("notes", 12);
pub(crate) const PEOPLE: (&str, u32) = ("people", 6);
/// Data subjects.
const SUBJECTS: u32 = 4;
/// Distinct task objectives (repeated submissions deduplicate while one is active).
const OBJECTIVES: u32 = 10;

/// A fault step.
#[derive(Debug, Clone)]
pub(crate) enum Fault {
    /// Kill a random node; restart it after `down_us`.
    Crash {
        down_us: u64,
    },
    /// A random node leaves gracefully; it restarts after `down_us`.
    Leave {
        down_us: u64,
    },
    Restart(u32),
    Partition {
        split: Split,
        for_us: u64,
    },
    /// Heal partition number `.0` (if no other replaced it).
    Heal(u64),
    Storm {
        faults: Faults,
        for_us: u64,
    },
    /// End storm number `.0`.
    Calm(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    Halves,
    Isolate,
    Link,
}

fn secs_us(rng: &mut impl RngExt, lo: u64, hi: u64) -> u64 {
    rng.random_range(lo * 1_000_000..hi * 1_000_000)
}

impl World {
    /// Draw the faults of the faulty phase `[start, end)`.
    pub(crate) fn schedule_faults(&mut self, start: u64, end: u64) {
        let per_min = self.opts.faults_per_min;
        if per_min <= 0.0 {
            return;
        }
        let mean_us = 60e6 / per_min;
        let mut t = start;
        loop {
            let u: f64 = self.ctx.rng.random();
            t += (-(1.0 - u).ln() * mean_us) as u64;
            if t >= end {
                break;
            }
            let rng = &mut self.ctx.rng;
            let f = match rng.random_range(0..100) {
                0..30 => Fault::Crash {
                    down_us: secs_us(rng, 2, 25),
                },
                30..40 => Fault::Leave {
                    down_us: secs_us(rng, 3, 20),
                },
                40..55 => Fault::Partition {
                    split: Split::Halves,
                    for_us: secs_us(rng, 3, 25),
                },
                55..70 => Fault::Partition {
                    split: Split::Isolate,
                    for_us: secs_us(rng, 3, 25),
                },
                70..80 => Fault::Partition {
                    split: Split::Link,
                    for_us: secs_us(rng, 3, 25),
                },
                _ => Fault::Storm {
                    faults: Faults {
                        loss: rng.random_range(0.1..0.4),
                        duplicate: rng.random_range(0.0..0.2),
                        reorder: rng.random_range(0.1..0.5),
                    },
                    for_us: secs_us(rng, 3, 15),
                },
            };
            self.ctx.schedule(t, Ev::Fault(f));
        }
    }

    pub(crate) fn fault(&mut self, f: Fault) -> Result<(), String> {
        let now = self.ctx.now_us;
        let faulty = now < self.chaos_end_us;
        match f {
            Fault::Crash { down_us } | Fault::Leave { down_us } if faulty => {
                // Up and not already leaving.
                let up: Vec<u32> = self
                    .nodes
                    .iter()
                    .filter(|n| {
                        n.proc
                            .as_ref()
                            .is_some_and(|p| p.leaving_since_us.is_none())
                    })
                    .map(|n| n.id)
                    .collect();
                // Node 0 is never stopped: the gossip simulator restarts a member by announcing
                // it to member 0, so a restarted member 0 would know nobody.
                let victims: Vec<u32> = up.iter().copied().filter(|i| *i != 0).collect();
                if up.len() <= 2 || victims.is_empty() {
                    return Ok(());
                }
                let victim = victims[self.ctx.rng.random_range(0..victims.len())];
                if matches!(f, Fault::Crash { .. }) {
                    self.crash(victim);
                } else {
                    self.leave(victim);
                }
                self.ctx
                    .schedule(now + down_us, Ev::Fault(Fault::Restart(victim)));
            }
            Fault::Restart(i) => self.restart(i)?,
            Fault::Partition { split, for_us } if faulty => {
                self.partition(split);
                self.ctx
                    .schedule(now + for_us, Ev::Fault(Fault::Heal(self.partition_gen)));
            }
            Fault::Heal(generation) if generation == self.partition_gen && self.ctx.partitioned => {
                self.ctx.gossip.heal();
                self.ctx.net.heal();
                self.ctx.partitioned = false;
                self.ctx.disturbed_until_us = now + super::world::GRACE_US;
                self.ctx.history.fault(now, "heal the partition");
            }
            Fault::Storm { faults, for_us } if faulty => {
                self.storm_gen += 1;
                self.ctx.net.faults = faults;
                self.ctx.counts.storms += 1;
                self.ctx.history.fault(
                    now,
                    format!(
                        "storm: loss {:.2}, duplication {:.2}, reordering {:.2}",
                        faults.loss, faults.duplicate, faults.reorder
                    ),
                );
                self.ctx
                    .schedule(now + for_us, Ev::Fault(Fault::Calm(self.storm_gen)));
            }
            Fault::Calm(generation) if generation == self.storm_gen => {
                self.ctx.net.faults = self.baseline;
                self.ctx.history.fault(now, "storm over");
            }
            // A fault drawn for after the faulty phase, or a heal or calm that a later fault
            // superseded: nothing.
            _ => {}
        }
        Ok(())
    }

    /// A new partition, replacing the one in force (in gossip and in the network alike).
    fn partition(&mut self, split: Split) {
        let n = self.nodes.len() as u32;
        // Node 0 stays on the larger side: the gossip simulator gives it no seeds, so a node 0
        // cut off while the others restart would never hear of them again (real nodes have
        // every other node as a seed).
        let mut others: Vec<u32> = (1..n).collect();
        others.shuffle(&mut self.ctx.rng);
        self.ctx.gossip.heal();
        self.ctx.net.heal();
        let what = match split {
            Split::Halves | Split::Isolate => {
                let size = if split == Split::Halves { n / 2 } else { 1 };
                let side = &others[..size as usize];
                self.ctx.gossip.partition(side);
                self.ctx.net.partition(side);
                let names: Vec<String> = side.iter().map(|i| name(*i)).collect();
                format!("partition {} from the rest", names.join(", "))
            }
            Split::Link => {
                let a = self.ctx.rng.random_range(0..n);
                let b = (a + self.ctx.rng.random_range(1..n)) % n;
                self.ctx.gossip.cut(a, b);
                self.ctx.net.cut(a, b);
                format!("cut the link {} - {}", name(a), name(b))
            }
        };
        self.partition_gen += 1;
        self.ctx.partitioned = true;
        self.ctx.counts.partitions += 1;
        self.ctx.history.fault(self.ctx.now_us, what);
        // Stage streams across the cut break.
        self.ctx
            .abandon_runs(|r, net| !net.reachable(r.owner, r.home));
    }

    /// Time to the next client operation.
    pub(crate) fn next_client_gap(&mut self) -> u64 {
        let rate = self.opts.ops_per_sec.max(1e-6);
        let u: f64 = self.ctx.rng.random();
        ((-(1.0 - u).ln() / rate) * 1e6) as u64 + 1
    }

    /// One client operation at a random serving node.
    pub(crate) fn client(&mut self) {
        let now = self.ctx.now_us;
        if now >= self.chaos_end_us {
            return;
        }
        let gap = self.next_client_gap();
        self.ctx.schedule(now + gap, Ev::Client);
        let serving: Vec<u32> = self
            .nodes
            .iter()
            .filter(|n| n.proc.as_ref().is_some_and(|p| p.serving))
            .map(|n| n.id)
            .collect();
        if serving.is_empty() {
            return;
        }
        let rng = &mut self.ctx.rng;
        let node = serving[rng.random_range(0..serving.len())];
        let roll = rng.random_range(0..100);
        let notes_key = format!("k{}", rng.random_range(0..NOTES.1));
        let people_key = format!("p{}", rng.random_range(0..PEOPLE.1));
        let subject = format!("user-{}", rng.random_range(0..SUBJECTS));
        let objective = format!("objective {}", rng.random_range(0..OBJECTIVES));
        let workflows = workflow_names();
        let workflow = workflows[rng.random_range(0..workflows.len())];
        let value = format!("{{\"v\":{}}}", self.ctx.next_id());
        let Some(p) = self.nodes[node as usize].proc.as_mut() else {
            return;
        };
        let ctx = &mut self.ctx;
        match roll {
            0..40 => p.client_put(ctx, NOTES.0, &notes_key, value, None),
            40..55 => p.client_put(ctx, PEOPLE.0, &people_key, value, Some(subject)),
            55..62 => p.client_delete(ctx, NOTES.0, &notes_key),
            62..66 => p.client_delete(ctx, PEOPLE.0, &people_key),
            66..69 => p.client_erase(ctx, &subject),
            _ => p.client_submit(ctx, &objective, workflow),
        }
    }
}
