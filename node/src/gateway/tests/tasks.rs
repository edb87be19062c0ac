//! The task, agent, stats and event routes over an in-memory task service ([`FakeTasks`]):
//! what the gateway itself owes them (status codes, who sees what, the error mapping, the
//! event stream's ids, filter, resumption and lag), not what the real service decides.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::StreamExt;
use serde_json::{Value, json};
use swarm_actors::Error;
use swarm_actors::inference::BoxFuture;
use swarm_actors::tasks::events::SUBSCRIBER_BUFFER;
use swarm_actors::tasks::{
    AgentAnswer, AgentQuery, AgentView, Backlog, EventBus, ListQuery, NewEvent, Running,
    StageRecord, Submit, Submitted, TaskApi, TaskFailure, TaskRecord, TaskStats, TaskStatus,
};
use swarm_config::{LimitsConfig, SwarmFile};
use tower::ServiceExt;

use super::{Fixture, code, fixture, fixture_parts};
use crate::gateway::{MAX_EVENT_SUBSCRIBERS, router};

/// An in-memory task service: keeps records, answers the error it is told to, publishes on a
/// real [`EventBus`].
#[derive(Default)]
struct FakeTasks {
    tasks: Mutex<BTreeMap<String, TaskRecord>>,
    results: Mutex<BTreeMap<String, Vec<StageRecord>>>,
    /// What the next submission answers instead of a task.
    refuse: Mutex<Option<Error>>,
    submitted: Mutex<Vec<Submit>>,
    bus: EventBus,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("the fake's lock")
}

fn record(id: &str, submitter: &str, objective: &str, status: TaskStatus) -> TaskRecord {
    TaskRecord {
        hash: format!("hash-of-{objective}"),
        status,
        epoch: 1,
        owner: "n1".into(),
        stages_total: 7,
        ..TaskRecord::new(id, objective, Value::Null, "sparc", submitter, 1_000)
    }
}

impl FakeTasks {
    fn insert(&self, r: TaskRecord) {
        lock(&self.tasks).insert(r.id.clone(), r);
    }

    fn refuse_next(&self, e: Error) {
        *lock(&self.refuse) = Some(e);
    }

    fn publish(&self, kind: &str, task: &str, submitter: Option<&str>) -> u64 {
        self.bus.publish(NewEvent {
            kind: kind.into(),
            task: Some(task.into()),
            agent: Some("coder-1".into()),
            submitter: submitter.map(String::from),
            node: "n1".into(),
            data: json!({"stage": "specification", "text": "hi"}),
        })
    }

    fn accept(&self, req: Submit) -> Submitted {
        let mut tasks = lock(&self.tasks);
        let replay = tasks.values().find(|t| {
            req.idempotency_key.is_some()
                && t.idempotency_key == req.idempotency_key
                && t.submitter == req.submitter
        });
        if let Some(t) = replay {
            return Submitted {
                task: t.clone(),
                deduplicated: false,
                replayed: true,
            };
        }
        let same = tasks
            .values()
            .find(|t| t.objective == req.objective && t.status.is_active());
        if let Some(t) = same {
            return Submitted {
                task: t.clone(),
                deduplicated: true,
                replayed: false,
            };
        }
        let id = format!("t{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 100);
        let mut r = record(&id, &req.submitter, &req.objective, TaskStatus::Pending);
        r.idempotency_key = req.idempotency_key.clone();
        tasks.insert(id, r.clone());
        Submitted {
            task: r,
            deduplicated: false,
            replayed: false,
        }
    }

    fn change(
        &self,
        id: &str,
        f: impl FnOnce(&mut TaskRecord) -> Result<(), Error>,
    ) -> Result<TaskRecord, Error> {
        let mut tasks = lock(&self.tasks);
        let t = tasks
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        f(t)?;
        Ok(t.clone())
    }
}

fn agent_view() -> AgentView {
    AgentView {
        id: "vllm-specialist".into(),
        name: "vLLM Specialist".into(),
        kind: "specialist".into(),
        role: "user".into(),
        priority: 2,
        capabilities: vec!["inference".into()],
        specialization: "serving".into(),
        clearance: "confidential".into(),
        parent: Some("orchestration-coordinator".into()),
        node: Some("n1".into()),
        state: "busy".into(),
        current_task: Some("t100".into()),
        load: 1,
        max_load: 4,
        completed: 9,
        failed: 1,
        success_rate: 0.9,
        mean_stage_ms: 2500.0,
        restarts: 0,
        model: Some("tiny".into()),
    }
}

fn stats() -> TaskStats {
    TaskStats {
        node: "n1".into(),
        backlog: vec![Backlog {
            priority: "high".into(),
            waiting: 3,
            oldest_ms: 2_500,
        }],
        running: 2,
        concurrency: 10,
        queue_bound: 1024,
        dead_letter: 1,
        completed: 5,
        ..TaskStats::default()
    }
}

impl TaskApi for FakeTasks {
    fn submit(&self, req: Submit) -> BoxFuture<'_, Result<Submitted, Error>> {
        Box::pin(async move {
            if let Some(e) = lock(&self.refuse).take() {
                return Err(e);
            }
            lock(&self.submitted).push(req.clone());
            Ok(self.accept(req))
        })
    }

