//! Schema-only types for `/openapi.json`: the JSON bodies that handlers build with `json!`, and
//! the types of crates that do not depend on utoipa (storage, membership), described field for
//! field. Nothing constructs them; the gateway tests and the schemathesis run check that the
//! handlers' answers match them.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::gateway::admin::KeyView;

/// The body of every error response: OpenAI's error shape, plus `field` when a request field is
/// at fault.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Error {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct ErrorDetail {
    /// Stable, machine-readable: `invalid_field`, `unauthenticated`, `forbidden`, `not_found`,
    /// `overloaded`, `rate_limited`, `body_timeout`, `unavailable`, …
    code: String,
    /// Safe to show to a user.
    message: String,
    /// OpenAI's error type: `invalid_request_error`, `authentication_error`, `server_error`, …
    #[serde(rename = "type")]
    kind: String,
    /// OpenAI's name for `field`; null when no field is at fault.
    #[schema(required = true)]
    param: Option<String>,
    /// The request field at fault (a JSON path such as `messages[0].role`, or a parameter).
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

/// `namespace` and `key` of a memory value: letters, digits, `.`, `_`, `:`, `-`, not starting
/// with `.` and without `..`; at most `limits.max_name_len` bytes (128 by default).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub(in crate::gateway) struct MemoryPath {
    #[param(
        pattern = "^[A-Za-z0-9_:-][A-Za-z0-9._:-]*$",
        min_length = 1,
        max_length = 128
    )]
    namespace: String,
    #[param(
        pattern = "^[A-Za-z0-9_:-][A-Za-z0-9._:-]*$",
        min_length = 1,
        max_length = 128
    )]
    key: String,
}

/// A memory namespace (same rules as [`MemoryPath`]).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub(in crate::gateway) struct NamespacePath {
    #[param(
        pattern = "^[A-Za-z0-9_:-][A-Za-z0-9._:-]*$",
        min_length = 1,
        max_length = 128
    )]
    namespace: String,
}

/// A data subject (same rules as a namespace).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub(in crate::gateway) struct SubjectPath {
    /// The subject whose data key is destroyed.
    #[param(
        pattern = "^[A-Za-z0-9_:-][A-Za-z0-9._:-]*$",
        min_length = 1,
        max_length = 128
    )]
    id: String,
}

/// An API key id, as `POST /v1/keys` and `GET /v1/keys` show it.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub(in crate::gateway) struct KeyPath {
    id: String,
}

/// The kinds of agent memory, each with its default lifetime (`swarm_storage::MemoryType`).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(in crate::gateway) enum MemoryType {
    /// Conversation state: expires after a day unless a TTL says otherwise.
    Session,
    /// Facts and knowledge (the default): kept until deleted.
    Semantic,
    /// An agent's own state: kept until deleted (retention applies).
    Agent,
    /// Execution traces: expire after a week unless a TTL says otherwise.
    Trace,
}

/// `GET /health`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Health {
    /// `ok`, or `degraded` when storage fails or a model is unavailable.
    status: String,
    node: String,
    version: String,
    uptime_s: u64,
    /// Members alive or suspect, this node included.
    members_alive: u64,
    services: Services,
    /// Status of each model served here: `ready`, `loading` or `unavailable: <why>`.
    models: BTreeMap<String, String>,
}

#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Services {
    /// `ok` or `error`.
    storage: String,
    /// `joined`, `isolated`, `alone`, `left` or `standalone`.
    membership: String,
    /// `ready`, `loading`, `unavailable` or `disabled`.
    inference: String,
}

/// How the caller proved who they are.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(in crate::gateway) enum AuthType {
    Jwt,
    ApiKey,
    /// Only in the bench-only build without authentication.
    Disabled,
}

/// `GET /v1/me`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Me {
    subject: String,
    role: String,
    auth_type: AuthType,
    /// `jwt:<jti>` or `key:<id>`.
    credential_id: String,
    /// Unix seconds.
    expires_at: u64,
}

/// `DELETE /v1/memory/{namespace}/{key}`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Deleted {
    deleted: bool,
    namespace: String,
    key: String,
}

