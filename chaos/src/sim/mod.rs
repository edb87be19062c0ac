//! Deterministic simulation: the sans-IO cores of swarm composed into one cluster in virtual
//! time, under seeded faults, with the chaos runner's invariants checked after every run.
//!
//! What runs is the real code of each core; only the shells around them are the simulator's:
//! - **gossip**: [`swarm_membership::sim::Sim`], every member's foca SWIM state machine, with
//!   packet loss, partitions and cut links;
//! - **replication**: each node's real store (`swarm_storage`, on a simulated disk that loses
//!   unsynced writes in a crash) and the real protocol of
//!   `swarm_actors::replication::protocol`: pushes acknowledged with `w=2`, anti-entropy rounds,
//!   erasures exchanged first;
//! - **tasks**: one real `Dispatcher` per node, its records and stage results written to the
//!   replicated store, owners chosen by rendezvous over each node's own gossip view, orphans
//!   adopted at a higher epoch, stage results fenced.
//!
//! Around them, an in-memory network (loss, duplication, reordering, the same partitions as
//! gossip), crashes, graceful leaves, restarts, partitions and network storms, and a client
//! workload of writes, deletes, erasures and task submissions. After the faults everything
//! heals, every node restarts, the cluster settles, and the checks run (see `check`).
//!
//! Left out: tombstone collection, overflowing push queues, clock skew beyond a few hundred
//! milliseconds, cancel and requeue, idempotency keys, the event relay, escalation records and
//! agent placement by roster (an agent's home is the rendezvous of its id over the live
//! members). The task shell starts a stage at once rather than after the writes before it are
//! acknowledged; otherwise it does what `swarm_actors::tasks::service` does: it looks for
//! orphaned tasks only once it has caught up and exchanged an anti-entropy round with every
//! live peer since membership last changed, takes an owner for gone only when gossip says so,
//! and deduplicates a submission against the unfinished tasks of its replica.
//!
//! Everything random is drawn from one generator seeded with the seed (gossip and every
//! dispatcher get their seeds from it), and nothing reads a real clock, so a seed replays
//! exactly: `swarm-chaos sim --seeds 1 --first-seed SEED`.
//!
//! Layout: `world` (the cluster, its event loop and phases), `faults` (the fault schedule and
//! the workload), `node` (a node's disk and process: store and replication shell), `tasks` (the
//! task shell), `swarm` (the agents and workflows), `net` (the network), `disk` (the simulated
//! disk), `history` (what happened) and `check` (the invariants).

mod check;
mod disk;
mod faults;
mod history;
mod net;
mod node;
mod swarm;
mod tasks;
mod world;

use std::time::Duration;

use crate::Error;

/// What a simulated run looks like. The fault rates are upper bounds: each seed draws its own
/// below them.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Nodes, 3 to 7; 0 draws the number from the seed.
    pub nodes: u32,
    /// Virtual length of the faulty phase (workload and faults); the heal and the settling
    /// follow it.
    pub duration: Duration,
    /// Longest virtual time the cluster gets to settle after the heal.
    pub settle: Duration,
    /// Client operations per virtual second.
    pub ops_per_sec: f64,
    /// Faults (crash, leave, partition, cut link, network storm) started per virtual minute.
    pub faults_per_min: f64,
    /// Highest baseline probability that a replication or task message is lost.
    pub loss: f64,
    /// Highest baseline probability that one is delivered twice.
    pub duplicate: f64,
    /// Highest baseline probability that one is held back, so that it arrives after later ones.
    pub reorder: f64,
    /// Highest probability that a gossip packet is lost.
    pub gossip_loss: f64,
    /// Probability that a stage fails on its agent (one failure in ten cannot be retried).
    pub stage_failure: f64,
    /// A deliberate bug, to show that the checks catch it; `None` for real runs.
    pub sabotage: Option<Sabotage>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            nodes: 0,
            duration: Duration::from_secs(60),
            settle: Duration::from_secs(180),
            ops_per_sec: 4.0,
            faults_per_min: 6.0,
            loss: 0.05,
            duplicate: 0.05,
            reorder: 0.1,
            gossip_loss: 0.03,
            stage_failure: 0.05,
            sabotage: None,
        }
    }
}

/// A deliberate bug for the tests of the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// After the heal, one replica silently loses the record of an acknowledged write.
    LoseAckedWrite,
    /// Nodes adopt unfinished tasks whose owner is alive, so tasks run on two owners at once.
    AdoptFromLiveOwners,
    /// The task shell as the service had it before this simulation: it looks for orphans from
    /// its first look at membership (a restarted node, not caught up, sees itself alone and
    /// adopts the unfinished tasks of live owners), and deduplicates a submission only against
    /// what its own dispatcher holds (a task whose hash moved to a member that came back runs
    /// again).
    EarlyOrphanScan,
    /// The submission fallback as the service had it before the chaos figures: a node whose
    /// owner does not answer takes the task itself, so two nodes that cannot reach one owner
    /// each accept the same objective.
    FallbackHere,
}

