//! The invariants, checked on the settled cluster against the history. The same promises the
//! chaos runner checks against real nodes:
//!
//! 1. **membership converged**: every node sees every other as alive (no killed one lingers).
//! 2. **replicas identical**: every namespace has the same digest on every node, and every node
//!    has the same destroyed subjects.
//! 3. **acked write lost**: every acknowledged write, or a later one, is held by every node.
//! 4. **wrong value**: every key reads, on every node, what its last write (by version) says:
//!    the value written, or nothing after a delete or the erasure of the value's subject.
//! 5. **erased readable**: no value of an erased subject can be read anywhere.
//! 6. **task lost**: every acknowledged submission's task is in every replica.
//! 7. **task stuck**: every task ended (completed, failed, cancelled) or waits in the dead
//!    letters; no dispatcher still holds one; a completed task has every stage's result.
//! 8. **stage recorded twice**: a stage's result was written more than once outside a
//!    partition (its aftermath, or gossip wrongly declaring a member down, count as inside).
//! 9. **ran twice**: a task held by two dispatchers, or two tasks of one hash active, at once,
//!    outside a partition; two tasks of a hash are also excused when they come from
//!    replication lag (the owner that accepted the later one did not hold the earlier one in
//!    its replica yet), never from the submission fallback (every sender that cannot reach
//!    an owner routes to the same next choice). Excused cases are counted in the outcome.
//! 10. **fencing**: a stage result recorded under another epoch than the one it ran under.

use std::collections::{BTreeMap, BTreeSet};

use swarm_actors::tasks::{StageRecord, TaskRecord, TaskStatus};
use swarm_membership::MemberState;
use swarm_storage::Version;

use super::faults::{NOTES, PEOPLE};
use super::history::{History, Write, secs};
use super::node::name;
use super::swarm::stage_names;
use super::world::{World, destroyed, digests};

/// What a key holds on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyState {
    /// The stored version, tombstones included (`None`: no record).
    pub(crate) version: Option<Version>,
    /// What a read returns.
    pub(crate) readable: Option<String>,
}

/// The final state of one node, as the checks read it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct NodeView {
    pub(crate) node: u32,
    pub(crate) up: bool,
    /// The state it gives every other node.
    pub(crate) sees: Vec<(u32, Option<MemberState>)>,
    pub(crate) digests: BTreeMap<String, (u64, u64)>,
    pub(crate) destroyed: Vec<String>,
    /// Every key the workload wrote.
    pub(crate) keys: BTreeMap<(String, String), KeyState>,
    /// Readable values with a subject: (namespace, key, subject).
    pub(crate) subject_values: Vec<(String, String, String)>,
    pub(crate) tasks: BTreeMap<String, TaskRecord>,
    /// Stage results readable: (task, index).
    pub(crate) stages: BTreeSet<(String, u32)>,
    /// Tasks its dispatcher holds pending or in progress.
    pub(crate) holding: Vec<String>,
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    pub(crate) invariant: &'static str,
    pub(crate) detail: String,
    /// When it happened (µs), where the history knows.
    pub(crate) at_us: Option<u64>,
}

fn violation(invariant: &'static str, detail: String, at_us: Option<u64>) -> Violation {
    Violation {
        invariant,
        detail,
        at_us,
    }
}

impl World {
    /// Read the final state of every node.
    pub(crate) fn snapshot(&self) -> Vec<NodeView> {
        let n = self.nodes.len() as u32;
        let keys: BTreeSet<(String, String)> = self
            .ctx
            .history
            .writes
            .iter()
            .map(|w| (w.ns.clone(), w.key.clone()))
            .collect();
        let mut out = Vec::new();
        for node in &self.nodes {
            let mut v = NodeView {
                node: node.id,
                ..NodeView::default()
            };
            let Some(p) = &node.proc else {
                out.push(v);
                continue;
            };
            v.up = true;
            let now = self.ctx.now_ms(node.id);
            let store = &p.storage().memory;
            v.sees = (0..n)
                .filter(|j| *j != node.id)
                .map(|j| (j, self.ctx.gossip.state_seen(node.id, j)))
                .collect();
            v.digests = digests(p.storage());
            v.destroyed = destroyed(p.storage());
            for (ns, key) in &keys {
                let readable = store.get(ns, key, now).ok().flatten().map(|i| i.value_json);
                let state = KeyState {
                    version: p.version(ns, key),
                    readable,
                };
                v.keys.insert((ns.clone(), key.clone()), state);
            }
            for ns in [NOTES.0, PEOPLE.0] {
                for item in store.list(ns, "", None, 100_000, now).unwrap_or_default() {
                    if let Some(s) = item.subject {
                        v.subject_values.push((ns.to_string(), item.key, s));
                    }
                }
            }
            for t in p.scan_tasks(&self.ctx).iter().cloned() {
                for (i, st) in stage_names(&t.workflow).into_iter().enumerate() {
                    if p.read::<StageRecord>(&self.ctx, &StageRecord::key(&t.id, st))
                        .is_some()
                    {
                        v.stages.insert((t.id.clone(), i as u32));
                    }
                }
                v.tasks.insert(t.id.clone(), t);
            }
            v.holding = p.holding().into_iter().map(|(t, _)| t).collect();
            out.push(v);
        }
        out
    }
}

