//! `/v1/tasks`, `/v1/agents` and `/v1/stats`: the task service ([`TaskApi`]) over HTTP; and,
//! in `events`, `/v1/events`, the node's event bus as server-sent events.
//!
//! Handlers map, they do not decide: the service validates the values of a submission (and
//! names the field of a bad one), deduplicates, queues and runs; the gateway checks the
//! permission, who may see a task (its submitter or an admin: anyone else gets the 404 of a
//! task that does not exist, so ids cannot be probed), shapes the JSON (`view`) and maps the
//! service's errors ([`AppError::from_task`]). A node without a task service answers 503.

pub(super) mod events;
mod view;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use swarm_actors::tasks::{
    AgentAnswer, AgentQuery, AgentView, ListQuery, Submit, TaskApi, TaskRecord, TaskStats,
    TaskStatus,
};
use swarm_config::{TasksConfig, WorkflowConfig};

pub use events::MAX_EVENT_SUBSCRIBERS;
use view::{ResultsView, SubmittedView, TaskList, TaskView};

use super::extract::{ApiPath, ApiQuery, json_body};
use super::openapi::schemas;
use super::{AppState, AuditCtx, Class, blocking};
use crate::auth::Principal;
use crate::error::AppError;

/// Tasks a list answers when the request names no `limit`.
const DEFAULT_LIST: usize = 50;
/// Most tasks one list answers.
const MAX_LIST: usize = 1000;
/// Longest `Idempotency-Key`, in bytes.
const MAX_IDEMPOTENCY_KEY: usize = 128;
/// Longest direct question to an agent, in bytes.
const MAX_QUESTION: usize = 16 * 1024;

/// Workflow name → its stage names in order: what the gateway needs of the workflows in force
/// to name a task's current stage.
pub fn workflow_stages(cfg: &TasksConfig) -> BTreeMap<String, Vec<String>> {
    stage_names(cfg.effective_workflows())
}

fn stage_names(workflows: BTreeMap<String, WorkflowConfig>) -> BTreeMap<String, Vec<String>> {
    workflows
        .into_iter()
        .map(|(name, w)| (name, w.stages.into_iter().map(|s| s.name).collect()))
        .collect()
}

/// The task service as the gateway holds it, with the stage names of the workflows. Cheap to
/// clone, so blocking reads can take it along.
#[derive(Clone)]
pub(super) struct TaskService {
    api: Arc<dyn TaskApi>,
    workflows: Arc<BTreeMap<String, Vec<String>>>,
}

impl std::fmt::Debug for TaskService {
    // By hand: the service is a trait object without `Debug`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("workflows", &self.workflows)
            .finish_non_exhaustive()
    }
}

impl TaskService {
    /// `workflows` empty: the preset workflows.
    pub(super) fn new(api: Arc<dyn TaskApi>, workflows: BTreeMap<String, Vec<String>>) -> Self {
        let workflows = if workflows.is_empty() {
            stage_names(swarm_config::preset_workflows())
        } else {
            workflows
        };
        Self {
            api,
            workflows: Arc::new(workflows),
        }
    }

    fn view(&self, r: TaskRecord) -> TaskView {
        let stages = self.workflows.get(&r.workflow).map(Vec::as_slice);
        view::task_view(r, stages)
    }

    /// The task, when it exists and `who` may see it; else the same 404 either way.
    async fn visible(
        &self,
        s: &AppState,
        who: &Principal,
        id: &str,
    ) -> Result<TaskRecord, AppError> {
        let api = self.api.clone();
        let key = id.to_string();
        let found = blocking(move || api.get(&key).map_err(|e| AppError::from_task(&e))).await?;
        match found {
            Some(r) if s.sees_all(who) || r.submitter == who.subject => Ok(r),
            _ => Err(AppError::NotFound(format!("task {id}"))),
        }
    }
}

/// The node's task service, or 503 where it runs none.
fn service(s: &AppState) -> Result<TaskService, AppError> {
    s.tasks
        .clone()
        .ok_or_else(|| AppError::Unavailable("this node runs no task service".into()))
}

