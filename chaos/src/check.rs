//! The checks: the history against what the nodes hold after the heal. Each check is a pure
//! function of its inputs (unit-tested with crafted histories) and names the operations that
//! broke it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::{Op, OpKind, Version};
use crate::scenario::Planned;

/// One check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was checked, in numbers.
    pub summary: String,
    /// What broke it: op ids, keys, nodes (at most 50 listed).
    pub violations: Vec<String>,
}

impl Check {
    pub(crate) fn new(name: &'static str, summary: String, mut violations: Vec<String>) -> Self {
        let n = violations.len();
        violations.truncate(50);
        if n > 50 {
            violations.push(format!("... and {} more", n - 50));
        }
        Self {
            name,
            ok: n == 0,
            summary,
            violations,
        }
    }

    /// A check that could not be made (the nodes did not answer): failed, with the reason.
    pub fn failed(name: &'static str, why: String) -> Self {
        Self {
            name,
            ok: false,
            summary: why,
            violations: Vec::new(),
        }
    }
}

/// A node's replica of the run's namespace after the heal: key → version.
pub type Replica = BTreeMap<String, Version>;

/// No acknowledged write lost: for every key of the plain and subject writes (subjects not
/// erased), every live node holds the newest acknowledged version or a later one. A key
/// deleted with acknowledgement must be gone everywhere.
pub fn no_acked_write_lost(
    ops: &[Op],
    replicas: &BTreeMap<u32, Replica>,
    erased: &BTreeSet<String>,
) -> Check {
    let mut newest: BTreeMap<&str, (&Version, u64)> = BTreeMap::new();
    let mut deleted: BTreeMap<&str, u64> = BTreeMap::new();
    let mut subject_of: BTreeMap<&str, bool> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.acked()) {
        match op.kind {
            OpKind::Write | OpKind::SubjectWrite => {
                if op.kind == OpKind::SubjectWrite {
                    subject_of.insert(&op.key, erased.contains(&subject_key_owner(&op.key)));
                }
                if let Some(v) = &op.version {
                    let e = newest.entry(&op.key).or_insert((v, op.id));
                    if v > e.0 {
                        *e = (v, op.id);
                    }
                }
            }
            OpKind::Delete => {
                deleted.insert(&op.key, op.id);
            }
            _ => {}
        }
    }
    let mut bad = Vec::new();
    let mut checked = 0;
    for (key, (version, id)) in &newest {
        if deleted.contains_key(key) || subject_of.get(key).copied().unwrap_or(false) {
            continue;
        }
        checked += 1;
        for (node, rep) in replicas {
            match rep.get(*key) {
                Some(v) if v >= *version => {}
                Some(v) => bad.push(format!(
                    "op {id}: {key} acked at {}@{}, node-{node} holds the older {}@{}",
                    version.hlc, version.origin, v.hlc, v.origin
                )),
                None => bad.push(format!(
                    "op {id}: {key} acked at {}@{}, missing on node-{node}",
                    version.hlc, version.origin
                )),
            }
        }
    }
    for (key, id) in &deleted {
        for (node, rep) in replicas {
            if rep.contains_key(*key) {
                bad.push(format!(
                    "op {id}: {key} deleted with ack, still on node-{node}"
                ));
            }
        }
    }
    Check::new(
        "no_acked_write_lost",
        format!(
            "{checked} keys with acknowledged writes and {} acknowledged deletes on {} nodes",
            deleted.len(),
            replicas.len()
        ),
        bad,
    )
}

/// The subject a subject write's key belongs to: `s{client}-{n}-{i}` → `subject-{client}-{n}`.
pub fn subject_key_owner(key: &str) -> String {
    let rest = key.strip_prefix('s').unwrap_or(key);
    let mut parts = rest.split('-');
    match (parts.next(), parts.next()) {
        (Some(c), Some(n)) => format!("subject-{c}-{n}"),
        _ => String::new(),
    }
}

