//! What a task is, as it is stored, replicated and answered: its record, its stage results, its
//! priority and status, the task hash and the rendezvous owner.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The reserved namespace of task records and stage results (clients cannot write `_sys*`).
pub const TASKS_NAMESPACE: &str = "_sys_tasks";
/// The reserved namespace of agent state records (where each agent is, its counters).
pub const AGENTS_NAMESPACE: &str = "_sys_agents";

/// Context keys the task hash covers (DESIGN §6).
pub const HASHED_CONTEXT_KEYS: [&str; 4] = [
    "file_paths",
    "service_names",
    "operation_type",
    "technology_stack",
];

/// Queue priority; `Critical` runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Critical,
    High,
    Normal,
    Low,
    Background,
}

impl Priority {
    pub const ALL: [Priority; 5] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
        Priority::Background,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
            Priority::Background => "background",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// 0 for critical … 4 for background.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Accepted, waiting for a workflow slot (or for a retry).
    Pending,
    /// Its workflow runs.
    InProgress,
    Completed,
    /// Ended without a result: deadline, budget, a stage that cannot be retried.
    Failed,
    Cancelled,
    /// Retries exhausted and escalated to the coordinator; an admin may requeue it.
    DeadLetter,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::InProgress => "in_progress",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::DeadLetter => "dead_letter",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            TaskStatus::Pending,
            TaskStatus::InProgress,
            TaskStatus::Completed,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
            TaskStatus::DeadLetter,
        ]
        .into_iter()
        .find(|s2| s2.as_str() == s)
    }

    /// Nothing more happens to it (a dead-lettered task waits for an admin, so it is not
    /// finished).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    /// Pending or in progress: its hash is taken.
    pub fn is_active(self) -> bool {
        matches!(self, TaskStatus::Pending | TaskStatus::InProgress)
    }
}

/// The stage attempt running now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub agent: String,
    /// The agent's home node when the stage was sent.
    pub node: String,
    /// 1 for the first attempt of this stage.
    pub attempt: u32,
    pub started_ms: u64,
}

/// Why a task failed, with a stable code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailure {
    pub code: String,
    pub message: String,
}

/// A task, as stored under [`TASKS_NAMESPACE`]`/task:{id}` and replicated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    /// Hex SHA-256 task hash ([`task_hash`]).
    pub hash: String,
    pub objective: String,
    pub task_definition: Option<String>,
    pub priority: Priority,
    pub workflow: String,
    /// The request's context object (`null` when none).
    pub context: serde_json::Value,
    /// Capabilities the task needs of its agents (each held by some agent).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Who submitted it (owner-or-admin reads).
    pub submitter: String,
    pub idempotency_key: Option<String>,
    pub created_ms: u64,
    pub deadline_ms: u64,
    /// Tokens it may spend over all its stages.
    pub token_budget: u32,
    pub tokens_used: u32,
    pub status: TaskStatus,
    /// Fencing epoch: raised each time an owner adopts the task.
    pub epoch: u64,
    /// The node whose dispatcher runs it.
    pub owner: String,
    /// Stages in its workflow.
    pub stages_total: u32,
    /// Completed stages (the index of the next stage to run).
    pub stage: u32,
    pub current: Option<Running>,
    /// Failed attempts of the current stage.
    pub failures: u32,
    /// Agents that failed the current stage (a retry goes to another one).
    #[serde(default)]
    pub failed_agents: Vec<String>,
    /// Agents that completed a stage of it, in order, each once.
    pub agents_involved: Vec<String>,
    pub error: Option<TaskFailure>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub updated_ms: u64,
}

impl TaskRecord {
    /// A new pending task of `objective` with `context` (its hash computed from both, normal
    /// priority) on `workflow`, submitted by `submitter` at `now_ms`, before an owner takes it:
    /// epoch 0, no owner, no stage counted, an hour to its deadline, a budget of 16,384 tokens.
    /// Callers set what differs.
    pub fn new(
        id: &str,
        objective: &str,
        context: serde_json::Value,
        workflow: &str,
        submitter: &str,
        now_ms: u64,
    ) -> Self {
        Self {
            id: id.to_string(),
            hash: task_hash(objective, &context),
            objective: objective.to_string(),
            task_definition: None,
            priority: Priority::Normal,
            workflow: workflow.to_string(),
            context,
            capabilities: Vec::new(),
            submitter: submitter.to_string(),
            idempotency_key: None,
            created_ms: now_ms,
            deadline_ms: now_ms + 3_600_000,
            token_budget: 16_384,
            tokens_used: 0,
            status: TaskStatus::Pending,
            epoch: 0,
            owner: String::new(),
            stages_total: 0,
            stage: 0,
            current: None,
            failures: 0,
            failed_agents: Vec::new(),
            agents_involved: Vec::new(),
            error: None,
            started_ms: None,
            finished_ms: None,
            updated_ms: now_ms,
        }
    }