/// `POST /v1/subjects/{id}/erase`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Erased {
    subject: String,
    erased: bool,
    /// Whether this node held a data key for the subject.
    key_existed: bool,
}

/// One audit entry (`swarm_storage::AuditEntry`).
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct AuditEntry {
    seq: u64,
    ts_ms: u64,
    node: String,
    request_id: String,
    /// The principal (`anonymous` when unauthenticated, `system` for the node's own acts).
    actor: String,
    action: String,
    resource: String,
    /// `ok`, `denied` or `error`.
    outcome: String,
    status: u16,
    /// The error code, when there was one.
    #[schema(required = true)]
    code: Option<String>,
}

/// `GET /v1/audit/verify` (`swarm_storage::VerifyReport`).
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct VerifyReport {
    ok: bool,
    entries: u64,
    /// The first entry whose link is broken.
    #[schema(required = true)]
    first_broken: Option<u64>,
    #[schema(required = true)]
    reason: Option<String>,
}

/// `POST /v1/keys`: the key itself is shown here only.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct KeyCreated {
    /// The secret: send it as `X-API-Key`.
    key: String,
    note: String,
    id: String,
    name: String,
    role: String,
    owner: String,
    /// Unix seconds.
    expires_at: u64,
}

/// `GET /v1/keys`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct KeyList {
    keys: Vec<KeyView>,
}

/// `DELETE /v1/keys/{id}`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct KeyRevoked {
    id: String,
    revoked: bool,
}

/// `POST /v1/tokens/revoke`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct TokenRevoked {
    jti: String,
    revoked: bool,
}

/// `GET /v1/cluster/members`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Members {
    node: String,
    /// This node is connected to at least one active member.
    joined: bool,
    /// Members alive or suspect.
    alive: u64,
    members: Vec<Member>,
}

/// What gossip says about a member (`swarm_membership::MemberInfo`).
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Member {
    name: String,
    /// Gossip (QUIC) address, `ip:port`.
    addr: String,
    state: MemberState,
    incarnation: u64,
    /// Null until this node has heard the member's metadata.
    #[schema(required = true)]
    meta: Option<NodeMeta>,
    meta_version: u64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(in crate::gateway) enum MemberState {
    Alive,
    Suspect,
    Down,
    Left,
}

/// What a node tells its peers about itself (`swarm_membership::NodeMeta`).
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct NodeMeta {
    /// The gateway's address, as clients reach it.
    gateway: String,
    roles: Vec<String>,
    devices: Vec<DeviceMeta>,
    /// Requests in flight at the gateway.
    load: u32,
    version: String,
    models: Vec<ModelMeta>,
}

#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct DeviceMeta {
    /// `cpu` or `cuda`.
    kind: String,
    name: String,
    memory_total: u64,
    memory_free: u64,
}

#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct ModelMeta {
    name: String,
    /// Sequences running plus waiting.
    load: u32,
    /// Most sequences it runs at once.
    slots: u32,
}

/// `POST /v1/cluster/leave`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Left {
    node: String,
    /// `left`.
    state: String,
    stopping: bool,
}

/// `POST /v1/cluster/ping`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Pong {
    node: String,
    peer: String,
    /// Round trip of the actor call, microseconds.
    rtt_us: u64,
}

/// `GET /v1/models`: OpenAI's model list, with the nodes serving each model.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct ModelList {
    /// `list`.
    object: String,
    data: Vec<Model>,
}

#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Model {
    id: String,
    /// `model`.
    object: String,
    created: u64,
    owned_by: String,
    nodes: Vec<String>,
}

/// `POST /v1/chat/completions` without `stream`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct ChatCompletion {
    id: String,
    /// `chat.completion`.
    object: String,
    created: u64,
    model: String,
    choices: Vec<ChatChoice>,
    usage: Usage,
}

#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct ChatChoice {
    index: u32,
    message: AssistantMessage,
    /// `stop`, `length`, …
    finish_reason: String,
    /// Always null.
    #[schema(required = true)]
    logprobs: Option<Value>,
}

#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct AssistantMessage {
    /// `assistant`.
    role: String,
    content: String,
}

