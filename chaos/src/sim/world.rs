//! The simulated cluster and its event loop.
//!
//! [`Ctx`] is what every node's process may use: the clock, the one seeded random generator,
//! the gossip simulator (each member's view of the others), the network, the queue of what
//! happens next and the history. [`World`] holds the nodes and runs the phases of a seed: the
//! cluster forms, the workload and the faults run for the configured time, everything heals and
//! every killed node restarts, the cluster settles, and its final state is read for the checks.
//!
//! Time is the gossip simulator's: before each event the gossip members run up to its instant,
//! so what a process sees of membership is what gossip says at that moment.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use swarm_actors::tasks::StageRecord;
use swarm_actors::tasks::dispatcher::{RunStage, StageError, StageOutcome, StageSuccess};
use swarm_membership::sim::{Sim, SimConfig};
use swarm_membership::{GossipSettings, MemberState};

use super::history::History;
use super::net::{Class, Envelope, Faults, Msg, Net};
use super::node::{HAND_OFF_LIMIT_US, Node, index, name};
use super::tasks::{UNREACHABLE_US, VIEW_EVERY_US, unreachable};
use super::{Sabotage, SimOptions};

/// Wall-clock milliseconds at virtual time zero.
pub(crate) const BASE_MS: u64 = 1_700_000_000_000;
/// Period of every process's housekeeping.
const TICK_US: u64 = 50_000;
/// How long after a partition heals (or gossip wrongly declares a member down) work held twice
/// is still put down to it.
pub(crate) const GRACE_US: u64 = 30_000_000;
/// Longest wait for the cluster to form at the start.
const FORM_US: u64 = 30_000_000;

/// A stage its owner waits for, on the home that runs it.
#[derive(Debug, Clone)]
pub(crate) struct RemoteRun {
    pub(crate) owner: u32,
    pub(crate) owner_boot: u64,
    pub(crate) home: u32,
    pub(crate) stage: RunStage,
}

/// What happens next.
#[derive(Debug)]
pub(crate) enum Ev {
    Deliver(Box<Envelope>),
    /// Every process's housekeeping.
    Tick,
    /// The next client operation.
    Client,
    Fault(super::faults::Fault),
    /// A stage ends on its home (the process `boot` of `node`).
    StageDone {
        node: u32,
        boot: u64,
        run: u64,
        stage: Box<RunStage>,
        result: Result<StageSuccess, StageError>,
    },
    /// A stage's outcome found by its owner itself (an unreachable home).
    Outcome {
        node: u32,
        boot: u64,
        outcome: Box<StageOutcome>,
    },
}

impl Ev {
    fn tag(&self) -> u64 {
        match self {
            Ev::Deliver(e) => 10 + u64::from(e.msg.tag()),
            Ev::Tick => 1,
            Ev::Client => 2,
            Ev::Fault(_) => 3,
            Ev::StageDone { .. } => 4,
            Ev::Outcome { .. } => 5,
        }
    }
}

#[derive(Debug)]
struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Counters over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) ae_rounds: u64,
    pub(crate) ae_failed: u64,
    pub(crate) ae_entries: u64,
    pub(crate) stale_results: u64,
    pub(crate) adoptions: u64,
    pub(crate) stage_writes_skipped: u64,
    pub(crate) crashes: u64,
    pub(crate) leaves: u64,
    pub(crate) partitions: u64,
    pub(crate) storms: u64,
    pub(crate) lost_on_crash: u64,
    pub(crate) false_downs: u64,
}

/// What the processes share: clock, randomness, membership, network, queue, history.
pub(crate) struct Ctx {
    pub(crate) now_us: u64,
    pub(crate) rng: StdRng,
    pub(crate) gossip: Sim,
    pub(crate) net: Net,
    /// The process running on each node (its boot number), `None` while down.
    boots: Vec<Option<u64>>,
    /// Each node's clock lead (ms).
    skew_ms: Vec<u64>,
    /// Stages waited for, by run.
    pub(crate) remote: BTreeMap<u64, RemoteRun>,
    pub(crate) history: History,
    pub(crate) counts: Counts,
    pub(crate) stage_failure: f64,
    pub(crate) sabotage: Option<Sabotage>,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    next_id: u64,
    next_task: u64,
    /// A partition or cut is in force.
    pub(crate) partitioned: bool,
    pub(crate) disturbed_until_us: u64,
    /// A hash of every event handled, in order: equal runs have equal traces.
    pub(crate) trace: u64,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("now_us", &self.now_us)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    /// Node `i`'s wall clock, in ms.
    pub(crate) fn now_ms(&self, i: u32) -> u64 {
        BASE_MS + self.now_us / 1000 + self.skew_ms.get(i as usize).copied().unwrap_or(0)
    }

