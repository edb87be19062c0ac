//! [`TaskService`]: the IO shell around this node's [`Dispatcher`].
//!
//! - **Ownership.** A task belongs to the rendezvous owner of its hash among the live members
//!   when it is submitted; a submission arriving elsewhere is forwarded there (so every copy of
//!   one hash meets the same dispatcher, which refuses to start it twice, and the owner also
//!   refuses a hash unfinished in its replica: a task another node took before the hash's
//!   owner moved). It stays with that owner while the owner lives. When gossip says the owner
//!   is down or has left, the rendezvous owner of its hash among the live members adopts it:
//!   the epoch goes up and it resumes from its last recorded stage. A node also reconciles at
//!   start the unfinished tasks it owns. Orphans are looked for only once this node has caught
//!   up and exchanged an anti-entropy round with every live peer since membership changed, so
//!   the stage results a gone owner recorded are here.
//! - **Durability.** Every record the dispatcher changes is written through [`Memory`] with
//!   `w=2`; a submission is answered once its record is durable here and on one peer (when one
//!   is alive). Writes of one task are chained, so they land in the order decided.
//! - **Stages** run on the agent's home node: locally through the [`AgentRuntime`], or over a
//!   [`crate::StreamKind::Tasks`] stream that carries the stage's text back as it is generated
//!   (published as `stage.delta` events). Aborting a stage drops its stream or future, which
//!   stops its generation.
//! - **Events** happen where they happen and are relayed in batches to every live peer, so a
//!   client following a task sees it from any gateway.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use swarm_config::{SwarmFile, TasksConfig, WorkflowConfig};
use swarm_membership::{MemberState, Membership};
use swarm_storage::{MemoryType, PutRequest};

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::dispatcher::{
    Action, Catalog, Dispatcher, Event as DEvent, Limits, Refusal, RunStage, StageError,
    StageOutcome,
};
use super::model::{StageRecord, TASKS_NAMESPACE, TaskRecord, TaskStatus, read_json, rendezvous};
use super::stall::{BEAT_EVERY, Stall};
use super::unfinished::Unfinished;
use super::wire::{Reply, Req, StageJob, Turn, WireError};
use super::{
    AgentAnswer, AgentQuery, AgentView, EventBus, ListQuery, NewEvent, Priority, Submit, Submitted,
    TaskApi, TaskStats, now_ms,
};
use crate::agents::{AgentRecord, AgentRuntime, Host, place};
use crate::inference::{BoxFuture, StreamPair};
use crate::replication::Replicator;
use crate::stream::{FrameReader, FrameWriter, StreamKind};
use crate::{Caller, Error, Inference, Memory, Put, StreamService};

/// Commands the dispatcher loop takes; bounded.
const CMD_QUEUE: usize = 4096;
/// How often membership and placement are looked at.
const VIEW_EVERY: Duration = Duration::from_millis(250);
/// How often unfinished tasks of dead owners are looked for, outside membership changes.
const SCAN_EVERY: Duration = Duration::from_secs(10);
/// How long after start a member missing from the view (neither alive nor declared gone) is
/// taken for gone: by then gossip has joined and has heard of every member that is alive.
const VIEW_FORMS_IN: Duration = Duration::from_secs(20);
/// After a membership change, scan this often for a while (records of a dead owner may reach
/// this node by anti-entropy after the change).
const SCAN_AFTER_CHANGE: Duration = Duration::from_secs(1);
const SCAN_AFTER_CHANGE_FOR: Duration = Duration::from_secs(30);
/// Most task records read in one scan or listing.
const SCAN_MAX: usize = 100_000;
/// How long a peer may take to answer a forwarded call.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a submission's sender waits for the hash's owner at most before it passes it over
/// for the next choice (an owner killed or paused is not known dead for seconds; a client
/// should not wait that long), and how old a forwarded submission may be when the owner reads
/// it at most: an older one is refused, its sender has passed it on or is about to. With the
/// preset's 2 s response target the first forward waits 1.425 s (three quarters of the
/// budget) and its reader refuses it after 760 ms, the next waits what is left (455 ms) and
/// its reader refuses it after 243 ms: the same share, which leaves each reader about half
/// the wait to make an accepted one durable and answer; past that, the task may run on both.
const FORWARD_WAIT: Duration = Duration::from_millis(1500);
const FORWARD_STALE: Duration = Duration::from_millis(800);
/// A submission is answered this much before the gateway's response target, so the answer is
/// the service's, not the gateway's timeout.
const SUBMIT_MARGIN: Duration = Duration::from_millis(100);
/// A forward to the next choice ends this much before the submission's budget.
const ROUTE_MARGIN: Duration = Duration::from_millis(20);
/// Events relayed to peers in one batch, and how often.
const RELAY_BATCH: usize = 512;
const RELAY_EVERY: Duration = Duration::from_millis(100);
/// History records per agent read at start for anti-collision.
const HISTORY_LOADED: usize = 4096;
/// Earlier stage text sent with a stage (bytes per stage).
const PREVIOUS_MAX: usize = 2000;

/// What the task service needs of the network: who is alive (with what they host) and streams.
pub trait TaskPeers: Send + Sync {
    /// This node's name.
    fn name(&self) -> &str;
    /// Live members, this node included: name, whether it hosts agents.
    fn live(&self) -> Vec<(String, bool)>;
    /// Members gossip has declared `down` or `left` (not merely missing from a view that is
    /// still forming).
    fn gone(&self) -> Vec<String> {
        Vec::new()
    }
    /// Opens a tasks stream to `peer`.
    fn open(&self, peer: &str) -> BoxFuture<'_, Result<StreamPair, Error>>;
    /// Whether this node has caught up, and has completed an anti-entropy round with each of
    /// `peers` that began at or after `since_ms` (starting those it has not): the task records
    /// and stage results a gone owner wrote are then here, from whichever peer acknowledged
    /// them. Without replication (a node alone), true.
    fn synced_since(&self, _peers: &[String], _since_ms: u64) -> bool {
        true
    }
}

/// QUIC through the membership service. `hosts_here` is this node's `agents.host`; peers say
/// theirs with the gossiped `agents` role.
#[derive(Debug, Clone)]
pub struct QuicTaskPeers {
    pub membership: Membership,
    pub replicator: Replicator,
    pub hosts_here: bool,
}

impl TaskPeers for QuicTaskPeers {
    fn name(&self) -> &str {
        self.membership.name()
    }

    fn live(&self) -> Vec<(String, bool)> {
        let me = self.membership.name().to_string();
        let mut out: Vec<(String, bool)> = self
            .membership
            .view()
            .members
            .into_iter()
            .filter(|m| m.name != me)
            .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
            .map(|m| {
                let hosts = m
                    .meta
                    .as_ref()
                    .is_some_and(|meta| meta.roles.iter().any(|r| r == "agents"));
                (m.name, hosts)
            })
            .collect();
        out.push((me, self.hosts_here));
        out.sort();
        out
    }

    fn gone(&self) -> Vec<String> {
        self.membership
            .view()
            .members
            .into_iter()
            .filter(|m| matches!(m.state, MemberState::Down | MemberState::Left))
            .map(|m| m.name)
            .collect()
    }

    fn synced_since(&self, peers: &[String], since_ms: u64) -> bool {
        self.replicator.synced_since(peers, since_ms)
    }

    fn open(&self, peer: &str) -> BoxFuture<'_, Result<StreamPair, Error>> {
        let peer = peer.to_string();
        Box::pin(async move {
            let (send, recv) = self
                .membership
                .open_stream(&peer, StreamKind::Tasks.byte())
                .await
                .map_err(|e| Error::Stream {
                    peer: peer.clone(),
                    message: e.to_string(),
                })?;
            Ok(StreamPair {
                send: Box::new(send),
                recv: Box::new(recv),
            })
        })
    }
}

/// A node alone (tests of the gateway): only itself, no streams.
#[derive(Debug, Clone)]
pub struct AlonePeers {
    pub name: String,
    pub hosts_here: bool,
}

impl TaskPeers for AlonePeers {
    fn name(&self) -> &str {
        &self.name
    }

    fn live(&self) -> Vec<(String, bool)> {
        vec![(self.name.clone(), self.hosts_here)]
    }

    fn open(&self, peer: &str) -> BoxFuture<'_, Result<StreamPair, Error>> {
        let peer = peer.to_string();
        Box::pin(async move { Err(Error::NoSession(peer)) })
    }
}

enum Cmd {
    Submit(Box<TaskRecord>, oneshot::Sender<Result<Submitted, Error>>),
    Outcome(Box<StageOutcome>),
    Change(Change, String, oneshot::Sender<Result<TaskRecord, Error>>),
}

/// A change of a task made on its owner, answered with the record once it is durable.
#[derive(Debug, Clone, Copy)]
enum Change {
    Cancel,
    /// Of a dead letter.
    Requeue,
}