/// Replicas identical: every node holds the same keys at the same versions.
pub fn replicas_identical(replicas: &BTreeMap<u32, Replica>) -> Check {
    let mut bad = Vec::new();
    let mut first: Option<(&u32, &Replica)> = None;
    for (node, rep) in replicas {
        match first {
            None => first = Some((node, rep)),
            Some((n0, r0)) => {
                for (k, v) in r0 {
                    if rep.get(k) != Some(v) {
                        bad.push(format!(
                            "{k}: node-{n0} {}@{}, node-{node} {}",
                            v.hlc,
                            v.origin,
                            rep.get(k).map_or("missing".to_string(), |w| format!(
                                "{}@{}",
                                w.hlc, w.origin
                            ))
                        ));
                    }
                }
                for k in rep.keys().filter(|k| !r0.contains_key(*k)) {
                    bad.push(format!("{k}: on node-{node}, missing on node-{n0}"));
                }
            }
        }
    }
    let keys = first.map_or(0, |(_, r)| r.len());
    Check::new(
        "replicas_identical",
        format!("{keys} keys on {} nodes", replicas.len()),
        bad,
    )
}

/// No erased value readable: `reads` are (node, key, status, value) of every key ever written
/// under an erased subject, read from every live node after the heal.
pub fn nothing_erased_readable(reads: &[(u32, String, Option<u16>, Option<String>)]) -> Check {
    let bad = reads
        .iter()
        .filter(|(_, _, status, _)| *status == Some(200))
        .map(|(node, key, _, value)| {
            format!(
                "{key} readable on node-{node} after its subject was erased: {}",
                value.as_deref().unwrap_or("")
            )
        })
        .collect();
    Check::new(
        "nothing_erased_readable",
        format!("{} reads of erased subjects' keys", reads.len()),
        bad,
    )
}

/// A restarted node's first reads, made as soon as it answered: each saw the newest version
/// acknowledged anywhere before it began serving, or a later one.
#[derive(Debug, Clone, Serialize)]
pub struct RestartRead {
    pub node: u32,
    /// When the node answered `/health` again (ms from the start of the run).
    pub serving_ms: u64,
    pub key: String,
    pub seen: Option<Version>,
    pub status: Option<u16>,
}

pub fn no_stale_read_after_restart(ops: &[Op], reads: &[RestartRead]) -> Check {
    let mut bad = Vec::new();
    for r in reads {
        let newest = ops
            .iter()
            .filter(|o| o.acked() && o.kind == OpKind::Write && o.key == r.key)
            .filter(|o| o.end_ms < r.serving_ms)
            .filter_map(|o| o.version.as_ref().map(|v| (v, o.id)))
            .max();
        let Some((want, id)) = newest else {
            continue;
        };
        match (&r.seen, r.status) {
            (Some(v), _) if v >= want => {}
            (seen, status) => bad.push(format!(
                "node-{} restarted at {} ms read {} as {} (status {status:?}); op {id} acked {}@{} before",
                r.node,
                r.serving_ms,
                r.key,
                seen.as_ref()
                    .map_or("missing".to_string(), |v| format!("{}@{}", v.hlc, v.origin)),
                want.hlc,
                want.origin
            )),
        }
    }
    Check::new(
        "no_stale_read_after_restart",
        format!("{} first reads of restarted nodes", reads.len()),
        bad,
    )
}

/// One time a node recorded a stage's result (an `ok` audit entry of `tasks.record`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recording {
    /// The owner's epoch that recorded it.
    pub epoch: u64,
    pub node: String,
    pub agent: String,
    pub ts_ms: u64,
}

impl std::fmt::Display for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epoch {} on {} by {} at {}",
            self.epoch, self.node, self.agent, self.ts_ms
        )
    }
}

/// What the checks learned about one acknowledged task after the heal.
#[derive(Debug, Clone, Serialize)]
pub struct TaskEnd {
    pub task: String,
    pub objective: String,
    pub status: String,
    /// Each stage with every time a node recorded it.
    pub stages: BTreeMap<String, Vec<Recording>>,
    /// Each stage's result as the cluster holds it after the heal: the epoch that wrote it.
    pub final_epochs: BTreeMap<String, u64>,
    pub stages_total: u32,
    pub created_ms: u64,
    /// When it finished, in the run's clock (approximate: from the node's timestamps).
    pub finished_ms: Option<u64>,
}

/// A stage's recordings against its final result: `Err` when one epoch recorded it twice, or
/// when the result kept is not the newest epoch's (a superseded owner's result won); else how
/// many superseded recordings were fenced (an owner cut off, then adopted: both ran the stage,
/// the newer epoch's result stands).
fn stage_verdict(records: &[Recording], kept: Option<u64>) -> Result<usize, String> {
    let mut epochs: Vec<u64> = records.iter().map(|r| r.epoch).collect();
    epochs.sort_unstable();
    if let Some(w) = epochs.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("epoch {} recorded it twice", w[0]));
    }
    let newest = epochs.last().copied();
    if records.len() > 1 && kept != newest {
        return Err(format!(
            "the result kept is epoch {kept:?}'s, not the newest epoch {newest:?}'s"
        ));
    }
    Ok(records.len().saturating_sub(1))
}