    pub(crate) fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at: at.max(self.now_us),
            seq: self.seq,
            ev,
        });
    }

    /// Send a message now.
    pub(crate) fn send(&mut self, env: Envelope, class: Class) {
        let out = self.net.send(&mut self.rng, self.now_us, env, class);
        self.deliver_all(out);
    }

    pub(crate) fn deliver_all(&mut self, out: Vec<(u64, Envelope)>) {
        for (at, env) in out {
            self.schedule(at, Ev::Deliver(Box::new(env)));
        }
    }

    /// The process on node `i`, if one runs.
    pub(crate) fn up(&self, i: u32) -> Option<u64> {
        self.boots.get(i as usize).copied().flatten()
    }

    /// The peers node `i`'s gossip calls live (alive or suspect), in order.
    pub(crate) fn live_peers(&self, i: u32) -> Vec<u32> {
        let me = name(i);
        let mut out: Vec<u32> = self
            .gossip
            .view(i)
            .into_iter()
            .filter(|m| m.name != me)
            .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
            .filter_map(|m| index(&m.name))
            .collect();
        out.sort_unstable();
        out
    }

    /// Node `i`'s live members by name, itself included, sorted (the task shell's view).
    pub(crate) fn view(&self, i: u32) -> Vec<String> {
        let mut out: Vec<String> = self.live_peers(i).into_iter().map(name).collect();
        out.push(name(i));
        out.sort();
        out
    }

    pub(crate) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) fn next_task_id(&mut self) -> String {
        self.next_task += 1;
        format!("t{:05}", self.next_task)
    }

    /// A partition is in force, or ended (or gossip declared a live member down) lately.
    pub(crate) fn disturbed(&self) -> bool {
        self.partitioned || self.now_us < self.disturbed_until_us
    }

    fn mix(&mut self, v: u64) {
        self.trace = (self.trace ^ v).wrapping_mul(0x0100_0000_01b3);
    }

    /// Stages in flight on or for a node that went away, or across a cut: the owner hears that
    /// the home cannot be reached (if it is still there to hear it).
    pub(crate) fn abandon_runs(&mut self, gone: impl Fn(&RemoteRun, &Net) -> bool) {
        let lost: Vec<u64> = self
            .remote
            .iter()
            .filter(|(_, r)| gone(r, &self.net))
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            let Some(r) = self.remote.remove(&id) else {
                continue;
            };
            if self.up(r.owner) == Some(r.owner_boot) && r.owner != r.home {
                let outcome = unreachable(&r.stage, &name(r.owner));
                self.schedule(
                    self.now_us + UNREACHABLE_US,
                    Ev::Outcome {
                        node: r.owner,
                        boot: r.owner_boot,
                        outcome: Box::new(outcome),
                    },
                );
            }
        }
    }
}

/// The cluster.
#[derive(Debug)]
pub(crate) struct World {
    pub(crate) ctx: Ctx,
    pub(crate) nodes: Vec<Node>,
    pub(crate) opts: SimOptions,
    /// The datagram faults outside storms.
    pub(crate) baseline: Faults,
    pub(crate) partition_gen: u64,
    pub(crate) storm_gen: u64,
    pub(crate) chaos_end_us: u64,
    next_look_us: u64,
    last_false_downs: u64,
    /// Why the cluster never went quiet while settling (`None`: it did).
    pub(crate) unsettled: Option<String>,
    pub(crate) settled_after_us: u64,
    /// Stage writes of the history judged so far ([`Self::judge_stage_writes`]).
    stage_writes_judged: usize,
}