/// The parts a task service is built from.
#[allow(missing_debug_implementations)]
pub struct TaskParts {
    pub node: String,
    pub tasks: TasksConfig,
    pub swarm: SwarmFile,
    pub memory: Memory,
    pub inference: Arc<dyn Inference>,
    pub agents: Arc<AgentRuntime>,
    pub events: Arc<EventBus>,
    pub peers: Arc<dyn TaskPeers>,
    /// Seed of the dispatcher's jitter.
    pub seed: u64,
}

struct Shared {
    node: String,
    cfg: TasksConfig,
    workflows: BTreeMap<String, WorkflowConfig>,
    /// Every capability some agent holds.
    capabilities: Vec<String>,
    memory: Memory,
    inference: Arc<dyn Inference>,
    agents: Arc<AgentRuntime>,
    events: Arc<EventBus>,
    peers: Arc<dyn TaskPeers>,
    /// The unfinished tasks of this replica.
    unfinished: Arc<Unfinished>,
    /// How long a submission may take to be answered ([`SUBMIT_MARGIN`] under the gateway's
    /// response target for orchestration).
    submit_budget: Duration,
    cmd: mpsc::Sender<Cmd>,
    stats: Mutex<TaskStats>,
    /// Agent → home node.
    placement: Mutex<BTreeMap<String, Option<String>>>,
    /// Stages running from this node: task → what stops them.
    running: Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// Per task, the last write in flight (the next one waits for it), with its number.
    writes: Mutex<HashMap<String, (u64, WriteDone)>>,
    write_seq: std::sync::atomic::AtomicU64,
    /// Stage results refused at the write (already recorded by another epoch).
    stale_writes: std::sync::atomic::AtomicU64,
    /// Submissions answered with an unfinished task of this replica the dispatcher did not hold.
    twins: std::sync::atomic::AtomicU64,
    /// Events not relayed to peers.
    not_relayed: std::sync::atomic::AtomicU64,
    /// Whether this node is back from a stall and holds off ownership.
    stall: Mutex<Stall>,
    stop: CancellationToken,
}

/// The task service of one node. Cheap to clone.
#[derive(Clone)]
pub struct TaskService {
    s: Arc<Shared>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("node", &self.s.node)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TaskService {
    /// Start the dispatcher loop, the event relay and placement.
    pub fn start(p: TaskParts) -> Self {
        let catalog = Catalog::from_config(&p.tasks, &p.swarm, agents_max_load(&p.agents));
        let limits = Limits {
            node: p.node.clone(),
            queue_bound: p.tasks.queue_bound,
            concurrency: p.tasks.concurrency(&p.swarm) as usize,
            max_retries: p.tasks.max_retries(&p.swarm),
            retry_delay_ms: p.tasks.retry_delay.0.as_millis() as u64,
            stage_timeout_ms: p.tasks.stage_timeout.0.as_millis() as u64,
            seed: p.seed,
        };
        let mut capabilities: Vec<String> = p
            .swarm
            .agents
            .iter()
            .flat_map(|a| a.capabilities.iter().cloned())
            .collect();
        capabilities.sort();
        capabilities.dedup();
        let (tx, rx) = mpsc::channel(CMD_QUEUE);
        let target = p.swarm.performance.response_targets.orchestration.0;
        let submit_budget = target.saturating_sub(SUBMIT_MARGIN).max(target / 2);
        let unfinished = Arc::new(Unfinished::default());
        unfinished.watch(&p.memory.storage().memory);
        let s = Arc::new(Shared {
            node: p.node,
            workflows: p.tasks.effective_workflows(),
            cfg: p.tasks,
            capabilities,
            memory: p.memory,
            inference: p.inference,
            agents: p.agents,
            events: p.events,
            peers: p.peers,
            unfinished,
            submit_budget,
            cmd: tx,
            stats: Mutex::new(TaskStats::default()),
            placement: Mutex::new(BTreeMap::new()),
            running: Mutex::new(HashMap::new()),
            writes: Mutex::new(HashMap::new()),
            write_seq: std::sync::atomic::AtomicU64::new(0),
            stale_writes: std::sync::atomic::AtomicU64::new(0),
            twins: std::sync::atomic::AtomicU64::new(0),
            not_relayed: std::sync::atomic::AtomicU64::new(0),
            stall: Mutex::new(Stall::new(std::time::Instant::now())),
            stop: CancellationToken::new(),
        });
        let svc = Self { s };
        let dispatcher = Dispatcher::new(limits, catalog);
        tokio::spawn(svc.clone().run(dispatcher, rx));
        tokio::spawn(svc.clone().relay());
        tokio::spawn(svc.clone().beat());
        svc
    }

    /// The heartbeat that finds stalls ([`Stall`]).
    async fn beat(self) {
        let mut tick = tokio::time::interval(BEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.s.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            lock(&self.s.stall).beat(std::time::Instant::now(), now_ms());
        }
    }

    /// Whether this node holds off task ownership now (back from a stall).
    fn holding_off(&self) -> bool {
        let caught_up = |since_ms| {
            let peers: Vec<String> = self
                .s
                .peers
                .live()
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| *n != self.s.node)
                .collect();
            self.s.peers.synced_since(&peers, since_ms)
        };
        lock(&self.s.stall).holding(std::time::Instant::now(), now_ms(), caught_up)
    }

    /// Act as if this node had just come back from a stall.
    #[cfg(test)]
    pub(super) fn stalled_now(&self) {
        let late = std::time::Instant::now() + super::stall::STALL_AFTER * 2;
        lock(&self.s.stall).beat(late, now_ms());
    }

    /// Stop the loop, the relay and every stage this node runs.
    pub fn shutdown(&self) {
        self.s.stop.cancel();
        for (_, (_, t)) in lock(&self.s.running).drain() {
            t.cancel();
        }
        self.s.agents.shutdown();
    }

    /// The agent runtime of this node.
    pub fn agent_runtime(&self) -> &Arc<AgentRuntime> {
        &self.s.agents
    }

    // ---- the dispatcher loop ----

