//! What happened in a run, as the checks need it: every client operation and its answer, every
//! stage result written, every time two holders of one task (or two tasks of one hash) were
//! seen, and the faults. The checks in `check` read this and the final state, nothing else.

use std::collections::BTreeSet;

use swarm_storage::Version;

/// A memory write a client made on a node (a put or a delete), applied there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Write {
    pub(crate) op: u64,
    pub(crate) node: u32,
    pub(crate) ns: String,
    pub(crate) key: String,
    /// The JSON written; `None` for a delete.
    pub(crate) value: Option<String>,
    pub(crate) subject: Option<String>,
    /// The version the node gave it.
    pub(crate) version: Version,
    pub(crate) at_us: u64,
    /// `Some(true)` once acknowledged (a put: by one peer too; a delete: durable on its node),
    /// `Some(false)` when the client got an error, `None` while it waits.
    pub(crate) acked: Option<bool>,
}

/// A subject erased on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Erasure {
    pub(crate) subject: String,
    pub(crate) node: u32,
    pub(crate) at_us: u64,
}

/// A task submission and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Submission {
    pub(crate) op: u64,
    pub(crate) node: u32,
    pub(crate) objective: String,
    pub(crate) at_us: u64,
    /// The task it created or was deduplicated against, with `deduplicated`; `Err` with the
    /// refusal's code; `None` while it waits.
    pub(crate) answer: Option<Result<(String, bool), String>>,
    /// The owner did not answer and the next choice (the owner among the live members less
    /// that one) accepted it as this task.
    pub(crate) fallback: Option<String>,
}

impl Submission {
    /// The new task this submission created, when acknowledged.
    pub(crate) fn created(&self) -> Option<&str> {
        match &self.answer {
            Some(Ok((task, false))) => Some(task),
            _ => None,
        }
    }
}

/// A stage result a node wrote to its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StageWrite {
    pub(crate) task: String,
    pub(crate) index: u32,
    /// The stage's name (its result's key).
    pub(crate) stage: String,
    pub(crate) epoch: u64,
    pub(crate) node: u32,
    pub(crate) at_us: u64,
    /// Written inside a partition or its aftermath (a replica there may lack an earlier
    /// result written on the other side).
    pub(crate) disturbed: bool,
    /// `None` for a stage's first result. For a later one: whether an earlier result was on a
    /// live node when this one was written. When it was not (every copy was on nodes that had
    /// crashed or left, its replication never acknowledged), the stage ran again as the `w=2`
    /// promise allows: at least once.
    pub(crate) earlier_on_a_live_node: Option<bool>,
}

/// Work held twice at one moment, as first seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Twice {
    /// `task X held by n1, n3` or `hash H active as t1, t2`.
    pub(crate) what: String,
    /// The tasks concerned.
    pub(crate) tasks: Vec<String>,
    pub(crate) at_us: u64,
    /// Excused (inside a partition or its aftermath, replication lag: see
    /// `World::look_for_twice`): fenced, not an error.
    pub(crate) excused: bool,
}

/// A fault as it was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FaultLog {
    pub(crate) at_us: u64,
    pub(crate) what: String,
}

/// The whole history of a run.
#[derive(Debug, Default)]
pub(crate) struct History {
    pub(crate) writes: Vec<Write>,
    pub(crate) erasures: Vec<Erasure>,
    pub(crate) submissions: Vec<Submission>,
    pub(crate) stage_writes: Vec<StageWrite>,
    pub(crate) twice: Vec<Twice>,
    pub(crate) faults: Vec<FaultLog>,
    /// A stage result was recorded under an epoch other than the one it ran under.
    pub(crate) fencing: Vec<String>,
    /// Tasks seen held twice inside a partition: their duplicate stage results are excused.
    pub(crate) excused_tasks: BTreeSet<String>,
    /// What `twice` has seen already (so each pair is judged once, when it begins).
    seen_twice: BTreeSet<String>,
    /// Tasks an owner's dispatcher accepted: when, and whether its replica then held no
    /// unfinished task of the same hash (`true`: it could not have known of one).
    accepted: std::collections::BTreeMap<String, (u64, bool)>,
    next_op: u64,
}

impl History {
    pub(crate) fn next_op(&mut self) -> u64 {
        self.next_op += 1;
        self.next_op
    }

    pub(crate) fn fault(&mut self, at_us: u64, what: impl Into<String>) {
        let what = what.into();
        tracing::debug!(at_us, %what, "sim: fault");
        self.faults.push(FaultLog { at_us, what });
    }

    /// Note work held twice (`key` identifies the pair); only its first sighting is judged.
    pub(crate) fn twice(
        &mut self,
        key: String,
        what: String,
        tasks: Vec<String>,
        at_us: u64,
        excused: bool,
    ) {
        if !self.seen_twice.insert(key) {
            return;
        }
        if excused {
            self.excused_tasks.extend(tasks.iter().cloned());
        }
        self.twice.push(Twice {
            what,
            tasks,
            at_us,
            excused,
        });
    }

    /// The dispatcher of an owner accepted `task` at `at_us`; `blind` when its replica held no
    /// unfinished task of the same hash.
    pub(crate) fn accepted(&mut self, task: &str, at_us: u64, blind: bool) {
        self.accepted.insert(task.to_string(), (at_us, blind));
    }

    /// Whether task `task` was accepted (not refused, not deduplicated).
    pub(crate) fn was_accepted(&self, task: &str) -> bool {
        self.accepted.contains_key(task)
    }

    /// Task `task` was accepted by a node that is not its hash's owner by any view (the old
    /// fallback): a duplicate it makes is not one of replication lag.
    pub(crate) fn accepted_as_non_owner(&mut self, task: &str) {
        if let Some((_, blind)) = self.accepted.get_mut(task) {
            *blind = false;
        }
    }

    /// Of tasks of one hash active at once, the one accepted last was accepted blind: the
    /// duplicate comes from replication lag at an ownership change, which no owner could see.
    pub(crate) fn lagged(&self, tasks: &[String]) -> bool {
        tasks
            .iter()
            .filter_map(|t| self.accepted.get(t))
            .max_by_key(|(at, _)| *at)
            .is_some_and(|(_, blind)| *blind)
    }

    /// Tasks accepted by the next choice after their owner did not answer.
    pub(crate) fn fallback_tasks(&self) -> BTreeSet<&str> {
        self.submissions
            .iter()
            .filter_map(|s| s.fallback.as_deref())
            .collect()
    }

    /// The faults applied between `from` and `to` (µs), for a report.
    pub(crate) fn faults_between(&self, from: u64, to: u64) -> Vec<String> {
        self.faults
            .iter()
            .filter(|f| f.at_us >= from && f.at_us <= to)
            .map(|f| format!("{} {}", secs(f.at_us), f.what))
            .collect()
    }
}

/// `12.345s`.
pub(crate) fn secs(us: u64) -> String {
    format!("{:.3}s", us as f64 / 1e6)
}