/// Every invariant over the final state `nodes` and the history `h`; the violations, in the
/// order of the list in the module doc.
pub(crate) fn check(h: &History, nodes: &[NodeView]) -> Vec<Violation> {
    let mut out = Vec::new();
    membership(nodes, &mut out);
    replicas(nodes, &mut out);
    memory(h, nodes, &mut out);
    tasks(h, nodes, &mut out);
    twice(h, &mut out);
    for f in &h.fencing {
        out.push(violation("fencing", f.clone(), None));
    }
    out
}

fn membership(nodes: &[NodeView], out: &mut Vec<Violation>) {
    for v in nodes {
        if !v.up {
            out.push(violation(
                "membership converged",
                format!("{} never came back up", name(v.node)),
                None,
            ));
            continue;
        }
        for (j, state) in &v.sees {
            if *state != Some(MemberState::Alive) {
                out.push(violation(
                    "membership converged",
                    format!("{} sees {} as {state:?}", name(v.node), name(*j)),
                    None,
                ));
            }
        }
    }
}

fn replicas(nodes: &[NodeView], out: &mut Vec<Violation>) {
    let mut up = nodes.iter().filter(|v| v.up);
    let Some(first) = up.next() else {
        return;
    };
    for v in up {
        let all: BTreeSet<&String> = first.digests.keys().chain(v.digests.keys()).collect();
        for ns in all {
            let (a, b) = (first.digests.get(ns), v.digests.get(ns));
            if a != b {
                out.push(violation(
                    "replicas identical",
                    format!(
                        "namespace {ns}: {} has (root, count) {a:?}, {} has {b:?}",
                        name(first.node),
                        name(v.node)
                    ),
                    None,
                ));
            }
        }
        if first.destroyed != v.destroyed {
            out.push(violation(
                "replicas identical",
                format!(
                    "destroyed subjects: {} has {:?}, {} has {:?}",
                    name(first.node),
                    first.destroyed,
                    name(v.node),
                    v.destroyed
                ),
                None,
            ));
        }
    }
}

fn describe(w: &Write) -> String {
    let what = match &w.value {
        Some(v) => format!("put {}/{} = {v}", w.ns, w.key),
        None => format!("delete {}/{}", w.ns, w.key),
    };
    let subject = w
        .subject
        .as_ref()
        .map(|s| format!(" (subject {s})"))
        .unwrap_or_default();
    format!(
        "op {} {what}{subject} on {} at {}, version {}@{}",
        w.op,
        name(w.node),
        secs(w.at_us),
        w.version.hlc.0,
        w.version.origin
    )
}

