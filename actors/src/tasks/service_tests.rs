//! In-process tests of [`TaskService`] on one node (`AlonePeers`), its agents on a scripted
//! fake model, over an in-memory store without a replicator: a SPARC task end to end,
//! deduplication and idempotency, validation, retries into the dead-letter queue and back,
//! cancellation, the token budget, and adoption of unfinished tasks at restart. A node that sees
//! a second member (whose streams fail) shows deduplication against a task another node
//! accepted, and orphans looked for only after a round with every live peer. A node that sees
//! members cut off or answering (a scripted peer service) shows where submissions are routed:
//! the next choice when the owner does not answer, and away from itself after a stall.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use swarm_config::{AgentsConfig, HumanDuration, SPARC_STAGES, SwarmFile, TasksConfig};
use swarm_storage::{PutRequest, Storage};

use super::events::EVENT_RING;
use super::wire::{Reply, Req};
use super::{
    AlonePeers, EventBus, ListQuery, Submit, Submitted, TaskApi, TaskParts, TaskPeers, TaskRecord,
    TaskService, TaskStatus, rendezvous, task_hash,
};
use crate::agents::runtime_tests::{
    Act, Deny, FakeModel, Recorder, agents_config, eventually, nth_event, storage,
};
use crate::agents::{AgentRuntime, Roster};
use crate::inference::{BoxFuture, FailureCode, FinishReason, StreamPair};
use crate::stream::{FrameReader, FrameWriter};
use crate::tasks::model::TASKS_NAMESPACE;
use crate::{Error, Memory};

/// A node "n1" alone: its task service, the fake model its agents call, its event bus.
struct Node {
    svc: TaskService,
    model: Arc<FakeModel>,
    events: Arc<EventBus>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.svc.shutdown();
    }
}

/// Short delays, a few retries.
fn tasks_config() -> TasksConfig {
    TasksConfig {
        retry_delay: HumanDuration(Duration::from_millis(10)),
        concurrency: Some(4),
        max_retries: Some(2),
        ..TasksConfig::default()
    }
}

/// Start the node over `storage` and wait until its eight agents run.
async fn start(storage: Storage, model: Arc<FakeModel>, tasks: TasksConfig) -> Node {
    let alone = Arc::new(AlonePeers {
        name: "n1".into(),
        hosts_here: true,
    });
    start_with(storage, model, tasks, alone).await
}

/// [`start`], seeing the cluster through `peers`.
async fn start_with(
    storage: Storage,
    model: Arc<FakeModel>,
    tasks: TasksConfig,
    peers: Arc<dyn TaskPeers>,
) -> Node {
    let swarm = SwarmFile::preset().expect("preset");
    start_swarm(storage, model, tasks, peers, swarm).await
}

/// [`start_with`] a swarm file of the test's own.
async fn start_swarm(
    storage: Storage,
    model: Arc<FakeModel>,
    tasks: TasksConfig,
    peers: Arc<dyn TaskPeers>,
    swarm: SwarmFile,
) -> Node {
    let events = Arc::new(EventBus::new());
    let memory = Memory::new("n1", storage, None, Arc::new(Recorder::default()));
    let cfg: AgentsConfig = agents_config();
    let agents = AgentRuntime::start(
        "n1",
        Roster::new(&swarm, &cfg),
        cfg,
        model.clone(),
        memory.clone(),
        Arc::new(Deny(&[])),
        events.clone(),
    )
    .await
    .expect("agents");
    let svc = TaskService::start(TaskParts {
        node: "n1".into(),
        tasks,
        swarm: swarm.clone(),
        memory,
        inference: model.clone(),
        agents,
        events: events.clone(),
        peers,
        seed: 7,
    });
    for a in &swarm.agents {
        nth_event(&events, "agent.started", &a.id, 1).await;
    }
    Node { svc, model, events }
}