/// Tasks: every acknowledged task completed (none lost, none stuck), no stage recorded twice,
/// and two accepted twins of one objective did not both run, unless a partition was on.
pub fn tasks(
    ops: &[Op],
    ends: &BTreeMap<String, TaskEnd>,
    faults: &[Planned],
) -> (Check, Check, Check, u32, usize) {
    let accepted: Vec<&Op> = ops
        .iter()
        .filter(|o| o.kind == OpKind::Task && o.acked() && !o.deduplicated)
        .collect();
    let mut lost = Vec::new();
    let mut twice = Vec::new();
    let mut completed = 0;
    let mut superseded = 0;
    for op in &accepted {
        let Some(id) = &op.task else { continue };
        match ends.get(id) {
            None => lost.push(format!(
                "op {}: task {id} accepted, unknown after the heal",
                op.id
            )),
            Some(t) if t.status != "completed" => lost.push(format!(
                "op {}: task {id} is {} after the heal",
                op.id, t.status
            )),
            Some(t) => {
                completed += 1;
                if t.stages.len() as u32 != t.stages_total {
                    lost.push(format!(
                        "op {}: task {id} completed with {} of {} stages recorded",
                        op.id,
                        t.stages.len(),
                        t.stages_total
                    ));
                }
                for (stage, records) in &t.stages {
                    match stage_verdict(records, t.final_epochs.get(stage).copied()) {
                        Ok(n) => superseded += n,
                        Err(why) => {
                            let all: Vec<String> = records.iter().map(|r| r.to_string()).collect();
                            twice.push(format!(
                                "task {id}: stage {stage}: {why} ({})",
                                all.join("; ")
                            ));
                        }
                    }
                }
            }
        }
    }
    // Twins: two accepted (not deduplicated) tasks of one objective whose lives overlapped.
    let mut by_objective: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &accepted {
        by_objective.entry(&op.key).or_default().push(op);
    }
    let mut dup = Vec::new();
    let mut fenced = 0;
    for (objective, twins) in by_objective {
        for pair in twins.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let end = |op: &Op| op.task.as_ref().and_then(|id| ends.get(id));
            let a_end = end(a).and_then(|t| t.finished_ms).unwrap_or(u64::MAX);
            // The second was accepted when its record was made (it may have been sent before
            // the first finished, and read after).
            let b_accepted = end(b).map_or(b.start_ms, |t| t.created_ms.max(b.start_ms));
            if b_accepted >= a_end {
                continue; // the first had finished: a new task, rightly
            }
            let in_partition = a.in_partition
                || b.in_partition
                || faults.iter().any(|f| {
                    f.kind.is_partition()
                        && (f.start.as_millis() as u64) <= b.end_ms
                        && (f.end.as_millis() as u64 + 10_000) >= a.start_ms
                });
            if in_partition {
                fenced += 1;
            } else {
                dup.push(format!(
                    "ops {} and {}: `{objective}` accepted twice while the first was active",
                    a.id, b.id
                ));
            }
        }
    }
    (
        Check::new(
            "tasks_none_lost",
            format!("{} tasks accepted, {completed} completed", accepted.len()),
            lost,
        ),
        Check::new(
            "tasks_no_stage_twice",
            format!(
                "{completed} completed tasks' stages; {superseded} results of superseded epochs fenced"
            ),
            twice,
        ),
        Check::new(
            "tasks_no_duplicate_run",
            format!("{fenced} twins accepted inside a partition (fenced)"),
            dup,
        ),
        fenced,
        superseded,
    )
}

