//! The task dispatcher of one node: a sans-IO state machine over the tasks this node owns.
//!
//! It queues tasks by priority, runs their workflows within a number of slots, picks an agent
//! for each stage (anti-collision first, then score, else least recently used), retries failed
//! stages on other agents, dead-letters and escalates what keeps failing, fails what passes its
//! deadline or budget, and fences every stage result with the task's epoch so that a result of
//! a superseded owner is refused.
//!
//! No clock, no IO, no tokio: every input carries `now_ms`, every method returns the
//! [`Action`]s the shell must carry out in order (persist, record a stage result, run a stage,
//! abort one, publish an event). The only randomness is the score jitter, from a seeded
//! [`StdRng`], so a run is reproducible.
//!
//! Memory is bounded: the queue by `queue_bound`, finished records by [`FINISHED_KEPT`], dead
//! letters by [`DEAD_LETTERS_KEPT`], each agent's history by [`HISTORY_PER_AGENT`].

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use swarm_config::{AgentType, BENCH_NOOP_KIND, SwarmFile, TasksConfig};

use crate::tasks::model::{Priority, Running, StageRecord, TaskFailure, TaskRecord, TaskStatus};
use crate::tasks::{Backlog, TaskStats};

/// Task hashes remembered per agent (oldest out): enough for anti-collision, bounded.
pub const HISTORY_PER_AGENT: usize = 4096;
/// Finished records kept for [`Dispatcher::task`] lookups (oldest out); the store has them all.
pub const FINISHED_KEPT: usize = 1024;
/// Dead letters held in memory (oldest out); the shell adopts one again to requeue it.
pub const DEAD_LETTERS_KEPT: usize = 1024;
/// Epochs of released tasks remembered, so a late result for one is refused as stale.
const RELEASED_KEPT: usize = 4096;
/// Bounds of the `retry_after_ms` estimate of a full queue.
const MIN_RETRY_AFTER_MS: u64 = 1000;
const MAX_RETRY_AFTER_MS: u64 = 300_000;
/// Stage duration (seconds) at which the speed term of the score reaches zero.
const SPEED_HORIZON_S: f64 = 30.0;
/// Upper bound of the score jitter: it breaks ties, it never outweighs a real difference.
const JITTER: f64 = 0.01;

/// Identity and limits of one node's dispatcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// This node's id (records it owns name it).
    pub node: String,
    /// Tasks waiting for a slot before a submission is refused.
    pub queue_bound: usize,
    /// Workflows in progress at once (at least 1 is used).
    pub concurrency: usize,
    /// Retries of a failed stage before the task is dead-lettered.
    pub max_retries: u32,
    pub retry_delay_ms: u64,
    /// Longest a stage may run before it counts as a retryable failure.
    pub stage_timeout_ms: u64,
    /// Seed of the score jitter.
    pub seed: u64,
}

impl Limits {
    /// The limits the node's `[tasks]` section and the swarm file give.
    pub fn from_config(node: &str, tasks: &TasksConfig, swarm: &SwarmFile, seed: u64) -> Limits {
        let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Limits {
            node: node.to_string(),
            queue_bound: tasks.queue_bound,
            concurrency: usize::try_from(tasks.concurrency(swarm)).unwrap_or(usize::MAX),
            max_retries: tasks.max_retries(swarm),
            retry_delay_ms: millis(tasks.retry_delay.0),
            stage_timeout_ms: millis(tasks.stage_timeout.0),
            seed,
        }
    }
}

/// One stage of a workflow as the dispatcher needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageDef {
    pub name: String,
    pub kind: String,
    pub max_tokens: u32,
}

/// An agent of the swarm file as the dispatcher needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentProfile {
    pub id: String,
    pub capabilities: Vec<String>,
    pub specialization: String,
    /// Stages it runs at once.
    pub max_load: u32,
}

/// What the dispatcher knows of the swarm: workflows (name → stages), kinds (kind → agent ids
/// allowed to run it), agents, and the coordinator's id (escalations name it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Catalog {
    pub workflows: BTreeMap<String, Vec<StageDef>>,
    pub kinds: BTreeMap<String, Vec<String>>,
    pub agents: Vec<AgentProfile>,
    pub coordinator: String,
}

impl Catalog {
    /// The catalog in force: the effective workflows and kinds of `tasks`, the agents of
    /// `swarm` (each with `max_load`), and its coordinator (the agent of type coordinator, else
    /// the first agent).
    pub fn from_config(tasks: &TasksConfig, swarm: &SwarmFile, max_load: u32) -> Catalog {
        let workflows = tasks
            .effective_workflows()
            .into_iter()
            .map(|(name, w)| {
                let stages = w
                    .stages
                    .into_iter()
                    .map(|s| StageDef {
                        name: s.name,
                        kind: s.kind,
                        max_tokens: s.max_tokens,
                    })
                    .collect();
                (name, stages)
            })
            .collect();
        let agents = swarm
            .agents
            .iter()
            .map(|a| AgentProfile {
                id: a.id.clone(),
                capabilities: a.capabilities.clone(),
                specialization: a.specialization.clone(),
                max_load,
            })
            .collect();
        let coordinator = swarm
            .agents
            .iter()
            .find(|a| a.kind == AgentType::Coordinator)
            .or_else(|| swarm.agents.first())
            .map(|a| a.id.clone())
            .unwrap_or_default();
        Catalog {
            workflows,
            kinds: tasks.effective_kinds(),
            agents,
            coordinator,
        }
    }
}

/// A stage to send to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStage {
    pub task: String,
    pub hash: String,
    pub index: u32,
    pub stage: String,
    pub kind: String,
    pub agent: String,
    /// The task's epoch: the outcome must carry it back.
    pub epoch: u64,
    /// 1 for the first attempt of this stage.
    pub attempt: u32,
    /// min(stage max_tokens, budget left).
    pub max_tokens: u32,
    /// The budget left is below the stage's max_tokens.
    pub budget_capped: bool,
    /// When the stage must be done: the stage timeout or the task's deadline, the earlier.
    pub deadline_ms: u64,
}

/// What came of a [`RunStage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOutcome {
    pub task: String,
    pub index: u32,
    pub epoch: u64,
    pub agent: String,
    /// The node the agent ran on.
    pub node: String,
    pub result: Result<StageSuccess, StageError>,
}

/// A stage's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSuccess {
    pub text: String,
    /// The stage's own turn of the prompt ([`StageRecord::prompt`]).
    #[serde(default)]
    pub prompt: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub duration_ms: u64,
}

/// Why a stage failed; `retryable` decides between a retry and failing the task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

/// What happened, for the event bus and metrics (serialised externally tagged: the variant
/// name in snake_case around its fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Accepted {
        task: String,
    },
    Started {
        task: String,
    },
    StageStarted {
        task: String,
        index: u32,
        stage: String,
        agent: String,
        attempt: u32,
        epoch: u64,
    },
    StageCompleted {
        task: String,
        index: u32,
        stage: String,
        agent: String,
        duration_ms: u64,
    },
    StageFailed {
        task: String,
        index: u32,
        stage: String,
        agent: String,
        code: String,
        retry: bool,
    },
    Completed {
        task: String,
    },
    Failed {
        task: String,
        code: String,
    },
    Cancelled {
        task: String,
    },
    Escalated {
        task: String,
        coordinator: String,
        code: String,
    },
    DeadLettered {
        task: String,
    },
    Requeued {
        task: String,
    },
    Adopted {
        task: String,
        epoch: u64,
    },
    /// For the shell to publish when [`Dispatcher::stage_finished`] answers
    /// [`Refusal::Stale`] (the dispatcher returns no actions with a refusal).
    StaleResult {
        task: String,
        index: u32,
        epoch: u64,
        current: u64,
    },
}

impl Event {
    /// The event bus kind (`task.accepted`, `stage.failed`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Accepted { .. } => "task.accepted",
            Event::Started { .. } => "task.started",
            Event::StageStarted { .. } => "stage.started",
            Event::StageCompleted { .. } => "stage.completed",
            Event::StageFailed { .. } => "stage.failed",
            Event::Completed { .. } => "task.completed",
            Event::Failed { .. } => "task.failed",
            Event::Cancelled { .. } => "task.cancelled",
            Event::Escalated { .. } => "task.escalated",
            Event::DeadLettered { .. } => "task.dead_letter",
            Event::Requeued { .. } => "task.requeued",
            Event::Adopted { .. } => "task.adopted",
            Event::StaleResult { .. } => "result.refused",
        }
    }

    /// The task it is about.
    pub fn task(&self) -> &str {
        match self {
            Event::Accepted { task }
            | Event::Started { task }
            | Event::StageStarted { task, .. }
            | Event::StageCompleted { task, .. }
            | Event::StageFailed { task, .. }
            | Event::Completed { task }
            | Event::Failed { task, .. }
            | Event::Cancelled { task }
            | Event::Escalated { task, .. }
            | Event::DeadLettered { task }
            | Event::Requeued { task }
            | Event::Adopted { task, .. }
            | Event::StaleResult { task, .. } => task,
        }
    }
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "actions live for one call and most are Persist; boxing the record buys nothing"
)]
pub enum Action {
    /// Write this record durably (it changed). Always the full record.
    Persist(TaskRecord),
    /// Write this stage result durably BEFORE the Persist that follows it (written once per
    /// (task, index) ever).
    RecordStage(StageRecord),
    /// Send a stage to an agent.
    Run(RunStage),
    /// Stop the running stage of `task` (cancel, deadline, timeout): its generation must stop.
    Abort {
        task: String,
        agent: String,
        epoch: u64,
    },
    Event(Event),
}

/// Why an input was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the task queue is full; retry after {retry_after_ms} ms")]
    QueueFull { retry_after_ms: u64 },
    #[error("task {existing} has the same hash and is not finished")]
    Duplicate { existing: String },
    #[error("unknown workflow")]
    UnknownWorkflow,
    #[error("no agent has the capability `{capability}`")]
    NoCapableAgent { capability: String },
    #[error("no such task here")]
    NotFound,
    #[error("the task is already {}", status.as_str())]
    Finished { status: TaskStatus },
    #[error("the task is {}, not dead_letter", status.as_str())]
    NotDeadLetter { status: TaskStatus },
    #[error("stale result; the task's epoch is {current}")]
    Stale { current: u64 },
}