    async fn run(self, mut d: Dispatcher, mut rx: mpsc::Receiver<Cmd>) {
        self.load_histories(&mut d);
        // Every record once; the store's observer (registered before) tells of every change.
        for rec in self.scan_tasks() {
            self.s.unfinished.note_record(&rec);
        }
        let mut view: Vec<(String, bool)> = Vec::new();
        let mut last_view = tokio::time::Instant::now() - VIEW_EVERY;
        let mut last_scan: Option<tokio::time::Instant> = None;
        let mut changed_at = tokio::time::Instant::now();
        let mut changed_ms = now_ms();
        let mut serving: Vec<String> = Vec::new();
        let started = tokio::time::Instant::now();
        loop {
            let wake = d
                .next_wakeup()
                .map(|t| Duration::from_millis(t.saturating_sub(now_ms())))
                .unwrap_or(VIEW_EVERY)
                .min(VIEW_EVERY);
            tokio::select! {
                _ = self.s.stop.cancelled() => return,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(&mut d, cmd),
                    None => return,
                },
                _ = tokio::time::sleep(wake) => {}
            }
            // Drain what else is queued before looking at time and membership.
            while let Ok(cmd) = rx.try_recv() {
                self.command(&mut d, cmd);
            }
            if last_view.elapsed() >= VIEW_EVERY {
                last_view = tokio::time::Instant::now();
                let live = self.s.peers.live();
                let now_serving = self.serving_nodes();
                if live != view {
                    view = live;
                    changed_at = tokio::time::Instant::now();
                    changed_ms = now_ms();
                    self.placed(&mut d, &view, &now_serving);
                    last_scan = None;
                } else if now_serving != serving {
                    // A model loaded or unloaded somewhere: agents that need one may move.
                    self.placed(&mut d, &view, &now_serving);
                }
                serving = now_serving;
                let due = match last_scan {
                    None => true,
                    Some(t) if changed_at.elapsed() < SCAN_AFTER_CHANGE_FOR => {
                        t.elapsed() >= SCAN_AFTER_CHANGE
                    }
                    Some(t) => t.elapsed() >= SCAN_EVERY,
                };
                // Only once this node has caught up and exchanged a round with every live peer
                // since the view changed: what a gone owner recorded is here by then (an adopter
                // that lacked a stage result would run the stage again; the simulation of the
                // chaos suite found it).
                if due {
                    let peers: Vec<String> = view
                        .iter()
                        .filter(|(n, _)| *n != self.s.node)
                        .map(|(n, _)| n.clone())
                        .collect();
                    if self.s.peers.synced_since(&peers, changed_ms) {
                        last_scan = Some(tokio::time::Instant::now());
                        self.adopt_orphans(&mut d, &view, started.elapsed());
                    }
                }
            }
            let actions = d.tick(now_ms());
            self.execute(actions, None);
            *lock(&self.s.stats) = d.stats(now_ms());
        }
    }

    fn command(&self, d: &mut Dispatcher, cmd: Cmd) {
        let now = now_ms();
        match cmd {
            Cmd::Submit(rec, reply) => {
                if let Some(task) = self.unfinished_twin(d, &rec) {
                    self.s
                        .twins
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = reply.send(Ok(Submitted {
                        task,
                        deduplicated: true,
                        replayed: false,
                    }));
                    return;
                }
                self.submit_to(d, now, rec, reply);
            }
            Cmd::Outcome(o) => {
                let (task, index, epoch) = (o.task.clone(), o.index, o.epoch);
                match d.stage_finished(now, *o) {
                    Ok(actions) => self.execute(actions, None),
                    Err(Refusal::Stale { current }) => {
                        self.stale(&task, index, epoch, current);
                    }
                    Err(_) => {}
                }
            }
            Cmd::Change(change, id, reply) => {
                self.hold(d, &id);
                let done = match change {
                    Change::Cancel => d.cancel(now, &id),
                    Change::Requeue => d.requeue(now, &id),
                };
                match done {
                    Ok(actions) => self.execute(actions, Some(Ack::Record(id, reply))),
                    Err(r) => {
                        let _ = reply.send(Err(self.state_error(&id, r)));
                    }
                }
            }
        }
    }

    /// A submission this node owns, to its dispatcher (which refuses a hash it holds).
    fn submit_to(
        &self,
        d: &mut Dispatcher,
        now: u64,
        rec: Box<TaskRecord>,
        reply: oneshot::Sender<Result<Submitted, Error>>,
    ) {
        match d.submit(now, (*rec).clone()) {
            Ok(actions) => self.execute(actions, Some(Ack::Submit(rec.id.clone(), reply, false))),
            Err(Refusal::Duplicate { existing }) => {
                let _ = reply.send(match d.task(&existing).cloned() {
                    Some(task) => Ok(Submitted {
                        task,
                        deduplicated: true,
                        replayed: false,
                    }),
                    None => Err(Error::Unavailable("duplicate task vanished".into())),
                });
            }
            Err(r) => {
                let _ = reply.send(Err(refusal_error(&rec.id, r, &rec.capabilities)));
            }
        }
    }

    /// A pending or running task of `rec`'s hash in this replica that this dispatcher does not
    /// hold: another node accepted it, and the hash's owner has moved here since (a member
    /// came back). The submission is that task.
    fn unfinished_twin(&self, d: &Dispatcher, rec: &TaskRecord) -> Option<TaskRecord> {
        for id in self.s.unfinished.with_hash(&rec.hash) {
            if id == rec.id || d.task(&id).is_some() {
                continue; // the dispatcher's own deduplication answers
            }
            match self.read_task(&id) {
                Some(t) if t.status.is_active() => return Some(t),
                Some(t) if !t.status.is_finished() => {} // dead-lettered: not running
                _ => self.s.unfinished.forget(&id),
            }
        }
        None
    }

    /// Make sure the dispatcher holds task `id` when its record is unfinished here (an
    /// operation on a task this node owns by adoption but has not picked up yet).
    fn hold(&self, d: &mut Dispatcher, id: &str) {
        if d.task(id).is_some() {
            return;
        }
        if let Some(rec) = self.read_task(id)
            && !rec.status.is_finished()
        {
            let rec = self.resume_point(rec);
            let actions = d.adopt(now_ms(), rec);
            self.execute(actions, None);
        }
    }

    fn state_error(&self, id: &str, r: Refusal) -> Error {
        match r {
            Refusal::Finished { status } => Error::TaskFinished {
                id: id.to_string(),
                status: status.as_str().into(),
            },
            Refusal::NotDeadLetter { status } => Error::TaskState {
                id: id.to_string(),
                status: status.as_str().into(),
                message: "only a dead-lettered task can be requeued".into(),
            },
            Refusal::NotFound => match self.read_task(id) {
                Some(rec) if rec.status.is_finished() => Error::TaskFinished {
                    id: id.to_string(),
                    status: rec.status.as_str().into(),
                },
                _ => Error::NotFound(format!("task {id}")),
            },
            other => refusal_error(id, other, &[]),
        }
    }

    /// A stage result from a superseded epoch: refused, counted (in the dispatcher's stats),
    /// audited and published.
    fn stale(&self, task: &str, index: u32, epoch: u64, current: u64) {
        let e = Error::StaleEpoch {
            task: task.to_string(),
            stage: index.to_string(),
            epoch,
            current,
        };
        tracing::warn!(%task, index, epoch, current, "stale stage result refused");
        let caller = Caller::new(
            "system",
            "tasks.record",
            format!("tasks/{task}/stage/{index}"),
        )
        .with_request_id(task.to_string());
        self.s.memory.refuse(&caller, &e);
        self.s.events.publish(NewEvent {
            kind: "result.refused".into(),
            task: Some(task.to_string()),
            agent: None,
            submitter: None,
            node: self.s.node.clone(),
            data: serde_json::json!({"index": index, "epoch": epoch, "current": current}),
        });
    }

    /// Tell the dispatcher which task hashes each agent's history holds (anti-collision
    /// survives restarts and adoptions): up to [`HISTORY_LOADED`] history records of each
    /// agent's namespace.
    fn load_histories(&self, d: &mut Dispatcher) {
        let store = &self.s.memory.storage().memory;
        for spec in &self.s.agents.roster().specs {
            let id = &spec.agent.id;
            let Ok(items) = store.list(id, "history:", None, HISTORY_LOADED, now_ms()) else {
                continue;
            };
            for i in items {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&i.value_json)
                    && let Some(hash) = v.get("hash").and_then(|h| h.as_str())
                {
                    d.note_history(id, hash);
                }
            }
        }
    }

    /// A task escalated to the coordinator: besides the event, a record in the coordinator's
    /// namespace (`escalation:{task}`) that says what failed, written as the coordinator.
    fn record_escalation(&self, task: &str, coordinator: &str, code: &str) {
        let svc = self.clone();
        let (task, coordinator, code) =
            (task.to_string(), coordinator.to_string(), code.to_string());
        tokio::spawn(async move {
            let rec = svc.read_task(&task);
            let value = serde_json::json!({
                "task": task,
                "code": code,
                "error": rec.as_ref().and_then(|r| r.error.clone()),
                "stage": rec.as_ref().map(|r| r.stage),
                "failed_agents": rec.as_ref().map(|r| r.failed_agents.clone()),
                "at_ms": now_ms(),
            });
            let key = format!("escalation:{task}");
            let caller = Caller::new(
                coordinator.clone(),
                "memory.write",
                format!("memory/{coordinator}/{key}"),
            )
            .with_request_id(task.clone());
            let req = PutRequest {
                value_json: value.to_string(),
                memory_type: MemoryType::Agent,
                ttl_ms: None,
                subject: None,
                tags: vec![format!("task:{task}")],
            };
            if let Err(e) = svc.s.memory.put(caller, coordinator, key, req, false).await {
                tracing::warn!(%task, error = %e, "escalation record not written");
            }
        });
    }

    /// The nodes that serve a model, sorted.
    fn serving_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self
            .s
            .inference
            .models()
            .into_iter()
            .flat_map(|m| m.nodes)
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Membership or the nodes serving models (`serving`) changed: place the agents, tell the
    /// dispatcher which are online.
    fn placed(&self, d: &mut Dispatcher, view: &[(String, bool)], serving: &[String]) {
        let hosts: Vec<Host> = view
            .iter()
            .map(|(name, hosts)| Host {
                name: name.clone(),
                hosts_agents: *hosts,
                serves_model: serving.contains(name),
            })
            .collect();
        let placement = place(self.s.agents.roster(), &hosts);
        let mine: Vec<String> = placement
            .iter()
            .filter(|(_, n)| n.as_deref() == Some(self.s.node.as_str()))
            .map(|(a, _)| a.clone())
            .collect();
        let online: Vec<String> = placement
            .iter()
            .filter(|(_, n)| n.is_some())
            .map(|(a, _)| a.clone())
            .collect();
        *lock(&self.s.placement) = placement;
        self.s.agents.set_homes(&mine);
        let actions = d.set_online(now_ms(), &online);
        self.execute(actions, None);
    }

    /// Adopt the unfinished tasks whose owner is gone and whose hash this node now owns, and
    /// (at start) the unfinished ones this node owned before. An owner is gone when gossip
    /// says it is down or has left; one merely missing from the view counts only once the view
    /// has had [`VIEW_FORMS_IN`] to form (a node just started sees itself alone, and adopting
    /// then would run the live owners' tasks twice: the simulation of the chaos suite found it).
    fn adopt_orphans(&self, d: &mut Dispatcher, view: &[(String, bool)], since_start: Duration) {
        let live: Vec<&str> = view.iter().map(|(n, _)| n.as_str()).collect();
        let gone = self.s.peers.gone();
        let formed = since_start >= VIEW_FORMS_IN;
        let mut adopted = 0usize;
        // The index of unfinished tasks, unless it overflowed (then every record).
        let candidates: Vec<TaskRecord> = if self.s.unfinished.is_full() {
            self.scan_tasks()
        } else {
            let ids = self.s.unfinished.ids();
            ids.iter()
                .filter_map(|id| match self.read_task(id) {
                    Some(rec) if !rec.status.is_finished() => Some(rec),
                    _ => {
                        self.s.unfinished.forget(id);
                        None
                    }
                })
                .collect()
        };
        for rec in candidates {
            if rec.status.is_finished() || d.task(&rec.id).is_some() {
                continue;
            }
            let owner_gone = rec.owner != self.s.node
                && (gone.contains(&rec.owner) || (formed && !live.contains(&rec.owner.as_str())));
            if rec.owner != self.s.node && !owner_gone {
                continue;
            }
            let mine = rec.owner == self.s.node
                || rendezvous(&rec.hash, live.iter().copied()) == Some(self.s.node.as_str());
            if !mine {
                continue;
            }
            let rec = self.resume_point(rec);
            let actions = d.adopt(now_ms(), rec);
            adopted += 1;
            self.execute(actions, None);
        }
        if adopted > 0 {
            tracing::info!(adopted, "unfinished tasks adopted");
        }
    }

    /// `rec` with `stage` moved past every stage result recorded for it.
    fn resume_point(&self, mut rec: TaskRecord) -> TaskRecord {
        let Some(w) = self.s.workflows.get(&rec.workflow) else {
            return rec;
        };
        let mut done = rec.stage;
        for (i, st) in w.stages.iter().enumerate() {
            let i = i as u32;
            if i < done {
                continue;
            }
            if self.read_stage(&rec.id, &st.name).is_some() {
                done = i + 1;
            } else {
                break;
            }
        }
        rec.stage = done.min(rec.stages_total);
        rec
    }

    // ---- carrying out the dispatcher's decisions ----

    fn execute(&self, actions: Vec<Action>, mut ack: Option<Ack>) {
        // Consecutive records of one task collapse to the last (a record is the whole state);
        // a stage result in between keeps the order.
        let mut writes: Vec<(String, Write)> = Vec::new();
        // A task's events are published once the writes decided with them are durable, so a
        // client that reads the task on an event sees what the event says.
        let mut events: Vec<(String, NewEvent)> = Vec::new();
        // Submitters of the tasks in this batch, for its events (a new task's record is not in
        // the store yet).
        let mut submitters: HashMap<String, String> = HashMap::new();
        for a in actions {
            match a {
                Action::Persist(rec) => {
                    submitters.insert(rec.id.clone(), rec.submitter.clone());
                    if let Some((id, Write::Record(prev))) = writes.last_mut()
                        && *id == rec.id
                    {
                        **prev = rec;
                        continue;
                    }
                    writes.push((rec.id.clone(), Write::Record(Box::new(rec))));
                }
                Action::RecordStage(st) => writes.push((st.task.clone(), Write::Stage(st))),
                Action::Run(run) => {
                    // Its record (with the stage running) is written first.
                    self.flush_writes(&mut writes, &mut events, &mut ack);
                    self.run_stage(run);
                }
                Action::Abort { task, .. } => {
                    if let Some((_, t)) = lock(&self.s.running).remove(&task) {
                        t.cancel();
                    }
                }
                Action::Event(e) => {
                    if let DEvent::Escalated {
                        task,
                        coordinator,
                        code,
                    } = &e
                    {
                        self.record_escalation(task, coordinator, code);
                    }
                    let task = e.task().to_string();
                    events.push((task, self.event(e, &submitters)));
                }
            }
        }
        self.flush_writes(&mut writes, &mut events, &mut ack);
        if let Some(ack) = ack {
            ack.fail(Error::Unavailable("the task was not written".into()));
        }
    }

    /// Start the writes queued, chained per task, each chain publishing its task's events
    /// when its writes are done; the ack (if its task is among them) is answered after its
    /// task's last write. Events of a task with no write here follow its writes in flight, or
    /// go out at once when there are none.
    fn flush_writes(
        &self,
        writes: &mut Vec<(String, Write)>,
        events: &mut Vec<(String, NewEvent)>,
        ack: &mut Option<Ack>,
    ) {
        let mut per_task: Vec<(String, Vec<Write>, Vec<NewEvent>)> = Vec::new();
        for (id, w) in writes.drain(..) {
            match per_task.iter_mut().find(|(t, _, _)| *t == id) {
                Some((_, v, _)) => v.push(w),
                None => per_task.push((id, vec![w], Vec::new())),
            }
        }
        for (id, e) in events.drain(..) {
            match per_task.iter_mut().find(|(t, _, _)| *t == id) {
                Some((_, _, v)) => v.push(e),
                None if lock(&self.s.writes).contains_key(&id) => {
                    per_task.push((id, Vec::new(), vec![e]));
                }
                None => {
                    self.s.events.publish(e);
                }
            }
        }
        for (id, ws, evs) in per_task {
            let a = match ack {
                Some(a) if a.task() == id => ack.take(),
                _ => None,
            };
            self.chain_write(id, ws, evs, a);
        }
    }

    fn chain_write(&self, task: String, ws: Vec<Write>, events: Vec<NewEvent>, ack: Option<Ack>) {
        let svc = self.clone();
        let seq = self
            .s
            .write_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut writes = lock(&self.s.writes);
        let prev = writes.get(&task).map(|(_, done)| done.clone());
        let t = task.clone();
        let handle: JoinHandle<()> = tokio::spawn(async move {
            if let Some(p) = prev {
                p.await;
            }
            let last = svc.write_all(ws).await;
            // Published even when a write was not confirmed by a peer: it is durable here.
            for e in events {
                svc.s.events.publish(e);
            }
            if let Some(ack) = ack {
                ack.answer(last);
            }
            // The last write of its task leaves the map (a later one replaced it otherwise).
            let mut writes = lock(&svc.s.writes);
            if writes.get(&t).is_some_and(|(s, _)| *s == seq) {
                writes.remove(&t);
            }
        });
        let done: WriteDone = async move {
            let _ = handle.await;
        }
        .boxed()
        .shared();
        writes.insert(task, (seq, done));
    }

    /// Write `ws` in order as one change (one store step, one sync, one push of their deltas);
    /// the record when the last is one.
    async fn write_all(&self, ws: Vec<Write>) -> Result<Option<TaskRecord>, Error> {
        let mut puts = Vec::with_capacity(ws.len());
        let mut tail = None;
        for w in ws {
            tail = match w {
                Write::Record(rec) => {
                    puts.push(Self::record_put(&rec)?);
                    Some(*rec)
                }
                Write::Stage(st) => {
                    puts.extend(self.stage_put(&st)?);
                    None
                }
            };
        }
        if !puts.is_empty() {
            self.put_all(puts).await?;
        }
        Ok(tail)
    }

    /// Durable here and on one peer when one is alive.
    async fn put_all(&self, puts: Vec<Put>) -> Result<(), Error> {
        match self.s.memory.put_many(puts, true).await {
            Ok(_) => Ok(()),
            Err(Error::NotReplicated(inner))
                if matches!(*inner, Error::NoReplica | Error::NoReplicator) =>
            {
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "task write not confirmed");
                Err(e)
            }
        }
    }

    fn record_put(rec: &TaskRecord) -> Result<Put, Error> {
        let value_json = serde_json::to_string(rec).map_err(|e| Error::Encode(e.to_string()))?;
        let caller = Caller::new(
            if rec.status == TaskStatus::Pending && rec.epoch <= 1 {
                rec.submitter.clone()
            } else {
                "system".to_string()
            },
            "tasks.record",
            format!("tasks/{}", rec.id),
        )
        .with_request_id(rec.id.clone());
        Ok(Self::task_put(caller, TaskRecord::key(&rec.id), value_json))
    }

    /// `None` when the stage's result is already recorded here.
    fn stage_put(&self, st: &StageRecord) -> Result<Option<Put>, Error> {
        // Written once per stage: a result already recorded (by an earlier epoch whose record
        // reached this node late) is not written again.
        if self.read_stage(&st.task, &st.stage).is_some() {
            self.s
                .stale_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.stale(&st.task, st.index, st.epoch, st.epoch);
            return Ok(None);
        }
        let value_json = serde_json::to_string(st).map_err(|e| Error::Encode(e.to_string()))?;
        // The request id names the task and the epoch that recorded it: a stage recorded by two
        // epochs (an owner cut off, then adopted) shows in the audit logs as such.
        let caller = Caller::new(
            st.agent.clone(),
            "tasks.record",
            format!("tasks/{}/stage/{}", st.task, st.stage),
        )
        .with_request_id(format!("{}@{}", st.task, st.epoch));
        let key = StageRecord::key(&st.task, &st.stage);
        Ok(Some(Self::task_put(caller, key, value_json)))
    }

    fn task_put(caller: Caller, key: String, value_json: String) -> Put {
        Put {
            caller,
            namespace: TASKS_NAMESPACE.into(),
            key,
            req: PutRequest {
                value_json,
                memory_type: MemoryType::Semantic,
                ttl_ms: None,
                subject: None,
                tags: Vec::new(),
            },
        }
    }

    /// A dispatcher event as the bus carries it.
    fn event(&self, e: DEvent, submitters: &HashMap<String, String>) -> NewEvent {
        let (kind, task, agent, data) = event_parts(e);
        let submitter = task.as_deref().and_then(|t| {
            submitters
                .get(t)
                .cloned()
                .or_else(|| self.read_task(t).map(|r| r.submitter))
        });
        NewEvent {
            kind,
            task,
            agent,
            submitter,
            node: self.s.node.clone(),
            data,
        }
    }

    /// Run a stage on its agent's home node; the outcome goes back to the loop.
    fn run_stage(&self, run: RunStage) {
        let svc = self.clone();
        let token = CancellationToken::new();
        let run_id = self
            .s
            .write_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((_, old)) =
            lock(&self.s.running).insert(run.task.clone(), (run_id, token.clone()))
        {
            old.cancel();
        }
        let span = tracing::info_span!(
            "stage",
            task = %run.task,
            stage = %run.stage,
            agent = %run.agent,
            epoch = run.epoch,
            attempt = run.attempt,
        );
        // The stage is built from the store (the task, the earlier results), and runs once
        // the writes decided before it (its record showing it running) are durable.
        let written = lock(&self.s.writes)
            .get(&run.task)
            .map(|(_, done)| done.clone());
        tokio::spawn(
            async move {
                if let Some(w) = written {
                    tokio::select! {
                        _ = token.cancelled() => return,
                        () = w => {}
                    }
                }
                let home = lock(&svc.s.placement).get(&run.agent).cloned().flatten();
                let result = match svc.job(&run) {
                    Some(job) => tokio::select! {
                        _ = token.cancelled() => return,
                        r = svc.dispatch_stage(home.clone(), job) => r,
                    },
                    None => Err(StageError {
                        code: "task_missing".into(),
                        message: "the task's record is not in this node's store".into(),
                        retryable: false,
                    }),
                };
                {
                    let mut running = lock(&svc.s.running);
                    if running.get(&run.task).is_some_and(|(id, _)| *id == run_id) {
                        running.remove(&run.task);
                    }
                }
                let outcome = StageOutcome {
                    task: run.task.clone(),
                    index: run.index,
                    epoch: run.epoch,
                    agent: run.agent.clone(),
                    node: home.unwrap_or_default(),
                    result,
                };
                if svc
                    .s
                    .cmd
                    .send(Cmd::Outcome(Box::new(outcome)))
                    .await
                    .is_err()
                {
                    tracing::debug!("dispatcher stopped; stage outcome dropped");
                }
            }
            .instrument(span),
        );
    }

    /// The stage's job, from the task record and the earlier results here; `None` when the
    /// record is missing (its writes came before the stage, so only a lost store does that).
    fn job(&self, run: &RunStage) -> Option<StageJob> {
        let rec = Some(self.read_task(&run.task)?);
        let prompt = self
            .s
            .workflows
            .get(rec.as_ref().map(|r| r.workflow.as_str()).unwrap_or(""))
            .and_then(|w| w.stages.get(run.index as usize))
            .map(|s| s.prompt.clone())
            .unwrap_or_default();
        let earlier: Vec<StageRecord> = rec
            .as_ref()
            .and_then(|r| self.s.workflows.get(&r.workflow))
            .map(|w| {
                w.stages
                    .iter()
                    .take(run.index as usize)
                    .filter_map(|st| self.read_stage(&run.task, &st.name))
                    .collect()
            })
            .unwrap_or_default();
        // The conversation so far, when every earlier stage recorded its turn.
        let turns = if earlier.len() == run.index as usize
            && earlier.iter().all(|s| !s.prompt.is_empty())
        {
            earlier
                .iter()
                .map(|s| Turn {
                    user: s.prompt.clone(),
                    assistant: s.text.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let previous = earlier
            .into_iter()
            .map(|s| {
                let mut t = s.text;
                clip_in_place(&mut t, PREVIOUS_MAX);
                (s.stage, s.agent, t)
            })
            .collect();
        let rec = rec?;
        Some(StageJob {
            task: run.task.clone(),
            submitter: rec.submitter,
            hash: run.hash.clone(),
            objective: rec.objective,
            task_definition: rec.task_definition,
            context: rec.context,
            workflow: rec.workflow,
            stage: run.stage.clone(),
            index: run.index,
            kind: run.kind.clone(),
            prompt,
            max_tokens: run.max_tokens,
            budget_capped: run.budget_capped,
            agent: run.agent.clone(),
            epoch: run.epoch,
            attempt: run.attempt,
            deadline_ms: run.deadline_ms,
            previous,
            turns,
        })
    }

    /// Run `job` on `home` (here or a peer), publishing its text as it comes.
    async fn dispatch_stage(
        &self,
        home: Option<String>,
        job: StageJob,
    ) -> Result<super::dispatcher::StageSuccess, StageError> {
        let Some(home) = home else {
            return Err(StageError {
                code: "agent_offline".into(),
                message: format!("no live node can host agent {}", job.agent),
                retryable: true,
            });
        };
        let (dtx, mut drx) = mpsc::channel::<String>(crate::agents::DELTA_BUFFER);
        let meta = (job.task.clone(), job.stage.clone(), job.agent.clone());
        let submitter = Some(job.submitter.clone());
        let svc = self.clone();
        let forward = tokio::spawn(async move {
            while let Some(text) = drx.recv().await {
                svc.s.events.publish(NewEvent {
                    kind: "stage.delta".into(),
                    task: Some(meta.0.clone()),
                    agent: Some(meta.2.clone()),
                    submitter: submitter.clone(),
                    node: svc.s.node.clone(),
                    data: serde_json::json!({"stage": meta.1, "text": text}),
                });
            }
        });
        let result = if home == self.s.node {
            self.s.agents.run_stage(job, dtx).await
        } else {
            self.remote_stage(&home, job, dtx).await
        };
        let _ = forward.await;
        result
    }

    async fn remote_stage(
        &self,
        home: &str,
        job: StageJob,
        deltas: mpsc::Sender<String>,
    ) -> Result<super::dispatcher::StageSuccess, StageError> {
        let unreachable = |e: &Error| StageError {
            code: "agent_unreachable".into(),
            message: e.to_string(),
            retryable: true,
        };
        let pair = self.s.peers.open(home).await.map_err(|e| unreachable(&e))?;
        let mut w = FrameWriter::new(pair.send, home);
        let mut r = FrameReader::new(pair.recv, home);
        w.send_json(&Req::RunStage(job))
            .await
            .map_err(|e| unreachable(&e))?;
        loop {
            match r.next_json::<Reply>().await {
                Ok(Some(Reply::Delta(t))) => {
                    let _ = deltas.try_send(t);
                }
                Ok(Some(Reply::Stage(result))) => return result,
                Ok(Some(_)) => {
                    return Err(unreachable(&Error::BadReply(home.to_string())));
                }
                Ok(None) => return Err(unreachable(&Error::PeerGone(home.to_string()))),
                Err(e) => return Err(unreachable(&e)),
            }
        }
    }

    // ---- reads of the local replica ----

    fn read_task(&self, id: &str) -> Option<TaskRecord> {
        read_json(&self.s.memory, TASKS_NAMESPACE, &TaskRecord::key(id))
    }

    fn read_stage(&self, task: &str, stage: &str) -> Option<StageRecord> {
        read_json(
            &self.s.memory,
            TASKS_NAMESPACE,
            &StageRecord::key(task, stage),
        )
    }

    /// Every task record here (at most [`SCAN_MAX`]).
    fn scan_tasks(&self) -> Vec<TaskRecord> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        let store = &self.s.memory.storage().memory;
        while out.len() < SCAN_MAX {
            let Ok(page) = store.list(TASKS_NAMESPACE, "task:", after.as_deref(), 1000, now_ms())
            else {
                break;
            };
            let n = page.len();
            after = page.last().map(|i| i.key.clone());
            out.extend(
                page.into_iter()
                    .filter_map(|i| serde_json::from_str::<TaskRecord>(&i.value_json).ok()),
            );
            if n < 1000 {
                break;
            }
        }
        out
    }

    fn idempotency_key(submitter: &str, key: &str) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(submitter.as_bytes());
        h.update([0]);
        h.update(key.as_bytes());
        format!("idem:{}", &hex::encode(h.finalize())[..32])
    }

    /// The answer to a submission whose idempotency key named a task already.
    fn replay(&self, req: &Submit) -> Option<Submitted> {
        let key = req.idempotency_key.as_deref()?;
        let id: String = read_json(
            &self.s.memory,
            TASKS_NAMESPACE,
            &Self::idempotency_key(&req.submitter, key),
        )?;
        Some(Submitted {
            task: self.read_task(&id)?,
            deduplicated: false,
            replayed: true,
        })
    }

    async fn remember_idempotency(&self, submitter: &str, key: &str, id: &str) {
        let caller = Caller::new(submitter, "tasks.create", format!("tasks/{id}"));
        let value = serde_json::Value::String(id.to_string()).to_string();
        let put = Self::task_put(caller, Self::idempotency_key(submitter, key), value);
        if let Err(e) = self.put_all(vec![put]).await {
            tracing::debug!(error = %e, "idempotency key not confirmed by a peer");
        }
    }

    // ---- submissions ----

    /// Check a submission's values and build its record (id, hash, deadline, budget).
    fn validate(&self, req: &Submit) -> Result<TaskRecord, Error> {
        let invalid = |field: &str, message: String| Error::Invalid {
            field: field.into(),
            message,
        };
        let objective = req.objective.trim();
        if objective.is_empty() {
            return Err(invalid("objective", "must not be empty".into()));
        }
        if req.objective.len() > self.s.cfg.max_objective_bytes {
            return Err(invalid(
                "objective",
                format!("longer than {} bytes", self.s.cfg.max_objective_bytes),
            ));
        }
        let priority = match req.priority.as_deref() {
            None => Priority::Normal,
            Some(p) => Priority::parse(p).ok_or_else(|| {
                invalid(
                    "priority",
                    format!("`{p}`: use critical, high, normal, low or background"),
                )
            })?,
        };
        let workflow = req
            .workflow
            .clone()
            .unwrap_or_else(|| self.s.cfg.default_workflow.clone());
        let Some(w) = self.s.workflows.get(&workflow) else {
            let known: Vec<&str> = self.s.workflows.keys().map(String::as_str).collect();
            return Err(invalid(
                "workflow",
                format!("`{workflow}` is not a workflow ({})", known.join(", ")),
            ));
        };
        let context = req.context.clone().unwrap_or(serde_json::Value::Null);
        if !(context.is_object() || context.is_null()) {
            return Err(invalid("context", "must be an object".into()));
        }
        check_context_types(&context)?;
        let ctx_len =
            context.to_string().len() + req.task_definition.as_ref().map_or(0, String::len);
        if ctx_len > self.s.cfg.max_context_bytes {
            return Err(invalid(
                "context",
                format!(
                    "context and task_definition over {} bytes",
                    self.s.cfg.max_context_bytes
                ),
            ));
        }
        for (i, c) in req.capabilities.iter().enumerate() {
            if !self.s.capabilities.contains(c) {
                return Err(Error::NoCapableAgent {
                    field: format!("capabilities[{i}]"),
                    capability: c.clone(),
                });
            }
        }
        let budget = match req.token_budget {
            None => self.s.cfg.token_budget,
            Some(0) => return Err(invalid("token_budget", "must be at least 1".into())),
            Some(b) if b > self.s.cfg.token_budget => {
                return Err(invalid(
                    "token_budget",
                    format!("at most {} (tasks.token_budget)", self.s.cfg.token_budget),
                ));
            }
            Some(b) => b,
        };
        let max_deadline = self.s.cfg.default_deadline.0.as_secs().max(1) * 24;
        let deadline_s = match req.deadline_s {
            None => self.s.cfg.default_deadline.0.as_secs().max(1),
            Some(0) => return Err(invalid("deadline_s", "must be at least 1".into())),
            Some(s) if s > max_deadline => {
                return Err(invalid("deadline_s", format!("at most {max_deadline} s")));
            }
            Some(s) => s,
        };
        if let Some(k) = &req.idempotency_key
            && (k.is_empty() || k.len() > 128 || !k.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(invalid(
                "Idempotency-Key",
                "1-128 printable ASCII characters".into(),
            ));
        }
        let now = now_ms();
        let id = {
            use rand::Rng;
            let mut b = [0u8; 10];
            rand::rng().fill_bytes(&mut b);
            hex::encode(b)
        };
        Ok(TaskRecord {
            task_definition: req.task_definition.clone(),
            priority,
            capabilities: req.capabilities.clone(),
            idempotency_key: req.idempotency_key.clone(),
            deadline_ms: now + deadline_s * 1000,
            token_budget: budget,
            epoch: 1,
            owner: self.s.node.clone(),
            stages_total: w.stages.len() as u32,
            ..TaskRecord::new(&id, objective, context, &workflow, &req.submitter, now)
        })
    }

    /// Validate, then route to the owner of the task's hash among the live members (or take
    /// it here). An owner that does not answer in time, or refuses it as read too late, is
    /// passed over for the next choice (the owner among the live members less that one):
    /// every node that cannot reach the owner picks the same one, which is also where the
    /// owner's tasks go should it be dead, so their submissions are deduplicated there. When
    /// that one does not answer either, the submission is refused (`owner_unreachable`, 503:
    /// a node cut off from both); a retry is deduplicated against whatever either accepted. A
    /// node back from a stall routes as if it were not a member ([`Stall`]).
    async fn submit_routed(&self, req: Submit) -> Result<Submitted, Error> {
        // Shape first, here, so a bad request costs no forwarding.
        let rec = self.validate(&req)?;
        if let Some(replayed) = self.replay(&req) {
            return Ok(replayed);
        }
        let began = std::time::Instant::now();
        let mut passed_over: Vec<String> = Vec::new();
        while passed_over.len() < 2 {
            // Read again each time: the view may have changed while the owner was waited for.
            let live: Vec<String> = self.s.peers.live().into_iter().map(|(n, _)| n).collect();
            // Back from a stall, this node routes as if it were not a member (unless alone).
            let away = self.holding_off() && live.iter().any(|n| *n != self.s.node);
            let candidates = live
                .iter()
                .filter(|n| !(passed_over.contains(n) || (away && **n == self.s.node)))
                .map(String::as_str);
            let Some(owner) = rendezvous(&rec.hash, candidates).map(str::to_string) else {
                break;
            };
            if owner == self.s.node {
                return self.submit_here(req).await;
            }
            // The first choice waits [`FORWARD_WAIT`] at most and leaves a quarter of the
            // budget for the next (or for this node, should it be the next); the next waits
            // what is left, less a moment so that the refusal is this one, not the budget's.
            let left = self.s.submit_budget.saturating_sub(began.elapsed());
            let wait = if passed_over.is_empty() {
                FORWARD_WAIT.min(left.mul_f64(0.75))
            } else {
                left.saturating_sub(ROUTE_MARGIN)
            };
            match self.forward(&owner, &req, wait).await {
                Some(answer) => return answer,
                None => passed_over.push(owner),
            }
        }
        match <[String; 2]>::try_from(passed_over) {
            Ok([first, next]) => Err(Error::OwnerUnreachable { first, next }),
            // Back from a stall, and every other member passed over.
            Err(others) => Err(Error::Unavailable(format!(
                "this node is back from a stall and takes no ownership while its view \
                 refreshes; {} did not answer",
                others.join(", ")
            ))),
        }
    }

    /// Forward a submission to `owner` and wait at most `wait` for its answer: `None` when it
    /// did not answer in time, could not be reached, or refused it as read too late (it is
    /// told to refuse it past a share of `wait` that leaves it time to make an accepted one
    /// durable and answer).
    async fn forward(
        &self,
        owner: &str,
        req: &Submit,
        wait: Duration,
    ) -> Option<Result<Submitted, Error>> {
        let stale = wait.mul_f64(FORWARD_STALE.as_secs_f64() / FORWARD_WAIT.as_secs_f64());
        let fwd = Req::Submit {
            submit: req.clone(),
            sent_ms: now_ms(),
            stale_ms: Some(stale.as_millis() as u64),
        };
        match self.call_within(owner, &fwd, wait).await {
            // It read it too late (it was paused, overloaded or back from a stall).
            Ok(Reply::Submitted(Err(w))) if w.code == "timeout" => {
                tracing::warn!(%owner, "owner refused the submission as read too late");
                None
            }
            Ok(Reply::Submitted(r)) => Some(r.map_err(Error::from)),
            Ok(_) => Some(Err(Error::BadReply(owner.to_string()))),
            Err(e) => {
                tracing::warn!(%owner, error = %e, "owner did not answer the submission");
                None
            }
        }
    }

    /// Submit on this node as the owner.
    async fn submit_here(&self, req: Submit) -> Result<Submitted, Error> {
        let rec = self.validate(&req)?;
        if let Some(replayed) = self.replay(&req) {
            return Ok(replayed);
        }
        let (tx, rx) = oneshot::channel();
        self.s
            .cmd
            .try_send(Cmd::Submit(Box::new(rec), tx))
            .map_err(|_| Error::QueueFull { retry_after_s: 1 })?;
        let out = rx
            .await
            .map_err(|_| Error::Unavailable("the dispatcher stopped".into()))??;
        if let Some(k) = &req.idempotency_key
            && !out.deduplicated
        {
            self.remember_idempotency(&req.submitter, k, &out.task.id)
                .await;
        }
        Ok(out)
    }

    /// Call `peer`'s task service with `req` and read its one reply.
    async fn call(&self, peer: &str, req: &Req) -> Result<Reply, Error> {
        self.call_within(peer, req, CALL_TIMEOUT).await
    }

    /// [`Self::call`] with its own time limit.
    async fn call_within(&self, peer: &str, req: &Req, limit: Duration) -> Result<Reply, Error> {
        let fut = async {
            let pair = self.s.peers.open(peer).await?;
            let mut w = FrameWriter::new(pair.send, peer);
            let mut r = FrameReader::new(pair.recv, peer);
            w.send_json(req).await?;
            let _ = w.get_mut().shutdown().await;
            r.next_json::<Reply>()
                .await?
                .ok_or_else(|| Error::PeerGone(peer.to_string()))
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| Error::RpcTimeout(peer.to_string()))?
    }

    /// The live node a task's changes go to: its owner while alive, else the rendezvous owner
    /// of its hash.
    fn owner_of(&self, rec: &TaskRecord) -> String {
        let live = self.s.peers.live();
        if live.iter().any(|(n, _)| *n == rec.owner) {
            return rec.owner.clone();
        }
        rendezvous(&rec.hash, live.iter().map(|(n, _)| n.as_str()))
            .unwrap_or(self.s.node.as_str())
            .to_string()
    }

    async fn change(&self, id: &str, req: Req, change: Change) -> Result<TaskRecord, Error> {
        let rec = self
            .read_task(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        let owner = self.owner_of(&rec);
        if owner != self.s.node {
            match self.call(&owner, &req).await? {
                Reply::Task(r) => return r.map_err(Error::from),
                _ => return Err(Error::BadReply(owner)),
            }
        }
        self.local_change(id, change).await
    }

    // ---- the event relay ----

    async fn relay(self) {
        let mut sub = self.s.events.subscribe(None).live;
        let mut batch: Vec<NewEvent> = Vec::new();
        let mut tick = tokio::time::interval(RELAY_EVERY);
        loop {
            tokio::select! {
                _ = self.s.stop.cancelled() => return,
                e = sub.recv() => match e {
                    // Membership events are not relayed: every node publishes its own view.
                    Ok(e) if e.node == self.s.node && !e.kind.starts_with("member.") => {
                        if batch.len() < RELAY_BATCH {
                            batch.push(NewEvent {
                                kind: e.kind.clone(),
                                task: e.task.clone(),
                                agent: e.agent.clone(),
                                submitter: e.submitter.clone(),
                                node: e.node.clone(),
                                data: e.data.clone(),
                            });
                        } else {
                            self.s
                                .not_relayed
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "event relay fell behind");
                        self.s
                            .not_relayed
                            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => return,
                },
                _ = tick.tick() => {
                    if batch.is_empty() {
                        continue;
                    }
                    let events = std::mem::take(&mut batch);
                    for (peer, _) in self.s.peers.live() {
                        if peer == self.s.node {
                            continue;
                        }
                        let svc = self.clone();
                        let req = Req::Events(events.clone());
                        tokio::spawn(async move {
                            if let Err(e) = svc.call(&peer, &req).await {
                                tracing::debug!(%peer, error = %e, "events not relayed");
                            }
                        });
                    }
                }
            }
        }
    }

    // ---- serving peers ----

    pub(super) async fn serve_stream(self, peer: String, pair: StreamPair) {
        let mut r = FrameReader::new(pair.recv, &peer);
        let mut w = FrameWriter::new(pair.send, &peer);
        let req = match r.next_json::<Req>().await {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "bad tasks frame");
                return;
            }
        };
        let reply = match req {
            Req::Submit {
                submit,
                sent_ms,
                stale_ms,
            } => {
                let age = now_ms().saturating_sub(sent_ms);
                let stale = stale_ms
                    .unwrap_or(u64::MAX)
                    .min(FORWARD_STALE.as_millis() as u64);
                let r = if age > stale || self.holding_off() {
                    tracing::debug!(
                        age_ms = age,
                        "forwarded submission refused: too old, or back from a stall"
                    );
                    Err(Error::RpcTimeout(self.s.node.clone()))
                } else {
                    self.submit_here(submit).await
                };
                Reply::Submitted(r.map_err(|e| WireError::from(&e)))
            }
            Req::Cancel { id, .. } => Reply::Task(
                self.local_change(&id, Change::Cancel)
                    .await
                    .map_err(|e| WireError::from(&e)),
            ),
            Req::Requeue { id, .. } => Reply::Task(
                self.local_change(&id, Change::Requeue)
                    .await
                    .map_err(|e| WireError::from(&e)),
            ),
            Req::Query(q) => {
                let agent = q.agent.clone().unwrap_or_default();
                Reply::Answer(
                    self.s
                        .agents
                        .query(&agent, q)
                        .await
                        .map_err(|e| WireError::from(&e)),
                )
            }
            Req::Events(events) => {
                for e in events.into_iter().take(RELAY_BATCH) {
                    self.s.events.publish(e);
                }
                Reply::Ack
            }
            Req::RunStage(job) => {
                self.serve_stage(job, &mut w).await;
                return;
            }
        };
        if let Err(e) = w.send_json(&reply).await {
            tracing::debug!(%peer, error = %e, "tasks reply not sent");
        }
        let _ = w.get_mut().shutdown().await;
    }

    async fn local_change(&self, id: &str, change: Change) -> Result<TaskRecord, Error> {
        let (tx, rx) = oneshot::channel();
        self.s
            .cmd
            .send(Cmd::Change(change, id.to_string(), tx))
            .await
            .map_err(|_| Error::Unavailable("the dispatcher stopped".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("the dispatcher stopped".into()))?
    }

    /// Run a stage for a peer, streaming its text; a closed stream cancels it.
    async fn serve_stage<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        job: StageJob,
        w: &mut FrameWriter<W>,
    ) {
        let (dtx, mut drx) = mpsc::channel::<String>(crate::agents::DELTA_BUFFER);
        let run = self.s.agents.run_stage(job, dtx);
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                Some(t) = drx.recv() => {
                    if w.send_json(&Reply::Delta(t)).await.is_err() {
                        // The owner is gone or aborted: dropping `run` stops the generation.
                        return;
                    }
                }
            }
        };
        while let Ok(t) = drx.try_recv() {
            if w.send_json(&Reply::Delta(t)).await.is_err() {
                return;
            }
        }
        let _ = w.send_json(&Reply::Stage(result)).await;
        let _ = w.get_mut().shutdown().await;
    }

    /// Serve a tasks stream from an in-memory or test transport.
    pub fn serve_pair(&self, peer: String, pair: StreamPair) {
        tokio::spawn(self.clone().serve_stream(peer, pair));
    }
}