    /// Completed stages / stages.
    pub fn progress(&self) -> f64 {
        if self.stages_total == 0 {
            return 0.0;
        }
        f64::from(self.stage) / f64::from(self.stages_total)
    }

    /// Key of the record in [`TASKS_NAMESPACE`].
    pub fn key(id: &str) -> String {
        format!("task:{id}")
    }
}

/// One stage's result, as stored under [`TASKS_NAMESPACE`]`/task_{id}_stage_{stage}`; written
/// once, by the owner of the epoch that ran it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub task: String,
    pub stage: String,
    pub index: u32,
    pub epoch: u64,
    pub agent: String,
    pub node: String,
    pub attempt: u32,
    pub text: String,
    /// The stage's own turn of the prompt (the agent and its step, without the task): a later
    /// stage replays it word for word, so its prompt extends this one's and the engine's
    /// prefix cache finds it.
    #[serde(default)]
    pub prompt: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub duration_ms: u64,
    pub finished_ms: u64,
}

impl StageRecord {
    /// Key of a stage result in [`TASKS_NAMESPACE`].
    pub fn key(task: &str, stage: &str) -> String {
        format!("task_{task}_stage_{stage}")
    }
}

/// The live value at `namespace`/`key` in this node's replica, decoded from its JSON; `None`
/// when absent, expired, unreadable or of another shape.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    memory: &crate::Memory,
    namespace: &str,
    key: &str,
) -> Option<T> {
    let item = memory
        .storage()
        .memory
        .get(namespace, key, super::now_ms())
        .ok()??;
    serde_json::from_str(&item.value_json).ok()
}

/// Lowercase, every run of whitespace one space, trimmed.
pub fn normalise_objective(objective: &str) -> String {
    objective
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// JSON with object keys sorted at every level (serde_json's map is ordered by key unless
/// `preserve_order` is on; this does not rely on it).
pub fn canonical_json(v: &serde_json::Value) -> String {
    fn write(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    if let Some(v) = m.get(k) {
                        write(v, out);
                    }
                }
                out.push('}');
            }
            serde_json::Value::Array(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(v, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// The task hash (DESIGN §6): hex SHA-256 over the normalised objective, a newline, and the
/// canonical JSON of the context's hashed keys (absent keys left out).
pub fn task_hash(objective: &str, context: &serde_json::Value) -> String {
    let mut picked = serde_json::Map::new();
    if let serde_json::Value::Object(m) = context {
        for k in HASHED_CONTEXT_KEYS {
            if let Some(v) = m.get(k) {
                picked.insert(k.to_string(), v.clone());
            }
        }
    }
    let mut h = Sha256::new();
    h.update(normalise_objective(objective).as_bytes());
    h.update(b"\n");
    h.update(canonical_json(&serde_json::Value::Object(picked)).as_bytes());
    hex::encode(h.finalize())
}

/// Rendezvous (highest random weight) choice of `key` among `candidates`: the candidate with
/// the largest SHA-256 of `candidate \0 key`. Every node with the same candidates picks the
/// same one; removing a candidate moves only the keys it had.
pub fn rendezvous<'a, I>(key: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    candidates
        .into_iter()
        .map(|c| {
            let mut h = Sha256::new();
            h.update(c.as_bytes());
            h.update([0]);
            h.update(key.as_bytes());
            let d = h.finalize();
            let mut w = [0u8; 8];
            w.copy_from_slice(&d[..8]);
            (u64::from_be_bytes(w), c)
        })
        .max()
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_ignores_case_spacing_key_order_and_unhashed_keys() {
        let a = task_hash(
            "Build  the API",
            &serde_json::json!({"file_paths": ["a", "b"], "operation_type": "build", "note": 1}),
        );
        let b = task_hash(
            " build the api ",
            &serde_json::json!({"operation_type": "build", "file_paths": ["a", "b"]}),
        );
        assert_eq!(a, b);
        let c = task_hash(
            "build the api",
            &serde_json::json!({"file_paths": ["b", "a"], "operation_type": "build"}),
        );
        assert_ne!(a, c, "array order is part of the context");
        assert_ne!(a, task_hash("build the api", &serde_json::Value::Null));
    }

    #[test]
    fn rendezvous_moves_only_the_keys_of_a_removed_candidate() {
        let all = ["node-1", "node-2", "node-3"];
        let mut moved = 0;
        for i in 0..300 {
            let key = format!("k{i}");
            let before = rendezvous(&key, all.iter().copied()).map(String::from);
            let after = rendezvous(&key, ["node-1", "node-2"].iter().copied());
            match before.as_deref() {
                Some("node-3") => moved += 1,
                b => assert_eq!(b, after, "a key of a remaining node moved"),
            }
        }
        assert!((50..150).contains(&moved), "{moved} of 300 on node-3");
        assert_eq!(rendezvous("x", std::iter::empty()), None);
    }
}