impl Refusal {
    /// A stable code for metrics and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::QueueFull { .. } => "queue_full",
            Refusal::Duplicate { .. } => "duplicate",
            Refusal::UnknownWorkflow => "unknown_workflow",
            Refusal::NoCapableAgent { .. } => "no_capable_agent",
            Refusal::NotFound => "not_found",
            Refusal::Finished { .. } => "finished",
            Refusal::NotDeadLetter { .. } => "not_dead_letter",
            Refusal::Stale { .. } => "stale",
        }
    }
}

/// Per-agent counters the dispatcher keeps (of the stages it sent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentCounters {
    /// Stages it runs now for this dispatcher.
    pub load: u32,
    pub completed: u64,
    pub failed: u64,
    /// Sum of the durations of its completed stages.
    pub total_stage_ms: u64,
    /// When it was last given a stage (`None`: never).
    pub last_used_ms: Option<u64>,
}

/// An agent's counters and the hashes it handled (for anti-collision).
#[derive(Debug, Default)]
struct AgentState {
    counters: AgentCounters,
    history: VecDeque<String>,
    seen: HashSet<String>,
}

impl AgentState {
    fn remember(&mut self, hash: &str) {
        if self.seen.contains(hash) {
            return;
        }
        if self.history.len() >= HISTORY_PER_AGENT
            && let Some(old) = self.history.pop_front()
        {
            self.seen.remove(&old);
        }
        self.history.push_back(hash.to_string());
        self.seen.insert(hash.to_string());
    }
}

/// A task held here with what is not in its record.
#[derive(Debug)]
struct Held {
    rec: TaskRecord,
    /// It was in progress under its previous owner: it goes ahead of new ones.
    resumed: bool,
    /// A failed stage is tried again at this time.
    retry_due: Option<u64>,
}

/// Order of the queue: priority, resumed before new, oldest, id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct QueueKey {
    priority: usize,
    fresh: bool,
    created_ms: u64,
    id: String,
}

impl Held {
    fn key(&self) -> QueueKey {
        QueueKey {
            priority: self.rec.priority.index(),
            fresh: !self.resumed,
            created_ms: self.rec.created_ms,
            id: self.rec.id.clone(),
        }
    }
}

/// Monotonic counters for [`TaskStats`].
#[derive(Debug, Default)]
struct Counts {
    submitted: u64,
    deduplicated: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
    stages_completed: u64,
    stages_failed: u64,
    retries: u64,
    stale_results: u64,
    adopted: u64,
    redispatched: u64,
}

/// How a running stage ended badly.
#[derive(Debug)]
struct StageFault {
    index: u32,
    agent: String,
    code: String,
    message: String,
    retryable: bool,
}

/// Failure codes of a stage that never ran on its agent (at its load limit, placed elsewhere,
/// restarting, unreachable): the stage goes to another agent after [`REDISPATCH_DELAY_MS`]
/// without counting as a failed attempt.
pub const NOT_RUN: [&str; 5] = [
    "agent_busy",
    "agent_moved",
    "agent_down",
    "agent_offline",
    "agent_unreachable",
];
/// Wait before a stage that never ran is sent again (a short one: dispatchers on different
/// owners may pick the same agent at once).
pub const REDISPATCH_DELAY_MS: u64 = 20;

/// The dispatcher of one node's tasks. See the module doc.
#[derive(Debug)]
pub struct Dispatcher {
    limits: Limits,
    catalog: Catalog,
    profiles: BTreeMap<String, AgentProfile>,
    rng: StdRng,
    online: BTreeSet<String>,
    agents: BTreeMap<String, AgentState>,
    /// Unfinished tasks owned here (dead letters included).
    held: BTreeMap<String, Held>,
    /// Pending tasks, in the order they start.
    queue: BTreeSet<QueueKey>,
    /// Tasks holding a workflow slot.
    in_progress: BTreeSet<String>,
    /// Active (pending or in progress) task by hash.
    by_hash: BTreeMap<String, String>,
    finished: BTreeMap<String, TaskRecord>,
    finished_order: VecDeque<String>,
    /// Epochs of tasks released to another owner.
    released: BTreeMap<String, u64>,
    released_order: VecDeque<String>,
    counts: Counts,
}

impl Dispatcher {
    pub fn new(limits: Limits, catalog: Catalog) -> Self {
        let profiles: BTreeMap<String, AgentProfile> = catalog
            .agents
            .iter()
            .map(|a| (a.id.clone(), a.clone()))
            .collect();
        let agents = profiles
            .keys()
            .map(|id| (id.clone(), AgentState::default()))
            .collect();
        Self {
            rng: StdRng::seed_from_u64(limits.seed),
            limits,
            catalog,
            profiles,
            online: BTreeSet::new(),
            agents,
            held: BTreeMap::new(),
            queue: BTreeSet::new(),
            in_progress: BTreeSet::new(),
            by_hash: BTreeMap::new(),
            finished: BTreeMap::new(),
            finished_order: VecDeque::new(),
            released: BTreeMap::new(),
            released_order: VecDeque::new(),
            counts: Counts::default(),
        }
    }

    /// Agents placed on a live node now (the others cannot be assigned). Initially none are
    /// online. Tasks waiting for an agent start if they now can.
    pub fn set_online(&mut self, now_ms: u64, agents: &[String]) -> Vec<Action> {
        self.online = agents.iter().cloned().collect();
        self.pump(now_ms)
    }

    /// Remember that `agent`'s history holds `hash` (at most [`HISTORY_PER_AGENT`] per agent,
    /// the oldest dropped). Agents not in the catalog are ignored.
    pub fn note_history(&mut self, agent: &str, hash: &str) {
        if let Some(a) = self.agents.get_mut(agent) {
            a.remember(hash);
        }
    }

    /// Accept a new task (pending, epoch 1, owned here, stage 0) and start what can start.
    pub fn submit(&mut self, now_ms: u64, mut rec: TaskRecord) -> Result<Vec<Action>, Refusal> {
        let stages = self
            .catalog
            .workflows
            .get(&rec.workflow)
            .ok_or(Refusal::UnknownWorkflow)?;
        let stages_total = u32::try_from(stages.len()).unwrap_or(u32::MAX);
        if let Some(missing) = rec.capabilities.iter().find(|c| {
            !self
                .catalog
                .agents
                .iter()
                .any(|a| a.capabilities.contains(c))
        }) {
            return Err(Refusal::NoCapableAgent {
                capability: missing.clone(),
            });
        }
        let existing = self
            .by_hash
            .get(&rec.hash)
            .cloned()
            .or_else(|| self.held.contains_key(&rec.id).then(|| rec.id.clone()));
        if let Some(existing) = existing {
            self.counts.deduplicated += 1;
            return Err(Refusal::Duplicate { existing });
        }
        if self.queue.len() >= self.limits.queue_bound {
            return Err(Refusal::QueueFull {
                retry_after_ms: self.retry_after_estimate(),
            });
        }
        rec.status = TaskStatus::Pending;
        rec.epoch = 1;
        rec.owner = self.limits.node.clone();
        rec.stage = 0;
        rec.stages_total = stages_total;
        rec.current = None;
        rec.failures = 0;
        rec.failed_agents.clear();
        rec.error = None;
        rec.started_ms = None;
        rec.finished_ms = None;
        rec.updated_ms = now_ms;
        let id = rec.id.clone();
        self.counts.submitted += 1;
        let mut out = vec![
            Action::Persist(rec.clone()),
            Action::Event(Event::Accepted { task: id.clone() }),
        ];
        self.insert_held(Held {
            rec,
            resumed: false,
            retry_due: None,
        });
        out.extend(self.pump(now_ms));
        Ok(out)
    }

    /// Take over an unfinished record: a higher epoch, owned here, queued (ahead of new ones
    /// when it was in progress), resuming at `rec.stage`. A dead letter stays one (same
    /// epoch). Finished records, and records held here at an equal or higher epoch, change
    /// nothing.
    pub fn adopt(&mut self, now_ms: u64, mut rec: TaskRecord) -> Vec<Action> {
        if rec.status.is_finished()
            || self
                .finished
                .get(&rec.id)
                .is_some_and(|f| f.epoch >= rec.epoch)
        {
            return Vec::new();
        }
        let mut seen = self.released.get(&rec.id).copied().unwrap_or(0);
        let mut out = Vec::new();
        if let Some(h) = self.held.get(&rec.id) {
            if h.rec.epoch >= rec.epoch {
                return Vec::new();
            }
            seen = seen.max(h.rec.epoch);
            out.extend(self.drop_held(&rec.id));
        }
        if self.finished.remove(&rec.id).is_some() {
            self.finished_order.retain(|f| *f != rec.id);
        }
        let resumed = rec.status == TaskStatus::InProgress;
        rec.owner = self.limits.node.clone();
        rec.current = None;
        rec.updated_ms = now_ms;
        if rec.status != TaskStatus::DeadLetter {
            rec.epoch = rec.epoch.max(seen) + 1;
            rec.status = TaskStatus::Pending;
        }
        self.counts.adopted += 1;
        out.push(Action::Persist(rec.clone()));
        out.push(Action::Event(Event::Adopted {
            task: rec.id.clone(),
            epoch: rec.epoch,
        }));
        let dead = rec.status == TaskStatus::DeadLetter;
        self.insert_held(Held {
            rec,
            resumed,
            retry_due: None,
        });
        if dead {
            self.trim_dead_letters();
        }
        out
    }

    /// A stage's outcome: recorded and the workflow moves on, or the failure is retried,
    /// dead-lettered or fails the task. Refused (nothing changes) when it is not the stage
    /// attempt running now under the task's current epoch.
    pub fn stage_finished(
        &mut self,
        now_ms: u64,
        outcome: StageOutcome,
    ) -> Result<Vec<Action>, Refusal> {
        self.check_outcome(&outcome)?;
        let running = self.take_current(&outcome.task).ok_or(Refusal::NotFound)?;
        match outcome.result {
            Ok(success) => Ok(self.stage_succeeded(
                now_ms,
                &outcome.task,
                outcome.index,
                &outcome.node,
                running,
                success,
            )),
            Err(error) => {
                if let Some(a) = self.agents.get_mut(&running.agent) {
                    a.counters.failed += 1;
                }
                let fault = StageFault {
                    index: outcome.index,
                    agent: running.agent,
                    code: error.code,
                    message: error.message,
                    retryable: error.retryable,
                };
                let mut out = self.stage_fault(now_ms, &outcome.task, fault);
                out.extend(self.pump(now_ms));
                Ok(out)
            }
        }
    }