/// Body of `POST /v1/tasks`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(in crate::gateway) struct TaskBody {
    /// What the swarm should do.
    #[schema(min_length = 1)]
    objective: String,
    /// A longer description the stages' prompts include.
    #[serde(default)]
    task_definition: Option<String>,
    /// `normal` when absent.
    #[serde(default)]
    #[schema(value_type = Option<schemas::Priority>)]
    priority: Option<String>,
    /// A workflow of the node's `[tasks]` (`sparc`, `ask`, ...); the configured default when
    /// absent.
    #[serde(default)]
    workflow: Option<String>,
    /// Anything the agents should know; its keys `file_paths`, `service_names`,
    /// `operation_type` and `technology_stack` are part of the task hash (deduplication).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    context: Option<Value>,
    /// Capabilities the task needs; each must be held by some agent.
    #[serde(default)]
    capabilities: Vec<String>,
    /// Tokens the task may spend over all its stages; at most the configured budget.
    #[serde(default)]
    #[schema(minimum = 1)]
    token_budget: Option<u32>,
    /// Seconds until the task's deadline; at most the configured maximum.
    #[serde(default)]
    #[schema(minimum = 1)]
    deadline_s: Option<u64>,
}

impl TaskBody {
    fn into_submit(
        self,
        idempotency_key: Option<String>,
        who: &Principal,
        ctx: &AuditCtx,
    ) -> Submit {
        Submit {
            objective: self.objective,
            task_definition: self.task_definition,
            priority: self.priority,
            workflow: self.workflow,
            context: self.context,
            capabilities: self.capabilities,
            token_budget: self.token_budget,
            deadline_s: self.deadline_s,
            idempotency_key,
            submitter: who.subject.clone(),
            request_id: ctx.request_id(),
        }
    }
}

/// The `Idempotency-Key` header: absent, or 1 to 128 printable ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, AppError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        AppError::invalid_field(
            "Idempotency-Key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"),
        )
    };
    let key = v.to_str().map_err(|_| bad())?;
    let printable = key.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || !printable {
        return Err(bad());
    }
    Ok(Some(key.to_string()))
}

/// Submit a task: durable on its owner node (and one peer when one is alive) before the answer.
///
/// A full task queue answers 429 `queue_full` with `Retry-After`; a bad value, 400
/// `invalid_request` naming the field. 503 `owner_unreachable`: neither the owner of the task's
/// hash nor the next choice answered in time (a node cut off); `replication_timeout`: the
/// record was not durable on a peer in time. A retry is deduplicated against whatever was
/// accepted.
#[utoipa::path(
    post,
    path = "/v1/tasks",
    tag = "tasks",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 128 printable ASCII \
          characters: a resubmission with the same key by the same submitter answers the first \
          task (`replayed`)")
    ),
    request_body = TaskBody,
    responses(
        (status = 202, description = "Accepted: the task; with `deduplicated`, the pending or \
          running task of the same hash (nothing new started); with `replayed`, the first task \
          of this `Idempotency-Key`", body = SubmittedView),
        (status = 422, description = "No agent has a capability the task needs \
          (`no_capable_agent`, naming the field)", body = schemas::Error)
    ),
    extensions(("x-permission" = json!("tasks.create")))
)]
pub(in crate::gateway) async fn create_task(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<SubmittedView>), AppError> {
    s.authorize(&ctx, &who, "tasks.create", "tasks", None)?;
    let tasks = service(&s)?;
    let key = idempotency_key(&headers)?;
    // The body first, within its deadline: a stalled upload holds no permit.
    let b: TaskBody = json_body(body, s.body_limit, s.body_deadline(Class::Orchestration)).await?;
    let _permit = s.permit(Class::Orchestration, &who)?;
    let req = b.into_submit(key, &who, &ctx);
    let api = tasks.api.clone();
    let done = s
        .timed(Class::Orchestration, async move {
            api.submit(req).await.map_err(|e| AppError::from_task(&e))
        })
        .await?;
    ctx.set_action("tasks.create", &format!("tasks/{}", done.task.id));
    let view = SubmittedView::new(tasks.view(done.task), done.deduplicated, done.replayed);
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Query of `GET /v1/tasks`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(in crate::gateway) struct ListParams {
    /// Only tasks in this state.
    #[serde(default)]
    #[param(value_type = Option<schemas::TaskStatus>)]
    status: Option<String>,
    /// Most tasks to answer: 50 by default, at most 1000.
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

impl ListParams {
    fn query(&self, who: &Principal, sees_all: bool) -> Result<ListQuery, AppError> {
        let status = match self.status.as_deref() {
            None => None,
            Some(s) => Some(TaskStatus::parse(s).ok_or_else(|| {
                AppError::invalid_field(
                    "status",
                    "one of pending, in_progress, completed, failed, cancelled, dead_letter",
                )
            })?),
        };
        let limit = self.limit.unwrap_or(DEFAULT_LIST);
        if limit == 0 || limit > MAX_LIST {
            return Err(AppError::invalid_field(
                "limit",
                format!("must be between 1 and {MAX_LIST}"),
            ));
        }
        Ok(ListQuery {
            submitter: (!sees_all).then(|| who.subject.clone()),
            status,
            limit,
        })
    }
}

/// The caller's tasks (an admin's: everyone's), newest first.
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    params(ListParams),
    responses((status = 200, description = "Tasks, newest first", body = TaskList)),
    extensions(("x-permission" = json!("tasks.read")))
)]
pub(in crate::gateway) async fn list_tasks(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiQuery(q): ApiQuery<ListParams>,
) -> Result<Json<TaskList>, AppError> {
    s.authorize(&ctx, &who, "tasks.read", "tasks", None)?;
    let tasks = service(&s)?;
    let query = q.query(&who, s.sees_all(&who))?;
    let _permit = s.permit(Class::Orchestration, &who)?;
    let api = tasks.api.clone();
    let records = s
        .timed(
            Class::Orchestration,
            blocking(move || api.list(query).map_err(|e| AppError::from_task(&e))),
        )
        .await?;
    let tasks = records.into_iter().map(|r| tasks.view(r)).collect();
    Ok(Json(TaskList { tasks }))
}