/// What a clean run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimOutcome {
    pub seed: u64,
    pub nodes: u32,
    /// Memory writes (puts) applied on a node.
    pub writes: u64,
    /// Of those, acknowledged by a peer too.
    pub writes_acked: u64,
    pub deletes: u64,
    pub erasures: u64,
    /// Submissions acknowledged with a new task.
    pub tasks_submitted: u64,
    /// Submissions answered with an active task of the same hash.
    pub tasks_deduplicated: u64,
    /// Submissions accepted by the next choice because the owner did not answer.
    pub tasks_fallback: u64,
    pub tasks_completed: u64,
    pub tasks_dead_lettered: u64,
    pub tasks_failed: u64,
    pub adoptions: u64,
    /// Stage results refused because their epoch or attempt was superseded.
    pub stale_results: u64,
    /// Work held twice inside a partition (fenced, not errors).
    pub excused_twice: u64,
    /// Stages run again outside a partition because no live node held their earlier result
    /// (it was only on a node that crashed or left before any peer acknowledged it).
    pub stages_rerun: u64,
    pub faults: u64,
    pub crashes: u64,
    pub partitions: u64,
    /// Replication and task messages sent, lost and duplicated.
    pub messages: u64,
    pub messages_lost: u64,
    pub messages_duplicated: u64,
    pub ae_rounds: u64,
    /// Virtual time of the whole run.
    pub virtual_time: Duration,
    /// Virtual time from the heal until the cluster was quiet.
    pub settle_time: Duration,
    /// A hash of every event in order: two runs of a seed have the same.
    pub trace: u64,
}

/// How to replay `seed`.
fn replay(seed: u64) -> String {
    format!("replay: swarm-chaos sim --seeds 1 --first-seed {seed}")
}

/// Run one seed; [`Error::Sim`] names the broken invariant, the operations that broke it and
/// the faults around them, and how to replay the seed.
pub fn run_seed(seed: u64, opts: &SimOptions) -> Result<SimOutcome, Error> {
    if opts.nodes != 0 && !(3..=7).contains(&opts.nodes) {
        return Err(Error::scenario("nodes", "must be 0 (drawn) or 3 to 7"));
    }
    let sim_error = |m: String| Error::Sim(format!("seed {seed}: {m}; {}", replay(seed)));
    let mut w = world::World::new(seed, opts).map_err(sim_error)?;
    w.run().map_err(sim_error)?;
    if opts.sabotage == Some(Sabotage::LoseAckedWrite) {
        w.lose_an_acked_write().map_err(sim_error)?;
    }
    let snapshot = w.snapshot();
    let violations = check::check(&w.ctx.history, &snapshot);
    if let Some(first) = violations.first() {
        let others: Vec<&str> = violations[1..].iter().map(|v| v.invariant).collect();
        let mut msg = format!("{}: {}", first.invariant, first.detail);
        if !others.is_empty() {
            let mut kinds = others.clone();
            kinds.dedup();
            msg.push_str(&format!(
                " (and {} more: {})",
                others.len(),
                kinds.join(", ")
            ));
        }
        if let Some(reason) = &w.unsettled {
            msg.push_str(&format!("; never quiet after the heal: {reason}"));
        }
        // The faults within half a minute of it, or all of them when it has no time.
        let (from, to, label) = match first.at_us {
            Some(at) => (
                at.saturating_sub(30_000_000),
                at + 30_000_000,
                "faults around it",
            ),
            None => (0, u64::MAX, "faults"),
        };
        let faults = w.ctx.history.faults_between(from, to);
        if !faults.is_empty() {
            msg.push_str(&format!("; {label}: {}", faults.join(", ")));
        }
        return Err(sim_error(msg));
    }
    Ok(outcome(seed, &w, &snapshot))
}

fn outcome(seed: u64, w: &world::World, snapshot: &[check::NodeView]) -> SimOutcome {
    let h = &w.ctx.history;
    let c = &w.ctx.counts;
    let net = w.ctx.net.stats;
    let tasks = snapshot.first().map(|v| &v.tasks);
    let status = |s: swarm_actors::tasks::TaskStatus| {
        tasks.map_or(0, |t| t.values().filter(|r| r.status == s).count() as u64)
    };
    use swarm_actors::tasks::TaskStatus::{Completed, DeadLetter, Failed};
    SimOutcome {
        seed,
        nodes: w.nodes.len() as u32,
        writes: h.writes.iter().filter(|w| w.value.is_some()).count() as u64,
        writes_acked: h
            .writes
            .iter()
            .filter(|w| w.value.is_some() && w.acked == Some(true))
            .count() as u64,
        deletes: h.writes.iter().filter(|w| w.value.is_none()).count() as u64,
        erasures: h.erasures.len() as u64,
        tasks_submitted: h
            .submissions
            .iter()
            .filter(|s| s.created().is_some())
            .count() as u64,
        tasks_deduplicated: h
            .submissions
            .iter()
            .filter(|s| matches!(s.answer, Some(Ok((_, true)))))
            .count() as u64,
        tasks_fallback: h
            .submissions
            .iter()
            .filter(|s| s.fallback.is_some())
            .count() as u64,
        tasks_completed: status(Completed),
        tasks_dead_lettered: status(DeadLetter),
        tasks_failed: status(Failed),
        adoptions: c.adoptions,
        stale_results: c.stale_results,
        excused_twice: h.twice.iter().filter(|t| t.excused).count() as u64,
        stages_rerun: h
            .stage_writes
            .iter()
            .filter(|w| !w.disturbed && w.earlier_on_a_live_node == Some(false))
            .count() as u64,
        faults: c.crashes + c.leaves + c.partitions + c.storms,
        crashes: c.crashes,
        partitions: c.partitions,
        messages: net.sent,
        messages_lost: net.lost,
        messages_duplicated: net.duplicated,
        ae_rounds: c.ae_rounds,
        virtual_time: Duration::from_micros(w.ctx.now_us),
        settle_time: Duration::from_micros(w.settled_after_us),
        trace: w.ctx.trace,
    }
}
