//! Scenario files (`chaos/scenarios/*.toml`): the cluster, the workload, the faults and the
//! bounds the checks hold the cluster to; and the seeded schedule the faults become.
//!
//! A scenario is refused before any process starts when a field is unknown, a timing cannot be
//! kept (a fault past the end, a heal bound of zero), the cluster has more nodes than addresses, or
//! a fault needs root and the runner is not root.

use std::path::Path;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use swarm_config::HumanDuration;

use crate::Error;

/// The most nodes a scenario may run: one 127.0.0.x address each, from [`FIRST_HOST`] on.
pub const MAX_NODES: u32 = 9;
/// Node k (1-based) listens on 127.0.0.(FIRST_HOST + k).
pub const FIRST_HOST: u32 = 10;

/// One scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Nodes in the cluster (at most [`MAX_NODES`]); `swarm-chaos run --nodes` overrides.
    pub nodes: u32,
    /// How long the workload runs with faults, after the warm-up.
    pub duration: HumanDuration,
    /// Workload without faults before the first may start.
    #[serde(default = "default_warmup")]
    pub warmup: HumanDuration,
    /// After the heal: how long membership and the replicas may take to converge (the checks'
    /// bound; the issue's target is 10 s).
    #[serde(default = "default_converge")]
    pub converge_within: HumanDuration,
    /// After the heal: how long the tasks acknowledged during the run may take to finish.
    #[serde(default = "default_tasks_within")]
    pub tasks_within: HumanDuration,
    /// The lowest share of requests to live nodes, during faults, the gateways must answer
    /// (with a success or a stated refusal, never a dropped connection or an internal error).
    #[serde(default = "default_min_success")]
    pub min_gateway_success: f64,
    /// First ports of the gateways and of gossip (the same on every address).
    #[serde(default = "default_http_port")]
    pub http_port: u16,
    #[serde(default = "default_gossip_port")]
    pub gossip_port: u16,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
}

fn default_warmup() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_converge() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_tasks_within() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_min_success() -> f64 {
    0.99
}
fn default_http_port() -> u16 {
    18_480
}
fn default_gossip_port() -> u16 {
    18_481
}

/// The client load: `clients` threads, each issuing `rate` operations per second, the kind
/// drawn by the weights.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    pub clients: u32,
    /// Operations per second per client.
    pub rate: f64,
    /// Keys the writes and reads share (overwrites are the point).
    pub keys: u32,
    pub write: u32,
    pub read: u32,
    /// A key written then deleted by the same client.
    pub delete: u32,
    /// A value written under a data subject; the subject is erased later in the run.
    pub subject_write: u32,
    /// A task of the no-LLM workflow; `duplicate` of them repeat an earlier objective.
    pub task: u32,
    pub duplicate: f64,
    /// A chat completion with the tiny model.
    pub chat: u32,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            clients: 4,
            rate: 10.0,
            keys: 32,
            write: 40,
            read: 30,
            delete: 5,
            subject_write: 5,
            task: 15,
            duplicate: 0.2,
            chat: 5,
        }
    }
}

/// One fault of a scenario. `at` and `target` left out are drawn from the seed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub kind: FaultKind,
    /// Start, counted from the end of the warm-up.
    #[serde(default)]
    pub at: Option<HumanDuration>,
    /// How long it lasts before it is undone (a killed node restarts, a partition heals).
    #[serde(rename = "for")]
    pub lasts: HumanDuration,
    /// A node (1-based) it applies to; a partition's isolated node, a bridge's bridge.
    #[serde(default)]
    pub target: Option<u32>,
    /// `loss`: the share of datagrams dropped; `reorder`: the share held back.
    #[serde(default)]
    pub rate: Option<f64>,
    /// `delay`: milliseconds added to every datagram, and up to `jitter_ms` more.
    #[serde(default)]
    pub delay_ms: Option<u32>,
    #[serde(default)]
    pub jitter_ms: Option<u32>,
    /// Repeat the fault this many times (each drawn anew), spread over the run.
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL, restarted when it ends.
    Kill,
    /// SIGSTOP, SIGCONT when it ends.
    Pause,
    /// A graceful leave (SIGTERM), rejoined when it ends.
    Leave,
    /// Kill and restart every node in turn (one at a time, `for` each).
    RollingRestart,
    /// The nodes split in two halves.
    PartitionHalves,
    /// One node cut off from all others.
    PartitionIsolate,
    /// One node's datagrams to the others dropped, theirs to it delivered.
    PartitionOneWay,
    /// Two halves that both reach one bridge node, but not each other.
    PartitionBridge,
    /// Datagrams between nodes dropped at random (iptables `statistic`).
    Loss,
    /// Every datagram a node sends delayed, with jitter (the transport's fault wrapper).
    Delay,
    /// Datagrams a node sends held back at random, so they arrive out of order.
    Reorder,
}