    fn get(&self, id: &str) -> Result<Option<TaskRecord>, Error> {
        Ok(lock(&self.tasks).get(id).cloned())
    }

    fn list(&self, q: ListQuery) -> Result<Vec<TaskRecord>, Error> {
        Ok(lock(&self.tasks)
            .values()
            .rev()
            .filter(|t| q.submitter.as_ref().is_none_or(|s| *s == t.submitter))
            .filter(|t| q.status.is_none_or(|s| s == t.status))
            .take(q.limit)
            .cloned()
            .collect())
    }

    fn results(&self, id: &str) -> Result<Vec<StageRecord>, Error> {
        Ok(lock(&self.results).get(id).cloned().unwrap_or_default())
    }

    fn cancel(
        &self,
        id: &str,
        _by: &str,
        _request_id: &str,
    ) -> BoxFuture<'_, Result<TaskRecord, Error>> {
        let id = id.to_string();
        Box::pin(async move {
            self.change(&id, |t| {
                if t.status.is_finished() {
                    return Err(Error::TaskFinished {
                        id: t.id.clone(),
                        status: t.status.as_str().into(),
                    });
                }
                t.status = TaskStatus::Cancelled;
                Ok(())
            })
        })
    }

    fn requeue(
        &self,
        id: &str,
        _by: &str,
        _request_id: &str,
    ) -> BoxFuture<'_, Result<TaskRecord, Error>> {
        let id = id.to_string();
        Box::pin(async move {
            self.change(&id, |t| {
                if t.status != TaskStatus::DeadLetter {
                    return Err(Error::TaskState {
                        id: t.id.clone(),
                        status: t.status.as_str().into(),
                        message: "only a dead-lettered task is requeued".into(),
                    });
                }
                t.status = TaskStatus::Pending;
                Ok(())
            })
        })
    }

    fn agents(&self) -> Vec<AgentView> {
        vec![agent_view()]
    }

    fn query_agent(&self, q: AgentQuery) -> BoxFuture<'_, Result<AgentAnswer, Error>> {
        Box::pin(async move {
            Ok(AgentAnswer {
                agent: q.agent.unwrap_or_else(|| "vllm-specialist".into()),
                node: "n1".into(),
                answer: format!("you asked: {}", q.question),
                confidence: 0.5,
                prompt_tokens: 3,
                completion_tokens: 4,
                duration_ms: 5,
            })
        })
    }

    fn stats(&self) -> TaskStats {
        stats()
    }

    fn events(&self) -> &EventBus {
        &self.bus
    }
}

