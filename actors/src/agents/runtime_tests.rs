//! In-process tests of [`AgentRuntime`]: placement starts and stops agents, a crash restarts
//! an agent and past its budget escalates to its parent, a dropped stage drops its generation,
//! a stage is remembered under the agent's own name (or refused by its policy), a prompt too
//! long for the model is shortened, and `bench_noop` runs no model.
//!
//! The fakes here ([`FakeModel`], [`Recorder`], [`Deny`]) and the waiting helpers are shared
//! with the task service's tests (`tasks::service_tests`), hence `pub(crate)`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use swarm_config::{AgentsConfig, BENCH_NOOP_KIND, HumanDuration, SwarmFile};
use swarm_storage::{
    AuditEvent, AuditSink, MemEngine, MemoryType, SecretKey, Storage, StorageError, StorageOptions,
};
use tokio::sync::mpsc;

use super::{Access, AgentRecord, AgentRuntime, DELTA_BUFFER, Roster};
use crate::inference::{
    BoxFuture, Chunk, ClusterModel, Failure, FailureCode, FinishReason, Generation, Input, Request,
    Usage,
};
use crate::tasks::events::EVENT_RING;
use crate::tasks::wire::StageJob;
use crate::tasks::{Event, EventBus, now_ms};
use crate::{Inference, Memory};

/// How long a test waits for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(5);

// ---- fakes shared with the task service's tests ----

/// What [`FakeModel`] does with one request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Act {
    /// `chunks` distinct words, then `Done` ending with `finish`.
    Answer { chunks: u32, finish: FinishReason },
    /// Refuse before any text (every code but `invalid_field` is retryable for a stage).
    Fail(FailureCode),
    /// Panic inside `generate`: the agent running the stage crashes.
    Panic,
    /// One text chunk, then nothing until the generation is dropped.
    Hang,
    /// Answer when the user message is at most this many bytes, else refuse with
    /// `context_length_exceeded` and a message that starts with `prompt`.
    Fit(usize),
}

impl Act {
    /// Three words and a natural stop.
    pub(crate) const STOP: Act = Act::Answer {
        chunks: 3,
        finish: FinishReason::Stop,
    };
}

/// A model "fake" served on node "n1" whose behaviour the test scripts: the queued acts in
/// order, then the standing one. It counts calls, hangs started and hangs dropped, and keeps
/// each user message.
#[derive(Debug)]
pub(crate) struct FakeModel {
    script: Mutex<(VecDeque<Act>, Act)>,
    calls: AtomicUsize,
    hangs: AtomicUsize,
    /// Hanging generations whose reader went away (set by the producer once it sees it).
    dropped: Arc<AtomicUsize>,
    /// The user message of every request, in order.
    users: Mutex<Vec<String>>,
}

impl FakeModel {
    pub(crate) fn new(standing: Act) -> Arc<Self> {
        Arc::new(Self {
            script: Mutex::new((VecDeque::new(), standing)),
            calls: AtomicUsize::new(0),
            hangs: AtomicUsize::new(0),
            dropped: Arc::new(AtomicUsize::new(0)),
            users: Mutex::new(Vec::new()),
        })
    }

    /// Queue `acts` for the next requests.
    pub(crate) fn then(&self, acts: impl IntoIterator<Item = Act>) {
        self.script.lock().expect("script").0.extend(acts);
    }

    /// Drop the queue; every request from now on gets `act`.
    pub(crate) fn set(&self, act: Act) {
        *self.script.lock().expect("script") = (VecDeque::new(), act);
    }

    pub(crate) fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    pub(crate) fn hangs(&self) -> usize {
        self.hangs.load(SeqCst)
    }

    pub(crate) fn dropped(&self) -> usize {
        self.dropped.load(SeqCst)
    }

    pub(crate) fn user_messages(&self) -> Vec<String> {
        self.users.lock().expect("users").clone()
    }

    fn next_act(&self) -> Act {
        let mut s = self.script.lock().expect("script");
        s.0.pop_front().unwrap_or_else(|| s.1.clone())
    }

    fn hang(&self) -> Generation {
        self.hangs.fetch_add(1, SeqCst);
        let dropped = self.dropped.clone();
        let (tx, generation) = Generation::channel("n1", 10);
        tokio::spawn(async move {
            if tx.send(Chunk::Text("partial ".into())).await.is_ok() {
                tx.closed().await;
            }
            dropped.fetch_add(1, SeqCst);
        });
        generation
    }
}

