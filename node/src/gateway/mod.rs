//! The axum gateway: routing, request ids, authentication, RBAC, bulkheads, timeouts and audit.
//!
//! Request path: `track` (request id, per-source rate limit, metrics, audit of the outcome) →
//! `authenticate` (JWT or API key; public routes skip it) → handler: `authorize` (RBAC, records the
//! action for the audit), the body (read within a deadline, before any permit), `permit`
//! (bulkhead, 429 when full; admins have a reserve), `timed` (the class's response target), work.
//! A state change goes through the memory service ([`swarm_actors::Memory`]): write, audit entry
//! committed with one group-commit sync, push to the peers, outcome; the handler only maps it.
//! Anonymous refusals are counted per source and audited once per interval (`abuse`).
//! Tasks and agents go through the task service ([`swarm_actors::tasks::TaskApi`]), which
//! `tasks` only maps to HTTP; an event stream (`/v1/events`) holds a subscriber slot for its
//! life, never a bulkhead permit.

mod abuse;
mod admin;
mod audit_writer;
mod cluster;
mod extract;
mod memory;
mod openai;
mod openapi;
mod system;
mod tasks;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use ed25519_dalek::SigningKey;
use rand::Rng;
use swarm_actors::tasks::TaskApi;
use swarm_actors::{ActorCluster, Caller, Memory, Replicator};
use swarm_config::{LimitsConfig, SwarmFile};
use swarm_membership::Membership;
use swarm_storage::{AuditEvent, AuditSink, Storage};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::auth::{AuthType, Authenticator, Principal};
use crate::error::{AppError, ErrorCause, ErrorCode};
use crate::inference::Inference;
use crate::metrics::{self, Metrics};
use crate::policy::{Owner, Policy};
use audit_writer::Unaudited;

pub(crate) use abuse::source_ip;
pub use audit_writer::AuditWriter;
pub use extract::parse_json;
pub use tasks::{MAX_EVENT_SUBSCRIBERS, workflow_stages};

/// Classes of work, each with its own bulkhead and response target (from the swarm file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Memory,
    Security,
    Orchestration,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Memory => "memory_ops",
            Class::Security => "security_ops",
            Class::Orchestration => "orchestration",
        }
    }
}

/// A class's capacity: `sem` is everyone's; `reserved` (a fifth of it, at least one) only admins
/// may take, when `sem` is full, so no other role can lock them out.
#[derive(Debug)]
struct Bulkhead {
    sem: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
    timeout: Duration,
}

/// Longest resource string an audit entry keeps (bytes, cut on a character boundary).
const AUDIT_RESOURCE_MAX: usize = 256;

/// Everything handlers share.
#[derive(Debug)]
pub struct Inner {
    pub(crate) node: String,
    /// The store, for reads (changes go through `memory_service`).
    pub(crate) storage: Storage,
    auth: Authenticator,
    policy: Policy,
    pub(crate) metrics: Metrics,
    limits: LimitsConfig,
    body_limit: usize,
    max_token_ttl_s: u64,
    pub signing_key: SigningKey,
    pub issuer: String,
    pub audience: String,
    started: Instant,
    /// False only in the bench-only builds (`bench-noauth`): every caller is an admin.
    pub(crate) secured: bool,
    /// False only in the bench-only builds (`bench-noauth`, `bench-noaudit`).
    pub(crate) audited: bool,
    memory: Bulkhead,
    security: Bulkhead,
    orchestration: Bulkhead,
    /// How long an inference request body may take to arrive (the swarm file's `vllm_ops`).
    inference_body_deadline: Duration,
    /// The node's audit writer (shared with everything else that audits).
    audit: Arc<dyn AuditSink>,
    /// Every memory change (and write of the replicated authentication state): write, audit,
    /// push, outcome.
    memory_service: Memory,
    rate: Mutex<abuse::RateLimiter>,
    refusals: Mutex<abuse::RefusalLog>,
    /// Cluster membership; `None` in unit tests of the gateway alone.
    membership: Option<Membership>,
    /// Actor sessions with peers; `None` in unit tests of the gateway alone.
    actors: Option<ActorCluster>,
    /// Memory replication (its metrics; pushes go through `memory_service`); `None` in unit
    /// tests of the gateway alone.
    replicator: Option<Replicator>,
    /// Models served here and routing to peers.
    pub(crate) inference: Arc<Inference>,
    /// Agent id → retention (ms) of its memory namespace (the namespace named like the agent),
    /// from the swarm file; permanent agents are absent.
    retention: std::collections::HashMap<String, u64>,
    /// Notified when the node should stop (after `POST /v1/cluster/leave`).
    pub(crate) stop: Arc<Notify>,
    /// The task service and the stage names of its workflows; `None` where the node runs no
    /// tasks (the task routes answer 503).
    tasks: Option<tasks::TaskService>,
    /// `/v1/events` subscribers this node serves at once: a stream holds one of these, never a
    /// bulkhead permit, so subscribers cannot starve requests (nor requests subscribers).
    event_subscribers: Arc<Semaphore>,
}