fn memory(h: &History, nodes: &[NodeView], out: &mut Vec<Violation>) {
    let erased: BTreeSet<&str> = h.erasures.iter().map(|e| e.subject.as_str()).collect();
    // The last write of every key, by version: what every replica must read.
    let mut last: BTreeMap<(&str, &str), &Write> = BTreeMap::new();
    for w in &h.writes {
        let k = (w.ns.as_str(), w.key.as_str());
        if last.get(&k).is_none_or(|l| l.version < w.version) {
            last.insert(k, w);
        }
    }
    for v in nodes.iter().filter(|v| v.up) {
        for w in h.writes.iter().filter(|w| w.acked == Some(true)) {
            let held = v
                .keys
                .get(&(w.ns.clone(), w.key.clone()))
                .and_then(|k| k.version.clone());
            if held.as_ref().is_none_or(|held| *held < w.version) {
                let held = held
                    .map(|v| format!("version {}@{}", v.hlc.0, v.origin))
                    .unwrap_or_else(|| "nothing".into());
                out.push(violation(
                    "acked write lost",
                    format!("{}; {} holds {held}", describe(w), name(v.node)),
                    Some(w.at_us),
                ));
            }
        }
        for ((ns, key), w) in &last {
            let expected = match (&w.value, &w.subject) {
                (Some(_), Some(s)) if erased.contains(s.as_str()) => None,
                (value, _) => value.clone(),
            };
            let got = v
                .keys
                .get(&(ns.to_string(), key.to_string()))
                .and_then(|k| k.readable.clone());
            if got != expected {
                out.push(violation(
                    "wrong value",
                    format!(
                        "{} reads {got:?} at {ns}/{key}; the last write is {}",
                        name(v.node),
                        describe(w)
                    ),
                    Some(w.at_us),
                ));
            }
        }
        for (ns, key, subject) in &v.subject_values {
            if erased.contains(subject.as_str()) {
                let when = h.erasures.iter().find(|e| e.subject == *subject);
                out.push(violation(
                    "erased readable",
                    format!(
                        "{} reads {ns}/{key} of {subject}, erased on {}",
                        name(v.node),
                        when.map(|e| format!("{} at {}", name(e.node), secs(e.at_us)))
                            .unwrap_or_default()
                    ),
                    when.map(|e| e.at_us),
                ));
            }
        }
    }
}

fn tasks(h: &History, nodes: &[NodeView], out: &mut Vec<Violation>) {
    for v in nodes.iter().filter(|v| v.up) {
        for s in &h.submissions {
            let Some(task) = s.created() else { continue };
            if !v.tasks.contains_key(task) {
                out.push(violation(
                    "task lost",
                    format!(
                        "{task} ({}) submitted on {} at {} and acknowledged is not in the replica of {}",
                        s.objective,
                        name(s.node),
                        secs(s.at_us),
                        name(v.node)
                    ),
                    Some(s.at_us),
                ));
            }
        }
        for t in v.tasks.values() {
            if t.status.is_active() {
                out.push(violation(
                    "task stuck",
                    format!(
                        "{} is {} at stage {}/{} (owner {}, epoch {}) in the replica of {}",
                        t.id,
                        t.status.as_str(),
                        t.stage,
                        t.stages_total,
                        t.owner,
                        t.epoch,
                        name(v.node)
                    ),
                    None,
                ));
            }
            if t.status == TaskStatus::Completed {
                let missing: Vec<u32> = (0..t.stages_total)
                    .filter(|i| !v.stages.contains(&(t.id.clone(), *i)))
                    .collect();
                if !missing.is_empty() || t.stage != t.stages_total {
                    out.push(violation(
                        "task stuck",
                        format!(
                            "{} is completed at stage {}/{} without the results of stages {missing:?} on {}",
                            t.id,
                            t.stage,
                            t.stages_total,
                            name(v.node)
                        ),
                        None,
                    ));
                }
            }
        }
        for t in &v.holding {
            out.push(violation(
                "task stuck",
                format!("{} still holds {t} as unfinished", name(v.node)),
                None,
            ));
        }
    }
}

fn twice(h: &History, out: &mut Vec<Violation>) {
    let mut writes: BTreeMap<(&str, u32), Vec<&super::history::StageWrite>> = BTreeMap::new();
    for w in &h.stage_writes {
        writes
            .entry((w.task.as_str(), w.index))
            .or_default()
            .push(w);
    }
    for ((task, index), ws) in writes {
        // Every write after the first must be excused: inside a partition, of a task that was
        // held twice inside one, or made when no live node held an earlier result (its only
        // copies were lost with the nodes that wrote them, never acknowledged by a peer).
        let excused = h.excused_tasks.contains(task)
            || ws[1..]
                .iter()
                .all(|w| w.disturbed || w.earlier_on_a_live_node != Some(true));
        if ws.len() < 2 || excused {
            continue;
        }
        let who: Vec<String> = ws
            .iter()
            .map(|w| format!("{} at epoch {} at {}", name(w.node), w.epoch, secs(w.at_us)))
            .collect();
        out.push(violation(
            "stage recorded twice",
            format!("{task} stage {index}: {}", who.join("; ")),
            ws.get(1).map(|w| w.at_us),
        ));
    }
    for t in h.twice.iter().filter(|t| !t.excused) {
        out.push(violation(
            "ran twice",
            format!("{} at {}", t.what, secs(t.at_us)),
            Some(t.at_us),
        ));
    }
}