fn with_fake() -> (Fixture, Arc<FakeTasks>) {
    let fake = Arc::new(FakeTasks::default());
    let f = fixture_parts(
        64 * 1024,
        SwarmFile::preset().expect("preset"),
        LimitsConfig::default(),
        Some(fake.clone()),
    );
    (f, fake)
}

fn body(v: Value) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(&v).expect("json"))
}

impl Fixture {
    /// `POST /v1/tasks` with an optional `Idempotency-Key`.
    async fn submit(
        &self,
        token: &str,
        task: Value,
        key: Option<&str>,
    ) -> (StatusCode, Value, axum::http::HeaderMap) {
        let mut b = Request::builder()
            .method("POST")
            .uri("/v1/tasks")
            .header("authorization", format!("Bearer {token}"));
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        let req = b
            .body(Body::from(serde_json::to_vec(&task).expect("json")))
            .expect("request");
        self.send(req, 1 << 20).await
    }

    /// Open `/v1/events` (`uri`) as `token`; the answer's status and its body as a stream.
    async fn subscribe(
        &self,
        uri: &str,
        token: &str,
        last_id: Option<&str>,
    ) -> (StatusCode, axum::body::BodyDataStream) {
        let mut b = Request::builder()
            .uri(uri)
            .header("authorization", format!("Bearer {token}"));
        if let Some(id) = last_id {
            b = b.header("last-event-id", id);
        }
        let req = b.body(Body::empty()).expect("request");
        let resp = router(self.state.clone())
            .oneshot(req)
            .await
            .expect("response");
        (resp.status(), resp.into_body().into_data_stream())
    }
}

/// Read the stream until it has `n` messages (or ends); their text.
async fn messages(stream: &mut axum::body::BodyDataStream, n: usize) -> String {
    let mut text = String::new();
    while text.matches("\n\n").count() < n {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap_or_else(|_| panic!("{n} messages in time; so far:\n{text}"));
        match next {
            Some(chunk) => text.push_str(&String::from_utf8_lossy(&chunk.expect("a chunk"))),
            None => break,
        }
    }
    text
}

/// The `id:` lines of a stream's text.
fn ids(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("id: ")?.parse().ok())
        .collect()
}