/// The user message of a request (the prompt of a raw one).
fn user_message(req: &Request) -> String {
    match &req.input {
        // The conversation the model is asked to continue, the system prompt left out.
        Input::Chat(messages) => messages
            .iter()
            .filter(|m| m.role != "system")
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        Input::Prompt(p) => p.clone(),
    }
}

/// `chunks` distinct words, then `Done`.
fn answer(chunks: u32, finish: FinishReason) -> Generation {
    let (tx, generation) = Generation::channel("n1", 10);
    tokio::spawn(async move {
        for i in 0..chunks {
            if tx.send(Chunk::Text(format!("word{i} "))).await.is_err() {
                return;
            }
        }
        let usage = Usage {
            finish_reason: finish,
            prompt_tokens: 10,
            completion_tokens: chunks,
        };
        let _ = tx.send(Chunk::Done(usage)).await;
    });
    generation
}

impl Inference for FakeModel {
    fn models(&self) -> Vec<ClusterModel> {
        vec![ClusterModel {
            name: "fake".into(),
            nodes: vec!["n1".into()],
        }]
    }

    fn generate(&self, req: Request) -> BoxFuture<'_, Result<Generation, Failure>> {
        Box::pin(async move {
            self.calls.fetch_add(1, SeqCst);
            if req.model != "fake" {
                return Err(Failure::new(FailureCode::ModelNotFound, "only `fake`"));
            }
            let user = user_message(&req);
            self.users.lock().expect("users").push(user.clone());
            match self.next_act() {
                Act::Answer { chunks, finish } => Ok(answer(chunks, finish)),
                Act::Fail(code) => Err(Failure::new(code, "the fake refused")),
                Act::Panic => panic!("the fake model panicked (on purpose)"),
                Act::Hang => Ok(self.hang()),
                Act::Fit(max) if user.len() > max => Err(Failure::new(
                    FailureCode::ContextLengthExceeded,
                    format!("prompt of {} bytes is over {max}", user.len()),
                )),
                Act::Fit(_) => Ok(answer(3, FinishReason::Stop)),
            }
        })
    }
}

/// An audit sink that keeps every entry, and whether it was committed or only submitted.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    seen: Mutex<Vec<(bool, AuditEvent)>>,
}

impl Recorder {
    pub(crate) fn entries(&self) -> Vec<(bool, AuditEvent)> {
        self.seen.lock().expect("audit").clone()
    }
}

impl AuditSink for Recorder {
    fn submit(&self, event: AuditEvent) -> Result<(), StorageError> {
        self.seen.lock().expect("audit").push((false, event));
        Ok(())
    }

    fn commit(&self, event: AuditEvent) -> Result<(), StorageError> {
        self.seen.lock().expect("audit").push((true, event));
        Ok(())
    }

    /// The store is in memory: nothing to sync.
    fn sync_then(&self, done: swarm_storage::Committed) {
        done(Ok(()));
    }
}

/// A policy that denies the listed actions to every role and allows the rest.
#[derive(Debug)]
pub(crate) struct Deny(pub(crate) &'static [&'static str]);

impl Access for Deny {
    fn allowed(&self, _role: &str, action: &str) -> bool {
        !self.0.contains(&action)
    }
}

/// A store of node "n1" in memory.
pub(crate) fn storage() -> Storage {
    Storage::with_engine(
        Arc::new(MemEngine::default()),
        SecretKey::generate(),
        StorageOptions::new("n1"),
    )
    .expect("storage")
}

/// Agent settings with short restart delays.
pub(crate) fn agents_config() -> AgentsConfig {
    AgentsConfig {
        restart_backoff: HumanDuration(Duration::from_millis(10)),
        ..AgentsConfig::default()
    }
}

/// Poll `probe` until it gives a value; fail the test after [`PATIENCE`].
pub(crate) async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `n`th event (from 1) of `kind` about `about` (an agent or a task), once published.
pub(crate) async fn nth_event(bus: &EventBus, kind: &str, about: &str, n: usize) -> Arc<Event> {
    eventually(&format!("{kind} #{n} of {about}"), || {
        bus.recent(EVENT_RING)
            .into_iter()
            .filter(|e| e.kind == kind)
            .filter(|e| e.agent.as_deref() == Some(about) || e.task.as_deref() == Some(about))
            .nth(n.saturating_sub(1))
    })
    .await
}