    /// Cancel a task held here (a dead letter included); its running stage is aborted.
    pub fn cancel(&mut self, now_ms: u64, task: &str) -> Result<Vec<Action>, Refusal> {
        if !self.held.contains_key(task) {
            return Err(match self.finished.get(task) {
                Some(f) => Refusal::Finished { status: f.status },
                None => Refusal::NotFound,
            });
        }
        let mut out = Vec::new();
        if let Some(abort) = self.abort_current(task) {
            out.push(abort);
        }
        self.counts.cancelled += 1;
        out.extend(self.retire(now_ms, task, TaskStatus::Cancelled, None));
        out.push(Action::Event(Event::Cancelled {
            task: task.to_string(),
        }));
        out.extend(self.pump(now_ms));
        Ok(out)
    }

    /// Put a dead letter held here back in the queue with its retries reset. Refused with
    /// `Duplicate` when another task with its hash became active meanwhile.
    pub fn requeue(&mut self, now_ms: u64, task: &str) -> Result<Vec<Action>, Refusal> {
        let (status, hash) = match (self.held.get(task), self.finished.get(task)) {
            (Some(h), _) => (h.rec.status, h.rec.hash.clone()),
            (None, Some(f)) => return Err(Refusal::NotDeadLetter { status: f.status }),
            (None, None) => return Err(Refusal::NotFound),
        };
        if status != TaskStatus::DeadLetter {
            return Err(Refusal::NotDeadLetter { status });
        }
        if let Some(existing) = self.by_hash.get(&hash) {
            return Err(Refusal::Duplicate {
                existing: existing.clone(),
            });
        }
        self.update(task, |h| {
            h.rec.failures = 0;
            h.rec.failed_agents.clear();
            h.rec.error = None;
            h.rec.status = TaskStatus::Pending;
            h.resumed = true;
            h.retry_due = None;
        });
        let mut out: Vec<Action> = self.persist(now_ms, task).into_iter().collect();
        out.push(Action::Event(Event::Requeued {
            task: task.to_string(),
        }));
        out.extend(self.pump(now_ms));
        Ok(out)
    }

    /// Forget a task (its ownership moved away); aborts its running stage. A later result of
    /// it is refused as stale.
    pub fn release(&mut self, task: &str) -> Vec<Action> {
        self.drop_held(task)
    }