/// Shared state of the gateway.
pub type AppState = Arc<Inner>;

/// What the gateway needs to be built.
pub struct GatewayParts {
    pub node: String,
    pub storage: Storage,
    pub auth: Authenticator,
    pub policy: Policy,
    pub swarm: SwarmFile,
    pub limits: LimitsConfig,
    pub body_limit: usize,
    pub max_token_ttl_s: u64,
    pub signing_key: SigningKey,
    pub issuer: String,
    pub audience: String,
    pub membership: Option<Membership>,
    pub actors: Option<ActorCluster>,
    pub replicator: Option<Replicator>,
    pub inference: Arc<Inference>,
    /// The task service (`None`: this node runs no tasks; the task routes answer 503).
    pub tasks: Option<Arc<dyn TaskApi>>,
    /// Workflow name → its stage names, in order ([`workflow_stages`]), for the `current_stage`
    /// of a task; empty: the preset workflows.
    pub workflows: BTreeMap<String, Vec<String>>,
}

impl std::fmt::Debug for GatewayParts {
    // By hand: the task service is a trait object without `Debug`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayParts")
            .field("node", &self.node)
            .field("limits", &self.limits)
            .field("body_limit", &self.body_limit)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("tasks", &self.tasks.is_some())
            .field("workflows", &self.workflows)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The gateway state with an audit writer of its own (the gateway's unit tests).
    pub fn new(p: GatewayParts) -> std::io::Result<AppState> {
        let audit = AuditWriter::spawn(p.storage.audit.clone(), p.storage.engine.clone())?;
        Ok(Self::with_audit(p, Arc::new(audit)))
    }

    /// The gateway state, auditing into the node's writer (started before anything that
    /// audits, and shared with it).
    pub fn with_audit(p: GatewayParts, audit: Arc<AuditWriter>) -> AppState {
        let mut metrics = Metrics::default();
        metrics.audit_entries = audit.entries();
        metrics.audit_failures = audit.failures();
        metrics.tasks = crate::metrics::TaskGauges::new(p.tasks.clone());
        let secured = !cfg!(feature = "bench-noauth");
        let audited = !cfg!(any(feature = "bench-noauth", feature = "bench-noaudit"));
        // Unaudited builds still make every change durable before acknowledging it.
        let memory_audit: Arc<dyn AuditSink> = if audited {
            audit.clone()
        } else {
            Arc::new(Unaudited(p.storage.engine.clone()))
        };
        let memory_service = Memory::new(
            p.node.clone(),
            p.storage.clone(),
            p.replicator.clone(),
            memory_audit,
        )
        .with_refusal_codes(memory::refusal_codes);
        let perf = &p.swarm.performance;
        let bh = |n: u32, t: swarm_config::HumanDuration| Bulkhead {
            sem: Arc::new(Semaphore::new(n as usize)),
            reserved: Arc::new(Semaphore::new((n as usize / 5).max(1))),
            timeout: t.0,
        };
        let l = &p.limits;
        let rate = abuse::RateLimiter::new(
            l.requests_per_second_per_source,
            l.burst_per_source,
            l.max_tracked_sources,
        );
        let refusals = abuse::RefusalLog::new(
            u64::try_from(l.refusal_audit_interval.0.as_millis()).unwrap_or(u64::MAX),
            l.max_tracked_sources,
            AUDIT_RESOURCE_MAX,
        );
        let state = Arc::new(Inner {
            audit,
            memory_service,
            rate: Mutex::new(rate),
            refusals: Mutex::new(refusals),
            inference_body_deadline: perf.response_targets.vllm_ops.0,
            memory: bh(
                perf.concurrency_limits.memory_ops,
                perf.response_targets.memory_ops,
            ),
            security: bh(
                perf.concurrency_limits.security_scanning,
                perf.response_targets.security_ops,
            ),
            orchestration: bh(
                perf.concurrency_limits.orchestration,
                perf.response_targets.orchestration,
            ),
            node: p.node,
            storage: p.storage,
            auth: p.auth,
            policy: p.policy,
            metrics,
            limits: p.limits,
            body_limit: p.body_limit,
            max_token_ttl_s: p.max_token_ttl_s,
            signing_key: p.signing_key,
            issuer: p.issuer,
            audience: p.audience,
            started: Instant::now(),
            membership: p.membership,
            actors: p.actors,
            replicator: p.replicator,
            inference: p.inference,
            retention: p
                .swarm
                .agents
                .iter()
                .filter_map(|a| Some((a.id.clone(), a.memory.retention.as_millis()?)))
                .collect(),
            stop: Arc::new(Notify::new()),
            tasks: p.tasks.map(|api| tasks::TaskService::new(api, p.workflows)),
            event_subscribers: Arc::new(Semaphore::new(MAX_EVENT_SUBSCRIBERS)),
            secured,
            audited,
        });
        spawn_refusal_reports(&state);
        state
    }

    /// Wait until every queued audit entry is appended (before the final sync at shutdown),
    /// the counts of anonymous refusals not yet reported included.
    pub fn flush_audit(&self) {
        let all = lock(&self.refusals).drain();
        self.report_refusals(all);
        self.audit.flush();
    }

    /// Audit the anonymous refusals whose interval is over.
    fn report_due_refusals(&self, now_ms: u64) {
        let due = lock(&self.refusals).due(now_ms);
        self.report_refusals(due);
    }

    /// One `http.refused` entry per source and interval (the refusals after the first).
    fn report_refusals(&self, summaries: Vec<abuse::RefusalSummary>) {
        for r in summaries {
            let denied = r.statuses.contains_key(&401) || r.statuses.contains_key(&429);
            let event = AuditEvent {
                ts_ms: now_ms(),
                node: self.node.clone(),
                request_id: String::new(),
                actor: "anonymous".into(),
                action: "http.refused".into(),
                resource: r.resource(AUDIT_RESOURCE_MAX),
                outcome: if denied { "denied" } else { "error" }.into(),
                status: r.last_status,
                code: r.last_code.map(String::from),
            };
            tracing::info!(source = %r.source, count = r.count, "anonymous requests refused");
            self.submit_audit(event);
        }
    }

    /// Queue an audit entry of a request or a refusal (the writer counts it, or its loss, in
    /// `/metrics`).
    fn submit_audit(&self, event: AuditEvent) {
        let _ = self.audit.submit(event);
    }

    fn bulkhead(&self, class: Class) -> &Bulkhead {
        match class {
            Class::Memory => &self.memory,
            Class::Security => &self.security,
            Class::Orchestration => &self.orchestration,
        }
    }

    /// RBAC check; records the action and resource for the audit entry.
    pub fn authorize(
        &self,
        ctx: &AuditCtx,
        who: &Principal,
        action: &str,
        resource: &str,
        owner: Option<Owner<'_>>,
    ) -> Result<(), AppError> {
        ctx.set_action(action, resource);
        // The node's own namespaces (the replicated authentication state) are no client's.
        if resource
            .strip_prefix("memory/")
            .is_some_and(|ns| ns.starts_with(crate::auth::RESERVED_NAMESPACE_PREFIX))
        {
            return Err(AppError::Forbidden(format!(
                "{action} on a reserved namespace (`{}*`)",
                crate::auth::RESERVED_NAMESPACE_PREFIX
            )));
        }
        if !self.secured {
            return Ok(());
        }
        self.policy
            .check(who, action, owner)
            .map_err(AppError::Forbidden)
    }

    /// A bulkhead permit, or 429 at once when the class is full. Never queues. An admin may take
    /// one of the class's reserved permits when the shared ones are gone. Take it after the
    /// request body is read, so a stalled upload holds none.
    pub fn permit(&self, class: Class, who: &Principal) -> Result<OwnedSemaphorePermit, AppError> {
        let b = self.bulkhead(class);
        b.sem
            .clone()
            .try_acquire_owned()
            .or_else(|e| {
                if !self.secured || self.policy.is_admin(&who.role) {
                    b.reserved.clone().try_acquire_owned()
                } else {
                    Err(e)
                }
            })
            .map_err(|_| {
                self.metrics.rejected(class.name());
                AppError::Overloaded {
                    class: class.name(),
                    retry_after_s: 1,
                }
            })
    }

    /// Whether `who` sees everyone's tasks and events (an admin, or every caller of a bench
    /// build without authentication).
    fn sees_all(&self, who: &Principal) -> bool {
        !self.secured || self.policy.is_admin(&who.role)
    }

    /// The `limit` of a list request: 100 by default, at most `limits.max_list`.
    pub fn list_limit(&self, asked: Option<usize>) -> Result<usize, AppError> {
        let limit = asked.unwrap_or(100);
        if limit == 0 || limit > self.limits.max_list {
            return Err(AppError::invalid_field(
                "limit",
                format!("must be between 1 and {}", self.limits.max_list),
            ));
        }
        Ok(limit)
    }

    /// How long a request body of `class` may take to arrive: the class's response target.
    pub fn body_deadline(&self, class: Class) -> Duration {
        self.bulkhead(class).timeout
    }

    /// Run `fut` within the class's response target.
    pub async fn timed<T>(
        &self,
        class: Class,
        fut: impl std::future::Future<Output = Result<T, AppError>>,
    ) -> Result<T, AppError> {
        let limit = self.bulkhead(class).timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(AppError::Timeout {
                class: class.name(),
                timeout_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// The memory service, for a change on behalf of the request `ctx` describes (its action
    /// and resource set by [`Inner::authorize`]). The service audits the change's outcome, all
    /// of them, so the request is not audited again when it ends.
    fn memory_for(&self, ctx: &AuditCtx) -> (&Memory, Caller) {
        let caller = ctx.caller();
        ctx.mark_audited();
        (&self.memory_service, caller)
    }
}

/// Audit something the node did or refused on its own (not an HTTP request): a refused peer, a
/// refused replicated change.
pub fn audit_system(
    audit: &dyn AuditSink,
    node: &str,
    action: &str,
    resource: &str,
    outcome: &str,
    detail: &str,
) {
    // The sink counts and reports a lost entry.
    let _ = audit.submit(AuditEvent {
        ts_ms: now_ms(),
        node: node.to_string(),
        request_id: String::new(),
        actor: "system".into(),
        action: action.into(),
        resource: abuse::clip(resource, AUDIT_RESOURCE_MAX).into(),
        outcome: outcome.into(),
        status: 0,
        code: (!detail.is_empty()).then(|| detail.chars().take(200).collect()),
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Report due refusal counts every so often, until the gateway state is dropped.
fn spawn_refusal_reports(state: &AppState) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let every = (state.limits.refusal_audit_interval.0 / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
    let weak = Arc::downgrade(state);
    rt.spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(s) = weak.upgrade() else { return };
            s.report_due_refusals(now_ms());
        }
    });
}

/// Run blocking store work off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AppError> + Send + 'static,
) -> Result<T, AppError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AppError::Internal(format!("blocking task failed: {e}")))?
}

/// Per-request audit context, filled as the request goes through the layers.
#[derive(Debug, Clone, Default)]
pub struct AuditCtx(Arc<Mutex<AuditInfo>>);

#[derive(Debug, Default)]
struct AuditInfo {
    request_id: String,
    actor: Option<String>,
    action: Option<String>,
    resource: Option<String>,
    audited: bool,
}

impl AuditCtx {
    fn with<R>(&self, f: impl FnOnce(&mut AuditInfo) -> R) -> R {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn set_action(&self, action: &str, resource: &str) {
        self.with(|i| {
            i.action = Some(action.to_string());
            i.resource = Some(resource.to_string());
        });
    }

    /// The request's id (the `x-request-id` header), for services that record it.
    fn request_id(&self) -> String {
        self.with(|i| i.request_id.clone())
    }

    fn mark_audited(&self) {
        self.with(|i| i.audited = true);
    }

    /// Who the request is, for the memory service's audit entries (as [`AuditCtx::event`] names
    /// them).
    fn caller(&self) -> Caller {
        self.with(|i| Caller {
            actor: i.actor.clone().unwrap_or_else(|| "anonymous".into()),
            request_id: i.request_id.clone(),
            action: i.action.clone().unwrap_or_else(|| "http.request".into()),
            resource: i
                .resource
                .as_deref()
                .map(|r| abuse::clip(r, AUDIT_RESOURCE_MAX).to_string())
                .unwrap_or_default(),
        })
    }

    fn event(&self, node: &str, outcome: &str, status: u16, code: Option<&str>) -> AuditEvent {
        self.with(|i| AuditEvent {
            ts_ms: now_ms(),
            node: node.to_string(),
            request_id: i.request_id.clone(),
            actor: i.actor.clone().unwrap_or_else(|| "anonymous".into()),
            action: i.action.clone().unwrap_or_else(|| "http.request".into()),
            resource: i
                .resource
                .as_deref()
                .map(|r| abuse::clip(r, AUDIT_RESOURCE_MAX).to_string())
                .unwrap_or_default(),
            outcome: outcome.to_string(),
            status,
            code: code.map(String::from),
        })
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub fn now_s() -> u64 {
    now_ms() / 1000
}

/// Build the router.
pub fn router(state: AppState) -> Router {
    // The routes and their description come from one table (`openapi::routes`).
    let api = Router::from(openapi::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    api.layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn not_found(req: Request) -> AppError {
    AppError::NotFound(format!("route {}", req.uri().path()))
}

async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

/// Routes that need no principal.
fn is_public(path: &str) -> bool {
    matches!(path, "/health" | "/openapi.json")
}

/// The source of a request, for the per-source limits.
fn source_of(req: &Request) -> abuse::Source {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(abuse::Source::Unknown, |ci| {
            abuse::Source::from_ip(ci.0.ip())
        })
}

/// The caller is on this machine.
fn is_loopback(req: &Request) -> bool {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ci| ci.0.ip().is_loopback())
}

async fn authenticate(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if is_public(&path) || (path == "/metrics" && is_loopback(&req)) {
        return next.run(req).await;
    }
    let principal = if s.secured {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        match s.auth.authenticate(
            header("authorization").as_deref(),
            header("x-api-key").as_deref(),
            now_s(),
        ) {
            Ok(p) => p,
            Err(e) => {
                s.metrics.auth_failure(e.code());
                return AppError::Unauthorized(e).into_response();
            }
        }
    } else {
        Principal {
            subject: "bench".into(),
            role: "admin".into(),
            auth_type: AuthType::Disabled,
            credential_id: String::new(),
            expires_at: u64::MAX,
        }
    };
    if let Some(ctx) = req.extensions().get::<AuditCtx>() {
        ctx.with(|i| i.actor = Some(principal.subject.clone()));
        tracing::Span::current().record("principal", principal.subject.as_str());
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

async fn track(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let mut id = [0u8; 8];
    // Not a secret: the thread-local generator spares a system call per request.
    rand::rng().fill_bytes(&mut id);
    let request_id = hex::encode(id);
    // Labels, logs and audit entries keep bounded copies of what the client sent.
    let method = metrics::method_label(req.method().as_str());
    let path = abuse::clip(req.uri().path(), AUDIT_RESOURCE_MAX).to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let source = source_of(&req);
    let ctx = AuditCtx::default();
    ctx.with(|i| {
        i.request_id = request_id.clone();
        i.resource = Some(path.clone());
    });
    req.extensions_mut().insert(ctx.clone());
    // Per-source rate, before any other work (authentication included).
    let admitted = lock(&s.rate).check(source, now_ms());
    s.metrics
        .in_flight
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // One span per request: what the request's logs (and the services it calls) hang under.
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method,
        route = %route,
        principal = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    let mut resp = match admitted {
        Ok(()) => {
            use tracing::Instrument;
            next.run(req).instrument(span.clone()).await
        }
        Err(limited) => {
            s.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
            let retry_after_s = match limited {
                abuse::Limited::OverRate { retry_after_s } => retry_after_s,
                abuse::Limited::TableFull => 1,
            };
            AppError::RateLimited { retry_after_s }.into_response()
        }
    };
    s.metrics
        .in_flight
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    let status = resp.status();
    span.record("status", status.as_u16());
    let code = resp.extensions().get::<ErrorCode>().map(|c| c.0);
    if let Some(cause) = resp.extensions().get::<ErrorCause>() {
        tracing::error!(request_id = %request_id, %method, %path, cause = %cause.0, "internal error");
    } else if status.is_client_error() {
        tracing::debug!(request_id = %request_id, %method, %path, status = status.as_u16(), code, "request refused");
    }
    let quiet =
        matches!(path.as_str(), "/health" | "/metrics" | "/openapi.json") && status.is_success();
    let (already, anonymous) = ctx.with(|i| (i.audited, i.actor.is_none()));
    let refused = !(status.is_success() || status.is_redirection());
    // No principal: the first refusal of a source in an interval is audited as it happens; the
    // later ones are counted and audited together when the interval ends.
    let counted = s.audited
        && !quiet
        && !already
        && anonymous
        && refused
        && !lock(&s.refusals).record(source, status.as_u16(), code, &path, now_ms());
    if s.audited && !quiet && !already && !counted {
        let outcome = match status.as_u16() {
            200..=399 => "ok",
            401 | 403 => "denied",
            _ => "error",
        };
        s.submit_audit(ctx.event(&s.node, outcome, status.as_u16(), code));
    }
    if method != "OPTIONS" {
        s.metrics.observe_request(
            method,
            &route,
            status.as_u16(),
            start.elapsed().as_secs_f64() * 1000.0,
        );
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

#[cfg(test)]
mod tests;