impl StreamService for TaskService {
    fn serve(&self, peer: String, send: quinn::SendStream, recv: quinn::RecvStream) {
        let span = tracing::debug_span!("tasks_peer", %peer);
        let pair = StreamPair {
            send: Box::new(send),
            recv: Box::new(recv),
        };
        tokio::spawn(self.clone().serve_stream(peer, pair).instrument(span));
    }
}

impl TaskApi for TaskService {
    fn submit(&self, req: Submit) -> BoxFuture<'_, Result<Submitted, Error>> {
        Box::pin(async move {
            // Answered within the gateway's response target. Past it, the answer is the one a
            // write no peer confirmed in time gets (`replication_timeout`: a node cut off, its
            // forward and then its own `w=2` write waiting on peers that cannot answer); where
            // the task was accepted it is written and runs, and a retry is answered with it.
            let budget = self.s.submit_budget;
            tokio::time::timeout(budget, self.submit_routed(req))
                .await
                .unwrap_or_else(|_| Err(Error::NotReplicated(Box::new(Error::Timeout(budget)))))
        })
    }

    fn get(&self, id: &str) -> Result<Option<TaskRecord>, Error> {
        Ok(self.read_task(id))
    }

    fn list(&self, q: ListQuery) -> Result<Vec<TaskRecord>, Error> {
        let mut all: Vec<TaskRecord> = self
            .scan_tasks()
            .into_iter()
            .filter(|r| q.submitter.as_ref().is_none_or(|s| *s == r.submitter))
            .filter(|r| q.status.is_none_or(|s| s == r.status))
            .collect();
        all.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
        all.truncate(q.limit.max(1));
        Ok(all)
    }

    fn results(&self, id: &str) -> Result<Vec<StageRecord>, Error> {
        let rec = self
            .read_task(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        let Some(w) = self.s.workflows.get(&rec.workflow) else {
            return Ok(Vec::new());
        };
        Ok(w.stages
            .iter()
            .filter_map(|st| self.read_stage(id, &st.name))
            .collect())
    }

    fn cancel(
        &self,
        id: &str,
        by: &str,
        request_id: &str,
    ) -> BoxFuture<'_, Result<TaskRecord, Error>> {
        let req = Req::Cancel {
            id: id.to_string(),
            by: by.to_string(),
            request_id: request_id.to_string(),
        };
        let id = id.to_string();
        Box::pin(async move { self.change(&id, req, Change::Cancel).await })
    }

    fn requeue(
        &self,
        id: &str,
        by: &str,
        request_id: &str,
    ) -> BoxFuture<'_, Result<TaskRecord, Error>> {
        let req = Req::Requeue {
            id: id.to_string(),
            by: by.to_string(),
            request_id: request_id.to_string(),
        };
        let id = id.to_string();
        Box::pin(async move { self.change(&id, req, Change::Requeue).await })
    }

    fn agents(&self) -> Vec<AgentView> {
        let placement = lock(&self.s.placement).clone();
        let local: HashMap<String, AgentRecord> = self
            .s
            .agents
            .records()
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let models = self.s.inference.models();
        self.s
            .agents
            .roster()
            .specs
            .iter()
            .map(|spec| {
                let id = &spec.agent.id;
                let home = placement.get(id).cloned().flatten();
                let rec = local
                    .get(id)
                    .cloned()
                    .or_else(|| self.stored_agent(id))
                    .unwrap_or_default();
                let state = match &home {
                    None => "offline".to_string(),
                    Some(n) if *n == rec.node && !rec.state.is_empty() => {
                        match rec.state.as_str() {
                            "restarting" => "error".to_string(),
                            s => s.to_string(),
                        }
                    }
                    Some(_) => "idle".to_string(),
                };
                let runs = rec.completed + rec.failed;
                AgentView {
                    id: id.clone(),
                    name: spec.agent.name.clone(),
                    kind: format!("{:?}", spec.agent.kind).to_lowercase(),
                    role: spec.agent.role.clone(),
                    priority: spec.agent.priority,
                    capabilities: spec.agent.capabilities.clone(),
                    specialization: spec.agent.specialization.clone(),
                    clearance: spec.agent.security_clearance.as_str().to_string(),
                    parent: spec.parent.clone(),
                    node: home.clone(),
                    state,
                    current_task: rec.current_task.clone().filter(|_| home.is_some()),
                    load: if home.as_deref() == Some(rec.node.as_str()) {
                        rec.load
                    } else {
                        0
                    },
                    max_load: agents_max_load(&self.s.agents),
                    completed: rec.completed,
                    failed: rec.failed,
                    success_rate: if runs == 0 {
                        1.0
                    } else {
                        rec.completed as f64 / runs as f64
                    },
                    mean_stage_ms: if rec.completed == 0 {
                        0.0
                    } else {
                        rec.total_stage_ms as f64 / rec.completed as f64
                    },
                    restarts: rec.restarts,
                    model: spec
                        .model
                        .clone()
                        .or_else(|| models.first().map(|m| m.name.clone())),
                }
            })
            .collect()
    }

    fn query_agent(&self, q: AgentQuery) -> BoxFuture<'_, Result<AgentAnswer, Error>> {
        Box::pin(async move {
            if q.question.trim().is_empty() {
                return Err(Error::Invalid {
                    field: "question".into(),
                    message: "must not be empty".into(),
                });
            }
            let agent = match &q.agent {
                Some(a) => {
                    if self.s.agents.roster().get(a).is_none() {
                        return Err(Error::Invalid {
                            field: "agent".into(),
                            message: format!("`{a}` is not an agent of the swarm"),
                        });
                    }
                    a.clone()
                }
                None => self.best_agent_for(&q.question),
            };
            let home = lock(&self.s.placement)
                .get(&agent)
                .cloned()
                .flatten()
                .ok_or_else(|| Error::Unavailable(format!("agent {agent} is offline")))?;
            let mut q = q;
            q.agent = Some(agent.clone());
            if home == self.s.node {
                return self.s.agents.query(&agent, q).await;
            }
            match self.call(&home, &Req::Query(q)).await? {
                Reply::Answer(r) => r.map_err(Error::from),
                _ => Err(Error::BadReply(home)),
            }
        })
    }

    fn stats(&self) -> TaskStats {
        let mut st = lock(&self.s.stats).clone();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        st.stale_results += load(&self.s.stale_writes);
        st.deduplicated += load(&self.s.twins);
        st.events_not_relayed = load(&self.s.not_relayed);
        st
    }

    fn events(&self) -> &EventBus {
        &self.s.events
    }
}