#[tokio::test]
async fn a_submission_is_accepted_with_its_view_deduplicated_and_replayed() {
    let (f, fake) = with_fake();
    let alice = f.token("alice", "user");
    let (s, v, h) = f
        .submit(
            &alice,
            json!({"objective": "build it", "priority": "high"}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["task_id"].as_str().expect("task_id").to_string();
    assert_eq!(v["status"], "pending");
    assert_eq!(v["current_stage"], "specification", "{v}");
    assert_eq!(v["stages_total"], 7);
    assert_eq!(v["stages_completed"], 0);
    assert_eq!(v["progress"], 0.0);
    assert_eq!(v["submitter"], "alice");
    assert_eq!(v["running"], Value::Null);
    assert_eq!(v["error"], Value::Null);
    assert_eq!(
        (v["deduplicated"].clone(), v["replayed"].clone()),
        (json!(false), json!(false))
    );
    let seen = lock(&fake.submitted)[0].clone();
    assert_eq!(seen.submitter, "alice");
    assert_eq!(seen.priority.as_deref(), Some("high"));
    let request_id = h.get("x-request-id").and_then(|v| v.to_str().ok());
    assert_eq!(Some(seen.request_id.as_str()), request_id);
    let audit = f.audit_tail();
    assert_eq!(
        (audit.event.action.as_str(), audit.event.resource.as_str()),
        ("tasks.create", format!("tasks/{id}").as_str())
    );

    let (s, again, _) = f
        .submit(&alice, json!({"objective": "build it"}), None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(
        (again["task_id"].as_str(), again["deduplicated"].as_bool()),
        (Some(id.as_str()), Some(true))
    );

    let (_, first, _) = f
        .submit(&alice, json!({"objective": "other"}), Some("k-1"))
        .await;
    let (s, replayed, _) = f
        .submit(&alice, json!({"objective": "other"}), Some("k-1"))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(replayed["replayed"], true, "{replayed}");
    assert_eq!(replayed["task_id"], first["task_id"]);
    assert_eq!(
        lock(&fake.submitted)[2].idempotency_key.as_deref(),
        Some("k-1")
    );
}

#[tokio::test]
async fn the_services_refusals_keep_their_code_and_field() {
    let (f, fake) = with_fake();
    let alice = f.token("alice", "user");
    let cases = [
        (
            Error::Invalid {
                field: "priority".into(),
                message: "`urgent` is not a priority".into(),
            },
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Some("priority"),
        ),
        (
            Error::Invalid {
                field: "workflow".into(),
                message: "`nope` is not a workflow".into(),
            },
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Some("workflow"),
        ),
        (
            Error::NoCapableAgent {
                field: "capabilities[0]".into(),
                capability: "telepathy".into(),
            },
            StatusCode::UNPROCESSABLE_ENTITY,
            "no_capable_agent",
            Some("capabilities[0]"),
        ),
        (
            Error::NoSession("node-2".into()),
            StatusCode::SERVICE_UNAVAILABLE,
            "no_session",
            None,
        ),
    ];
    for (e, status, want, field) in cases {
        fake.refuse_next(e);
        let (s, v, _) = f.submit(&alice, json!({"objective": "x"}), None).await;
        assert_eq!((s, code(&v)), (status, want), "{v}");
        assert_eq!(v["error"]["field"].as_str(), field, "{v}");
    }
    fake.refuse_next(Error::QueueFull { retry_after_s: 7 });
    let (s, v, h) = f.submit(&alice, json!({"objective": "x"}), None).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
        "{v}"
    );
    assert_eq!(
        h.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("7")
    );
    // The gateway's own checks of shape: wrong types and unknown fields name the field.
    for (bad, field) in [
        (json!({"objective": 1}), "objective"),
        (
            json!({"objective": "x", "token_budget": "many"}),
            "token_budget",
        ),
        (json!({"objective": "x", "colour": "red"}), "colour"),
        (json!({}), "body"),
    ] {
        let (s, v, _) = f.submit(&alice, bad.clone(), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["error"]["field"], field, "{bad}: {v}");
    }
    assert!(
        lock(&fake.submitted).is_empty(),
        "nothing reached the service"
    );
}

#[tokio::test]
async fn idempotency_keys_are_checked_before_the_service() {
    let (f, fake) = with_fake();
    let alice = f.token("alice", "user");
    let long = "k".repeat(129);
    for key in ["", long.as_str(), "tab\there"] {
        let (s, v, _) = f.submit(&alice, json!({"objective": "x"}), Some(key)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{key:?}: {v}");
        assert_eq!(v["error"]["field"], "Idempotency-Key", "{v}");
    }
    assert!(lock(&fake.submitted).is_empty());
    let (s, _, _) = f
        .submit(&alice, json!({"objective": "x"}), Some(&"k".repeat(128)))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn only_the_submitter_and_admins_see_a_task() {
    let (f, fake) = with_fake();
    fake.insert(record("t1", "alice", "alice's", TaskStatus::InProgress));
    fake.insert(record("t2", "bob", "bob's", TaskStatus::Completed));
    lock(&fake.results).insert(
        "t1".into(),
        vec![StageRecord {
            task: "t1".into(),
            stage: "specification".into(),
            index: 0,
            epoch: 1,
            agent: "security-architect".into(),
            node: "n1".into(),
            attempt: 1,
            text: "the spec".into(),
            prompt: String::new(),
            prompt_tokens: 10,
            completion_tokens: 20,
            duration_ms: 30,
            finished_ms: 40,
        }],
    );
    let (alice, bob) = (f.token("alice", "user"), f.token("bob", "user"));
    let admin = f.token("root", "admin");
    for (method, uri) in [
        ("GET", "/v1/tasks/t1"),
        ("GET", "/v1/tasks/t1/results"),
        ("DELETE", "/v1/tasks/t1"),
        ("GET", "/v1/tasks/nope"),
    ] {
        let (s, v, _) = f.call(method, uri, Some(&bob), None).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{method} {uri}: {v}"
        );
    }
    assert_eq!(
        fake.get("t1").ok().flatten().map(|t| t.status),
        Some(TaskStatus::InProgress)
    );
    let (s, v, _) = f
        .call("GET", "/v1/tasks/t1/results", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["results"][0]["text"], "the spec");
    assert_eq!(v["results"][0]["agent"], "security-architect");
    assert_eq!(v["task_id"], "t1");
    let (s, v, _) = f.call("GET", "/v1/tasks/t2", Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["current_stage"],
        Value::Null,
        "a finished task has no current stage"
    );

    let listed = |v: &Value| -> Vec<String> {
        v["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .map(|t| t["task_id"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let (_, v, _) = f.call("GET", "/v1/tasks", Some(&alice), None).await;
    assert_eq!(listed(&v), ["t1"]);
    let (_, v, _) = f.call("GET", "/v1/tasks", Some(&admin), None).await;
    assert_eq!(listed(&v), ["t2", "t1"]);
    let (_, v, _) = f
        .call("GET", "/v1/tasks?status=completed", Some(&admin), None)
        .await;
    assert_eq!(listed(&v), ["t2"]);
    let (_, v, _) = f.call("GET", "/v1/tasks?limit=1", Some(&admin), None).await;
    assert_eq!(listed(&v), ["t2"]);
    for (uri, field) in [
        ("/v1/tasks?status=done", "status"),
        ("/v1/tasks?limit=0", "limit"),
        ("/v1/tasks?limit=1001", "limit"),
    ] {
        let (s, v, _) = f.call("GET", uri, Some(&admin), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert_eq!(v["error"]["field"], field, "{uri}: {v}");
    }
    // A viewer reads but does not submit.
    let viewer = f.token("vera", "viewer");
    let (s, _, _) = f.call("GET", "/v1/tasks", Some(&viewer), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v, _) = f.submit(&viewer, json!({"objective": "x"}), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
}

#[tokio::test]
async fn cancel_and_requeue_answer_the_tasks_state() {
    let (f, fake) = with_fake();
    let mut running = record("t1", "alice", "a", TaskStatus::InProgress);
    running.stage = 3;
    running.current = Some(Running {
        agent: "vllm-specialist".into(),
        node: "n2".into(),
        attempt: 2,
        started_ms: 5_000,
    });
    fake.insert(running);
    let mut dead = record("t2", "alice", "b", TaskStatus::DeadLetter);
    dead.error = Some(TaskFailure {
        code: "retries_exhausted".into(),
        message: "three agents failed".into(),
    });
    fake.insert(dead);
    let alice = f.token("alice", "user");
    let admin = f.token("root", "admin");
    let (s, v, _) = f.call("GET", "/v1/tasks/t1", Some(&alice), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["current_stage"], "implementation");
    assert_eq!(
        v["running"],
        json!({"agent": "vllm-specialist", "node": "n2", "attempt": 2, "started_at": 5_000})
    );
    let (s, v, _) = f.call("DELETE", "/v1/tasks/t1", Some(&alice), None).await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{v}"
    );
    let (s, v, _) = f.call("DELETE", "/v1/tasks/t1", Some(&alice), None).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::CONFLICT, "task_finished"),
        "{v}"
    );

    // `user` holds `tasks.*`, yet requeueing is an admin's.
    let (s, v, _) = f
        .call("POST", "/v1/tasks/t2/requeue", Some(&alice), None)
        .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{v}");
    let (s, v, _) = f
        .call("POST", "/v1/tasks/t1/requeue", Some(&admin), None)
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "task_state"), "{v}");
    let (s, v, _) = f.call("GET", "/v1/tasks/t2", Some(&alice), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v["error"],
        json!({"code": "retries_exhausted", "message": "three agents failed"})
    );
    let (s, v, _) = f
        .call("POST", "/v1/tasks/t2/requeue", Some(&admin), None)
        .await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("pending")),
        "{v}"
    );
}