#[cfg(test)]
mod tests {
    use swarm_storage::Hlc;

    use super::*;
    use crate::sim::history::{Erasure, StageWrite};

    fn version(hlc: u64, origin: &str) -> Version {
        Version {
            hlc: Hlc(hlc),
            origin: origin.into(),
        }
    }

    fn write(op: u64, key: &str, value: Option<&str>, hlc: u64, acked: bool) -> Write {
        Write {
            op,
            node: 0,
            ns: "notes".into(),
            key: key.into(),
            value: value.map(String::from),
            subject: None,
            version: version(hlc, "n0"),
            at_us: op * 1000,
            acked: Some(acked),
        }
    }

    /// Two nodes that agree and hold `k` at version 20 with `v2`.
    fn settled() -> Vec<NodeView> {
        (0..2)
            .map(|i| {
                let mut v = NodeView {
                    node: i,
                    up: true,
                    sees: vec![(1 - i, Some(MemberState::Alive))],
                    ..NodeView::default()
                };
                v.digests.insert("notes".into(), (7, 1));
                v.keys.insert(
                    ("notes".into(), "k".into()),
                    KeyState {
                        version: Some(version(20, "n0")),
                        readable: Some("v2".into()),
                    },
                );
                v
            })
            .collect()
    }

    fn history() -> History {
        let mut h = History::default();
        h.writes.push(write(1, "k", Some("v1"), 10, true));
        h.writes.push(write(2, "k", Some("v2"), 20, false));
        h
    }

    fn invariants(v: &[Violation]) -> Vec<&'static str> {
        v.iter().map(|v| v.invariant).collect()
    }

    #[test]
    fn a_settled_cluster_that_kept_its_promises_passes() {
        assert_eq!(check(&history(), &settled()), Vec::new());
    }

    #[test]
    fn a_replica_without_an_acknowledged_write_is_caught() {
        let mut nodes = settled();
        nodes[1].keys.insert(
            ("notes".into(), "k".into()),
            KeyState {
                version: Some(version(5, "n1")),
                readable: Some("v0".into()),
            },
        );
        nodes[1].digests.insert("notes".into(), (8, 1));
        let found = invariants(&check(&history(), &nodes));
        assert!(found.contains(&"acked write lost"), "{found:?}");
        assert!(found.contains(&"wrong value"), "{found:?}");
        assert!(found.contains(&"replicas identical"), "{found:?}");
    }

    #[test]
    fn an_erased_subjects_value_must_not_be_readable() {
        let mut h = history();
        h.erasures.push(Erasure {
            subject: "carol".into(),
            node: 0,
            at_us: 5,
        });
        let mut nodes = settled();
        nodes[0]
            .subject_values
            .push(("people".into(), "p1".into(), "carol".into()));
        assert_eq!(invariants(&check(&h, &nodes)), ["erased readable"]);
    }

    #[test]
    fn a_stage_written_twice_is_excused_only_inside_a_partition_or_when_its_copy_was_lost() {
        let mut h = history();
        for (node, epoch) in [(0, 1), (1, 2)] {
            h.stage_writes.push(StageWrite {
                task: "t1".into(),
                index: 0,
                stage: "specification".into(),
                epoch,
                node,
                at_us: epoch * 1000,
                disturbed: false,
                earlier_on_a_live_node: (epoch > 1).then_some(false),
            });
        }
        // The first result's only copy was gone: run again, at least once.
        assert_eq!(check(&h, &settled()), Vec::new());
        h.stage_writes[1].earlier_on_a_live_node = Some(true);
        assert_eq!(invariants(&check(&h, &settled())), ["stage recorded twice"]);
        h.twice(
            "task t1".into(),
            "task t1 held by n0, n1".into(),
            vec!["t1".into()],
            500,
            true,
        );
        assert_eq!(check(&h, &settled()), Vec::new());
        h.twice(
            "hash x".into(),
            "hash x active as t2, t3".into(),
            vec!["t2".into(), "t3".into()],
            900,
            false,
        );
        assert_eq!(invariants(&check(&h, &settled())), ["ran twice"]);
    }

    #[test]
    fn membership_and_unfinished_tasks_are_caught() {
        let mut nodes = settled();
        nodes[0].sees = vec![(1, Some(MemberState::Down))];
        nodes[1].holding.push("t9".into());
        let found = invariants(&check(&history(), &nodes));
        assert_eq!(found, ["membership converged", "task stuck"]);
    }
}