impl TaskService {
    fn stored_agent(&self, id: &str) -> Option<AgentRecord> {
        read_json(&self.s.memory, super::model::AGENTS_NAMESPACE, id)
    }

    /// The agent whose specialization or capabilities share the most words with `question`;
    /// the coordinator (first in priority) when none does.
    fn best_agent_for(&self, question: &str) -> String {
        let q = question.to_lowercase();
        let roster = self.s.agents.roster();
        let score = |spec: &crate::agents::AgentSpec| {
            std::iter::once(&spec.agent.specialization)
                .chain(spec.agent.capabilities.iter())
                .flat_map(|s| s.split('_'))
                .filter(|w| w.len() > 2 && q.contains(*w))
                .count()
        };
        roster
            .specs
            .iter()
            .max_by_key(|s| (score(s), std::cmp::Reverse(s.agent.priority)))
            .filter(|s| score(s) > 0)
            .or_else(|| roster.specs.first())
            .map(|s| s.agent.id.clone())
            .unwrap_or_default()
    }
}

fn agents_max_load(rt: &AgentRuntime) -> u32 {
    rt.max_load()
}

/// Resolves when a task's writes so far are done (each waiter holds a clone).
type WriteDone = futures_util::future::Shared<futures_util::future::BoxFuture<'static, ()>>;