/// Gateway success on live nodes during faults: the share of requests, to nodes that were up
/// and started while a fault was on, that were served ([`Op::served`]).
pub fn gateway_success(ops: &[Op], faults: &[Planned], min: f64) -> (Check, f64) {
    let during: Vec<&Op> = ops
        .iter()
        .filter(|o| o.node_live)
        .filter(|o| {
            faults.iter().any(|f| {
                (f.start.as_millis() as u64) <= o.start_ms && o.start_ms < f.end.as_millis() as u64
            })
        })
        .collect();
    let served = during.iter().filter(|o| o.served()).count();
    let share = if during.is_empty() {
        1.0
    } else {
        served as f64 / during.len() as f64
    };
    let bad = if share >= min {
        Vec::new()
    } else {
        during
            .iter()
            .filter(|o| !o.served())
            .map(|o| {
                format!(
                    "op {} to node-{} at {} ms: {}",
                    o.id, o.node, o.start_ms, o.code
                )
            })
            .collect()
    };
    (
        Check::new(
            "gateway_success",
            format!(
                "{served} of {} requests to live nodes during faults served ({:.2}%, bound {:.0}%)",
                during.len(),
                share * 100.0,
                min * 100.0
            ),
            bad,
        ),
        share,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: u64, kind: OpKind, key: &str, hlc: Option<u64>, status: u16) -> Op {
        Op {
            id,
            client: 0,
            node: 1,
            kind,
            key: key.into(),
            value: None,
            version: hlc.map(|h| Version {
                hlc: h,
                origin: "node-1".into(),
            }),
            task: None,
            deduplicated: false,
            start_ms: id * 10,
            end_ms: id * 10 + 5,
            status: Some(status),
            code: String::new(),
            node_live: true,
            in_partition: false,
        }
    }

    fn rep(items: &[(&str, u64)]) -> Replica {
        items
            .iter()
            .map(|(k, h)| {
                (
                    k.to_string(),
                    Version {
                        hlc: *h,
                        origin: "node-1".into(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_lost_or_rolled_back_write_is_named() {
        let ops = vec![
            op(1, OpKind::Write, "k1", Some(10), 200),
            op(2, OpKind::Write, "k1", Some(20), 200),
            op(3, OpKind::Write, "k2", Some(15), 200),
            op(4, OpKind::Write, "k3", None, 503), // not acked: may be anywhere
        ];
        let good = BTreeMap::from([
            (1, rep(&[("k1", 20), ("k2", 15)])),
            (2, rep(&[("k1", 25), ("k2", 15)])),
        ]);
        assert!(no_acked_write_lost(&ops, &good, &BTreeSet::new()).ok);
        let bad = BTreeMap::from([(1, rep(&[("k1", 10), ("k2", 15)])), (2, rep(&[("k1", 20)]))]);
        let c = no_acked_write_lost(&ops, &bad, &BTreeSet::new());
        assert!(!c.ok);
        assert_eq!(c.violations.len(), 2, "{:?}", c.violations);
        assert!(
            c.violations[0].starts_with("op 2: k1"),
            "{:?}",
            c.violations
        );
        assert!(c.violations[1].contains("k2") && c.violations[1].contains("missing on node-2"));
    }

    #[test]
    fn an_acked_delete_must_stay_deleted() {
        let ops = vec![
            op(1, OpKind::Write, "d0-1", Some(10), 200),
            op(2, OpKind::Delete, "d0-1", None, 200),
        ];
        let c = no_acked_write_lost(
            &ops,
            &BTreeMap::from([(1, rep(&[("d0-1", 10)]))]),
            &BTreeSet::new(),
        );
        assert!(!c.ok && c.violations[0].contains("deleted with ack"));
        assert!(no_acked_write_lost(&ops, &BTreeMap::from([(1, rep(&[]))]), &BTreeSet::new()).ok);
    }

    #[test]
    fn replicas_must_match() {
        let a = BTreeMap::from([(1, rep(&[("k1", 1)])), (2, rep(&[("k1", 1)]))]);
        assert!(replicas_identical(&a).ok);
        let b = BTreeMap::from([(1, rep(&[("k1", 1)])), (2, rep(&[("k1", 2), ("k9", 1)]))]);
        assert_eq!(replicas_identical(&b).violations.len(), 2);
    }

    #[test]
    fn a_stale_first_read_is_named() {
        let ops = vec![op(1, OpKind::Write, "k1", Some(10), 200)];
        let read = |hlc: Option<u64>| RestartRead {
            node: 2,
            serving_ms: 100,
            key: "k1".into(),
            seen: hlc.map(|h| Version {
                hlc: h,
                origin: "node-1".into(),
            }),
            status: Some(if hlc.is_some() { 200 } else { 404 }),
        };
        assert!(no_stale_read_after_restart(&ops, &[read(Some(10))]).ok);
        assert!(!no_stale_read_after_restart(&ops, &[read(Some(9))]).ok);
        assert!(!no_stale_read_after_restart(&ops, &[read(None)]).ok);
    }

    #[test]
    fn subject_keys_name_their_subject() {
        assert_eq!(subject_key_owner("s3-2-1"), "subject-3-2");
    }

    #[test]
    fn tasks_lost_twice_and_twins() {
        let mut t1 = op(1, OpKind::Task, "obj", None, 202);
        t1.task = Some("t1".into());
        let mut t2 = op(2, OpKind::Task, "obj", None, 202);
        t2.task = Some("t2".into());
        let end = |id: &str, status: &str, n: usize| TaskEnd {
            task: id.into(),
            objective: "obj".into(),
            status: status.into(),
            stages: BTreeMap::from([(
                "noop".to_string(),
                vec![
                    Recording {
                        epoch: 1,
                        node: "node-1".into(),
                        agent: "a".into(),
                        ts_ms: 0
                    };
                    n
                ],
            )]),
            final_epochs: BTreeMap::from([("noop".to_string(), 1)]),
            stages_total: 1,
            created_ms: 0,
            finished_ms: Some(1_000),
        };
        let ends = BTreeMap::from([
            ("t1".to_string(), end("t1", "completed", 2)),
            ("t2".to_string(), end("t2", "pending", 0)),
        ]);
        let (lost, twice, dup, fenced, _) = tasks(&[t1.clone(), t2.clone()], &ends, &[]);
        assert!(!lost.ok && lost.violations[0].contains("t2"));
        assert!(!twice.ok);
        assert!(!dup.ok, "t2 was accepted while t1 ran");
        assert_eq!(fenced, 0);

        // Sent while t1 ran, accepted (its record made) once t1 had finished: a new task.
        let mut t3 = op(3, OpKind::Task, "obj", None, 202);
        t3.task = Some("t3".into());
        t3.start_ms = 990;
        let late = |created_ms| TaskEnd {
            task: "t3".into(),
            created_ms,
            ..end("t3", "completed", 1)
        };
        for (created_ms, twin) in [(1_010, false), (995, true)] {
            let ends = BTreeMap::from([
                ("t1".to_string(), end("t1", "completed", 1)),
                ("t3".to_string(), late(created_ms)),
            ]);
            let (_, _, dup, _, _) = tasks(&[t1.clone(), t3.clone()], &ends, &[]);
            assert_eq!(dup.ok, !twin, "t3 created at {created_ms}");
        }
    }

    #[test]
    fn a_superseded_epoch_may_have_run_but_its_result_must_not_stand() {
        let rec = |epoch: u64| Recording {
            epoch,
            node: format!("node-{epoch}"),
            agent: "a".into(),
            ts_ms: epoch * 100,
        };
        assert_eq!(stage_verdict(&[rec(1)], Some(1)), Ok(0));
        assert_eq!(stage_verdict(&[rec(1), rec(2)], Some(2)), Ok(1));
        assert!(stage_verdict(&[rec(1), rec(2)], Some(1)).is_err());
        assert!(stage_verdict(&[rec(2), rec(2)], Some(2)).is_err());
    }

    #[test]
    fn success_counts_only_live_nodes_during_faults() {
        let mut a = op(1, OpKind::Read, "k", None, 200);
        a.start_ms = 1_500;
        let mut b = a.clone();
        b.status = None;
        b.code = "no_answer".into();
        let mut dead = b.clone();
        dead.node_live = false;
        let fault = Planned {
            kind: crate::scenario::FaultKind::Kill,
            nodes: vec![2],
            bridge: None,
            start: std::time::Duration::from_secs(1),
            end: std::time::Duration::from_secs(2),
            rate: 0.0,
            delay_ms: 0,
            jitter_ms: 0,
        };
        let (c, share) = gateway_success(&[a.clone(), b, dead], std::slice::from_ref(&fault), 0.99);
        assert!(!c.ok);
        assert!((share - 0.5).abs() < 1e-9);

        // A 5xx is a failure, but for the refusals a partition calls for on a node cut off.
        let mut timeout = a.clone();
        timeout.status = Some(503);
        timeout.code = "timeout".into();
        let mut cut_off = timeout.clone();
        cut_off.code = "no_replica".into();
        cut_off.in_partition = true;
        let mut no_owner = cut_off.clone();
        no_owner.code = "owner_unreachable".into();
        let mut no_owner_outside = no_owner.clone();
        no_owner_outside.in_partition = false;
        let mut refused = a.clone();
        refused.status = Some(429);
        refused.code = "queue_full".into();
        let ops = [a, timeout, cut_off, no_owner, no_owner_outside, refused];
        let (_, share) = gateway_success(&ops, &[fault], 0.99);
        assert!((share - 4.0 / 6.0).abs() < 1e-9, "{share}");
    }
}
