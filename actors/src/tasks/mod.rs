//! Tasks: durable, deduplicated, fenced work run by the agents through workflows.
//!
//! - `model`: the task record and stage results as stored, the task hash, rendezvous owners.
//! - `dispatcher`: the sans-IO state machine of one node's tasks: queue by priority, workflow
//!   slots, anti-collision assignment, retries, dead letters, deadlines, fencing epochs.
//! - `events`: the node's bounded event bus for `/v1/events`.
//! - `service`: the IO shell: [`TaskService`] owns a dispatcher, persists what it decides
//!   through [`crate::Memory`], forwards submissions to the owner of their hash, runs stages
//!   on the agents' home nodes and adopts the tasks of owners that died.
//! - `stall`: whether this node is back from a stall and holds off task ownership.
//!
//! [`TaskApi`] is what the gateway calls.

pub mod dispatcher;
pub mod events;
pub mod model;
mod service;
#[cfg(test)]
mod service_tests;
mod stall;
mod unfinished;
pub mod wire;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::inference::BoxFuture;

pub use events::{Event, EventBus, NewEvent, Subscription};
pub use model::{
    Priority, Running, StageRecord, TaskFailure, TaskRecord, TaskStatus, rendezvous, task_hash,
};
pub use service::{AlonePeers, QuicTaskPeers, TaskParts, TaskPeers, TaskService};

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A submission, validated by the gateway's JSON layer for shape only; [`TaskApi::submit`]
/// validates the values (and names the field of a bad one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submit {
    pub objective: String,
    pub task_definition: Option<String>,
    /// `normal` when absent.
    pub priority: Option<String>,
    /// The configured default workflow when absent.
    pub workflow: Option<String>,
    /// An object; the task hash covers its keys `file_paths`, `service_names`,
    /// `operation_type`, `technology_stack`.
    pub context: Option<serde_json::Value>,
    /// Capabilities the task needs; each must be held by some agent.
    pub capabilities: Vec<String>,
    /// Token budget over all stages; at most the configured one.
    pub token_budget: Option<u32>,
    /// Seconds until its deadline; at most the configured maximum.
    pub deadline_s: Option<u64>,
    /// The `Idempotency-Key` header: a resubmission with the same key by the same submitter
    /// answers the first task.
    pub idempotency_key: Option<String>,
    /// The principal submitting.
    pub submitter: String,
    /// The request id, for the audit entry.
    pub request_id: String,
}

/// The answer to a submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submitted {
    pub task: TaskRecord,
    /// A task with the same hash is pending or running: `task` is that one, nothing new was
    /// started.
    pub deduplicated: bool,
    /// The same `Idempotency-Key` was used before: `task` is the first submission's.
    pub replayed: bool,
}

/// Which tasks to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only this submitter's (`None`: everyone's; admins).
    pub submitter: Option<String>,
    pub status: Option<TaskStatus>,
    pub limit: usize,
}

/// An agent as `/v1/agents` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub role: String,
    pub priority: u32,
    pub capabilities: Vec<String>,
    pub specialization: String,
    pub clearance: String,
    /// Its parent in the supervision tree (`None` for the root).
    pub parent: Option<String>,
    /// Its home node (`None` when no live node can host it).
    pub node: Option<String>,
    /// `idle`, `busy`, `error` or `offline`.
    pub state: String,
    pub current_task: Option<String>,
    pub load: u32,
    pub max_load: u32,
    pub completed: u64,
    pub failed: u64,
    pub success_rate: f64,
    pub mean_stage_ms: f64,
    pub restarts: u32,
    /// The model it uses.
    pub model: Option<String>,
}

/// A direct question to one agent (`POST /v1/agents/query`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentQuery {
    /// The agent to ask; the best-scored idle one for the question when absent.
    pub agent: Option<String>,
    pub question: String,
    pub max_tokens: Option<u32>,
    pub asker: String,
    pub request_id: String,
}

/// An agent's direct answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentAnswer {
    pub agent: String,
    pub node: String,
    pub answer: String,
    /// Mean probability of the generated tokens … or, where the engine gives no
    /// probabilities, computed from how the generation ended and its length; never a
    /// constant.
    pub confidence: f64,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub duration_ms: u64,
}

/// Backlog of one priority.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Backlog {
    pub priority: String,
    /// Tasks waiting (not running) on this node.
    pub waiting: u64,
    /// Age of the oldest waiting one, in milliseconds (0 when none).
    pub oldest_ms: u64,
}

/// `/v1/stats` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskStats {
    pub node: String,
    pub backlog: Vec<Backlog>,
    pub running: u64,
    pub concurrency: u64,
    pub queue_bound: u64,
    pub dead_letter: u64,
    pub submitted: u64,
    pub deduplicated: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub stages_completed: u64,
    pub stages_failed: u64,
    pub retries: u64,
    /// Stage results refused because their epoch was superseded.
    pub stale_results: u64,
    /// Tasks adopted from owners that died or left.
    pub adopted: u64,
    /// Stages sent to another agent because theirs could not take them (at its load limit,
    /// moving, unreachable): not failures.
    pub redispatched: u64,
    /// Events of this node not relayed to its peers (past a batch of 512 per 100 ms, or the
    /// relay fell behind the event bus).
    pub events_not_relayed: u64,
}

/// What the gateway calls. Reads are of this node's replica (task records replicate to
/// every node); changes go to the owner of the task.
pub trait TaskApi: Send + Sync {
    /// Validate, make durable (here and on one peer when one is alive), queue on the owner.
    fn submit(&self, req: Submit) -> BoxFuture<'_, Result<Submitted, Error>>;
    /// A task by id.
    fn get(&self, id: &str) -> Result<Option<TaskRecord>, Error>;
    /// Tasks, newest first.
    fn list(&self, q: ListQuery) -> Result<Vec<TaskRecord>, Error>;
    /// Stage results of a task, in stage order.
    fn results(&self, id: &str) -> Result<Vec<StageRecord>, Error>;
    /// Cancel a task (its running generation stops within a second). A finished one is
    /// [`Error::TaskFinished`].
    fn cancel(
        &self,
        id: &str,
        by: &str,
        request_id: &str,
    ) -> BoxFuture<'_, Result<TaskRecord, Error>>;
    /// Put a dead-lettered task back in the queue.
    fn requeue(
        &self,
        id: &str,
        by: &str,
        request_id: &str,
    ) -> BoxFuture<'_, Result<TaskRecord, Error>>;
    /// Every agent of the swarm file, where it is and how it does.
    fn agents(&self) -> Vec<AgentView>;
    /// Ask one agent directly.
    fn query_agent(&self, q: AgentQuery) -> BoxFuture<'_, Result<AgentAnswer, Error>>;
    fn stats(&self) -> TaskStats;
    /// The node's event bus.
    fn events(&self) -> &EventBus;
}