// ---- the runtime under test ----

/// A runtime on node "n1" over an in-memory store, with what the tests look at.
struct Rig {
    rt: Arc<AgentRuntime>,
    model: Arc<FakeModel>,
    storage: Storage,
    audit: Arc<Recorder>,
    events: Arc<EventBus>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.rt.shutdown();
    }
}

async fn rig(cfg: AgentsConfig, act: Act, access: Deny) -> Rig {
    let storage = storage();
    let audit = Arc::new(Recorder::default());
    let memory = Memory::new("n1", storage.clone(), None, audit.clone());
    let events = Arc::new(EventBus::new());
    let model = FakeModel::new(act);
    let swarm = SwarmFile::preset().expect("preset");
    let rt = AgentRuntime::start(
        "n1",
        Roster::new(&swarm, &cfg),
        cfg,
        model.clone(),
        memory,
        Arc::new(access),
        events.clone(),
    )
    .await
    .expect("runtime");
    Rig {
        rt,
        model,
        storage,
        audit,
        events,
    }
}

impl Rig {
    /// Home `ids` here and wait until each one's actor runs.
    async fn home(&self, ids: &[&str]) {
        let homes: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        self.rt.set_homes(&homes);
        for id in ids {
            nth_event(&self.events, "agent.started", id, 1).await;
        }
    }

    fn record(&self, id: &str) -> AgentRecord {
        self.rt
            .records()
            .into_iter()
            .find(|r| r.id == id)
            .expect("the agent is homed here")
    }
}

/// A stage job for `agent`: the SPARC specification of task `task`, as kind `kind`.
fn job(agent: &str, kind: &str, task: &str) -> StageJob {
    StageJob {
        task: task.into(),
        submitter: "alice".into(),
        hash: format!("hash-{task}"),
        objective: "plan the rollout".into(),
        task_definition: None,
        context: serde_json::Value::Null,
        workflow: "sparc".into(),
        stage: "specification".into(),
        index: 0,
        kind: kind.into(),
        prompt: "Write the specification for: {objective}.".into(),
        max_tokens: 64,
        budget_capped: false,
        agent: agent.into(),
        epoch: 1,
        attempt: 1,
        deadline_ms: 0,
        previous: Vec::new(),
        turns: Vec::new(),
    }
}