/// A task (its submitter's or an admin's).
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    params(schemas::TaskPath),
    responses((status = 200, description = "The task", body = TaskView)),
    extensions(("x-permission" = json!("tasks.read")))
)]
pub(in crate::gateway) async fn get_task(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<TaskView>, AppError> {
    s.authorize(&ctx, &who, "tasks.read", &format!("tasks/{id}"), None)?;
    let tasks = service(&s)?;
    let _permit = s.permit(Class::Orchestration, &who)?;
    let r = s
        .timed(Class::Orchestration, tasks.visible(&s, &who, &id))
        .await?;
    Ok(Json(tasks.view(r)))
}

/// The stage results of a task so far, in stage order.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/results",
    tag = "tasks",
    params(schemas::TaskPath),
    responses((status = 200, description = "The task's stage results", body = ResultsView)),
    extensions(("x-permission" = json!("tasks.read")))
)]
pub(in crate::gateway) async fn task_results(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ResultsView>, AppError> {
    s.authorize(
        &ctx,
        &who,
        "tasks.read",
        &format!("tasks/{id}/results"),
        None,
    )?;
    let tasks = service(&s)?;
    let _permit = s.permit(Class::Orchestration, &who)?;
    let st = s.clone();
    s.timed(Class::Orchestration, async move {
        let r = tasks.visible(&st, &who, &id).await?;
        let api = tasks.api.clone();
        let stages =
            blocking(move || api.results(&id).map_err(|e| AppError::from_task(&e))).await?;
        Ok(Json(view::results_view(&r, stages)))
    })
    .await
}

/// Cancel a task (its submitter or an admin): its running generation stops within a second.
/// A finished task answers 409 `task_finished`.
#[utoipa::path(
    delete,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    params(schemas::TaskPath),
    responses((status = 200, description = "The cancelled task", body = TaskView)),
    extensions(("x-permission" = json!("tasks.cancel")))
)]
pub(in crate::gateway) async fn cancel_task(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<TaskView>, AppError> {
    s.authorize(&ctx, &who, "tasks.cancel", &format!("tasks/{id}"), None)?;
    let tasks = service(&s)?;
    let _permit = s.permit(Class::Orchestration, &who)?;
    let st = s.clone();
    s.timed(Class::Orchestration, async move {
        tasks.visible(&st, &who, &id).await?;
        let r = tasks
            .api
            .cancel(&id, &who.subject, &ctx.request_id())
            .await
            .map_err(|e| AppError::from_task(&e))?;
        Ok(Json(tasks.view(r)))
    })
    .await
}

/// Put a dead-lettered task back in the queue (admins only). A task that is not dead-lettered
/// answers 409 `task_state`.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/requeue",
    tag = "tasks",
    params(schemas::TaskPath),
    responses((status = 200, description = "The requeued task", body = TaskView)),
    extensions(("x-permission" = json!("tasks.admin")))
)]
pub(in crate::gateway) async fn requeue_task(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<TaskView>, AppError> {
    s.authorize(&ctx, &who, "tasks.admin", &format!("tasks/{id}"), None)?;
    // `user` holds `tasks.*`, which matches `tasks.admin`: requeueing is an admin's call.
    if !s.sees_all(&who) {
        return Err(AppError::Forbidden("tasks.admin (admin only)".into()));
    }
    let tasks = service(&s)?;
    let _permit = s.permit(Class::Orchestration, &who)?;
    let api = tasks.api.clone();
    let r = s
        .timed(Class::Orchestration, async move {
            api.requeue(&id, &who.subject, &ctx.request_id())
                .await
                .map_err(|e| AppError::from_task(&e))
        })
        .await?;
    Ok(Json(tasks.view(r)))
}

/// `GET /v1/agents`.
#[derive(Debug, Serialize)]
pub(in crate::gateway) struct AgentList {
    agents: Vec<AgentView>,
}

/// Every agent of the swarm file: where it runs and how it does.
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    responses((status = 200, description = "The agents", body = schemas::AgentList)),
    extensions(("x-permission" = json!("agents.read")))
)]
pub(in crate::gateway) async fn agents(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
) -> Result<Json<AgentList>, AppError> {
    s.authorize(&ctx, &who, "agents.read", "agents", None)?;
    let tasks = service(&s)?;
    let _permit = s.permit(Class::Orchestration, &who)?;
    let api = tasks.api.clone();
    let agents = blocking(move || Ok(api.agents())).await?;
    Ok(Json(AgentList { agents }))
}