/// `POST /v1/completions` without `stream`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct TextCompletion {
    id: String,
    /// `text_completion`.
    object: String,
    created: u64,
    model: String,
    choices: Vec<TextChoice>,
    usage: Usage,
}

#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct TextChoice {
    index: u32,
    text: String,
    finish_reason: String,
    /// Always null.
    #[schema(required = true)]
    logprobs: Option<Value>,
}

#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

/// A task's id.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub(in crate::gateway) struct TaskPath {
    #[param(min_length = 1)]
    id: String,
}

/// Where a task is in its life (`swarm_actors::tasks::TaskStatus`).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(in crate::gateway) enum TaskStatus {
    /// Accepted, waiting for a workflow slot (or for a retry).
    Pending,
    /// Its workflow runs.
    InProgress,
    Completed,
    /// Ended without a result: deadline, budget, a stage that cannot be retried.
    Failed,
    Cancelled,
    /// Retries exhausted: waits for an admin to requeue it.
    DeadLetter,
}

/// Queue priority; `critical` runs first (`swarm_actors::tasks::Priority`).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(in crate::gateway) enum Priority {
    Critical,
    High,
    Normal,
    Low,
    Background,
}

/// `GET /v1/agents`.
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct AgentList {
    agents: Vec<Agent>,
}

/// An agent of the swarm file, where it runs and how it does (`swarm_actors::tasks::AgentView`).
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Agent {
    id: String,
    name: String,
    /// `coordinator`, `specialist` or `worker`.
    #[serde(rename = "type")]
    kind: String,
    role: String,
    priority: u32,
    capabilities: Vec<String>,
    specialization: String,
    clearance: String,
    /// Its parent in the supervision tree (null for the root).
    #[schema(required = true)]
    parent: Option<String>,
    /// Its home node (null when no live node can host it).
    #[schema(required = true)]
    node: Option<String>,
    /// `idle`, `busy`, `error` or `offline`.
    state: String,
    #[schema(required = true)]
    current_task: Option<String>,
    load: u32,
    max_load: u32,
    completed: u64,
    failed: u64,
    #[schema(minimum = 0, maximum = 1)]
    success_rate: f64,
    mean_stage_ms: f64,
    restarts: u32,
    /// The model it uses.
    #[schema(required = true)]
    model: Option<String>,
}

/// `POST /v1/agents/query` (`swarm_actors::tasks::AgentAnswer`).
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct AgentAnswer {
    agent: String,
    node: String,
    answer: String,
    /// Mean probability of the generated tokens (or, where the engine gives none, an estimate
    /// from how the generation ended and its length).
    #[schema(minimum = 0, maximum = 1)]
    confidence: f64,
    prompt_tokens: u32,
    completion_tokens: u32,
    duration_ms: u64,
}

/// `GET /v1/stats`: this node's task queue and counters (`swarm_actors::tasks::TaskStats`).
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct TaskStats {
    node: String,
    /// Waiting tasks by priority.
    backlog: Vec<Backlog>,
    /// Workflows running now.
    running: u64,
    /// Workflows this node runs at once.
    concurrency: u64,
    /// Waiting tasks past which a submission gets 429 `queue_full`.
    queue_bound: u64,
    dead_letter: u64,
    submitted: u64,
    deduplicated: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
    stages_completed: u64,
    stages_failed: u64,
    retries: u64,
    /// Stage results refused because their epoch was superseded.
    stale_results: u64,
    /// Tasks adopted from owners that died or left.
    adopted: u64,
    /// Stages sent to another agent because theirs could not take them (not failures).
    redispatched: u64,
    /// Events of this node not relayed to its peers (past 512 per 100 ms, or the relay fell
    /// behind the event bus).
    events_not_relayed: u64,
}

/// Backlog of one priority (`swarm_actors::tasks::Backlog`).
#[derive(Serialize, ToSchema)]
pub(in crate::gateway) struct Backlog {
    #[schema(value_type = Priority)]
    priority: String,
    /// Tasks waiting (not running) on this node.
    waiting: u64,
    /// Age of the oldest waiting one, in milliseconds (0 when none).
    oldest_ms: u64,
}