impl FaultKind {
    /// Whether the fault needs iptables (and so root).
    pub fn needs_root(self) -> bool {
        matches!(
            self,
            FaultKind::PartitionHalves
                | FaultKind::PartitionIsolate
                | FaultKind::PartitionOneWay
                | FaultKind::PartitionBridge
                | FaultKind::Loss
        )
    }

    /// Whether it splits the cluster (duplicate task runs inside it are fenced, not errors).
    pub fn is_partition(self) -> bool {
        self.needs_root()
    }

    /// Whether it stops the target from answering at all.
    pub fn silences(self) -> bool {
        matches!(
            self,
            FaultKind::Kill | FaultKind::Pause | FaultKind::Leave | FaultKind::RollingRestart
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Leave => "leave",
            FaultKind::RollingRestart => "rolling_restart",
            FaultKind::PartitionHalves => "partition_halves",
            FaultKind::PartitionIsolate => "partition_isolate",
            FaultKind::PartitionOneWay => "partition_one_way",
            FaultKind::PartitionBridge => "partition_bridge",
            FaultKind::Loss => "loss",
            FaultKind::Delay => "delay",
            FaultKind::Reorder => "reorder",
        }
    }
}

/// One fault placed on the timeline: what, to whom, when (from the start of the run).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Planned {
    pub kind: FaultKind,
    /// The nodes it acts on (1-based): the killed or paused one; a partition's first side.
    pub nodes: Vec<u32>,
    /// A partition's bridge node, when there is one.
    pub bridge: Option<u32>,
    #[serde(rename = "start_s", serialize_with = "secs")]
    pub start: Duration,
    #[serde(rename = "end_s", serialize_with = "secs")]
    pub end: Duration,
    pub rate: f64,
    pub delay_ms: u32,
    pub jitter_ms: u32,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Scenario {
    /// Read and check a scenario file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        Self::parse(&text)
    }

    /// Parse and check a scenario.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let s: Scenario = toml::from_str(text).map_err(|e| {
            let field = e
                .message()
                .split('`')
                .nth(1)
                .unwrap_or("scenario")
                .to_string();
            Error::scenario(field, e.to_string())
        })?;
        s.validate()?;
        Ok(s)
    }

    /// The checks of [`Scenario::load`] that need no file: also run again after `--nodes`.
    pub fn validate(&self) -> Result<(), Error> {
        if self.nodes < 2 || self.nodes > MAX_NODES {
            return Err(Error::scenario(
                "nodes",
                format!(
                    "{} nodes: between 2 and {MAX_NODES} (one 127.0.0.x address each)",
                    self.nodes
                ),
            ));
        }
        if self.duration.0 < Duration::from_secs(1) {
            return Err(Error::scenario("duration", "at least 1s"));
        }
        if self.converge_within.0.is_zero() {
            return Err(Error::scenario("converge_within", "must be more than 0s"));
        }
        if self.tasks_within.0.is_zero() {
            return Err(Error::scenario("tasks_within", "must be more than 0s"));
        }
        if !(0.0..=1.0).contains(&self.min_gateway_success) {
            return Err(Error::scenario("min_gateway_success", "between 0 and 1"));
        }
        if self.http_port == 0 || self.gossip_port == 0 || self.http_port == self.gossip_port {
            return Err(Error::scenario(
                "http_port",
                "the gateway and gossip ports must be set and differ",
            ));
        }
        let w = &self.workload;
        if w.clients == 0 || w.clients > 64 {
            return Err(Error::scenario("workload.clients", "between 1 and 64"));
        }
        if !(w.rate > 0.0 && w.rate <= 1000.0) {
            return Err(Error::scenario(
                "workload.rate",
                "operations per second per client, above 0 and at most 1000",
            ));
        }
        if w.keys == 0 {
            return Err(Error::scenario("workload.keys", "at least 1"));
        }
        if w.write + w.read + w.delete + w.subject_write + w.task + w.chat == 0 {
            return Err(Error::scenario("workload", "every weight is 0"));
        }
        if !(0.0..=1.0).contains(&w.duplicate) {
            return Err(Error::scenario("workload.duplicate", "between 0 and 1"));
        }
        for (i, f) in self.faults.iter().enumerate() {
            let field = |name: &str| format!("faults[{i}].{name}");
            if f.lasts.0.is_zero() {
                return Err(Error::scenario(field("for"), "must be more than 0s"));
            }
            if f.times == 0 {
                return Err(Error::scenario(field("times"), "at least 1"));
            }
            let span = f.lasts.0 * f.times;
            let span = match f.kind {
                FaultKind::RollingRestart => span * self.nodes,
                _ => span,
            };
            let from = f.at.map_or(Duration::ZERO, |a| a.0);
            if from + span > self.duration.0 {
                return Err(Error::scenario(
                    field("for"),
                    format!(
                        "the fault runs to {:?}, past the run's {} duration",
                        from + span,
                        self.duration
                    ),
                ));
            }
            if let Some(t) = f.target
                && (t == 0 || t > self.nodes)
            {
                return Err(Error::scenario(
                    field("target"),
                    format!("node {t}: nodes are numbered 1 to {}", self.nodes),
                ));
            }
            let rate_needed = matches!(f.kind, FaultKind::Loss | FaultKind::Reorder);
            match f.rate {
                Some(r) if !rate_needed => {
                    return Err(Error::scenario(
                        field("rate"),
                        format!("{r}: only loss and reorder take a rate"),
                    ));
                }
                Some(r) if !(r > 0.0 && r <= 1.0) => {
                    return Err(Error::scenario(field("rate"), "above 0 and at most 1"));
                }
                None if rate_needed => {
                    return Err(Error::scenario(field("rate"), "loss and reorder need one"));
                }
                _ => {}
            }
            if f.kind == FaultKind::Delay && f.delay_ms.unwrap_or(0) == 0 {
                return Err(Error::scenario(
                    field("delay_ms"),
                    "a delay needs delay_ms > 0",
                ));
            }
            if f.kind != FaultKind::Delay && (f.delay_ms.is_some() || f.jitter_ms.is_some()) {
                return Err(Error::scenario(field("delay_ms"), "only a delay takes one"));
            }
            if f.delay_ms.unwrap_or(0) > 10_000 || f.jitter_ms.unwrap_or(0) > 10_000 {
                return Err(Error::scenario(field("delay_ms"), "at most 10000"));
            }
            if f.kind == FaultKind::PartitionBridge && self.nodes < 3 {
                return Err(Error::scenario(
                    field("kind"),
                    "a bridge needs at least 3 nodes",
                ));
            }
        }
        Ok(())
    }

    /// Whether any fault needs root (iptables).
    pub fn needs_root(&self) -> bool {
        self.faults.iter().any(|f| f.kind.needs_root())
    }

    /// Drop the faults that need root, for a run that is not root; says which went.
    pub fn without_root_faults(&mut self) -> Vec<FaultKind> {
        let gone: Vec<FaultKind> = self
            .faults
            .iter()
            .filter(|f| f.kind.needs_root())
            .map(|f| f.kind)
            .collect();
        self.faults.retain(|f| !f.kind.needs_root());
        gone
    }

    /// The faults on the timeline, drawn from `seed`: the same seed, the same schedule.
    /// Times are counted from the start of the run (the warm-up included).
    pub fn schedule(&self, seed: u64) -> Vec<Planned> {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = self.nodes;
        let warm = self.warmup.0;
        let mut out = Vec::new();
        for f in &self.faults {
            let each = f.lasts.0;
            let rolling = f.kind == FaultKind::RollingRestart;
            let span_one = if rolling { each * n } else { each };
            let room = self.duration.0.saturating_sub(span_one * f.times);
            for t in 0..f.times {
                let start = match f.at {
                    // A fixed start: repeats follow one another.
                    Some(at) => at.0 + span_one * t,
                    // A drawn start within this repeat's share of the run.
                    None => {
                        let share = room / f.times;
                        let jitter = if share.is_zero() {
                            Duration::ZERO
                        } else {
                            Duration::from_millis(rng.random_range(0..share.as_millis() as u64))
                        };
                        share * t + span_one * t + jitter
                    }
                };
                let target = f.target.unwrap_or_else(|| rng.random_range(1..=n));
                let base = Planned {
                    kind: f.kind,
                    nodes: vec![target],
                    bridge: None,
                    start: warm + start,
                    end: warm + start + each,
                    rate: f.rate.unwrap_or(0.0),
                    delay_ms: f.delay_ms.unwrap_or(0),
                    jitter_ms: f.jitter_ms.unwrap_or(0),
                };
                match f.kind {
                    FaultKind::RollingRestart => {
                        for (k, node) in (1..=n).enumerate() {
                            let s = base.start + each * k as u32;
                            out.push(Planned {
                                kind: FaultKind::Kill,
                                nodes: vec![node],
                                start: s,
                                end: s + each,
                                ..base.clone()
                            });
                        }
                    }
                    FaultKind::PartitionHalves => {
                        let mut all: Vec<u32> = (1..=n).collect();
                        shuffle(&mut rng, &mut all);
                        all.truncate((n / 2) as usize);
                        all.sort_unstable();
                        out.push(Planned { nodes: all, ..base });
                    }
                    FaultKind::PartitionBridge => {
                        let mut others: Vec<u32> = (1..=n).filter(|&k| k != target).collect();
                        shuffle(&mut rng, &mut others);
                        others.truncate(others.len() / 2);
                        others.sort_unstable();
                        out.push(Planned {
                            nodes: others,
                            bridge: Some(target),
                            ..base
                        });
                    }
                    _ => out.push(base),
                }
            }
        }
        out.sort_by_key(|p| p.start);
        out
    }

    /// When the last fault has ended (and the run heals).
    pub fn end(&self) -> Duration {
        self.warmup.0 + self.duration.0
    }
}