impl World {
    pub(crate) fn new(seed: u64, opts: &SimOptions) -> Result<Self, String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = match opts.nodes {
            0 => rng.random_range(3..=7),
            n => n,
        };
        let gossip_loss = opts.gossip_loss * rng.random::<f64>();
        let baseline = Faults {
            loss: opts.loss * rng.random::<f64>(),
            duplicate: opts.duplicate * rng.random::<f64>(),
            reorder: opts.reorder * rng.random::<f64>(),
        };
        let mut gossip = Sim::new(SimConfig {
            settings: GossipSettings {
                cluster_size: n,
                ..GossipSettings::default()
            },
            loss: gossip_loss,
            seed: rng.random(),
            ..SimConfig::default()
        });
        gossip.add_nodes(n);
        let skew_ms = (0..n).map(|_| rng.random_range(0..=300)).collect();
        let masters: Vec<[u8; 32]> = (0..n).map(|_| rng.random()).collect();
        let mut ctx = Ctx {
            now_us: 0,
            rng,
            gossip,
            net: Net::new(baseline),
            boots: vec![None; n as usize],
            skew_ms,
            remote: BTreeMap::new(),
            history: History::default(),
            counts: Counts::default(),
            stage_failure: opts.stage_failure.clamp(0.0, 1.0),
            sabotage: opts.sabotage,
            queue: BinaryHeap::new(),
            seq: 0,
            next_id: 0,
            next_task: 0,
            partitioned: false,
            disturbed_until_us: 0,
            trace: 0xcbf2_9ce4_8422_2325,
        };
        let mut nodes = Vec::with_capacity(n as usize);
        for (i, m) in masters.into_iter().enumerate() {
            let i = i as u32;
            let mut node = Node::new(i, m);
            let boot = node.boot(&mut ctx)?;
            ctx.boots[i as usize] = Some(boot);
            nodes.push(node);
        }
        Ok(Self {
            ctx,
            nodes,
            opts: opts.clone(),
            baseline,
            partition_gen: 0,
            storm_gen: 0,
            chaos_end_us: 0,
            next_look_us: 0,
            last_false_downs: 0,
            unsettled: None,
            settled_after_us: 0,
            stage_writes_judged: 0,
        })
    }

    /// The phases of a seed, up to the settled cluster (the checks read it afterwards).
    pub(crate) fn run(&mut self) -> Result<(), String> {
        self.ctx.schedule(0, Ev::Tick);
        while !self.ctx.gossip.full_view() && self.ctx.now_us < FORM_US {
            self.run_until(self.ctx.now_us + 100_000)?;
        }
        let start = self.ctx.now_us;
        self.chaos_end_us = start + duration_us(self.opts.duration);
        self.schedule_faults(start, self.chaos_end_us);
        let first = self.next_client_gap();
        self.ctx.schedule(start + first, Ev::Client);
        self.run_until(self.chaos_end_us)?;
        self.heal_all()?;
        let healed = self.ctx.now_us;
        let end = healed + duration_us(self.opts.settle);
        let mut streak = 0;
        while self.ctx.now_us < end {
            self.run_until(self.ctx.now_us + 1_000_000)?;
            if self.quiet().is_none() {
                streak += 1;
                if streak >= 3 {
                    break;
                }
            } else {
                streak = 0;
            }
        }
        self.settled_after_us = self.ctx.now_us - healed;
        self.unsettled = self.quiet();
        Ok(())
    }

    /// Handle every event up to `end` (µs), gossip running alongside.
    pub(crate) fn run_until(&mut self, end: u64) -> Result<(), String> {
        loop {
            let at = match self.ctx.queue.peek() {
                Some(s) if s.at <= end => s.at,
                _ => break,
            };
            let Some(item) = self.ctx.queue.pop() else {
                break;
            };
            self.advance(at);
            let tag = item.ev.tag();
            self.ctx.mix(at ^ (tag << 56));
            self.handle(item.ev)?;
            self.judge_stage_writes();
        }
        self.advance(end);
        Ok(())
    }

    /// For each stage result written during the last event that is not its stage's first:
    /// whether a live node other than its writer held an earlier one (its own push has not
    /// left yet, so what they hold is older).
    fn judge_stage_writes(&mut self) {
        let writes = &self.ctx.history.stage_writes;
        let held: Vec<(usize, bool)> = (self.stage_writes_judged..writes.len())
            .filter_map(|k| {
                let w = &writes[k];
                writes[..k]
                    .iter()
                    .any(|e| (e.task.as_str(), e.index) == (w.task.as_str(), w.index))
                    .then_some((k, w))
            })
            .map(|(k, w)| {
                let key = StageRecord::key(&w.task, &w.stage);
                let held = self
                    .nodes
                    .iter()
                    .filter(|n| n.id != w.node)
                    .filter_map(|n| n.proc.as_ref())
                    .any(|p| p.read::<StageRecord>(&self.ctx, &key).is_some());
                (k, held)
            })
            .collect();
        self.stage_writes_judged = writes.len();
        for (k, h) in held {
            self.ctx.history.stage_writes[k].earlier_on_a_live_node = Some(h);
        }
    }

    /// Run gossip up to `to` and move the clock there.
    fn advance(&mut self, to: u64) {
        let now = self.ctx.now_us;
        if to > now {
            self.ctx.gossip.run_for(Duration::from_micros(to - now));
            self.ctx.now_us = to;
        }
        let fd = self.ctx.gossip.stats().false_downs;
        if fd > self.last_false_downs {
            self.last_false_downs = fd;
            self.ctx.counts.false_downs = fd;
            self.ctx.disturbed_until_us = to + GRACE_US;
            self.ctx
                .history
                .fault(to, "gossip declared a live, reachable member down");
        }
    }

    fn handle(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Deliver(env) => {
                let m = (u64::from(env.from) << 8) | u64::from(env.to);
                self.ctx.mix(m);
                self.deliver(*env);
            }
            Ev::Tick => self.tick(),
            Ev::Client => self.client(),
            Ev::Fault(f) => self.fault(f)?,
            Ev::StageDone {
                node,
                boot,
                run,
                stage,
                result,
            } => {
                if let Some((p, ctx)) = self.proc_of(node, boot) {
                    p.stage_done(ctx, run, *stage, result, true);
                }
            }
            Ev::Outcome {
                node,
                boot,
                outcome,
            } => {
                if let Some((p, ctx)) = self.proc_of(node, boot) {
                    p.on_outcome(ctx, *outcome);
                }
            }
        }
        Ok(())
    }

    /// Process `boot` of `node`, if it still runs, with the context.
    fn proc_of(&mut self, node: u32, boot: u64) -> Option<(&mut super::node::Proc, &mut Ctx)> {
        let p = self
            .nodes
            .get_mut(node as usize)?
            .proc
            .as_mut()
            .filter(|p| p.boot == boot)?;
        Some((p, &mut self.ctx))
    }

    fn deliver(&mut self, env: Envelope) {
        let ctx = &mut self.ctx;
        let boot_ok = ctx
            .up(env.to)
            .is_some_and(|b| env.to_boot.is_none_or(|t| t == b));
        let reset = matches!(env.msg, Msg::AeReset { .. });
        if !boot_ok || !(reset || ctx.net.reachable(env.from, env.to)) {
            ctx.net.stats.lost += 1;
            if let Msg::Ae { round, .. } = env.msg {
                let resets = ctx.net.break_stream(ctx.now_us, &env, round);
                ctx.deliver_all(resets);
            }
            return;
        }
        if let Some(p) = self
            .nodes
            .get_mut(env.to as usize)
            .and_then(|n| n.proc.as_mut())
        {
            p.receive(ctx, env);
        }
    }

    fn tick(&mut self) {
        let look = self.ctx.now_us >= self.next_look_us;
        if look {
            self.next_look_us = self.ctx.now_us + VIEW_EVERY_US;
        }
        for n in &mut self.nodes {
            if let Some(p) = n.proc.as_mut() {
                p.tick(&mut self.ctx, look);
            }
        }
        self.end_leaves();
        if look {
            self.look_for_twice();
        }
        let next = self.ctx.now_us + TICK_US;
        self.ctx.schedule(next, Ev::Tick);
    }

    /// Work held twice right now: one task by two dispatchers, or two tasks of one hash active
    /// at once. Each is judged when first seen, and excused when it comes from a partition (or
    /// its aftermath, or gossip declaring a live member down), from the submission fallback
    /// (one task held twice), or (two tasks of a hash) from replication lag: the later one was
    /// accepted by an owner whose replica did not hold the earlier one yet.
    fn look_for_twice(&mut self) {
        let mut holders: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let mut by_hash: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for n in &self.nodes {
            let Some(p) = &n.proc else { continue };
            for (task, hash) in p.holding() {
                holders.entry(task.clone()).or_default().push(n.id);
                by_hash.entry(hash).or_default().insert(task);
            }
        }
        let disturbed = self.ctx.disturbed();
        let now = self.ctx.now_us;
        let h = &mut self.ctx.history;
        let fallback: BTreeSet<String> = h.fallback_tasks().into_iter().map(String::from).collect();
        for (task, nodes) in holders.into_iter().filter(|(_, n)| n.len() > 1) {
            let names: Vec<String> = nodes.iter().map(|i| name(*i)).collect();
            let what = format!("task {task} held by {}", names.join(", "));
            let excused = disturbed || fallback.contains(&task);
            h.twice(what.clone(), what, vec![task], now, excused);
        }
        for (hash, tasks) in by_hash.into_iter().filter(|(_, t)| t.len() > 1) {
            let tasks: Vec<String> = tasks.into_iter().collect();
            let what = format!(
                "hash {}… active as {} at once",
                hash.get(..12).unwrap_or(&hash),
                tasks.join(", ")
            );
            // Not excused by the fallback: every node that cannot reach an owner routes to
            // the same next choice, which deduplicates.
            let excused =
                disturbed || h.lagged(&tasks) || tasks.iter().any(|t| h.excused_tasks.contains(t));
            h.twice(format!("hash {tasks:?}"), what, tasks, now, excused);
        }
    }

    // ---- nodes going and coming ----

    pub(crate) fn crash(&mut self, i: u32) {
        let Some(node) = self.nodes.get_mut(i as usize) else {
            return;
        };
        let lost = node.crash();
        self.ctx.boots[i as usize] = None;
        self.ctx.gossip.kill(i);
        self.ctx.abandon_runs(|r, _| r.home == i || r.owner == i);
        self.ctx.counts.crashes += 1;
        self.ctx.counts.lost_on_crash += lost as u64;
        self.ctx.history.fault(
            self.ctx.now_us,
            format!("crash {} ({lost} unsynced changes lost)", name(i)),
        );
    }

    /// A graceful leave begins: the process stops taking work and hands off to a peer; it
    /// leaves gossip and stops once a round with a peer completes ([`Self::end_leaves`]).
    pub(crate) fn leave(&mut self, i: u32) {
        let Some(p) = self.nodes.get_mut(i as usize).and_then(|n| n.proc.as_mut()) else {
            return;
        };
        if p.leaving_since_us.is_some() {
            return;
        }
        p.begin_leave(&mut self.ctx);
        self.ctx.abandon_runs(|r, _| r.home == i || r.owner == i);
        self.ctx.counts.leaves += 1;
        self.ctx
            .history
            .fault(self.ctx.now_us, format!("leave {}", name(i)));
    }

    /// The leaves whose hand-off is over (a round with a peer, no peer left, or the limit).
    fn end_leaves(&mut self) {
        let now = self.ctx.now_us;
        let done: Vec<(u32, bool)> = self
            .nodes
            .iter()
            .filter_map(|n| {
                let p = n.proc.as_ref()?;
                let since = p.leaving_since_us?;
                let handed = p.handed_off();
                let over = handed
                    || self.ctx.live_peers(n.id).is_empty()
                    || now.saturating_sub(since) >= HAND_OFF_LIMIT_US;
                over.then_some((n.id, handed))
            })
            .collect();
        for (i, handed) in done {
            self.end_leave(i, handed);
        }
    }

    /// The leaving process announces it to gossip and stops.
    fn end_leave(&mut self, i: u32, handed: bool) {
        let Some(node) = self.nodes.get_mut(i as usize) else {
            return;
        };
        self.ctx.gossip.leave(i);
        node.stop();
        self.ctx.boots[i as usize] = None;
        self.ctx.abandon_runs(|r, _| r.home == i || r.owner == i);
        let how = if handed { "handed off" } else { "no hand-off" };
        self.ctx
            .history
            .fault(self.ctx.now_us, format!("{} left ({how})", name(i)));
    }

    pub(crate) fn restart(&mut self, i: u32) -> Result<(), String> {
        // A node still handing off goes now, to come back.
        let leaving = self
            .nodes
            .get(i as usize)
            .and_then(|n| n.proc.as_ref())
            .filter(|p| p.leaving_since_us.is_some())
            .map(|p| p.handed_off());
        if let Some(handed) = leaving {
            self.end_leave(i, handed);
        }
        let Some(node) = self.nodes.get_mut(i as usize) else {
            return Ok(());
        };
        if node.proc.is_some() {
            return Ok(());
        }
        let boot = node.boot(&mut self.ctx)?;
        self.ctx.boots[i as usize] = Some(boot);
        self.ctx.gossip.restart(i);
        self.ctx
            .history
            .fault(self.ctx.now_us, format!("restart {}", name(i)));
        Ok(())
    }

    /// The end of the faults: no partition, no storm, every node up.
    fn heal_all(&mut self) -> Result<(), String> {
        self.ctx.gossip.heal();
        self.ctx.net.heal();
        self.ctx.net.faults = Faults::NONE;
        if self.ctx.partitioned {
            self.ctx.disturbed_until_us = self.ctx.now_us + GRACE_US;
        }
        self.ctx.partitioned = false;
        self.partition_gen += 1;
        self.storm_gen += 1;
        self.ctx.history.fault(self.ctx.now_us, "heal everything");
        for i in 0..self.nodes.len() as u32 {
            self.restart(i)?;
        }
        Ok(())
    }

    /// Why the cluster is not quiet yet: a node down, membership not converged, replicas that
    /// differ, a task unfinished. `None` when quiet.
    pub(crate) fn quiet(&self) -> Option<String> {
        let g = &self.ctx.gossip;
        let n = self.nodes.len() as u32;
        for i in 0..n {
            if self.ctx.up(i).is_none() {
                return Some(format!("{} is down", name(i)));
            }
            for j in (0..n).filter(|j| *j != i) {
                let seen = g.state_seen(i, j);
                if seen != Some(MemberState::Alive) {
                    return Some(format!("{} sees {} as {seen:?}", name(i), name(j)));
                }
            }
        }
        let mut first: Option<Replica> = None;
        for node in &self.nodes {
            let p = node.proc.as_ref()?;
            let state = (digests(p.storage()), destroyed(p.storage()));
            match &first {
                None => first = Some(state),
                Some(f) if *f != state => {
                    return Some(format!("the replica of {} differs", name(node.id)));
                }
                Some(_) => {}
            }
            if let Some((task, _)) = p.holding().first() {
                return Some(format!("{} still runs {task}", name(node.id)));
            }
        }
        let p0 = self.nodes.first()?.proc.as_ref()?;
        p0.scan_tasks(&self.ctx)
            .iter()
            .find(|t| t.status.is_active())
            .map(|t| format!("task {} is {}", t.id, t.status.as_str()))
    }

    /// The sabotage of a replica that loses an acknowledged write after the heal.
    pub(crate) fn lose_an_acked_write(&mut self) -> Result<(), String> {
        let Some(w) = self
            .ctx
            .history
            .writes
            .iter()
            .find(|w| w.acked == Some(true) && w.value.is_some())
            .cloned()
        else {
            return Ok(());
        };
        let Some(node) = self.nodes.last_mut() else {
            return Ok(());
        };
        let mut key = w.ns.as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(w.key.as_bytes());
        node.disk
            .forget(swarm_storage::trees::MEMORY, &key)
            .map_err(|e| e.to_string())?;
        let storage = node.open_storage()?;
        if let Some(p) = node.proc.as_mut() {
            p.reopen(storage);
        }
        Ok(())
    }
}

/// What two replicas must agree on: every namespace's (root, count), the destroyed subjects.
type Replica = (BTreeMap<String, (u64, u64)>, Vec<String>);

/// Root and count of every namespace of a store.
pub(crate) fn digests(s: &swarm_storage::Storage) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for ns in s.memory.namespaces().unwrap_or_default() {
        if let Ok(d) = s.memory.digest(&ns) {
            out.insert(ns, (d.root, d.count));
        }
    }
    out
}

/// The destroyed subjects of a store.
pub(crate) fn destroyed(s: &swarm_storage::Storage) -> Vec<String> {
    s.memory.destroyed_subjects().unwrap_or_default()
}

pub(crate) fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