/// A write of the dispatcher's.
enum Write {
    Record(Box<TaskRecord>),
    Stage(StageRecord),
}

/// Who waits for a task's writes.
enum Ack {
    /// A submission: answered with the record once it is durable. `deduplicated` as decided.
    Submit(String, oneshot::Sender<Result<Submitted, Error>>, bool),
    /// A cancel or requeue: answered with the record once it is durable.
    Record(String, oneshot::Sender<Result<TaskRecord, Error>>),
}

impl Ack {
    fn task(&self) -> &str {
        match self {
            Ack::Submit(id, _, _) | Ack::Record(id, _) => id,
        }
    }

    fn answer(self, last: Result<Option<TaskRecord>, Error>) {
        match (self, last) {
            (Ack::Submit(_, tx, dedup), Ok(Some(task))) => {
                let _ = tx.send(Ok(Submitted {
                    task,
                    deduplicated: dedup,
                    replayed: false,
                }));
            }
            (Ack::Record(_, tx), Ok(Some(task))) => {
                let _ = tx.send(Ok(task));
            }
            (a, Ok(None)) => a.fail(Error::Unavailable("the task was not written".into())),
            (a, Err(e)) => a.fail(e),
        }
    }

    fn fail(self, e: Error) {
        match self {
            Ack::Submit(_, tx, _) => {
                let _ = tx.send(Err(e));
            }
            Ack::Record(_, tx) => {
                let _ = tx.send(Err(e));
            }
        }
    }
}

