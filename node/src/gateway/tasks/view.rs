//! The JSON of a task, as every task route answers it: one function builds it from the stored
//! record, so the routes cannot drift apart. Times are Unix milliseconds.

use serde::Serialize;
use swarm_actors::tasks::{StageRecord, TaskRecord};

use crate::gateway::openapi::schemas;

/// A task.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(in crate::gateway) struct TaskView {
    task_id: String,
    #[schema(value_type = schemas::TaskStatus)]
    status: &'static str,
    objective: String,
    #[schema(value_type = schemas::Priority)]
    priority: &'static str,
    workflow: String,
    /// The stage running or next to run; null once every stage is done (or when the node
    /// does not know the workflow).
    #[schema(required = true)]
    current_stage: Option<String>,
    /// Completed stages / stages, 0 to 1.
    #[schema(minimum = 0, maximum = 1)]
    progress: f64,
    stages_total: u32,
    stages_completed: u32,
    /// Agents that completed a stage of it, in order.
    agents_involved: Vec<String>,
    created_at: u64,
    #[schema(required = true)]
    started_at: Option<u64>,
    #[schema(required = true)]
    finished_at: Option<u64>,
    deadline_at: u64,
    updated_at: u64,
    /// Who submitted it.
    submitter: String,
    /// The task hash (hex SHA-256 of the normalised objective and the hashed context keys).
    hash: String,
    /// Fencing epoch: raised each time a new owner adopts the task.
    epoch: u64,
    /// The node whose dispatcher runs it.
    owner: String,
    /// The stage attempt running now; null when none runs.
    #[schema(required = true)]
    running: Option<RunningView>,
    tokens_used: u32,
    token_budget: u32,
    /// Why it failed; null unless it did.
    #[schema(required = true)]
    error: Option<FailureView>,
}

/// The stage attempt running now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(in crate::gateway) struct RunningView {
    agent: String,
    /// The agent's home node when the stage was sent.
    node: String,
    /// 1 for the first attempt of the stage.
    attempt: u32,
    started_at: u64,
}

/// Why a task failed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(in crate::gateway) struct FailureView {
    /// Stable: `deadline_exceeded`, `budget_exceeded`, `stage_failed`, ...
    code: String,
    message: String,
}

/// The answer to a submission: the task, and how it came to be the answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(in crate::gateway) struct SubmittedView {
    #[serde(flatten)]
    task: TaskView,
    /// A task with the same hash was pending or running: this is that one, nothing new was
    /// started.
    deduplicated: bool,
    /// The same `Idempotency-Key` was used before: this is the first submission's task.
    replayed: bool,
}

impl SubmittedView {
    pub(super) fn new(task: TaskView, deduplicated: bool, replayed: bool) -> Self {
        Self {
            task,
            deduplicated,
            replayed,
        }
    }
}

/// `GET /v1/tasks`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(in crate::gateway) struct TaskList {
    pub(super) tasks: Vec<TaskView>,
}

/// `GET /v1/tasks/{id}/results`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(in crate::gateway) struct ResultsView {
    task_id: String,
    #[schema(value_type = schemas::TaskStatus)]
    status: &'static str,
    #[schema(minimum = 0, maximum = 1)]
    progress: f64,
    /// One per completed stage, in stage order.
    results: Vec<StageView>,
}

/// One stage's result.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(in crate::gateway) struct StageView {
    /// The stage's name in its workflow.
    stage: String,
    /// Its position in the workflow, from 0.
    index: u32,
    /// The agent that ran it, on which node, in which owner epoch and attempt.
    agent: String,
    node: String,
    epoch: u64,
    attempt: u32,
    /// What the agent wrote.
    text: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    duration_ms: u64,
    finished_ms: u64,
}

/// The view of `r`; `stages` are the stage names of its workflow, when the node knows it.
pub(super) fn task_view(r: TaskRecord, stages: Option<&[String]>) -> TaskView {
    let progress = r.progress();
    let current_stage = stages
        .filter(|_| !r.status.is_finished())
        .and_then(|names| names.get(usize::try_from(r.stage).ok()?))
        .cloned();
    TaskView {
        task_id: r.id,
        status: r.status.as_str(),
        objective: r.objective,
        priority: r.priority.as_str(),
        workflow: r.workflow,
        current_stage,
        progress,
        stages_total: r.stages_total,
        stages_completed: r.stage,
        agents_involved: r.agents_involved,
        created_at: r.created_ms,
        started_at: r.started_ms,
        finished_at: r.finished_ms,
        deadline_at: r.deadline_ms,
        updated_at: r.updated_ms,
        submitter: r.submitter,
        hash: r.hash,
        epoch: r.epoch,
        owner: r.owner,
        running: r.current.map(|c| RunningView {
            agent: c.agent,
            node: c.node,
            attempt: c.attempt,
            started_at: c.started_ms,
        }),
        tokens_used: r.tokens_used,
        token_budget: r.token_budget,
        error: r.error.map(|e| FailureView {
            code: e.code,
            message: e.message,
        }),
    }
}

/// The results of `r` so far.
pub(super) fn results_view(r: &TaskRecord, stages: Vec<StageRecord>) -> ResultsView {
    ResultsView {
        task_id: r.id.clone(),
        status: r.status.as_str(),
        progress: r.progress(),
        results: stages
            .into_iter()
            .map(|s| StageView {
                stage: s.stage,
                index: s.index,
                agent: s.agent,
                node: s.node,
                epoch: s.epoch,
                attempt: s.attempt,
                text: s.text,
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.completion_tokens,
                duration_ms: s.duration_ms,
                finished_ms: s.finished_ms,
            })
            .collect(),
    }
}