    /// Time passes: deadlines, stage timeouts, due retries, then start work in free slots.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let late: Vec<String> = self
            .held
            .values()
            .filter(|h| h.rec.status != TaskStatus::DeadLetter && past_deadline(&h.rec, now_ms))
            .map(|h| h.rec.id.clone())
            .collect();
        for id in late {
            out.extend(self.fail(
                now_ms,
                &id,
                "deadline_exceeded",
                "the task passed its deadline",
            ));
        }
        let timeout = self.limits.stage_timeout_ms;
        let stuck: Vec<String> = self
            .held
            .values()
            .filter(|h| {
                h.rec
                    .current
                    .as_ref()
                    .is_some_and(|c| now_ms >= c.started_ms.saturating_add(timeout))
            })
            .map(|h| h.rec.id.clone())
            .collect();
        for id in stuck {
            out.extend(self.time_out(now_ms, &id));
        }
        let mut due: Vec<(u64, String)> = self
            .held
            .values()
            .filter_map(|h| {
                h.retry_due
                    .filter(|d| *d <= now_ms)
                    .map(|d| (d, h.rec.id.clone()))
            })
            .collect();
        due.sort();
        for (_, id) in due {
            self.update(&id, |h| h.retry_due = None);
            out.extend(self.start_stage(now_ms, &id));
        }
        out.extend(self.pump(now_ms));
        out
    }

    /// Earliest time [`Dispatcher::tick`] has something to do: a retry due, a deadline, a
    /// stage timeout, or 0 when queued work could start now (after an adoption). `None` when
    /// nothing is timed.
    pub fn next_wakeup(&self) -> Option<u64> {
        if !self.queue.is_empty() && self.in_progress.len() < self.concurrency() {
            return Some(0);
        }
        let timeout = self.limits.stage_timeout_ms;
        self.held
            .values()
            .flat_map(|h| {
                let deadline = (h.rec.status != TaskStatus::DeadLetter && h.rec.deadline_ms != 0)
                    .then_some(h.rec.deadline_ms);
                let stage = h
                    .rec
                    .current
                    .as_ref()
                    .map(|c| c.started_ms.saturating_add(timeout));
                [h.retry_due, deadline, stage]
            })
            .flatten()
            .min()
    }

    /// A task held here, or finished recently.
    pub fn task(&self, id: &str) -> Option<&TaskRecord> {
        self.held
            .get(id)
            .map(|h| &h.rec)
            .or_else(|| self.finished.get(id))
    }

    /// Tasks held here, then the recently finished ones.
    pub fn tasks(&self) -> impl Iterator<Item = &TaskRecord> {
        self.held
            .values()
            .map(|h| &h.rec)
            .chain(self.finished.values())
    }

    /// Active task id with this hash, if any.
    pub fn active_with_hash(&self, hash: &str) -> Option<&str> {
        self.by_hash.get(hash).map(String::as_str)
    }

    /// The dispatcher-owned fields of [`TaskStats`].
    pub fn stats(&self, now_ms: u64) -> TaskStats {
        let backlog = Priority::ALL
            .iter()
            .map(|p| {
                let waiting = self.queue.iter().filter(|k| k.priority == p.index());
                let oldest = waiting.clone().map(|k| k.created_ms).min();
                Backlog {
                    priority: p.as_str().to_string(),
                    waiting: waiting.count() as u64,
                    oldest_ms: oldest.map_or(0, |c| now_ms.saturating_sub(c)),
                }
            })
            .collect();
        let c = &self.counts;
        TaskStats {
            node: self.limits.node.clone(),
            backlog,
            running: self.in_progress.len() as u64,
            concurrency: self.concurrency() as u64,
            queue_bound: self.limits.queue_bound as u64,
            dead_letter: self.dead_letters() as u64,
            submitted: c.submitted,
            deduplicated: c.deduplicated,
            completed: c.completed,
            failed: c.failed,
            cancelled: c.cancelled,
            stages_completed: c.stages_completed,
            stages_failed: c.stages_failed,
            retries: c.retries,
            stale_results: c.stale_results,
            adopted: c.adopted,
            redispatched: c.redispatched,
            events_not_relayed: 0,
        }
    }

    /// Counters of an agent of the catalog.
    pub fn agent_stats(&self, agent: &str) -> Option<AgentCounters> {
        self.agents.get(agent).map(|a| a.counters)
    }

    // ----- the state of held tasks -------------------------------------------------------

    fn concurrency(&self) -> usize {
        self.limits.concurrency.max(1)
    }

    fn dead_letters(&self) -> usize {
        self.held
            .values()
            .filter(|h| h.rec.status == TaskStatus::DeadLetter)
            .count()
    }

    /// Adds a task to the indices its status puts it in.
    fn index(&mut self, id: &str) {
        let Some(h) = self.held.get(id) else { return };
        match h.rec.status {
            TaskStatus::Pending => {
                self.queue.insert(h.key());
            }
            TaskStatus::InProgress => {
                self.in_progress.insert(id.to_string());
            }
            _ => return,
        }
        self.by_hash
            .entry(h.rec.hash.clone())
            .or_insert_with(|| id.to_string());
    }

    /// Removes a task from every index (before its status or queue key changes).
    fn unindex(&mut self, id: &str) {
        let Some(h) = self.held.get(id) else { return };
        self.queue.remove(&h.key());
        self.in_progress.remove(id);
        if self.by_hash.get(&h.rec.hash).is_some_and(|i| i == id) {
            self.by_hash.remove(&h.rec.hash);
        }
    }

    fn insert_held(&mut self, held: Held) {
        let id = held.rec.id.clone();
        self.held.insert(id.clone(), held);
        self.index(&id);
    }

    /// Changes a held task, keeping the indices right.
    fn update(&mut self, id: &str, change: impl FnOnce(&mut Held)) {
        self.unindex(id);
        if let Some(h) = self.held.get_mut(id) {
            change(h);
        }
        self.index(id);
    }

    fn persist(&mut self, now_ms: u64, id: &str) -> Option<Action> {
        let h = self.held.get_mut(id)?;
        h.rec.updated_ms = now_ms;
        Some(Action::Persist(h.rec.clone()))
    }

    /// Ends a task's running stage (its agent's load drops); `None` when none runs.
    fn take_current(&mut self, id: &str) -> Option<Running> {
        let running = self.held.get_mut(id)?.rec.current.take()?;
        if let Some(a) = self.agents.get_mut(&running.agent) {
            a.counters.load = a.counters.load.saturating_sub(1);
        }
        Some(running)
    }

    /// Ends a task's running stage and says to stop its generation.
    fn abort_current(&mut self, id: &str) -> Option<Action> {
        let epoch = self.held.get(id)?.rec.epoch;
        let running = self.take_current(id)?;
        Some(Action::Abort {
            task: id.to_string(),
            agent: running.agent,
            epoch,
        })
    }

    /// Forgets a held task (aborting its stage) and remembers its epoch.
    fn drop_held(&mut self, id: &str) -> Vec<Action> {
        let out: Vec<Action> = self.abort_current(id).into_iter().collect();
        self.unindex(id);
        if let Some(h) = self.held.remove(id) {
            self.remember_released(id, h.rec.epoch);
        }
        out
    }

    fn remember_released(&mut self, id: &str, epoch: u64) {
        if self.released.insert(id.to_string(), epoch).is_none() {
            self.released_order.push_back(id.to_string());
        }
        while self.released_order.len() > RELEASED_KEPT {
            if let Some(old) = self.released_order.pop_front() {
                self.released.remove(&old);
            }
        }
    }

    /// Finishes a task (completed, failed or cancelled): persists it and moves it to the
    /// bounded cache of finished records. The caller has ended its stage.
    fn retire(
        &mut self,
        now_ms: u64,
        id: &str,
        status: TaskStatus,
        error: Option<TaskFailure>,
    ) -> Option<Action> {
        self.unindex(id);
        let mut h = self.held.remove(id)?;
        h.rec.status = status;
        h.rec.error = error;
        h.rec.current = None;
        h.rec.finished_ms = Some(now_ms);
        h.rec.updated_ms = now_ms;
        let persist = Action::Persist(h.rec.clone());
        self.finished_order.push_back(id.to_string());
        self.finished.insert(id.to_string(), h.rec);
        while self.finished_order.len() > FINISHED_KEPT {
            if let Some(old) = self.finished_order.pop_front() {
                self.finished.remove(&old);
            }
        }
        Some(persist)
    }

    /// Fails a task with `code` (aborting its running stage).
    fn fail(&mut self, now_ms: u64, id: &str, code: &str, message: &str) -> Vec<Action> {
        let mut out: Vec<Action> = self.abort_current(id).into_iter().collect();
        let error = TaskFailure {
            code: code.to_string(),
            message: message.to_string(),
        };
        self.counts.failed += 1;
        out.extend(self.retire(now_ms, id, TaskStatus::Failed, Some(error)));
        out.push(Action::Event(Event::Failed {
            task: id.to_string(),
            code: code.to_string(),
        }));
        out
    }

    /// Drops the oldest dead letters from memory past [`DEAD_LETTERS_KEPT`] (they stay in the
    /// store; the shell adopts one again to requeue it).
    fn trim_dead_letters(&mut self) {
        while self.dead_letters() > DEAD_LETTERS_KEPT {
            let oldest = self
                .held
                .values()
                .filter(|h| h.rec.status == TaskStatus::DeadLetter)
                .min_by_key(|h| (h.rec.updated_ms, h.rec.id.clone()))
                .map(|h| h.rec.id.clone());
            match oldest {
                Some(id) => {
                    self.drop_held(&id);
                }
                None => break,
            }
        }
    }

    fn retry_after_estimate(&self) -> u64 {
        let (ms, n) = self.agents.values().fold((0u64, 0u64), |(ms, n), a| {
            (
                ms.saturating_add(a.counters.total_stage_ms),
                n + a.counters.completed,
            )
        });
        let per_stage = ms.checked_div(n).unwrap_or(MIN_RETRY_AFTER_MS);
        let waves = (self.queue.len() / self.concurrency()).max(1) as u64;
        per_stage
            .saturating_mul(waves)
            .clamp(MIN_RETRY_AFTER_MS, MAX_RETRY_AFTER_MS)
    }

    // ----- running workflows -------------------------------------------------------------

    /// Starts what can start: tasks in a slot waiting for an agent, then queued tasks while
    /// slots are free.
    fn pump(&mut self, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let mut waiting: Vec<(usize, u64, String)> = self
            .in_progress
            .iter()
            .filter_map(|id| self.held.get(id))
            .filter(|h| h.rec.current.is_none() && h.retry_due.is_none())
            .map(|h| (h.rec.priority.index(), h.rec.created_ms, h.rec.id.clone()))
            .collect();
        waiting.sort();
        for (_, _, id) in waiting {
            out.extend(self.start_stage(now_ms, &id));
        }
        while self.in_progress.len() < self.concurrency() {
            let Some(next) = self.queue.first().map(|k| k.id.clone()) else {
                break;
            };
            out.extend(self.begin(now_ms, &next));
        }
        out
    }

    /// Gives a queued task a workflow slot and runs its next stage.
    fn begin(&mut self, now_ms: u64, id: &str) -> Vec<Action> {
        self.update(id, |h| {
            h.rec.status = TaskStatus::InProgress;
            h.rec.started_ms.get_or_insert(now_ms);
        });
        let mut out = vec![Action::Event(Event::Started {
            task: id.to_string(),
        })];
        let started = self.start_stage(now_ms, id);
        if started.is_empty() {
            // No agent free: the slot is held; persist the status change anyway.
            out.extend(self.persist(now_ms, id));
        }
        out.extend(started);
        out
    }

    /// Runs the task's next stage on the best agent; nothing when no agent can take it now.
    fn start_stage(&mut self, now_ms: u64, id: &str) -> Vec<Action> {
        let Some(h) = self.held.get(id) else {
            return Vec::new();
        };
        let Some(stages) = self.catalog.workflows.get(&h.rec.workflow) else {
            return self.fail(
                now_ms,
                id,
                "unknown_workflow",
                "its workflow is not configured",
            );
        };
        let Some(def) = stages.get(h.rec.stage as usize).cloned() else {
            return self.complete(now_ms, id, Vec::new());
        };
        let budget_left = h.rec.token_budget.saturating_sub(h.rec.tokens_used);
        let bench = def.kind == BENCH_NOOP_KIND;
        if !bench && budget_left == 0 {
            return self.fail(now_ms, id, "budget_exceeded", "the token budget is spent");
        }
        if self.catalog.kinds.get(&def.kind).is_none_or(Vec::is_empty) {
            // A configuration error: waiting would only hold the slot until the deadline.
            return self.fail(
                now_ms,
                id,
                "no_agent_for_kind",
                "no agent runs the stage's kind",
            );
        }
        let Some(agent) = self.pick_agent(id, &def.kind) else {
            return Vec::new();
        };
        if let Some(a) = self.agents.get_mut(&agent) {
            a.counters.load += 1;
            a.counters.last_used_ms = Some(now_ms);
        }
        let stage_deadline = now_ms.saturating_add(self.limits.stage_timeout_ms);
        let Some(h) = self.held.get_mut(id) else {
            return Vec::new();
        };
        let attempt = h.rec.failures + 1;
        h.rec.current = Some(Running {
            agent: agent.clone(),
            node: String::new(),
            attempt,
            started_ms: now_ms,
        });
        let run = RunStage {
            task: id.to_string(),
            hash: h.rec.hash.clone(),
            index: h.rec.stage,
            stage: def.name.clone(),
            kind: def.kind.clone(),
            agent: agent.clone(),
            epoch: h.rec.epoch,
            attempt,
            max_tokens: if bench {
                def.max_tokens
            } else {
                def.max_tokens.min(budget_left)
            },
            budget_capped: !bench && budget_left < def.max_tokens,
            deadline_ms: match h.rec.deadline_ms {
                0 => stage_deadline,
                d => d.min(stage_deadline),
            },
        };
        let started = Event::StageStarted {
            task: id.to_string(),
            index: run.index,
            stage: def.name,
            agent,
            attempt,
            epoch: run.epoch,
        };
        let mut out: Vec<Action> = self.persist(now_ms, id).into_iter().collect();
        out.push(Action::Event(started));
        out.push(Action::Run(run));
        out
    }

    /// Marks a task completed; `events` go between its Persist and `Completed`.
    fn complete(&mut self, now_ms: u64, id: &str, events: Vec<Action>) -> Vec<Action> {
        self.counts.completed += 1;
        let mut out: Vec<Action> = self
            .retire(now_ms, id, TaskStatus::Completed, None)
            .into_iter()
            .collect();
        out.extend(events);
        out.push(Action::Event(Event::Completed {
            task: id.to_string(),
        }));
        out
    }

    /// Refuses an outcome that is not the stage attempt running now under the current epoch.
    fn check_outcome(&mut self, o: &StageOutcome) -> Result<(), Refusal> {
        let current = match (self.held.get(&o.task), self.finished.get(&o.task)) {
            (Some(h), _) => {
                let runs_it = h.rec.epoch == o.epoch
                    && h.rec.stage == o.index
                    && h.rec.current.as_ref().is_some_and(|c| c.agent == o.agent);
                if runs_it {
                    return Ok(());
                }
                h.rec.epoch
            }
            (None, Some(f)) => f.epoch,
            (None, None) => match self.released.get(&o.task) {
                Some(epoch) => *epoch,
                None => return Err(Refusal::NotFound),
            },
        };
        self.counts.stale_results += 1;
        Err(Refusal::Stale { current })
    }

    fn stage_name(&self, id: &str, index: u32) -> String {
        self.held
            .get(id)
            .and_then(|h| self.catalog.workflows.get(&h.rec.workflow))
            .and_then(|s| s.get(index as usize))
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    /// Records a stage result and moves the workflow on (or completes it).
    fn stage_succeeded(
        &mut self,
        now_ms: u64,
        id: &str,
        index: u32,
        node: &str,
        running: Running,
        success: StageSuccess,
    ) -> Vec<Action> {
        let stage = self.stage_name(id, index);
        let Some(h) = self.held.get_mut(id) else {
            return Vec::new();
        };
        let record = StageRecord {
            task: id.to_string(),
            stage: stage.clone(),
            index,
            epoch: h.rec.epoch,
            agent: running.agent.clone(),
            node: node.to_string(),
            attempt: running.attempt,
            text: success.text,
            prompt: success.prompt,
            prompt_tokens: success.prompt_tokens,
            completion_tokens: success.completion_tokens,
            duration_ms: success.duration_ms,
            finished_ms: now_ms,
        };
        h.rec.tokens_used = h.rec.tokens_used.saturating_add(success.completion_tokens);
        h.rec.stage += 1;
        h.rec.failures = 0;
        h.rec.failed_agents.clear();
        if !h.rec.agents_involved.contains(&running.agent) {
            h.rec.agents_involved.push(running.agent.clone());
        }
        let last = h.rec.stage >= h.rec.stages_total;
        let hash = h.rec.hash.clone();
        if let Some(a) = self.agents.get_mut(&running.agent) {
            a.counters.completed += 1;
            a.counters.total_stage_ms = a
                .counters
                .total_stage_ms
                .saturating_add(success.duration_ms);
            a.remember(&hash);
        }
        self.counts.stages_completed += 1;
        let completed = Action::Event(Event::StageCompleted {
            task: id.to_string(),
            index,
            stage,
            agent: running.agent,
            duration_ms: success.duration_ms,
        });
        let mut out = vec![Action::RecordStage(record)];
        if last {
            out.extend(self.complete(now_ms, id, vec![completed]));
        } else {
            out.extend(self.persist(now_ms, id));
            out.push(completed);
            out.extend(self.start_stage(now_ms, id));
        }
        out.extend(self.pump(now_ms));
        out
    }

    /// A running stage passed its timeout: abort it and count a retryable failure.
    fn time_out(&mut self, now_ms: u64, id: &str) -> Vec<Action> {
        let Some(index) = self.held.get(id).map(|h| h.rec.stage) else {
            return Vec::new();
        };
        let Some(abort) = self.abort_current(id) else {
            return Vec::new();
        };
        let Action::Abort { agent, .. } = &abort else {
            return Vec::new();
        };
        let agent = agent.clone();
        if let Some(a) = self.agents.get_mut(&agent) {
            a.counters.failed += 1;
        }
        let fault = StageFault {
            index,
            agent,
            code: "stage_timeout".into(),
            message: "the stage ran past its timeout".into(),
            retryable: true,
        };
        let mut out = vec![abort];
        out.extend(self.stage_fault(now_ms, id, fault));
        out
    }

    /// A stage failed (its attempt already ended): retry later, dead-letter, or fail the task.
    fn stage_fault(&mut self, now_ms: u64, id: &str, fault: StageFault) -> Vec<Action> {
        let Some(h) = self.held.get_mut(id) else {
            return Vec::new();
        };
        if fault.retryable && NOT_RUN.contains(&fault.code.as_str()) {
            // The stage never ran (the agent was at its limit, moving or unreachable): another
            // agent takes it at once; this is no attempt of the stage's.
            if !h.rec.failed_agents.contains(&fault.agent) {
                h.rec.failed_agents.push(fault.agent);
            }
            h.retry_due = Some(now_ms.saturating_add(REDISPATCH_DELAY_MS));
            self.counts.redispatched += 1;
            return Vec::new();
        }
        self.counts.stages_failed += 1;
        let stage = self.stage_name(id, fault.index);
        let (max_retries, delay) = (self.limits.max_retries, self.limits.retry_delay_ms);
        let Some(h) = self.held.get_mut(id) else {
            return Vec::new();
        };
        if !fault.retryable {
            return self.fail(now_ms, id, &fault.code, &fault.message);
        }
        if !h.rec.failed_agents.contains(&fault.agent) {
            h.rec.failed_agents.push(fault.agent.clone());
        }
        let retry = h.rec.failures < max_retries;
        let failed = Action::Event(Event::StageFailed {
            task: id.to_string(),
            index: fault.index,
            stage,
            agent: fault.agent,
            code: fault.code.clone(),
            retry,
        });
        if retry {
            h.rec.failures += 1;
            h.retry_due = Some(now_ms.saturating_add(delay));
            self.counts.retries += 1;
            let mut out: Vec<Action> = self.persist(now_ms, id).into_iter().collect();
            out.push(failed);
            return out;
        }
        let error = TaskFailure {
            code: fault.code.clone(),
            message: fault.message,
        };
        self.update(id, |h| {
            h.rec.status = TaskStatus::DeadLetter;
            h.rec.error = Some(error);
            h.retry_due = None;
        });
        let mut out: Vec<Action> = self.persist(now_ms, id).into_iter().collect();
        out.push(failed);
        out.push(Action::Event(Event::Escalated {
            task: id.to_string(),
            coordinator: self.catalog.coordinator.clone(),
            code: fault.code,
        }));
        out.push(Action::Event(Event::DeadLettered {
            task: id.to_string(),
        }));
        self.trim_dead_letters();
        out
    }

    // ----- choosing an agent -------------------------------------------------------------

    /// The agent to run a stage of `kind` for task `id`: online and below its max load;
    /// not one that failed this stage when another exists; not one whose history holds the
    /// task's hash (then the best scored), else the least recently used.
    fn pick_agent(&mut self, id: &str, kind: &str) -> Option<String> {
        let rec = &self.held.get(id)?.rec;
        let mut free: Vec<&String> = self
            .catalog
            .kinds
            .get(kind)?
            .iter()
            .filter(|a| self.online.contains(*a) && self.below_max_load(a))
            .collect();
        free.sort();
        free.dedup();
        let fresh: Vec<&String> = free
            .iter()
            .copied()
            .filter(|a| !rec.failed_agents.contains(a))
            .collect();
        let pool = if fresh.is_empty() { free } else { fresh };
        let unseen: Vec<&String> = pool
            .iter()
            .copied()
            .filter(|a| {
                !self
                    .agents
                    .get(*a)
                    .is_some_and(|s| s.seen.contains(&rec.hash))
            })
            .collect();
        if unseen.is_empty() {
            return self.least_recently_used(&pool);
        }
        let words = objective_words(&rec.objective);
        let scored: Vec<(String, f64)> = unseen
            .iter()
            .filter_map(|a| {
                let profile = self.profiles.get(*a)?;
                let counters = self.agents.get(*a).map(|s| s.counters).unwrap_or_default();
                Some((
                    (*a).clone(),
                    score(&counters, profile, &rec.capabilities, &words),
                ))
            })
            .collect();
        let mut best: Option<(String, f64)> = None;
        for (agent, base) in scored {
            let total = base + self.rng.random::<f64>() * JITTER;
            if best.as_ref().is_none_or(|(_, b)| total > *b) {
                best = Some((agent, total));
            }
        }
        best.map(|(a, _)| a)
    }

    fn below_max_load(&self, agent: &str) -> bool {
        match (self.profiles.get(agent), self.agents.get(agent)) {
            (Some(p), Some(s)) => s.counters.load < p.max_load,
            _ => false,
        }
    }

    /// Never used first, then the longest unused; ties by id.
    fn least_recently_used(&self, pool: &[&String]) -> Option<String> {
        pool.iter()
            .min_by_key(|a| {
                let last = self.agents.get(**a).and_then(|s| s.counters.last_used_ms);
                (last, (**a).clone())
            })
            .map(|a| (*a).clone())
    }
}