/// Where a stage's text goes when nobody follows it.
fn nowhere() -> mpsc::Sender<String> {
    mpsc::channel(DELTA_BUFFER).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_homes_starts_the_agents_placed_here_and_stops_the_others() {
    let r = rig(agents_config(), Act::STOP, Deny(&[])).await;
    let all: Vec<&str> = r.rt.roster().ids().collect();
    assert_eq!(all.len(), 8);
    r.home(&all).await;
    let records = r.rt.records();
    assert_eq!(records.len(), 8);
    for rec in &records {
        assert_eq!(
            (
                rec.state.as_str(),
                rec.node.as_str(),
                rec.load,
                rec.escalated
            ),
            ("idle", "n1", 0, false),
            "{rec:?}"
        );
    }

    let kept = &all[..3];
    r.rt.set_homes(&kept.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let mut ids: Vec<String> = r.rt.records().into_iter().map(|r| r.id).collect();
    ids.sort();
    let mut want: Vec<String> = kept.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(ids, want, "only the agents still placed here are recorded");
    for id in &all[3..] {
        nth_event(&r.events, "agent.moved", id, 1).await;
        let e =
            r.rt.run_stage(job(id, "qa", "t-moved"), nowhere())
                .await
                .expect_err("a moved agent takes no stage");
        assert_eq!(e.code, "agent_moved");
    }
    r.rt.run_stage(job(kept[0], "planner", "t-kept"), nowhere())
        .await
        .expect("a kept agent still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_agent_restarts_and_serves_the_next_stage() {
    let r = rig(agents_config(), Act::STOP, Deny(&[])).await;
    r.model.then([Act::Panic]);
    r.home(&["testing-qa"]).await;
    let e =
        r.rt.run_stage(job("testing-qa", "qa", "t1"), nowhere())
            .await
            .expect_err("the stage crashed");
    assert_eq!(e.code, "agent_crashed");
    assert!(e.retryable, "another agent may run it");

    nth_event(&r.events, "agent.restarted", "testing-qa", 1).await;
    nth_event(&r.events, "agent.running", "testing-qa", 1).await;
    let ok =
        r.rt.run_stage(job("testing-qa", "qa", "t2"), nowhere())
            .await
            .expect("the restarted agent serves");
    assert_eq!(ok.text, "word0 word1 word2 ");
    let rec = r.record("testing-qa");
    assert_eq!(
        (rec.restarts, rec.failed, rec.completed, rec.escalated),
        (1, 1, 1, false),
        "{rec:?}"
    );
    assert_eq!((rec.state.as_str(), rec.load), ("idle", 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_keeps_crashing_escalates_to_its_parent() {
    let cfg = AgentsConfig {
        restart_budget: 2,
        ..agents_config()
    };
    let r = rig(cfg, Act::Panic, Deny(&[])).await;
    r.home(&["testing-qa"]).await;
    for round in 0..3 {
        if round > 0 {
            nth_event(&r.events, "agent.running", "testing-qa", round).await;
        }
        let e =
            r.rt.run_stage(job("testing-qa", "qa", &format!("t{round}")), nowhere())
                .await
                .expect_err("it always crashes");
        assert_eq!(e.code, "agent_crashed");
    }
    let escalated = nth_event(&r.events, "agent.escalated", "testing-qa", 1).await;
    assert_eq!(escalated.data["parent"], "memory-systems");
    let restarted = r
        .events
        .recent(EVENT_RING)
        .iter()
        .filter(|e| e.kind == "agent.restarted")
        .count();
    assert_eq!(restarted, 2, "restarts stop at the budget");
    let rec = r.record("testing-qa");
    assert_eq!(
        (rec.state.as_str(), rec.escalated, rec.restarts, rec.load),
        ("error", true, 2, 0),
        "{rec:?}"
    );
    let e =
        r.rt.run_stage(job("testing-qa", "qa", "t-after"), nowhere())
            .await
            .expect_err("an escalated agent stays down");
    assert_eq!(e.code, "agent_down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stage_drops_its_generation_and_frees_the_agent() {
    let r = rig(agents_config(), Act::Hang, Deny(&[])).await;
    r.home(&["testing-qa"]).await;
    let (deltas, mut followed) = mpsc::channel(DELTA_BUFFER);
    {
        let stage = r.rt.run_stage(job("testing-qa", "qa", "t1"), deltas);
        tokio::pin!(stage);
        tokio::select! {
            out = &mut stage => panic!("a hanging stage ended: {out:?}"),
            text = followed.recv() => assert_eq!(text.as_deref(), Some("partial ")),
        }
        let rec = r.record("testing-qa");
        assert_eq!(
            (rec.state.as_str(), rec.load, rec.current_task.as_deref()),
            ("busy", 1, Some("t1"))
        );
    }
    let started = Instant::now();
    eventually("the generation dropped", || {
        (r.model.dropped() == 1).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "dropped only after {:?}",
        started.elapsed()
    );
    eventually("the agent's load back to 0", || {
        let rec = r.record("testing-qa");
        (rec.load == 0 && rec.state == "idle" && rec.current_task.is_none()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_is_remembered_in_the_agents_namespace_as_the_agent() {
    let r = rig(agents_config(), Act::STOP, Deny(&[])).await;
    r.home(&["testing-qa"]).await;
    r.rt.run_stage(job("testing-qa", "qa", "t1"), nowhere())
        .await
        .expect("stage");
    let store = &r.storage.memory;
    let history = store
        .get("testing-qa", "history:t1:specification", now_ms())
        .expect("read")
        .expect("history written");
    let h: serde_json::Value = serde_json::from_str(&history.value_json).expect("json");
    assert_eq!(
        (&h["task"], &h["agent"], &h["stage"], &h["status"]),
        (
            &"t1".into(),
            &"testing-qa".into(),
            &"specification".into(),
            &"completed".into()
        )
    );
    assert_eq!(history.memory_type, MemoryType::Agent);
    assert!(
        history.expires_at.is_some(),
        "kept for the agent's retention"
    );
    let knowledge = store
        .get("testing-qa", "knowledge:qa:t1", now_ms())
        .expect("read")
        .expect("knowledge written");
    let k: serde_json::Value = serde_json::from_str(&knowledge.value_json).expect("json");
    assert_eq!(
        (&k["type"], &k["domain"]),
        (&"stage_result".into(), &"qa".into())
    );

    for key in ["history:t1:specification", "knowledge:qa:t1"] {
        let resource = format!("memory/testing-qa/{key}");
        let entries = r.audit.entries();
        let (committed, e) = entries
            .iter()
            .find(|(_, e)| e.resource == resource)
            .expect("the write is audited");
        assert!(committed);
        assert_eq!(
            (
                e.actor.as_str(),
                e.request_id.as_str(),
                e.action.as_str(),
                e.outcome.as_str()
            ),
            ("testing-qa", "t1", "memory.write", "ok")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_policy_denies_is_refused_audited_and_not_made() {
    let r = rig(agents_config(), Act::STOP, Deny(&["memory.write"])).await;
    r.home(&["testing-qa"]).await;
    r.rt.run_stage(job("testing-qa", "qa", "t1"), nowhere())
        .await
        .expect("the stage itself succeeds");
    let written = r
        .storage
        .memory
        .list("testing-qa", "", None, 10, now_ms())
        .expect("list");
    assert!(written.is_empty(), "nothing written: {written:?}");
    let refusals: Vec<AuditEvent> = r
        .audit
        .entries()
        .into_iter()
        .filter(|(_, e)| e.actor == "testing-qa" && e.action == "memory.write")
        .map(|(committed, e)| {
            assert!(!committed, "a refusal is submitted, not committed");
            e
        })
        .collect();
    assert_eq!(refusals.len(), 2, "history and knowledge: {refusals:?}");
    for e in &refusals {
        assert_eq!(
            (e.request_id.as_str(), e.outcome.as_str(), e.code.as_deref()),
            ("t1", "error", Some("forbidden"))
        );
    }
}

/// A job whose full prompt is long: a definition and three earlier stages of 1000 bytes.
fn long_job() -> StageJob {
    let mut j = job("testing-qa", "qa", "t-long");
    j.task_definition = Some("d".repeat(1000));
    j.previous = ["specification", "pseudocode", "architecture"]
        .iter()
        .map(|s| (s.to_string(), "api-architect".into(), "p".repeat(1000)))
        .collect();
    j.stage = "testing".into();
    j.index = 3;
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_too_long_for_the_model_is_shortened() {
    // The shortest prompt still names the task, the agent and the step (~400 bytes).
    let r = rig(agents_config(), Act::Fit(600), Deny(&[])).await;
    r.home(&["testing-qa"]).await;
    r.rt.run_stage(long_job(), nowhere())
        .await
        .expect("the shortened prompt fits");
    let lens: Vec<usize> = r.model.user_messages().iter().map(String::len).collect();
    assert!(lens.len() > 1, "shortened at least once: {lens:?}");
    assert!(
        lens.windows(2).all(|w| w[1] < w[0]),
        "shorter each time: {lens:?}"
    );
    assert!(lens.first().is_some_and(|l| *l > 3000), "{lens:?}");
    assert!(lens.last().is_some_and(|l| *l <= 600), "{lens:?}");

    // Even the shortest prompt is too long: not retryable (no other agent would fit it).
    r.model.set(Act::Fit(5));
    let before = r.model.calls();
    let e =
        r.rt.run_stage(long_job(), nowhere())
            .await
            .expect_err("nothing fits");
    assert_eq!(e.code, "context_length_exceeded");
    assert!(!e.retryable);
    assert_eq!(r.model.calls() - before, 4, "levels 0 to 3 tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_noop_answers_without_the_model() {
    // Any call to the model would crash the agent.
    let r = rig(agents_config(), Act::Panic, Deny(&[])).await;
    r.home(&["testing-qa"]).await;
    let ok =
        r.rt.run_stage(job("testing-qa", BENCH_NOOP_KIND, "t1"), nowhere())
            .await
            .expect("noop");
    assert_eq!(
        (ok.text.as_str(), ok.prompt_tokens, ok.completion_tokens),
        ("noop", 0, 0)
    );
    assert_eq!(r.model.calls(), 0);
    assert_eq!(r.record("testing-qa").completed, 1);
}