fn refusal_error(id: &str, r: Refusal, capabilities: &[String]) -> Error {
    match r {
        Refusal::QueueFull { retry_after_ms } => Error::QueueFull {
            retry_after_s: retry_after_ms.div_ceil(1000).max(1),
        },
        Refusal::UnknownWorkflow => Error::Invalid {
            field: "workflow".into(),
            message: "not a workflow".into(),
        },
        Refusal::NoCapableAgent { capability } => Error::NoCapableAgent {
            field: capabilities
                .iter()
                .position(|c| *c == capability)
                .map_or("capabilities".into(), |i| format!("capabilities[{i}]")),
            capability,
        },
        Refusal::NotFound => Error::NotFound(format!("task {id}")),
        Refusal::Finished { status } => Error::TaskFinished {
            id: id.into(),
            status: status.as_str().into(),
        },
        Refusal::NotDeadLetter { status } => Error::TaskState {
            id: id.into(),
            status: status.as_str().into(),
            message: "only a dead-lettered task can be requeued".into(),
        },
        Refusal::Stale { current } => Error::StaleEpoch {
            task: id.into(),
            stage: String::new(),
            epoch: 0,
            current,
        },
        Refusal::Duplicate { existing } => Error::TaskState {
            id: existing,
            status: "pending".into(),
            message: "a task with the same hash is active".into(),
        },
    }
}