fn shuffle(rng: &mut StdRng, v: &mut [u32]) {
    for i in (1..v.len()).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const BASE: &str = r#"
name = "t"
nodes = 3
duration = "30s"
"#;

    fn with(extra: &str) -> Result<Scenario, Error> {
        Scenario::parse(&format!("{BASE}{extra}"))
    }

    fn field_of(e: Error) -> String {
        match e {
            Error::Scenario { field, .. } => field,
            other => panic!("not a scenario error: {other}"),
        }
    }

    #[test]
    fn the_shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("scenarios folder") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "toml") {
                Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(
            n >= 6,
            "kill-restart, partition-heal, flaky-network, pause, rolling-restart, smoke"
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        assert_eq!(field_of(with("speed = 3\n").expect_err("unknown")), "speed");
        let e = with("[[faults]]\nkind = \"kill\"\nfor = \"5s\"\nvictim = 2\n").expect_err("x");
        assert_eq!(field_of(e), "victim");
        let e = with("[[faults]]\nkind = \"meteor\"\nfor = \"5s\"\n").expect_err("x");
        assert_eq!(field_of(e), "meteor");
    }

    #[test]
    fn impossible_timings_and_counts_are_refused() {
        let e = with("[[faults]]\nkind = \"kill\"\nat = \"28s\"\nfor = \"5s\"\n").expect_err("x");
        assert_eq!(field_of(e), "faults[0].for");
        let e = with("[[faults]]\nkind = \"kill\"\nfor = \"0s\"\n").expect_err("x");
        assert_eq!(field_of(e), "faults[0].for");
        let e = with("[[faults]]\nkind = \"rolling_restart\"\nfor = \"11s\"\n").expect_err("x");
        assert_eq!(field_of(e), "faults[0].for");
        let e = with("[[faults]]\nkind = \"kill\"\nfor = \"5s\"\ntarget = 4\n").expect_err("x");
        assert_eq!(field_of(e), "faults[0].target");
        let e = with("[[faults]]\nkind = \"loss\"\nfor = \"5s\"\n").expect_err("x");
        assert_eq!(field_of(e), "faults[0].rate");
        let e = with("[[faults]]\nkind = \"kill\"\nfor = \"5s\"\nrate = 0.5\n").expect_err("x");
        assert_eq!(field_of(e), "faults[0].rate");
        let e = with("[[faults]]\nkind = \"delay\"\nfor = \"5s\"\n").expect_err("x");
        assert_eq!(field_of(e), "faults[0].delay_ms");
        let e = Scenario::parse("name = \"t\"\nnodes = 12\nduration = \"30s\"\n").expect_err("x");
        assert_eq!(field_of(e), "nodes");
        let e = with("converge_within = \"0s\"\n").expect_err("x");
        assert_eq!(field_of(e), "converge_within");
        let e = with("[workload]\nclients = 0\n").expect_err("x");
        assert_eq!(field_of(e), "workload.clients");
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let s = with(
            "[[faults]]\nkind = \"kill\"\nfor = \"3s\"\ntimes = 3\n\
             [[faults]]\nkind = \"partition_halves\"\nfor = \"4s\"\n",
        )
        .expect("parse");
        let a = s.schedule(7);
        assert_eq!(a, s.schedule(7));
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|p| p.end <= s.end() && p.start >= s.warmup.0));
        let kills: Vec<_> = a.iter().filter(|p| p.kind == FaultKind::Kill).collect();
        for w in kills.windows(2) {
            assert!(
                w[0].end <= w[1].start,
                "repeats of one fault do not overlap"
            );
        }
        let other: Vec<_> = (0..20).map(|seed| s.schedule(seed)).collect();
        let targets: BTreeSet<u32> = other
            .iter()
            .flat_map(|o| o.iter().map(|p| p.nodes[0]))
            .collect();
        assert_eq!(targets.len(), 3, "every node is drawn for some seed");
        assert!(
            other.iter().any(|o| *o != a),
            "the seed changes the schedule"
        );
    }

    #[test]
    fn a_rolling_restart_takes_every_node_in_turn() {
        let s = with("[[faults]]\nkind = \"rolling_restart\"\nat = \"0s\"\nfor = \"5s\"\n")
            .expect("parse");
        let p = s.schedule(1);
        let nodes: Vec<u32> = p.iter().map(|f| f.nodes[0]).collect();
        assert_eq!(nodes, vec![1, 2, 3]);
        assert!(p.windows(2).all(|w| w[0].end <= w[1].start));
    }

    #[test]
    fn root_faults_can_be_set_aside() {
        let mut s = with(
            "[[faults]]\nkind = \"loss\"\nrate = 0.1\nfor = \"3s\"\n\
             [[faults]]\nkind = \"kill\"\nfor = \"3s\"\n",
        )
        .expect("parse");
        assert!(s.needs_root());
        assert_eq!(s.without_root_faults(), vec![FaultKind::Loss]);
        assert!(!s.needs_root());
        assert_eq!(s.faults.len(), 1);
    }
}