/// Body of `POST /v1/agents/query`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(in crate::gateway) struct QueryBody {
    /// The question, 1 byte to 16 KiB.
    #[schema(min_length = 1, max_length = 16384)]
    question: String,
    /// The agent to ask (its id); the best-scored idle one for the question when absent.
    #[serde(default)]
    agent: Option<String>,
    /// Most tokens the answer may take.
    #[serde(default)]
    #[schema(minimum = 1)]
    max_tokens: Option<u32>,
}

/// Ask one agent directly. Like the inference routes, this takes no bulkhead permit: the
/// model's own admission queue sheds the load (429), and the generation runs as long as its
/// tokens take.
#[utoipa::path(
    post,
    path = "/v1/agents/query",
    tag = "agents",
    request_body = QueryBody,
    responses(
        (status = 200, description = "The agent's answer", body = schemas::AgentAnswer),
        (status = 502, description = "The agent's generation failed (`stage_failed`)", body = schemas::Error)
    ),
    extensions(("x-permission" = json!("agents.query")))
)]
pub(in crate::gateway) async fn query_agent(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    body: Body,
) -> Result<Json<AgentAnswer>, AppError> {
    s.authorize(&ctx, &who, "agents.query", "agents", None)?;
    let tasks = service(&s)?;
    let b: QueryBody = json_body(body, s.body_limit, s.body_deadline(Class::Orchestration)).await?;
    if b.question.is_empty() || b.question.len() > MAX_QUESTION {
        return Err(AppError::invalid_field(
            "question",
            format!("must be 1 to {MAX_QUESTION} bytes"),
        ));
    }
    if let Some(agent) = &b.agent {
        ctx.set_action("agents.query", &format!("agents/{agent}"));
    }
    let answer = tasks
        .api
        .query_agent(AgentQuery {
            agent: b.agent,
            question: b.question,
            max_tokens: b.max_tokens,
            asker: who.subject.clone(),
            request_id: ctx.request_id(),
        })
        .await
        .map_err(|e| AppError::from_task(&e))?;
    Ok(Json(answer))
}

/// The node's task queue and counters (as `/metrics` shows them).
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "tasks",
    responses((status = 200, description = "Queue and counters of this node's task service", body = schemas::TaskStats)),
    extensions(("x-permission" = json!("stats.read")))
)]
pub(in crate::gateway) async fn stats(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
) -> Result<Json<TaskStats>, AppError> {
    s.authorize(&ctx, &who, "stats.read", "stats", None)?;
    let tasks = service(&s)?;
    let api = tasks.api.clone();
    Ok(Json(blocking(move || Ok(api.stats())).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_short_printable_ascii() {
        let key = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(v).expect("a header value"),
            );
            idempotency_key(&h)
        };
        assert_eq!(idempotency_key(&HeaderMap::new()).ok(), Some(None));
        assert_eq!(key(b"order 17/a").ok(), Some(Some("order 17/a".into())));
        assert!(key(&[b'k'; MAX_IDEMPOTENCY_KEY]).is_ok());
        for bad in [
            &b""[..],
            &[b'k'; MAX_IDEMPOTENCY_KEY + 1],
            b"caf\xc3\xa9",
            b"a\tb",
        ] {
            let e = key(bad).expect_err("refused");
            assert!(
                matches!(&e, AppError::BadRequest { field: Some(f), .. } if f == "Idempotency-Key"),
                "{bad:?}: {e:?}"
            );
        }
    }

    #[test]
    fn the_stage_names_come_from_the_workflows_in_force() {
        let w = workflow_stages(&TasksConfig::default());
        assert_eq!(w["ask"], ["answer"]);
        assert_eq!(w["sparc"].len(), 7);
        assert_eq!(w["sparc"][0], "specification");
    }
}