/// A submission by alice of `objective` on the default workflow.
fn submit(objective: &str) -> Submit {
    Submit {
        objective: objective.into(),
        task_definition: None,
        priority: None,
        workflow: None,
        context: None,
        capabilities: Vec::new(),
        token_budget: None,
        deadline_s: None,
        idempotency_key: None,
        submitter: "alice".into(),
        request_id: "req-1".into(),
    }
}

/// A one-stage task.
fn ask(objective: &str) -> Submit {
    Submit {
        workflow: Some("ask".into()),
        ..submit(objective)
    }
}

impl Node {
    async fn accepted(&self, req: Submit) -> Submitted {
        self.svc.submit(req).await.expect("accepted")
    }

    /// The stored record of `id` once it has `status`.
    async fn reaches(&self, id: &str, status: TaskStatus) -> TaskRecord {
        eventually(&format!("task {id} {}", status.as_str()), || {
            self.svc
                .get(id)
                .expect("get")
                .filter(|r| r.status == status)
        })
        .await
    }

    fn kinds_of_events_about(&self, task: &str) -> Vec<String> {
        self.events
            .recent(EVENT_RING)
            .iter()
            .filter(|e| e.task.as_deref() == Some(task))
            .map(|e| e.kind.clone())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparc_task_runs_its_seven_stages_in_order() {
    let n = start(storage(), FakeModel::new(Act::STOP), tasks_config()).await;
    let s = n.accepted(submit("build a rate limiter")).await;
    assert!(!s.deduplicated && !s.replayed);
    let id = s.task.id;
    let done = n.reaches(&id, TaskStatus::Completed).await;
    assert_eq!(done.progress(), 1.0);
    assert!(!done.agents_involved.is_empty());
    assert_eq!(done.tokens_used, 7 * 3);
    assert!(done.error.is_none() && done.current.is_none());

    let results = n.svc.results(&id).expect("results");
    let kinds = TasksConfig::default().effective_kinds();
    assert_eq!(results.len(), 7);
    for (i, (st, (name, kind))) in results.iter().zip(SPARC_STAGES).enumerate() {
        assert_eq!((st.stage.as_str(), st.index as usize), (name, i));
        assert!(
            kinds[kind].contains(&st.agent),
            "{name} ran on {} outside kind {kind}",
            st.agent
        );
        assert_eq!((st.epoch, st.node.as_str()), (1, "n1"));
        assert_eq!(st.text, "word0 word1 word2 ");
    }
    let kinds_seen = n.kinds_of_events_about(&id);
    for kind in [
        "task.accepted",
        "stage.delta",
        "stage.completed",
        "task.completed",
    ] {
        assert!(
            kinds_seen.iter().any(|k| k == kind),
            "no {kind}: {kinds_seen:?}"
        );
    }
    let delta = nth_event(&n.events, "stage.delta", &id, 1).await;
    assert_eq!(delta.data["stage"], "specification");
}

/// A stage's job is built from the task record and the stage results in the local store
/// (`TaskService::job`), so it must run only once the writes decided before it are durable:
/// otherwise the first stage runs without its objective, a later one misses the stage just
/// before it, and the first stage's `stage.delta` events carry no submitter (and would be
/// shown to every `events.read` holder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_is_given_its_task_and_the_earlier_stages() {
    let n = start(storage(), FakeModel::new(Act::STOP), tasks_config()).await;
    let id = n.accepted(submit("build a rate limiter")).await.task.id;
    n.reaches(&id, TaskStatus::Completed).await;
    let users = n.model.user_messages();
    assert_eq!(users.len(), 7);
    let mut missing = Vec::new();
    for (i, (user, (name, _))) in users.iter().zip(SPARC_STAGES).enumerate() {
        let given_task = user.starts_with("Objective: build a rate limiter\n")
            && user.contains(&format!("Your step: {name}. "))
            && user.contains("for: build a rate limiter");
        if !given_task {
            missing.push(format!("{name}: its task"));
        }
        // Earlier stages come as the turns they were (their step and their answer).
        for (earlier, _) in &SPARC_STAGES[..i] {
            if !user.contains(&format!("Your step: {earlier}. ")) {
                missing.push(format!("{name}: stage {earlier}"));
            }
        }
    }
    let unowned: Vec<u64> = n
        .events
        .recent(EVENT_RING)
        .iter()
        .filter(|e| e.task.as_deref() == Some(id.as_str()))
        .filter(|e| e.submitter.as_deref() != Some("alice"))
        .map(|e| e.id)
        .collect();
    assert!(
        missing.is_empty() && unowned.is_empty(),
        "stages not given: {missing:?}; events without their submitter: {unowned:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_is_answered_with_the_running_task_and_a_key_replays() {
    let n = start(storage(), FakeModel::new(Act::Hang), tasks_config()).await;
    let first = n.accepted(submit("index the repository")).await;
    // The hash normalises case and spacing.
    let again = n.accepted(submit("Index   the REPOSITORY")).await;
    assert!(again.deduplicated && !again.replayed);
    assert_eq!(again.task.id, first.task.id);

    let keyed = Submit {
        idempotency_key: Some("key-1".into()),
        ..submit("write the changelog")
    };
    let a = n.accepted(keyed.clone()).await;
    let b = n.accepted(keyed.clone()).await;
    assert!(!a.replayed && !a.deduplicated);
    assert!(b.replayed && !b.deduplicated);
    assert_eq!(b.task.id, a.task.id);
    // The key is the submitter's own: bob's same key is not a replay (only a duplicate).
    let bob = n
        .accepted(Submit {
            submitter: "bob".into(),
            ..keyed
        })
        .await;
    assert!(!bob.replayed && bob.deduplicated);
    eventually("stats counted the duplicates", || {
        let st = n.svc.stats();
        (st.submitted == 2 && st.deduplicated == 2).then_some(())
    })
    .await;
}

/// The field an error names.
fn field(e: &Error) -> Option<&str> {
    match e {
        Error::Invalid { field, .. } | Error::NoCapableAgent { field, .. } => Some(field),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_are_refused_naming_the_field() {
    let cfg = tasks_config();
    let n = start(storage(), FakeModel::new(Act::STOP), cfg.clone()).await;
    let base = submit("review the design");
    let cases: Vec<(Submit, &str, &str)> = vec![
        (submit("   "), "invalid_request", "objective"),
        (
            submit(&"o".repeat(cfg.max_objective_bytes + 1)),
            "invalid_request",
            "objective",
        ),
        (
            Submit {
                priority: Some("urgent".into()),
                ..base.clone()
            },
            "invalid_request",
            "priority",
        ),
        (
            Submit {
                workflow: Some("nope".into()),
                ..base.clone()
            },
            "invalid_request",
            "workflow",
        ),
        (
            Submit {
                context: Some(serde_json::json!(["not", "an", "object"])),
                ..base.clone()
            },
            "invalid_request",
            "context",
        ),
        (
            Submit {
                context: Some(serde_json::json!({"file_paths": "src/lib.rs"})),
                ..base.clone()
            },
            "invalid_request",
            "context.file_paths",
        ),
        (
            Submit {
                context: Some(serde_json::json!({"operation_type": 3})),
                ..base.clone()
            },
            "invalid_request",
            "context.operation_type",
        ),
        (
            Submit {
                capabilities: vec!["teleportation".into()],
                ..base.clone()
            },
            "no_capable_agent",
            "capabilities[0]",
        ),
        (
            Submit {
                capabilities: vec!["threat_modeling".into(), "teleportation".into()],
                ..base.clone()
            },
            "no_capable_agent",
            "capabilities[1]",
        ),
        (
            Submit {
                token_budget: Some(cfg.token_budget + 1),
                ..base.clone()
            },
            "invalid_request",
            "token_budget",
        ),
        (
            Submit {
                token_budget: Some(0),
                ..base.clone()
            },
            "invalid_request",
            "token_budget",
        ),
        (
            Submit {
                deadline_s: Some(0),
                ..base.clone()
            },
            "invalid_request",
            "deadline_s",
        ),
        (
            Submit {
                idempotency_key: Some(String::new()),
                ..base.clone()
            },
            "invalid_request",
            "Idempotency-Key",
        ),
    ];
    for (req, kind, want) in cases {
        let e = n.svc.submit(req).await.expect_err("refused");
        assert_eq!((e.kind(), field(&e)), (kind, Some(want)), "{e}");
    }
    assert!(
        n.svc
            .list(super::ListQuery {
                limit: 10,
                ..Default::default()
            })
            .expect("list")
            .is_empty(),
        "a refused submission stores nothing"
    );
    // A capability some agent holds is accepted.
    n.accepted(Submit {
        capabilities: vec!["threat_modeling".into()],
        ..ask("review the design")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_end_in_the_dead_letter_queue_and_a_requeue_runs_it_again() {
    let n = start(
        storage(),
        FakeModel::new(Act::Fail(FailureCode::Overloaded)),
        tasks_config(),
    )
    .await;
    let id = n.accepted(ask("summarise the incident")).await.task.id;
    let dead = n.reaches(&id, TaskStatus::DeadLetter).await;
    assert_eq!(
        dead.error.as_ref().map(|e| e.code.as_str()),
        Some("overloaded")
    );
    assert_eq!(n.model.calls(), 3, "the first attempt and max_retries = 2");
    let escalated = nth_event(&n.events, "task.escalated", &id, 1).await;
    assert_eq!(escalated.data["coordinator"], "orchestration-coordinator");
    nth_event(&n.events, "task.dead_letter", &id, 1).await;

    n.model.set(Act::STOP);
    let back = n.svc.requeue(&id, "root", "req-2").await.expect("requeued");
    assert!(back.status.is_active(), "{:?}", back.status);
    assert!(back.error.is_none());
    nth_event(&n.events, "task.requeued", &id, 1).await;
    let done = n.reaches(&id, TaskStatus::Completed).await;
    assert_eq!(done.progress(), 1.0);

    let e = n
        .svc
        .cancel(&id, "alice", "req-3")
        .await
        .expect_err("finished");
    assert!(matches!(e, Error::TaskFinished { .. }), "{e:?}");
    let e = n
        .svc
        .requeue(&id, "root", "req-4")
        .await
        .expect_err("not a dead letter");
    assert_eq!(e.kind(), "task_state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_running_generation() {
    let n = start(storage(), FakeModel::new(Act::Hang), tasks_config()).await;
    let id = n.accepted(ask("profile the cache")).await.task.id;
    eventually("the stage generating", || {
        (n.model.hangs() == 1).then_some(())
    })
    .await;
    let rec = n
        .svc
        .cancel(&id, "alice", "req-2")
        .await
        .expect("cancelled");
    assert_eq!(rec.status, TaskStatus::Cancelled);
    let at = Instant::now();
    eventually("the generation dropped", || {
        (n.model.dropped() == 1).then_some(())
    })
    .await;
    assert!(at.elapsed() < Duration::from_secs(1), "{:?}", at.elapsed());
    n.reaches(&id, TaskStatus::Cancelled).await;
    nth_event(&n.events, "task.cancelled", &id, 1).await;
    eventually("the agents freed", || {
        let rt = n.svc.agent_runtime();
        rt.records().iter().all(|r| r.load == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_spends_the_budget_fails_the_task() {
    let cut = Act::Answer {
        chunks: 3,
        finish: FinishReason::Length,
    };
    let n = start(storage(), FakeModel::new(cut), tasks_config()).await;
    let id = n
        .accepted(Submit {
            token_budget: Some(10),
            ..ask("list every open issue")
        })
        .await
        .task
        .id;
    let failed = n.reaches(&id, TaskStatus::Failed).await;
    assert_eq!(
        failed.error.as_ref().map(|e| e.code.as_str()),
        Some("budget_exceeded")
    );
    assert_eq!(n.model.calls(), 1, "not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_adopts_its_unfinished_task_and_completes_it() {
    let store = storage();
    // Two stages answer, the third hangs when the node stops.
    let before = FakeModel::new(Act::Hang);
    before.then([Act::STOP, Act::STOP]);
    // Agents may not be up yet when the adopted task's first stage is sent.
    let cfg = TasksConfig {
        retry_delay: HumanDuration(Duration::from_millis(50)),
        max_retries: Some(5),
        ..tasks_config()
    };
    let a = start(store.clone(), before.clone(), cfg.clone()).await;
    let id = a.accepted(submit("migrate the schema")).await.task.id;
    eventually("the third stage generating", || {
        (before.hangs() == 1).then_some(())
    })
    .await;
    eventually("the third stage recorded as running", || {
        a.svc
            .get(&id)
            .expect("get")
            .filter(|r| r.status == TaskStatus::InProgress && r.stage == 2 && r.current.is_some())
    })
    .await;
    drop(a);
    eventually("the stopped node's generation dropped", || {
        (before.dropped() == 1).then_some(())
    })
    .await;

    let after = FakeModel::new(Act::STOP);
    let b = start(store, after.clone(), cfg).await;
    let done = b.reaches(&id, TaskStatus::Completed).await;
    assert_eq!((done.epoch, done.owner.as_str()), (2, "n1"));
    let adopted = nth_event(&b.events, "task.adopted", &id, 1).await;
    assert_eq!(adopted.data["epoch"], 2);
    let epochs: Vec<u64> = b
        .svc
        .results(&id)
        .expect("results")
        .iter()
        .map(|s| s.epoch)
        .collect();
    assert_eq!(epochs, [1, 1, 2, 2, 2, 2, 2], "resumed at the third stage");
    assert_eq!(after.calls(), 5, "only the stages left ran again");
}

/// "n1" with "n2" alive beside it (hosting no agents; streams to it fail), and whether n1
/// has exchanged an anti-entropy round with it since the view changed.
struct WithN2 {
    synced: AtomicBool,
}

impl TaskPeers for WithN2 {
    fn name(&self) -> &str {
        "n1"
    }

    fn live(&self) -> Vec<(String, bool)> {
        vec![("n1".into(), true), ("n2".into(), false)]
    }

    fn open(&self, peer: &str) -> BoxFuture<'_, Result<StreamPair, Error>> {
        let peer = peer.to_string();
        Box::pin(async move { Err(Error::NoSession(peer)) })
    }

    fn synced_since(&self, _peers: &[String], _since_ms: u64) -> bool {
        self.synced.load(Ordering::SeqCst)
    }
}

/// An objective whose hash `node` owns when n1 and n2 are alive.
fn owned_by(node: &str, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix} {i}"))
        .find(|o| {
            let h = task_hash(o, &serde_json::Value::Null);
            rendezvous(&h, ["n1", "n2"]) == Some(node)
        })
        .expect("some objective")
}

/// "n1" with other members alive in its view. A stream to a member in `answering` is
/// answered as that member's task service accepting the submission as a task of its own
/// (`t-on-<member>`); to any other member a stream never opens (cut off). Keeps what each
/// member was sent.
struct Reaching {
    members: Vec<&'static str>,
    answering: Vec<&'static str>,
    sent: Arc<Mutex<Vec<(String, Req)>>>,
}

impl Reaching {
    fn new(members: &[&'static str], answering: &[&'static str]) -> Arc<Self> {
        Arc::new(Self {
            members: members.to_vec(),
            answering: answering.to_vec(),
            sent: Arc::default(),
        })
    }

    fn sent(&self) -> Vec<(String, Req)> {
        self.sent.lock().expect("sent").clone()
    }
}

impl TaskPeers for Reaching {
    fn name(&self) -> &str {
        "n1"
    }

    fn live(&self) -> Vec<(String, bool)> {
        self.members
            .iter()
            .map(|m| (m.to_string(), *m == "n1"))
            .collect()
    }

    fn open(&self, peer: &str) -> BoxFuture<'_, Result<StreamPair, Error>> {
        if !self.answering.contains(&peer) {
            return Box::pin(std::future::pending());
        }
        let (here, there) = tokio::io::duplex(1 << 16);
        let (read, write) = tokio::io::split(here);
        let (peer, sent) = (peer.to_string(), self.sent.clone());
        tokio::spawn(async move {
            let (r, w) = tokio::io::split(there);
            let mut r = FrameReader::new(r, "n1");
            let mut w = FrameWriter::new(w, "n1");
            let Ok(Some(req)) = r.next_json::<Req>().await else {
                return;
            };
            let reply = match &req {
                Req::Submit { submit, .. } => Reply::Submitted(Ok(Submitted {
                    task: running_on(&peer, &format!("t-on-{peer}"), &submit.objective),
                    deduplicated: false,
                    replayed: false,
                })),
                _ => return,
            };
            sent.lock().expect("sent").push((peer, req));
            let _ = w.send_json(&reply).await;
        });
        Box::pin(async move {
            Ok(StreamPair {
                send: Box::new(write),
                recv: Box::new(read),
            })
        })
    }
}

/// A node n1 on a hanging model that sees `members` through [`Reaching`].
async fn start_reaching(
    members: &[&'static str],
    answering: &[&'static str],
) -> (Node, Arc<Reaching>) {
    let peers = Reaching::new(members, answering);
    let n = start_with(
        storage(),
        FakeModel::new(Act::Hang),
        tasks_config(),
        peers.clone(),
    )
    .await;
    (n, peers)
}

/// An objective whose hash `first` owns among `members`, and `then` among them less `first`.
fn owned_then(first: &str, then: &str, members: &[&str], prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix} {i}"))
        .find(|o| {
            let h = task_hash(o, &serde_json::Value::Null);
            let rest: Vec<&str> = members.iter().copied().filter(|m| *m != first).collect();
            rendezvous(&h, members.iter().copied()) == Some(first)
                && rendezvous(&h, rest) == Some(then)
        })
        .expect("some objective")
}

/// The staleness a forwarded submission carried.
fn stale_ms(req: &Req) -> Option<u64> {
    match req {
        Req::Submit { stale_ms, .. } => *stale_ms,
        _ => None,
    }
}

/// A submission whose owner does not answer goes to the next choice (the owner among the
/// members less that one), the node every other sender that cannot reach the owner picks, not
/// to the node it arrived at; it is told to refuse it once its sender has given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_whose_owner_does_not_answer_goes_to_the_next_choice() {
    let members = ["n1", "n2", "n3"];
    let (n, peers) = start_reaching(&members, &["n3"]).await;
    let started = Instant::now();
    let s = n
        .accepted(submit(&owned_then(
            "n2",
            "n3",
            &members,
            "rebuild the index",
        )))
        .await;
    let took = started.elapsed();
    assert_eq!(s.task.id, "t-on-n3", "{s:?}");
    let sent = peers.sent();
    assert_eq!(sent.len(), 1);
    let stale = stale_ms(&sent[0].1).expect("a staleness");
    let target = SwarmFile::preset()
        .expect("preset")
        .performance
        .response_targets
        .orchestration
        .0;
    assert!(
        Duration::from_millis(stale) < target / 2,
        "stale after {stale} ms"
    );
    assert!(took < target, "answered after {took:?}");
    assert_eq!(n.model.calls(), 0, "nothing ran here");
}

/// When neither the owner nor the next choice answers, the submission is refused (a retry is
/// deduplicated against what either accepted), not taken where it arrived, and it is answered
/// within the gateway's response target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_neither_owner_answers_is_refused_within_the_response_target() {
    let mut swarm = SwarmFile::preset().expect("preset");
    // Under the 1.5 s the forward waits for its owner.
    swarm.performance.response_targets.orchestration = HumanDuration(Duration::from_millis(800));
    let members = ["n1", "n2", "n3"];
    let n = start_swarm(
        storage(),
        FakeModel::new(Act::Hang),
        tasks_config(),
        Reaching::new(&members, &[]),
        swarm,
    )
    .await;
    let started = Instant::now();
    let e = n
        .svc
        .submit(submit(&owned_then(
            "n2",
            "n3",
            &members,
            "rebuild the index",
        )))
        .await
        .expect_err("nobody answered");
    let took = started.elapsed();
    assert_eq!(e.kind(), "owner_unreachable", "{e}");
    assert!(took < Duration::from_millis(800), "answered after {took:?}");
    let here = n.svc.list(ListQuery {
        submitter: None,
        status: None,
        limit: 10,
    });
    assert_eq!(here.expect("list").len(), 0, "taken here");
}

/// In a cluster of two, the next choice after a cut-off owner is this node: it takes the task,
/// within the response target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_peer_cut_off_a_submission_it_owns_is_taken_here() {
    let mut swarm = SwarmFile::preset().expect("preset");
    swarm.performance.response_targets.orchestration = HumanDuration(Duration::from_millis(800));
    let n = start_swarm(
        storage(),
        FakeModel::new(Act::Hang),
        tasks_config(),
        Reaching::new(&["n1", "n2"], &[]),
        swarm,
    )
    .await;
    let started = Instant::now();
    let s = n
        .accepted(submit(&owned_by("n2", "rebuild the index")))
        .await;
    assert!(!s.deduplicated);
    assert_eq!(s.task.owner, "n1");
    assert!(started.elapsed() < Duration::from_millis(800));
}

/// A node back from a stall takes no ownership while its view refreshes: a submission it owns
/// by its own (stale) view goes where the others, which took it for dead, send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_from_a_stall_routes_as_if_it_were_not_a_member() {
    let members = ["n1", "n2", "n3"];
    let (n, _) = start_reaching(&members, &["n3"]).await;
    let objective = owned_then("n1", "n3", &members, "rotate the keys");
    n.svc.stalled_now();
    let s = n.accepted(submit(&objective)).await;
    assert_eq!(s.task.id, "t-on-n3", "{s:?}");
    assert_eq!(n.model.calls(), 0, "nothing ran here");
}

/// Send `req` to `n`'s task service as peer "n2" would, and read its reply.
async fn ask_as_peer(n: &Node, req: &Req) -> Reply {
    let (here, there) = tokio::io::duplex(1 << 16);
    let (read, write) = tokio::io::split(there);
    let pair = StreamPair {
        send: Box::new(write),
        recv: Box::new(read),
    };
    tokio::spawn(n.svc.clone().serve_stream("n2".into(), pair));
    let (r, w) = tokio::io::split(here);
    let mut w = FrameWriter::new(w, "n1");
    let mut r = FrameReader::new(r, "n1");
    w.send_json(req).await.expect("send");
    r.next_json::<Reply>()
        .await
        .expect("reply")
        .expect("a reply")
}

/// A forwarded submission is refused as read too late past the staleness its sender set, and
/// by a node back from a stall; the sender then passes this node over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_submissions_are_refused_when_stale_or_back_from_a_stall() {
    let (n, _) = start_reaching(&["n1", "n2"], &[]).await;
    let fwd = |objective: &str, age_ms: u64, stale_ms: u64| Req::Submit {
        submit: submit(objective),
        sent_ms: now_ms() - age_ms,
        stale_ms: Some(stale_ms),
    };
    let code = |reply: Reply| match reply {
        Reply::Submitted(Ok(s)) => format!("accepted {}", s.task.owner),
        Reply::Submitted(Err(e)) => e.code,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        code(ask_as_peer(&n, &fwd("one", 0, 500)).await),
        "accepted n1"
    );
    assert_eq!(
        code(ask_as_peer(&n, &fwd("two", 300, 200)).await),
        "timeout"
    );
    n.svc.stalled_now();
    assert_eq!(
        code(ask_as_peer(&n, &fwd("three", 0, 500)).await),
        "timeout"
    );
}

/// Task `id` of `objective`, running on `owner` at epoch 1 (a SPARC task of alice's).
fn running_on(owner: &str, id: &str, objective: &str) -> TaskRecord {
    TaskRecord {
        status: TaskStatus::InProgress,
        epoch: 1,
        owner: owner.into(),
        stages_total: 7,
        ..TaskRecord::new(
            id,
            objective,
            serde_json::Value::Null,
            "sparc",
            "alice",
            now_ms(),
        )
    }
}

/// Store `rec` as replication would bring it.
fn store_record(storage: &Storage, rec: &TaskRecord) {
    let req = PutRequest {
        value_json: serde_json::to_string(rec).expect("json"),
        ..Default::default()
    };
    storage
        .memory
        .put(
            TASKS_NAMESPACE,
            &TaskRecord::key(&rec.id),
            req,
            rec.updated_ms,
        )
        .expect("put");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The owner of a hash moved here (n2 accepted the task while n1 was away): a submission of
/// the same objective is that task, found in this replica, not a second run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_is_deduplicated_against_a_task_another_node_accepted() {
    let store = storage();
    let peers = Arc::new(WithN2 {
        synced: AtomicBool::new(true),
    });
    let n = start_with(
        store.clone(),
        FakeModel::new(Act::Hang),
        tasks_config(),
        peers,
    )
    .await;
    let objective = owned_by("n1", "summarise the incident");
    let mut theirs = running_on("n2", "t-on-n2", &objective);
    store_record(&store, &theirs);
    let s = n.accepted(submit(&objective)).await;
    assert!(s.deduplicated, "{s:?}");
    assert_eq!(s.task.id, "t-on-n2");
    assert_eq!(n.model.calls(), 0, "nothing ran here");

    // Once it has finished, the same objective is a new task that runs here.
    theirs.status = TaskStatus::Completed;
    theirs.updated_ms = now_ms();
    store_record(&store, &theirs);
    let s = n.accepted(submit(&objective)).await;
    assert!(!s.deduplicated);
    assert_ne!(s.task.id, "t-on-n2");
}

/// A restarted node resumes its unfinished task only once it has exchanged a round with every
/// live peer: before, its replica may lack what an adopter recorded meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_looked_for_only_after_a_round_with_every_live_peer() {
    let store = storage();
    let objective = owned_by("n1", "rotate the keys");
    let mine = running_on("n1", "t-mine", &objective);
    store_record(&store, &mine);
    let peers = Arc::new(WithN2 {
        synced: AtomicBool::new(false),
    });
    let n = start_with(
        store,
        FakeModel::new(Act::STOP),
        tasks_config(),
        peers.clone(),
    )
    .await;
    // The service looks at membership every 250 ms: a second is four looks, none adopting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !n.kinds_of_events_about("t-mine")
            .contains(&"task.adopted".to_string()),
        "adopted before a round with n2"
    );
    assert_eq!(n.model.calls(), 0);
    peers.synced.store(true, Ordering::SeqCst);
    let done = n.reaches("t-mine", TaskStatus::Completed).await;
    assert_eq!((done.epoch, done.owner.as_str()), (2, "n1"));
}