/// Values of the hashed context keys must have their documented types.
fn check_context_types(ctx: &serde_json::Value) -> Result<(), Error> {
    let Some(m) = ctx.as_object() else {
        return Ok(());
    };
    let list_of_strings = |v: &serde_json::Value| {
        v.as_array()
            .is_some_and(|a| a.iter().all(|x| x.is_string()))
    };
    for (key, ok) in [
        (
            "file_paths",
            m.get("file_paths").is_none_or(list_of_strings),
        ),
        (
            "service_names",
            m.get("service_names").is_none_or(list_of_strings),
        ),
        (
            "technology_stack",
            m.get("technology_stack").is_none_or(list_of_strings),
        ),
        (
            "operation_type",
            m.get("operation_type").is_none_or(|v| v.is_string()),
        ),
    ] {
        if !ok {
            let want = if key == "operation_type" {
                "a string"
            } else {
                "an array of strings"
            };
            return Err(Error::Invalid {
                field: format!("context.{key}"),
                message: format!("must be {want}"),
            });
        }
    }
    Ok(())
}

fn clip_in_place(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

/// An event of the dispatcher's as the bus carries it: kind, task, agent, data (its fields).
fn event_parts(e: DEvent) -> (String, Option<String>, Option<String>, serde_json::Value) {
    let kind = e.kind().to_string();
    let task = Some(e.task().to_string());
    // Externally tagged: {"variant": {fields}}.
    let data = serde_json::to_value(&e)
        .ok()
        .and_then(|v| v.as_object().and_then(|m| m.values().next().cloned()))
        .unwrap_or(serde_json::Value::Null);
    let agent = data.get("agent").and_then(|a| a.as_str()).map(String::from);
    (kind, task, agent, data)
}