/// The deadline (0: none) has come.
fn past_deadline(rec: &TaskRecord, now_ms: u64) -> bool {
    rec.deadline_ms != 0 && now_ms >= rec.deadline_ms
}

/// The lowercase alphanumeric words of an objective.
fn objective_words(objective: &str) -> HashSet<String> {
    objective
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// DESIGN §6 agent score without jitter: 0.3·success rate + 0.2·free load + 0.2·speed +
/// 0.3·specialisation match.
fn score(
    counters: &AgentCounters,
    profile: &AgentProfile,
    task_capabilities: &[String],
    objective: &HashSet<String>,
) -> f64 {
    let done = counters.completed + counters.failed;
    let success_rate = if done == 0 {
        1.0
    } else {
        counters.completed as f64 / done as f64
    };
    let max_load = f64::from(profile.max_load.max(1));
    let free = 1.0 - f64::from(counters.load) / max_load;
    let avg_s = if counters.completed == 0 {
        0.0
    } else {
        counters.total_stage_ms as f64 / counters.completed as f64 / 1000.0
    };
    let speed = (1.0 - avg_s / SPEED_HORIZON_S).max(0.0);
    let matched = if specialist_for(profile, task_capabilities, objective) {
        1.0
    } else {
        0.0
    };
    0.3 * success_rate + 0.2 * free + 0.2 * speed + 0.3 * matched
}

/// The agent has one of the task's capabilities, or a word of its specialization or of one of
/// its capabilities is a word of the objective.
fn specialist_for(
    profile: &AgentProfile,
    task_capabilities: &[String],
    objective: &HashSet<String>,
) -> bool {
    if profile
        .capabilities
        .iter()
        .any(|c| task_capabilities.contains(c))
    {
        return true;
    }
    std::iter::once(&profile.specialization)
        .chain(profile.capabilities.iter())
        .flat_map(|s| s.split(['_', '-', ' ']))
        .filter(|w| !w.is_empty())
        .any(|w| objective.contains(&w.to_lowercase()))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::tasks::model::{rendezvous, task_hash};

    const AGENTS: [&str; 3] = ["a1", "a2", "a3"];

    fn profile(id: &str, capability: &str, specialization: &str) -> AgentProfile {
        AgentProfile {
            id: id.into(),
            capabilities: vec![capability.into()],
            specialization: specialization.into(),
            max_load: 2,
        }
    }

    fn stage(name: &str, kind: &str, max_tokens: u32) -> StageDef {
        StageDef {
            name: name.into(),
            kind: kind.into(),
            max_tokens,
        }
    }

    fn catalog() -> Catalog {
        let mut workflows = BTreeMap::new();
        workflows.insert("one".to_string(), vec![stage("only", "work", 100)]);
        workflows.insert(
            "two".to_string(),
            vec![stage("first", "work", 100), stage("second", "work", 100)],
        );
        workflows.insert("bench".to_string(), vec![stage("noop", BENCH_NOOP_KIND, 0)]);
        let mut kinds = BTreeMap::new();
        kinds.insert("work".to_string(), AGENTS.map(String::from).to_vec());
        kinds.insert(BENCH_NOOP_KIND.to_string(), vec!["a1".to_string()]);
        Catalog {
            workflows,
            kinds,
            agents: vec![
                profile("a1", "rust", "storage_engines"),
                profile("a2", "python", "web_frontend"),
                profile("a3", "golang", "network_protocols"),
            ],
            coordinator: "a1".into(),
        }
    }

    fn limits(node: &str) -> Limits {
        Limits {
            node: node.into(),
            queue_bound: 8,
            concurrency: 2,
            max_retries: 3,
            retry_delay_ms: 500,
            stage_timeout_ms: 10_000,
            seed: 7,
        }
    }

    fn dispatcher(limits: Limits) -> Dispatcher {
        let mut d = Dispatcher::new(limits, catalog());
        let none = d.set_online(0, &AGENTS.map(String::from));
        assert!(none.is_empty(), "nothing to start yet");
        d
    }

    fn record(id: &str, objective: &str, priority: Priority, workflow: &str) -> TaskRecord {
        TaskRecord {
            priority,
            deadline_ms: 1_000_000_000,
            token_budget: 10_000,
            ..TaskRecord::new(id, objective, serde_json::Value::Null, workflow, "alice", 0)
        }
    }

    fn runs(actions: &[Action]) -> Vec<RunStage> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Run(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn only_run(actions: &[Action]) -> RunStage {
        let r = runs(actions);
        assert_eq!(r.len(), 1, "one run expected in {actions:?}");
        r.into_iter().next().expect("one run")
    }

    fn events(actions: &[Action]) -> Vec<Event> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    fn persisted(actions: &[Action]) -> Vec<TaskRecord> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Persist(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn success(run: &RunStage, completion_tokens: u32) -> StageOutcome {
        StageOutcome {
            task: run.task.clone(),
            index: run.index,
            epoch: run.epoch,
            agent: run.agent.clone(),
            node: "n1".into(),
            result: Ok(StageSuccess {
                text: format!("{} done", run.stage),
                prompt: String::new(),
                prompt_tokens: 10,
                completion_tokens,
                duration_ms: 100,
            }),
        }
    }

    fn failure(run: &RunStage, code: &str, retryable: bool) -> StageOutcome {
        StageOutcome {
            result: Err(StageError {
                code: code.into(),
                message: "it broke".into(),
                retryable,
            }),
            ..success(run, 0)
        }
    }

    fn submit(d: &mut Dispatcher, now: u64, rec: TaskRecord) -> Vec<Action> {
        d.submit(now, rec).expect("accepted")
    }

    #[test]
    fn the_same_hash_twice_is_a_duplicate_naming_the_first() {
        let mut d = dispatcher(limits("n1"));
        let first = submit(
            &mut d,
            0,
            record("t1", "Build the API", Priority::Normal, "one"),
        );
        let refused = d.submit(1, record("t2", "  build the   api", Priority::High, "one"));
        assert_eq!(
            refused,
            Err(Refusal::Duplicate {
                existing: "t1".into()
            })
        );
        assert_eq!(d.stats(1).deduplicated, 1);
        assert_eq!(
            d.active_with_hash(&record("x", "build the api", Priority::Normal, "one").hash),
            Some("t1")
        );
        let done = d
            .stage_finished(2, success(&only_run(&first), 5))
            .expect("result taken");
        assert!(events(&done).contains(&Event::Completed { task: "t1".into() }));
        submit(
            &mut d,
            3,
            record("t3", "build the api", Priority::Normal, "one"),
        );
        assert_eq!(d.stats(3).submitted, 2);
    }

    #[test]
    fn when_every_candidate_handled_the_hash_the_least_recently_used_runs_it() {
        let mut d = dispatcher(limits("n1"));
        let warm = only_run(&submit(
            &mut d,
            10,
            record("w", "warm up", Priority::Normal, "one"),
        ));
        d.stage_finished(20, success(&warm, 1)).expect("taken");
        let rec = record("t", "the real work", Priority::Normal, "one");
        for a in AGENTS {
            d.note_history(a, &rec.hash);
        }
        let run = only_run(&submit(&mut d, 30, rec));
        let lru = AGENTS
            .into_iter()
            .find(|a| *a != warm.agent)
            .expect("another agent");
        assert_eq!(run.agent, lru, "never used, first by id");
        assert_eq!(d.agent_stats(lru).map(|c| c.last_used_ms), Some(Some(30)));
    }

    #[test]
    fn the_score_prefers_the_matching_specialist_and_skips_agents_that_saw_the_hash() {
        for seed in 0..16 {
            let mut d = dispatcher(Limits {
                seed,
                ..limits("n1")
            });
            let by_objective = submit(
                &mut d,
                0,
                record("t1", "Tune the network protocols", Priority::Normal, "one"),
            );
            assert_eq!(only_run(&by_objective).agent, "a3", "seed {seed}");
            let mut rec = record("t2", "make something", Priority::Normal, "one");
            rec.capabilities = vec!["python".into()];
            assert_eq!(only_run(&submit(&mut d, 0, rec)).agent, "a2", "seed {seed}");
        }
        let mut d = dispatcher(limits("n1"));
        let rec = record("t3", "Tune the network protocols", Priority::Normal, "one");
        d.note_history("a3", &rec.hash);
        assert_ne!(
            only_run(&submit(&mut d, 0, rec)).agent,
            "a3",
            "a3 handled it"
        );
    }

    #[test]
    fn a_stage_that_never_ran_goes_to_another_agent_without_counting_as_a_failure() {
        let mut d = dispatcher(limits("n1"));
        let run = only_run(&submit(
            &mut d,
            0,
            record("t1", "one thing", Priority::Normal, "one"),
        ));
        // Busy at its home (another owner's dispatcher took its last slot).
        let out = d
            .stage_finished(10, failure(&run, "agent_busy", true))
            .expect("current");
        assert!(out.is_empty(), "no failure recorded: {out:?}");
        let t = d.task("t1").expect("held");
        assert_eq!(t.failures, 0);
        assert!(t.current.is_none());
        // Sent again shortly, to another agent, as the same attempt.
        assert_eq!(d.next_wakeup(), Some(10 + REDISPATCH_DELAY_MS));
        let again = only_run(&d.tick(10 + REDISPATCH_DELAY_MS));
        assert_ne!(again.agent, run.agent);
        assert_eq!(again.attempt, 1);
        let st = d.stats(100);
        assert_eq!((st.stages_failed, st.retries, st.redispatched), (0, 0, 1));
    }

    #[test]
    fn failures_retry_on_other_agents_after_the_delay_then_dead_letter_and_requeue() {
        let mut d = dispatcher(limits("n1"));
        let mut run = only_run(&submit(
            &mut d,
            0,
            record("t", "flaky work", Priority::Normal, "one"),
        ));
        let mut now = 0;
        let mut tried = Vec::new();
        for attempt in 1..=3u32 {
            assert_eq!(run.attempt, attempt);
            tried.push(run.agent.clone());
            now += 10;
            let failed = d
                .stage_finished(now, failure(&run, "agent_error", true))
                .expect("taken");
            assert!(runs(&failed).is_empty(), "a retry waits for its delay");
            assert!(
                events(&failed)
                    .iter()
                    .any(|e| matches!(e, Event::StageFailed { retry: true, .. }))
            );
            assert_eq!(d.next_wakeup(), Some(now + 500));
            assert!(runs(&d.tick(now + 499)).is_empty());
            now += 500;
            run = only_run(&d.tick(now));
            if attempt < 3 {
                assert!(
                    !tried.contains(&run.agent),
                    "retry {attempt} went to {}",
                    run.agent
                );
            }
        }
        assert_eq!(run.attempt, 4);
        let dead = d
            .stage_finished(now + 1, failure(&run, "agent_error", true))
            .expect("taken");
        let ev = events(&dead);
        assert!(ev.contains(&Event::Escalated {
            task: "t".into(),
            coordinator: "a1".into(),
            code: "agent_error".into()
        }));
        assert!(ev.contains(&Event::DeadLettered { task: "t".into() }));
        assert!(
            ev.iter()
                .any(|e| matches!(e, Event::StageFailed { retry: false, .. }))
        );
        assert_eq!(d.task("t").map(|t| t.status), Some(TaskStatus::DeadLetter));
        let stats = d.stats(now);
        assert_eq!(
            (
                stats.dead_letter,
                stats.retries,
                stats.stages_failed,
                stats.running
            ),
            (1, 3, 4, 0)
        );
        assert!(d.active_with_hash(&run.hash).is_none());

        let again = d.requeue(now + 2, "t").expect("requeued");
        assert!(events(&again).contains(&Event::Requeued { task: "t".into() }));
        let rerun = only_run(&again);
        assert_eq!(rerun.attempt, 1);
        let rec = d.task("t").expect("held");
        assert!(rec.error.is_none() && rec.failures == 0 && rec.failed_agents.is_empty());
        d.stage_finished(now + 3, success(&rerun, 1))
            .expect("taken");
        assert_eq!(d.task("t").map(|t| t.status), Some(TaskStatus::Completed));
        assert_eq!(
            d.requeue(now + 4, "t"),
            Err(Refusal::NotDeadLetter {
                status: TaskStatus::Completed
            })
        );
    }

    #[test]
    fn critical_runs_before_background_and_fifo_within_a_priority() {
        let mut d = dispatcher(Limits {
            concurrency: 1,
            ..limits("n1")
        });
        let tasks = [
            ("b1", Priority::Background),
            ("n1", Priority::Normal),
            ("c1", Priority::Critical),
            ("b2", Priority::Background),
            ("c2", Priority::Critical),
        ];
        let mut pending = Vec::new();
        for (i, (id, p)) in tasks.into_iter().enumerate() {
            let mut rec = record(id, &format!("job {id}"), p, "one");
            rec.created_ms = i as u64;
            pending.extend(runs(&submit(&mut d, i as u64, rec)));
        }
        let backlog = d.stats(10).backlog;
        assert_eq!(backlog[0].waiting, 2);
        assert_eq!(backlog[0].oldest_ms, 8);
        let mut order = Vec::new();
        let mut now = 100;
        while let Some(run) = pending.pop() {
            order.push(run.task.clone());
            now += 1;
            pending.extend(runs(
                &d.stage_finished(now, success(&run, 1)).expect("taken"),
            ));
        }
        assert_eq!(order, ["b1", "c1", "c2", "n1", "b2"]);
    }

    #[test]
    fn the_concurrency_limit_holds() {
        let mut d = dispatcher(limits("n1"));
        let mut started = Vec::new();
        for i in 0..5 {
            let rec = record(
                &format!("t{i}"),
                &format!("job {i}"),
                Priority::Normal,
                "two",
            );
            started.extend(runs(&submit(&mut d, i, rec)));
        }
        assert_eq!(started.len(), 2);
        let stats = d.stats(5);
        assert_eq!((stats.running, stats.backlog[2].waiting), (2, 3));
        let next = d.stage_finished(6, success(&started[0], 1)).expect("taken");
        let next = only_run(&next);
        assert_eq!(
            (next.task.as_str(), next.index),
            ("t0", 1),
            "the slot stays with t0"
        );
        assert_eq!(d.stats(6).running, 2);
        let after = d.stage_finished(7, success(&next, 1)).expect("taken");
        assert_eq!(only_run(&after).task, "t2", "t0 done: the next one starts");
        assert_eq!(d.stats(7).running, 2);
    }

    #[test]
    fn deadlines_fail_tasks_and_abort_running_stages() {
        let mut d = dispatcher(Limits {
            concurrency: 1,
            ..limits("n1")
        });
        let mut a = record("a", "job a", Priority::Normal, "one");
        a.deadline_ms = 1000;
        let mut b = record("b", "job b", Priority::Normal, "one");
        b.deadline_ms = 1000;
        let run = only_run(&submit(&mut d, 0, a));
        assert_eq!(
            run.deadline_ms, 1000,
            "the task deadline is sooner than the timeout"
        );
        submit(&mut d, 0, b);
        assert_eq!(d.next_wakeup(), Some(1000));
        assert!(d.tick(999).is_empty());
        let out = d.tick(1000);
        assert!(out.contains(&Action::Abort {
            task: "a".into(),
            agent: run.agent.clone(),
            epoch: 1
        }));
        let failed: Vec<Event> = events(&out)
            .into_iter()
            .filter(|e| matches!(e, Event::Failed { code, .. } if code == "deadline_exceeded"))
            .collect();
        assert_eq!(failed.len(), 2);
        for id in ["a", "b"] {
            let t = d.task(id).expect("kept");
            assert_eq!(t.status, TaskStatus::Failed);
            assert_eq!(
                t.error.as_ref().map(|e| e.code.as_str()),
                Some("deadline_exceeded")
            );
        }
        assert_eq!(d.agent_stats(&run.agent).map(|c| c.load), Some(0));
        assert_eq!(d.next_wakeup(), None);
        assert_eq!(d.stats(1000).failed, 2);
    }

    #[test]
    fn a_stage_timeout_counts_as_a_retryable_failure() {
        let mut d = dispatcher(limits("n1"));
        let run = only_run(&submit(
            &mut d,
            0,
            record("t", "slow job", Priority::Normal, "one"),
        ));
        assert_eq!(d.next_wakeup(), Some(10_000));
        let out = d.tick(10_000);
        assert_eq!(
            out.first(),
            Some(&Action::Abort {
                task: "t".into(),
                agent: run.agent.clone(),
                epoch: 1
            })
        );
        assert!(events(&out).iter().any(
            |e| matches!(e, Event::StageFailed { code, retry: true, .. } if code == "stage_timeout")
        ));
        let counters = d.agent_stats(&run.agent).expect("agent");
        assert_eq!((counters.failed, counters.load), (1, 0));
        let retry = only_run(&d.tick(10_500));
        assert_eq!(retry.attempt, 2);
        assert_ne!(retry.agent, run.agent);
        assert_eq!(
            d.stage_finished(10_600, success(&run, 1)),
            Err(Refusal::Stale { current: 1 }),
            "the timed-out attempt's late result"
        );
    }

    #[test]
    fn a_result_of_a_superseded_epoch_is_refused_after_adoption() {
        let mut a = dispatcher(limits("n1"));
        let out = submit(
            &mut a,
            0,
            record("t", "two stage job", Priority::Normal, "two"),
        );
        let run_a = only_run(&out);
        let last = persisted(&out).pop().expect("persisted");
        assert_eq!(last.status, TaskStatus::InProgress);

        let mut b = dispatcher(limits("n2"));
        let adopted = b.adopt(50, last.clone());
        let rec = persisted(&adopted).pop().expect("persisted");
        assert_eq!(
            (rec.epoch, rec.owner.as_str(), rec.status),
            (2, "n2", TaskStatus::Pending)
        );
        assert!(events(&adopted).contains(&Event::Adopted {
            task: "t".into(),
            epoch: 2
        }));
        assert!(b.adopt(51, rec.clone()).is_empty(), "same epoch: a no-op");
        assert_eq!(b.next_wakeup(), Some(0), "queued work waits for a tick");
        let run_b = only_run(&b.tick(60));
        assert_eq!((run_b.epoch, run_b.index), (2, 0));
        assert_eq!(
            b.stage_finished(70, success(&run_a, 1)),
            Err(Refusal::Stale { current: 2 })
        );
        assert_eq!(b.stats(70).stale_results, 1);
        assert_eq!(b.stats(70).adopted, 1);
        let taken = b
            .stage_finished(80, success(&run_b, 1))
            .expect("current epoch");
        match taken.first() {
            Some(Action::RecordStage(s)) => assert_eq!((s.epoch, s.index, s.attempt), (2, 0, 1)),
            other => panic!("stage recorded first, got {other:?}"),
        }
        assert_eq!(only_run(&taken).index, 1);
        assert!(
            b.adopt(90, last).is_empty(),
            "an older epoch changes nothing"
        );
    }

    #[test]
    fn a_duplicate_delivery_of_a_result_is_refused() {
        let mut d = dispatcher(limits("n1"));
        let run = only_run(&submit(
            &mut d,
            0,
            record("t", "a job", Priority::Normal, "two"),
        ));
        let first = d.stage_finished(1, success(&run, 1)).expect("taken");
        assert_eq!(
            first
                .iter()
                .filter(|a| matches!(a, Action::RecordStage(_)))
                .count(),
            1
        );
        assert_eq!(
            d.stage_finished(2, success(&run, 1)),
            Err(Refusal::Stale { current: 1 })
        );
        let unknown = StageOutcome {
            task: "nope".into(),
            ..success(&run, 1)
        };
        assert_eq!(d.stage_finished(3, unknown), Err(Refusal::NotFound));
    }

    #[test]
    fn a_spent_budget_fails_the_task_and_caps_the_last_stage() {
        let mut d = dispatcher(limits("n1"));
        let mut rec = record("t", "budgeted", Priority::Normal, "two");
        rec.token_budget = 150;
        let first = only_run(&submit(&mut d, 0, rec));
        assert_eq!((first.max_tokens, first.budget_capped), (100, false));
        let second = only_run(&d.stage_finished(1, success(&first, 100)).expect("taken"));
        assert_eq!((second.max_tokens, second.budget_capped), (50, true));

        let mut rec = record("u", "spent", Priority::Normal, "two");
        rec.token_budget = 100;
        let first = only_run(&submit(&mut d, 2, rec));
        let out = d.stage_finished(3, success(&first, 100)).expect("taken");
        assert!(runs(&out).is_empty());
        assert!(events(&out).contains(&Event::Failed {
            task: "u".into(),
            code: "budget_exceeded".into()
        }));
        assert_eq!(
            d.task("u").map(|t| (t.status, t.tokens_used)),
            Some((TaskStatus::Failed, 100))
        );

        let mut rec = record("v", "bench", Priority::Normal, "bench");
        rec.token_budget = 0;
        let noop = only_run(&submit(&mut d, 4, rec));
        assert_eq!(
            (noop.max_tokens, noop.budget_capped),
            (0, false),
            "bench needs no budget"
        );
    }

    #[test]
    fn cancel_aborts_running_work_and_refuses_finished_tasks() {
        let mut d = dispatcher(limits("n1"));
        let run = only_run(&submit(
            &mut d,
            0,
            record("t", "to cancel", Priority::Normal, "one"),
        ));
        let out = d.cancel(1, "t").expect("cancelled");
        assert_eq!(
            out.first(),
            Some(&Action::Abort {
                task: "t".into(),
                agent: run.agent.clone(),
                epoch: 1
            })
        );
        assert!(events(&out).contains(&Event::Cancelled { task: "t".into() }));
        assert_eq!(
            persisted(&out).pop().map(|r| r.status),
            Some(TaskStatus::Cancelled)
        );
        assert_eq!(
            d.cancel(2, "t"),
            Err(Refusal::Finished {
                status: TaskStatus::Cancelled
            })
        );
        let run = only_run(&submit(
            &mut d,
            3,
            record("u", "to finish", Priority::Normal, "one"),
        ));
        d.stage_finished(4, success(&run, 1)).expect("taken");
        assert_eq!(
            d.cancel(5, "u"),
            Err(Refusal::Finished {
                status: TaskStatus::Completed
            })
        );
        assert_eq!(d.cancel(6, "nope"), Err(Refusal::NotFound));
        assert_eq!(d.stats(6).cancelled, 1);
    }

    #[test]
    fn a_full_queue_and_bad_submissions_are_refused() {
        let mut d = dispatcher(Limits {
            queue_bound: 2,
            concurrency: 1,
            ..limits("n1")
        });
        for i in 0..3 {
            submit(
                &mut d,
                i,
                record(
                    &format!("t{i}"),
                    &format!("job {i}"),
                    Priority::Normal,
                    "one",
                ),
            );
        }
        match d.submit(4, record("t9", "job 9", Priority::Normal, "one")) {
            Err(Refusal::QueueFull { retry_after_ms }) => assert!(retry_after_ms >= 1000),
            other => panic!("queue full expected, got {other:?}"),
        }
        assert_eq!(
            d.submit(4, record("x", "x", Priority::Normal, "nope")),
            Err(Refusal::UnknownWorkflow)
        );
        let mut rec = record("y", "y", Priority::Normal, "one");
        rec.capabilities = vec!["cobol".into()];
        assert_eq!(
            d.submit(4, rec),
            Err(Refusal::NoCapableAgent {
                capability: "cobol".into()
            })
        );
    }

    #[test]
    fn a_stage_waits_for_an_online_agent_and_keeps_its_slot() {
        let mut d = Dispatcher::new(
            Limits {
                concurrency: 1,
                ..limits("n1")
            },
            catalog(),
        );
        let out = submit(&mut d, 0, record("t", "offline", Priority::Normal, "one"));
        assert!(runs(&out).is_empty());
        assert_eq!(
            persisted(&out).pop().map(|r| r.status),
            Some(TaskStatus::InProgress)
        );
        assert!(runs(&d.tick(10)).is_empty());
        let run = only_run(&d.set_online(20, &["a2".to_string()]));
        assert_eq!(run.agent, "a2");
    }

    // ----- a cluster of three dispatchers over a simulated durable store --------------

    const NODES: [&str; 3] = ["n1", "n2", "n3"];
    const RETRY_DELAY_MS: u64 = 300;

    #[derive(Debug, Clone)]
    enum Op {
        Submit { objective: u8, priority: u8 },
        Deliver { pick: u8, ok: bool, twice: bool },
        Redeliver { pick: u8 },
        Kill { node: u8 },
        Restart { node: u8 },
        Advance { ms: u16 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..6, 0u8..5).prop_map(|(objective, priority)| Op::Submit { objective, priority }),
            6 => (any::<u8>(), prop::bool::weighted(0.8), prop::bool::weighted(0.2))
                .prop_map(|(pick, ok, twice)| Op::Deliver { pick, ok, twice }),
            1 => any::<u8>().prop_map(|pick| Op::Redeliver { pick }),
            1 => (0u8..3).prop_map(|node| Op::Kill { node }),
            1 => (0u8..3).prop_map(|node| Op::Restart { node }),
            3 => (0u16..4000).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    /// Three nodes, their dispatchers (the live ones), and what they made durable.
    #[derive(Default)]
    struct Cluster {
        live: BTreeMap<String, Dispatcher>,
        store: BTreeMap<String, TaskRecord>,
        stages: BTreeMap<(String, u32), StageRecord>,
        /// Runs sent and not answered: (node that sent it, the run).
        runs: Vec<(String, RunStage)>,
        /// Outcomes delivered once, for late or repeated delivery: (task hash, outcome).
        delivered: VecDeque<(String, StageOutcome)>,
        accepted: BTreeSet<String>,
        dead_lettered: BTreeSet<String>,
        now: u64,
        next_id: u64,
    }

    impl Cluster {
        fn new() -> Self {
            let mut c = Cluster::default();
            for n in NODES {
                let d = c.fresh(n);
                c.live.insert(n.to_string(), d);
            }
            c
        }

        fn fresh(&self, node: &str) -> Dispatcher {
            let limits = Limits {
                node: node.into(),
                queue_bound: 64,
                concurrency: 3,
                max_retries: 3,
                retry_delay_ms: RETRY_DELAY_MS,
                stage_timeout_ms: 5000,
                seed: u64::from(node.as_bytes()[1]),
            };
            let mut d = Dispatcher::new(limits, catalog());
            let none = d.set_online(self.now, &AGENTS.map(String::from));
            assert!(none.is_empty());
            d
        }

        fn owner(&self, hash: &str) -> Option<String> {
            rendezvous(hash, self.live.keys().map(String::as_str)).map(String::from)
        }

        fn apply(&mut self, node: &str, actions: Vec<Action>) {
            for a in actions {
                match a {
                    Action::Persist(rec) => {
                        if let Some(old) = self.store.get(&rec.id) {
                            assert!(
                                rec.epoch >= old.epoch,
                                "{node} wrote {} at a superseded epoch",
                                rec.id
                            );
                        }
                        self.store.insert(rec.id.clone(), rec);
                    }
                    Action::RecordStage(s) => {
                        let key = (s.task.clone(), s.index);
                        assert!(
                            self.stages.insert(key, s).is_none(),
                            "a stage result written twice"
                        );
                    }
                    Action::Run(r) => self.runs.push((node.to_string(), r)),
                    Action::Abort { task, agent, epoch } => self.runs.retain(|(n, r)| {
                        !(n == node && r.task == task && r.agent == agent && r.epoch == epoch)
                    }),
                    Action::Event(Event::DeadLettered { task }) => {
                        self.dead_lettered.insert(task);
                    }
                    Action::Event(_) => {}
                }
            }
        }

        /// Stages recorded for `task`, counted from 0 without a gap.
        fn recorded_stages(&self, task: &str) -> u32 {
            (0..)
                .take_while(|i| self.stages.contains_key(&(task.to_string(), *i)))
                .count() as u32
        }

        /// Every live node holds exactly the unfinished tasks it owns.
        fn rebalance(&mut self) {
            let nodes: Vec<String> = self.live.keys().cloned().collect();
            for n in &nodes {
                let moved: Vec<String> = self.live[n]
                    .tasks()
                    .filter(|t| !t.status.is_finished())
                    .filter(|t| self.owner(&t.hash).as_deref() != Some(n.as_str()))
                    .map(|t| t.id.clone())
                    .collect();
                for id in moved {
                    let out = self
                        .live
                        .get_mut(n)
                        .map(|d| d.release(&id))
                        .unwrap_or_default();
                    self.apply(n, out);
                }
            }
            let unfinished: Vec<TaskRecord> = self
                .store
                .values()
                .filter(|r| !r.status.is_finished())
                .cloned()
                .collect();
            for mut rec in unfinished {
                let Some(owner) = self.owner(&rec.hash) else {
                    continue;
                };
                rec.stage = self.recorded_stages(&rec.id);
                let now = self.now;
                let out = self
                    .live
                    .get_mut(&owner)
                    .map(|d| d.adopt(now, rec))
                    .unwrap_or_default();
                self.apply(&owner, out);
            }
            self.tick_all();
        }

        fn tick_all(&mut self) {
            let nodes: Vec<String> = self.live.keys().cloned().collect();
            for n in nodes {
                let now = self.now;
                let out = self
                    .live
                    .get_mut(&n)
                    .map(|d| d.tick(now))
                    .unwrap_or_default();
                self.apply(&n, out);
            }
        }

        fn submit(&mut self, objective: u8, priority: u8) {
            let text = format!("objective {objective}");
            let hash = task_hash(&text, &serde_json::Value::Null);
            let Some(owner) = self.owner(&hash) else {
                return;
            };
            self.next_id += 1;
            let id = format!("t{}", self.next_id);
            let mut rec = record(&id, &text, Priority::ALL[usize::from(priority) % 5], "two");
            rec.created_ms = self.now;
            rec.deadline_ms = self.now + 1_000_000_000;
            rec.token_budget = 1_000_000;
            let now = self.now;
            let Some(d) = self.live.get_mut(&owner) else {
                return;
            };
            match d.submit(now, rec) {
                Ok(out) => {
                    self.accepted.insert(id);
                    self.apply(&owner, out);
                }
                Err(Refusal::Duplicate { existing }) => {
                    let held = d.task(&existing).expect("the duplicate is held");
                    assert!(held.hash == hash && held.status.is_active());
                }
                Err(e) => panic!("unexpected refusal {e:?}"),
            }
        }

        fn outcome(run: &RunStage, ok: bool) -> StageOutcome {
            if ok {
                success(run, 3)
            } else {
                failure(run, "agent_error", true)
            }
        }

        /// Delivers an outcome to `node`'s dispatcher if it lives, else to the task's owner.
        fn deliver_to(
            &mut self,
            node: Option<&str>,
            hash: &str,
            outcome: StageOutcome,
        ) -> Option<Result<(), Refusal>> {
            let target = node
                .filter(|n| self.live.contains_key(*n))
                .map(String::from)
                .or_else(|| self.owner(hash))?;
            let now = self.now;
            let result = self
                .live
                .get_mut(&target)?
                .stage_finished(now, outcome.clone());
            Some(result.map(|out| {
                for a in &out {
                    if let Action::RecordStage(s) = a {
                        assert_eq!(
                            (s.epoch, s.index, s.agent.as_str()),
                            (outcome.epoch, outcome.index, outcome.agent.as_str()),
                            "a result was taken under another epoch"
                        );
                    }
                }
                self.apply(&target, out)
            }))
        }

        fn deliver(&mut self, pick: u8, ok: bool, twice: bool) {
            if self.runs.is_empty() {
                return;
            }
            let (node, run) = self.runs.remove(usize::from(pick) % self.runs.len());
            let outcome = Self::outcome(&run, ok);
            let first = self.deliver_to(Some(&node), &run.hash, outcome.clone());
            if twice && first.is_some() {
                let again = self.deliver_to(Some(&node), &run.hash, outcome.clone());
                assert!(
                    matches!(again, Some(Err(_))),
                    "a second delivery was taken: {again:?}"
                );
            }
            self.delivered.push_back((run.hash, outcome));
            if self.delivered.len() > 32 {
                self.delivered.pop_front();
            }
        }

        fn redeliver(&mut self, pick: u8) {
            if self.delivered.is_empty() {
                return;
            }
            let i = usize::from(pick) % self.delivered.len();
            let Some((hash, outcome)) = self.delivered.get(i).cloned() else {
                return;
            };
            let _ = self.deliver_to(None, &hash, outcome);
        }

        fn kill(&mut self, node: u8) {
            if self.live.remove(NODES[usize::from(node)]).is_some() {
                self.rebalance();
            }
        }

        fn restart(&mut self, node: u8) {
            let n = NODES[usize::from(node)];
            if !self.live.contains_key(n) {
                let d = self.fresh(n);
                self.live.insert(n.to_string(), d);
                self.rebalance();
            }
        }

        fn advance(&mut self, ms: u16) {
            self.now += u64::from(ms);
            self.tick_all();
        }

        fn run(&mut self, op: Op) {
            match op {
                Op::Submit {
                    objective,
                    priority,
                } => self.submit(objective, priority),
                Op::Deliver { pick, ok, twice } => self.deliver(pick, ok, twice),
                Op::Redeliver { pick } => self.redeliver(pick),
                Op::Kill { node } => self.kill(node),
                Op::Restart { node } => self.restart(node),
                Op::Advance { ms } => self.advance(ms),
            }
        }

        fn assert_hashes_unique(&self) {
            for (n, d) in &self.live {
                let mut seen = BTreeSet::new();
                for t in d.tasks().filter(|t| t.status.is_active()) {
                    assert!(
                        seen.insert(t.hash.clone()),
                        "{n} holds two active tasks with one hash"
                    );
                }
            }
        }

        fn settled(&self) -> bool {
            self.runs.is_empty()
                && self.accepted.iter().all(|id| {
                    self.store.get(id).is_some_and(|r| {
                        r.status.is_finished() || r.status == TaskStatus::DeadLetter
                    })
                })
        }

        /// Everyone up, everything outstanding answered with success, time moving on.
        fn heal(&mut self) {
            for i in 0..NODES.len() {
                self.restart(i as u8);
            }
            for _ in 0..500 {
                while !self.runs.is_empty() {
                    self.deliver(0, true, false);
                }
                if self.settled() {
                    return;
                }
                self.now += RETRY_DELAY_MS + 1;
                self.tick_all();
            }
            panic!(
                "the cluster did not settle: {:?}",
                self.store
                    .values()
                    .filter(|r| !r.status.is_finished())
                    .collect::<Vec<_>>()
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn a_cluster_loses_no_task_and_records_each_stage_once(ops in prop::collection::vec(op(), 1..60)) {
            let mut c = Cluster::new();
            for op in ops {
                c.run(op);
                c.assert_hashes_unique();
            }
            c.heal();
            c.assert_hashes_unique();
            for id in &c.accepted {
                let rec = c.store.get(id).expect("an accepted task is stored");
                match rec.status {
                    TaskStatus::Completed => {
                        prop_assert_eq!(c.recorded_stages(id), rec.stages_total);
                        prop_assert_eq!(rec.stage, rec.stages_total);
                    }
                    TaskStatus::DeadLetter => prop_assert!(c.dead_lettered.contains(id)),
                    other => prop_assert!(false, "{} ended {:?}", id, other),
                }
            }
        }
    }
}