#[tokio::test]
async fn agents_queries_stats_and_metrics() {
    let (f, _fake) = with_fake();
    let alice = f.token("alice", "user");
    let viewer = f.token("vera", "viewer");
    let admin = f.token("root", "admin");
    let (s, v, _) = f.call("GET", "/v1/agents", Some(&viewer), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["agents"][0]["id"], "vllm-specialist");
    assert_eq!(v["agents"][0]["type"], "specialist");

    let ask = |q: Value| body(q);
    let (s, _, _) = f
        .call(
            "POST",
            "/v1/agents/query",
            Some(&viewer),
            ask(json!({"question": "why?"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a viewer does not spend GPU time");
    let (s, v, _) = f
        .call(
            "POST",
            "/v1/agents/query",
            Some(&alice),
            ask(json!({"question": "why?", "agent": "testing-qa"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["agent"].as_str(), v["answer"].as_str()),
        (Some("testing-qa"), Some("you asked: why?"))
    );
    let long = "q".repeat(16 * 1024 + 1);
    for q in [
        json!({"question": ""}),
        json!({"question": long}),
        json!({"question": 3}),
    ] {
        let (s, v, _) = f
            .call("POST", "/v1/agents/query", Some(&alice), ask(q))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["field"], "question", "{v}");
    }

    let (s, v, _) = f.call("GET", "/v1/stats", Some(&viewer), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["backlog"][0],
        json!({"priority": "high", "waiting": 3, "oldest_ms": 2_500})
    );
    assert_eq!(v["running"], 2);

    let (s, text, _) = f.call("GET", "/metrics", Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK);
    let text = text.as_str().expect("text");
    for line in [
        "swarm_tasks_backlog{node=\"n1\",priority=\"high\"} 3",
        "swarm_tasks_oldest_age_seconds{node=\"n1\",priority=\"high\"} 2.5",
        "swarm_tasks_running{node=\"n1\"} 2",
        "swarm_tasks_dead_letter{node=\"n1\"} 1",
        "swarm_tasks_completed_total{node=\"n1\"} 5",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in /metrics");
    }
}

#[tokio::test]
async fn a_node_without_a_task_service_says_so() {
    let f = fixture();
    let admin = f.token("root", "admin");
    for (method, uri) in [
        ("GET", "/v1/tasks"),
        ("GET", "/v1/tasks/t1"),
        ("GET", "/v1/agents"),
        ("GET", "/v1/stats"),
        ("GET", "/v1/events"),
    ] {
        let (s, v, _) = f.call(method, uri, Some(&admin), None).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            "{uri}: {v}"
        );
    }
    let (s, text, _) = f.call("GET", "/metrics", Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!text.as_str().unwrap_or_default().contains("swarm_tasks_"));
}

#[tokio::test]
async fn events_stream_with_ids_resume_and_stay_private() {
    let (f, fake) = with_fake();
    let alice = f.token("alice", "user");
    let admin = f.token("root", "admin");
    let e1 = fake.publish("task.accepted", "t1", Some("alice"));
    fake.publish("task.accepted", "t2", Some("bob"));
    let e3 = fake.publish("stage.started", "t1", Some("alice"));
    fake.publish("member.up", "-", None);

    // Resume after the first: the ring's later events that alice may see, bob's left out.
    let (s, mut stream) = f
        .subscribe("/v1/events", &alice, Some(&e1.to_string()))
        .await;
    assert_eq!(s, StatusCode::OK);
    let text = messages(&mut stream, 2).await;
    assert_eq!(ids(&text), [e3, e3 + 1], "{text}");
    assert!(text.contains("event: stage.started\ndata: {"), "{text}");
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let ev: Value = serde_json::from_str(data).expect("the event as JSON");
    assert_eq!(
        (ev["id"].as_u64(), ev["task"].as_str()),
        (Some(e3), Some("t1"))
    );
    // Live: alice sees her task's, not bob's.
    fake.publish("stage.delta", "t2", Some("bob"));
    let mine = fake.publish("stage.delta", "t1", Some("alice"));
    assert_eq!(ids(&messages(&mut stream, 1).await), [mine]);

    // An admin narrowed to one task sees that task's events, whoever submitted it.
    let (_, mut stream) = f.subscribe("/v1/events?task=t2", &admin, Some("0")).await;
    let text = messages(&mut stream, 2).await;
    assert_eq!(ids(&text), [e1 + 1, mine - 1], "{text}");

    let (s, v, _) = f
        .send(
            Request::builder()
                .uri("/v1/events")
                .header("authorization", format!("Bearer {alice}"))
                .header("last-event-id", "soon")
                .body(Body::empty())
                .expect("request"),
            4096,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["field"], "Last-Event-ID");
}

#[tokio::test]
async fn a_lagging_subscriber_is_dropped_and_subscribers_are_bounded() {
    let (f, fake) = with_fake();
    let alice = f.token("alice", "user");
    let (s, mut stream) = f.subscribe("/v1/events", &alice, None).await;
    assert_eq!(s, StatusCode::OK);
    for _ in 0..SUBSCRIBER_BUFFER + 10 {
        fake.publish("stage.delta", "t1", Some("alice"));
    }
    let text = messages(&mut stream, 1).await;
    assert!(text.starts_with("event: dropped\ndata: {"), "{text}");
    let rest = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream ends in time");
    assert!(rest.is_none(), "the stream ends after `dropped`");

    // Every slot taken: the next subscriber gets 429 at once.
    let held = f
        .state
        .event_subscribers
        .clone()
        .try_acquire_many_owned(u32::try_from(MAX_EVENT_SUBSCRIBERS).expect("fits"))
        .expect("every slot is free again");
    let (s, _) = f.subscribe("/v1/events", &alice, None).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    drop(held);
    let (s, _) = f.subscribe("/v1/events", &alice, None).await;
    assert_eq!(s, StatusCode::OK);
}

/// Keys of a JSON object.
fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
    k.sort();
    k
}

/// Keys of `v` as JSON.
fn sent(v: &impl serde::Serialize) -> Vec<String> {
    keys(&serde_json::to_value(v).expect("json"))
}

/// The schema-only mirrors of the service's types describe what the routes really send.
#[tokio::test]
async fn the_documented_shapes_are_the_ones_sent() {
    let doc = serde_json::to_value(crate::gateway::openapi::document()).expect("document");
    let props = |name: &str| keys(&doc["components"]["schemas"][name]["properties"]);
    assert_eq!(props("Agent"), sent(&agent_view()));
    assert_eq!(props("TaskStats"), sent(&stats()));
    assert_eq!(props("Backlog"), sent(&stats().backlog[0]));
    let answer = AgentAnswer {
        agent: "a".into(),
        node: "n".into(),
        answer: "x".into(),
        confidence: 0.1,
        prompt_tokens: 1,
        completion_tokens: 1,
        duration_ms: 1,
    };
    assert_eq!(props("AgentAnswer"), sent(&answer));

    let (f, fake) = with_fake();
    fake.insert(record("t1", "alice", "a", TaskStatus::Pending));
    let alice = f.token("alice", "user");
    let (_, view, _) = f.call("GET", "/v1/tasks/t1", Some(&alice), None).await;
    assert_eq!(props("TaskView"), keys(&view));
    let (_, submitted, _) = f.submit(&alice, json!({"objective": "b"}), None).await;
    let mut both = props("TaskView");
    both.extend(["deduplicated".to_string(), "replayed".to_string()]);
    both.sort();
    assert_eq!(both, keys(&submitted));
}
