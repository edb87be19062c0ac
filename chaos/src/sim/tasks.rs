//! The task shell of a simulated node, around the real sans-IO [`Dispatcher`]; it does what
//! `swarm_actors::tasks::service` does, step for step, without tokio:
//!
//! - **Submission.** The owner of a task is the rendezvous owner of its hash among the members
//!   this node's gossip calls live; a submission made elsewhere is forwarded there, and taken
//!   to the next choice (the owner among the live members less that one) when the owner does
//!   not answer ([`CALL_TIMEOUT_US`]), refuses it as read too late ([`FORWARD_STALE_MS`]), or
//!   cannot be reached; refused when that one does not answer either. It is
//!   answered once the task's record is durable here and on one peer (`w=2`; alone, here).
//! - **Records.** Every record the dispatcher persists, and every stage result, is a write to
//!   the node's replicated store in `_sys_tasks` (consecutive records of a task collapse to the
//!   last; a stage result already in the replica is not written again).
//! - **Adoption.** Every [`VIEW_EVERY_US`] the shell looks at gossip's view; when it changed it
//!   scans the replica every second for a while, else every ten: an unfinished task whose owner
//!   is not live and whose hash this node now owns (or that it owned before a restart) is
//!   adopted from its last recorded stage, at a higher epoch.
//! - **Stages** run on the agent's home node (rendezvous of the agent over the live members):
//!   here, or sent to the home, whose result comes back as a message (lost, duplicated or late
//!   like any other). A home that crashes or is cut off mid-stage answers `agent_unreachable`.
//!   Every result that arrives goes to the dispatcher, which refuses what is stale.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use rand::RngExt;
use swarm_actors::tasks::dispatcher::{
    Action, Dispatcher, Event, Refusal, RunStage, StageError, StageOutcome, StageSuccess,
};
use swarm_actors::tasks::model::TASKS_NAMESPACE;
use swarm_actors::tasks::{StageRecord, TaskRecord, rendezvous};
use swarm_membership::MemberState;

use super::Sabotage;
use super::net::{Class, Msg};
use super::node::{Proc, Then, name};
use super::swarm::{AGENT_MAX_LOAD, agent_ids, catalog, limits, new_record, stage_names};
use super::world::{Ctx, Ev, RemoteRun};

/// How often the shell looks at membership (and ticks the dispatcher at the latest).
pub(crate) const VIEW_EVERY_US: u64 = 250_000;
/// Scans for orphaned tasks: every second for a while after a membership change, else every ten.
const SCAN_EVERY_US: u64 = 10_000_000;
const SCAN_AFTER_CHANGE_US: u64 = 1_000_000;
const SCAN_AFTER_CHANGE_FOR_US: u64 = 30_000_000;
/// How long a forwarded submission waits for the owner's answer at most.
const CALL_TIMEOUT_US: u64 = 1_500_000;
/// How old a forwarded submission may be when its owner reads it, at most (a forward that
/// waits less tells its reader to refuse it sooner, in proportion).
pub(crate) const FORWARD_STALE_MS: u64 = 800;
/// How long a submission may take to be answered (the preset's orchestration target), and
/// the margin routing leaves under it.
const SUBMIT_BUDGET_US: u64 = 1_900_000;
const SUBMIT_MARGIN_US: u64 = 100_000;
/// How long it takes to find a peer unreachable (a connection that fails, a stream that breaks).
pub(crate) const UNREACHABLE_US: u64 = 1_000_000;
/// How long a stage runs (µs).
const STAGE_US: (u64, u64) = (200_000, 4_000_000);
/// A member gossip does not know counts as gone once the process has been up this long (the
/// fixed shell).
const FORGOTTEN_AFTER_US: u64 = 30_000_000;

/// Where the answer to a submission goes.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    /// The client's submission: its place in the history.
    Client(usize),
    /// The node that forwarded it, and its call.
    Peer { node: u32, boot: u64, call: u64 },
}

/// A submission answered once its task's record is written.
#[derive(Debug, Clone)]
pub(crate) struct SubmitAck {
    pub(crate) task: String,
    pub(crate) reply: Reply,
}

/// A submission forwarded to its owner.
#[derive(Debug)]
struct Call {
    submission: usize,
    objective: String,
    workflow: String,
    owner: String,
    /// When the client submitted it.
    began_us: u64,
    /// Sent to the next choice (its first owner did not answer).
    next_choice: bool,
    deadline_us: u64,
}

/// A write the dispatcher decided.
enum TaskWrite {
    Record(Box<TaskRecord>),
    Stage(StageRecord),
}

/// The task side of a process.
#[derive(Debug)]
pub(crate) struct TaskShell {
    pub(crate) d: Dispatcher,
    view: Vec<String>,
    changed_us: u64,
    scanned_us: Option<u64>,
    /// Stages this dispatcher runs now: task → run.
    running: BTreeMap<String, u64>,
    calls: BTreeMap<u64, Call>,
    /// Stages this node runs as home: agent → how many.
    hosting: BTreeMap<String, u32>,
    /// The task records of the replica as last decoded, with the namespace's change counter.
    records: RefCell<Option<(u64, Rc<Vec<TaskRecord>>)>>,
}

impl TaskShell {
    pub(crate) fn new(ctx: &mut Ctx, node: u32, boot: u64) -> Self {
        let limits = limits(
            node,
            ctx.rng.random::<u64>() ^ (u64::from(node) << 32) ^ boot,
        );
        let mut d = Dispatcher::new(limits, catalog());
        let all = agent_ids();
        // Every agent has a home while any node lives; nothing is queued yet.
        let _ = d.set_online(ctx.now_ms(node), &all);
        Self {
            d,
            view: Vec::new(),
            changed_us: ctx.now_us,
            scanned_us: None,
            running: BTreeMap::new(),
            calls: BTreeMap::new(),
            hosting: BTreeMap::new(),
            records: RefCell::new(None),
        }
    }
}

impl TaskShell {
    /// Decode the records again at the next scan (the store was replaced).
    pub(crate) fn forget_records(&self) {
        *self.records.borrow_mut() = None;
    }
}

impl Proc {
    // ---- submissions ----

    /// A client submits `objective` here.
    pub(crate) fn client_submit(&mut self, ctx: &mut Ctx, objective: &str, workflow: &str) {
        let i = ctx.history.submissions.len();
        let op = ctx.history.next_op();
        ctx.history.submissions.push(super::history::Submission {
            op,
            node: self.id,
            objective: objective.to_string(),
            at_us: ctx.now_us,
            answer: None,
            fallback: None,
        });
        self.route_submission(ctx, i, objective, workflow, ctx.now_us, None);
    }

    /// Route submission `i` to the owner of its hash among the live members, less the one
    /// passed over (that did not answer): forwarded there, or taken here.
    fn route_submission(
        &mut self,
        ctx: &mut Ctx,
        i: usize,
        objective: &str,
        workflow: &str,
        began_us: u64,
        passed_over: Option<String>,
    ) {
        let id = ctx.next_task_id();
        let rec = new_record(id.clone(), objective, workflow, ctx.now_ms(self.id));
        let me = name(self.id);
        let view: Vec<String> = ctx
            .view(self.id)
            .into_iter()
            .filter(|n| Some(n) != passed_over.as_ref())
            .collect();
        let owner = rendezvous(&rec.hash, view.iter().map(String::as_str))
            .unwrap_or(me.as_str())
            .to_string();
        let here =
            owner == me || (passed_over.is_some() && ctx.sabotage == Some(Sabotage::FallbackHere));
        let index = super::node::index(&owner).filter(|_| !here);
        let Some(o) = index else {
            self.submit_here(ctx, rec, Reply::Client(i));
            if passed_over.is_some()
                && ctx.history.was_accepted(&id)
                && let Some(s) = ctx.history.submissions.get_mut(i)
            {
                s.fallback = Some(id.clone());
            }
            if owner != me {
                ctx.history.accepted_as_non_owner(&id);
            }
            return;
        };
        // The first choice waits [`CALL_TIMEOUT_US`] at most and leaves a quarter of the
        // budget for the next; the next waits what is left.
        let left = (SUBMIT_BUDGET_US - SUBMIT_MARGIN_US).saturating_sub(ctx.now_us - began_us);
        let wait = if passed_over.is_none() {
            CALL_TIMEOUT_US.min(left * 3 / 4)
        } else {
            left
        };
        let call = ctx.next_id();
        let reachable = ctx.up(o).is_some() && ctx.net.reachable(self.id, o);
        if reachable {
            let env = self.envelope_to(
                o,
                None,
                Msg::Submit {
                    call,
                    rec: Box::new(rec),
                    sent_ms: ctx.now_ms(self.id),
                    stale_ms: wait / 1000 * FORWARD_STALE_MS / (CALL_TIMEOUT_US / 1000),
                },
            );
            ctx.send(env, Class::Datagram);
        }
        let wait = if reachable {
            wait
        } else {
            wait.min(UNREACHABLE_US)
        };
        self.tasks.calls.insert(
            call,
            Call {
                submission: i,
                objective: objective.to_string(),
                workflow: workflow.to_string(),
                owner,
                began_us,
                next_choice: passed_over.is_some(),
                deadline_us: ctx.now_us + wait,
            },
        );
    }

    fn envelope_to(&self, to: u32, to_boot: Option<u64>, msg: Msg) -> super::net::Envelope {
        super::net::Envelope {
            from: self.id,
            from_boot: self.boot,
            to,
            to_boot,
            msg,
        }
    }

    /// Submit on this node as the owner.
    pub(crate) fn submit_here(&mut self, ctx: &mut Ctx, rec: TaskRecord, reply: Reply) {
        let id = rec.id.clone();
        let in_replica = self
            .scan_tasks(ctx)
            .iter()
            .find(|t| t.hash == rec.hash && t.id != id && t.status.is_active())
            .map(|t| t.id.clone());
        if !early_scan(ctx)
            && let Some(active) = in_replica.clone()
        {
            // Unfinished elsewhere (its hash's owner moved since): the same task.
            self.answer(ctx, reply, Ok((active, true)));
            return;
        }
        match self.tasks.d.submit(ctx.now_ms(self.id), rec) {
            Ok(actions) => {
                // Accepted without sight of an unfinished task of its hash (not in this replica
                // yet): a duplicate it makes is one of replication lag.
                ctx.history.accepted(&id, ctx.now_us, in_replica.is_none());
                let ack = SubmitAck { task: id, reply };
                self.execute(ctx, actions, Some(ack));
            }
            Err(Refusal::Duplicate { existing }) => {
                self.answer(ctx, reply, Ok((existing, true)));
            }
            Err(r) => self.answer(ctx, reply, Err(r.code().to_string())),
        }
    }

    /// Answer a submission, here or to the node that forwarded it.
    pub(crate) fn answer(
        &mut self,
        ctx: &mut Ctx,
        reply: Reply,
        answer: Result<(String, bool), String>,
    ) {
        match reply {
            Reply::Client(i) => {
                if let Some(s) = ctx.history.submissions.get_mut(i) {
                    s.answer.get_or_insert(answer);
                }
            }
            Reply::Peer { node, boot, call } => {
                let env = self.envelope_to(node, Some(boot), Msg::Submitted { call, answer });
                ctx.send(env, Class::Datagram);
            }
        }
    }

    pub(crate) fn on_submitted(
        &mut self,
        ctx: &mut Ctx,
        call: u64,
        answer: Result<(String, bool), String>,
    ) {
        if matches!(&answer, Err(code) if code == "timeout") {
            // Refused as read too late: passed over now.
            if let Some(c) = self.tasks.calls.get_mut(&call) {
                c.deadline_us = ctx.now_us;
            }
            self.expire_calls(ctx);
            return;
        }
        if let Some(c) = self.tasks.calls.remove(&call)
            && let Some(s) = ctx.history.submissions.get_mut(c.submission)
        {
            if c.next_choice
                && let Ok((task, false)) = &answer
            {
                s.fallback = Some(task.clone());
            }
            s.answer.get_or_insert(answer);
        }
    }

    /// Forwarded submissions their owner did not answer: sent to the next choice (the owner
    /// among the live members less that one), or refused when that was the next choice.
    fn expire_calls(&mut self, ctx: &mut Ctx) {
        let now = ctx.now_us;
        let late: Vec<u64> = self
            .tasks
            .calls
            .iter()
            .filter(|(_, c)| c.deadline_us <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let Some(c) = self.tasks.calls.remove(&id) else {
                continue;
            };
            if c.next_choice {
                if let Some(s) = ctx.history.submissions.get_mut(c.submission) {
                    s.answer.get_or_insert(Err("timeout".into()));
                }
                continue;
            }
            let (objective, workflow) = (c.objective, c.workflow);
            self.route_submission(
                ctx,
                c.submission,
                &objective,
                &workflow,
                c.began_us,
                Some(c.owner),
            );
        }
    }

    // ---- carrying out the dispatcher's decisions ----

    fn execute(&mut self, ctx: &mut Ctx, actions: Vec<Action>, mut ack: Option<SubmitAck>) {
        let mut writes: Vec<TaskWrite> = Vec::new();
        for a in actions {
            match a {
                Action::Persist(rec) => {
                    if let Some(TaskWrite::Record(prev)) = writes.last_mut()
                        && prev.id == rec.id
                    {
                        **prev = rec;
                        continue;
                    }
                    writes.push(TaskWrite::Record(Box::new(rec)));
                }
                Action::RecordStage(st) => writes.push(TaskWrite::Stage(st)),
                Action::Run(run) => {
                    // Its record (with the stage running) is written first.
                    self.flush(ctx, &mut writes, &mut ack);
                    self.start_run(ctx, run);
                }
                Action::Abort { task, .. } => {
                    if let Some(run) = self.tasks.running.remove(&task) {
                        ctx.remote.remove(&run);
                    }
                }
                Action::Event(Event::Adopted { .. }) => ctx.counts.adoptions += 1,
                Action::Event(_) => {}
            }
        }
        self.flush(ctx, &mut writes, &mut ack);
        if let Some(ack) = ack {
            self.answer(ctx, ack.reply, Err("not_written".into()));
        }
    }

    /// Write what is queued, in order; the submission's answer goes with its task's last write.
    fn flush(&mut self, ctx: &mut Ctx, writes: &mut Vec<TaskWrite>, ack: &mut Option<SubmitAck>) {
        let list = std::mem::take(writes);
        let last_of_ack = ack.as_ref().and_then(|a| {
            list.iter().rposition(|w| match w {
                TaskWrite::Record(r) => r.id == a.task,
                TaskWrite::Stage(s) => s.task == a.task,
            })
        });
        for (i, w) in list.into_iter().enumerate() {
            let then = if Some(i) == last_of_ack {
                ack.take()
            } else {
                None
            };
            let written = match w {
                TaskWrite::Record(rec) => self.write_record(ctx, &rec, then.clone()),
                TaskWrite::Stage(st) => self.write_stage(ctx, &st, then.clone()),
            };
            if let (Err(code), Some(a)) = (written, then) {
                self.answer(ctx, a.reply, Err(code));
            }
        }
    }

    fn write_record(
        &mut self,
        ctx: &mut Ctx,
        rec: &TaskRecord,
        then: Option<SubmitAck>,
    ) -> Result<(), String> {
        let json = serde_json::to_string(rec).map_err(|e| e.to_string())?;
        self.write_task(ctx, &TaskRecord::key(&rec.id), json, then)
    }

    fn write_stage(
        &mut self,
        ctx: &mut Ctx,
        st: &StageRecord,
        then: Option<SubmitAck>,
    ) -> Result<(), String> {
        let key = StageRecord::key(&st.task, &st.stage);
        // Written once per stage: a result already recorded here is not written again.
        if self.read::<StageRecord>(ctx, &key).is_some() {
            ctx.counts.stage_writes_skipped += 1;
            if let Some(a) = then {
                self.answer(ctx, a.reply, Ok((a.task, false)));
            }
            return Ok(());
        }
        let json = serde_json::to_string(st).map_err(|e| e.to_string())?;
        self.write_task(ctx, &key, json, then)?;
        ctx.history.stage_writes.push(super::history::StageWrite {
            task: st.task.clone(),
            index: st.index,
            stage: st.stage.clone(),
            epoch: st.epoch,
            node: self.id,
            at_us: ctx.now_us,
            disturbed: ctx.disturbed(),
            // Judged by the world once this event is over (it sees every node).
            earlier_on_a_live_node: None,
        });
        Ok(())
    }

    /// Durable here and on one peer when one is alive (alone: here is enough).
    fn write_task(
        &mut self,
        ctx: &mut Ctx,
        key: &str,
        json: String,
        then: Option<SubmitAck>,
    ) -> Result<(), String> {
        let delta = self.put_local(ctx, TASKS_NAMESPACE, key, json, None)?;
        let waits = then.clone().map(Then::Task);
        if !self.push(ctx, &delta, true, waits)
            && let Some(a) = then
        {
            self.answer(ctx, a.reply, Ok((a.task, false)));
        }
        Ok(())
    }

    /// The live value at `key` of the tasks namespace here, decoded.
    pub(crate) fn read<T: serde::de::DeserializeOwned>(&self, ctx: &Ctx, key: &str) -> Option<T> {
        let item = self
            .storage()
            .memory
            .get(TASKS_NAMESPACE, key, ctx.now_ms(self.id))
            .ok()??;
        serde_json::from_str(&item.value_json).ok()
    }

    /// Every task record in this node's replica (decoded once per change of the namespace).
    pub(crate) fn scan_tasks(&self, ctx: &Ctx) -> Rc<Vec<TaskRecord>> {
        let store = &self.storage().memory;
        let version = store
            .change_counter(TASKS_NAMESPACE)
            .load(std::sync::atomic::Ordering::Acquire);
        if let Some((v, records)) = &*self.tasks.records.borrow()
            && *v == version
        {
            return records.clone();
        }
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        let now = ctx.now_ms(self.id);
        while let Ok(page) = store.list(TASKS_NAMESPACE, "task:", after.as_deref(), 500, now) {
            let n = page.len();
            after = page.last().map(|i| i.key.clone());
            out.extend(
                page.into_iter()
                    .filter_map(|i| serde_json::from_str::<TaskRecord>(&i.value_json).ok()),
            );
            if n < 500 {
                break;
            }
        }
        let records = Rc::new(out);
        *self.tasks.records.borrow_mut() = Some((version, records.clone()));
        records
    }

    // ---- stages ----

    fn start_run(&mut self, ctx: &mut Ctx, stage: RunStage) {
        let view = if self.tasks.view.is_empty() {
            ctx.view(self.id)
        } else {
            self.tasks.view.clone()
        };
        let me = name(self.id);
        let home = rendezvous(&stage.agent, view.iter().map(String::as_str))
            .and_then(super::node::index)
            .unwrap_or(self.id);
        let run = ctx.next_id();
        if let Some(old) = self.tasks.running.insert(stage.task.clone(), run) {
            ctx.remote.remove(&old);
        }
        ctx.remote.insert(
            run,
            RemoteRun {
                owner: self.id,
                owner_boot: self.boot,
                home,
                stage: stage.clone(),
            },
        );
        if home == self.id {
            self.host_stage(ctx, run, stage);
        } else if ctx.up(home).is_none() || !ctx.net.reachable(self.id, home) {
            ctx.remote.remove(&run);
            let outcome = unreachable(&stage, &me);
            ctx.schedule(
                ctx.now_us + UNREACHABLE_US,
                Ev::Outcome {
                    node: self.id,
                    boot: self.boot,
                    outcome: Box::new(outcome),
                },
            );
        } else {
            let env = self.envelope_to(
                home,
                None,
                Msg::RunStage {
                    run,
                    stage: Box::new(stage),
                },
            );
            ctx.send(env, Class::Datagram);
        }
    }

    /// Run a stage of an agent this node hosts.
    pub(crate) fn host_stage(&mut self, ctx: &mut Ctx, run: u64, stage: RunStage) {
        if !ctx.remote.contains_key(&run) {
            return; // its owner gave up on it
        }
        let load = self.tasks.hosting.entry(stage.agent.clone()).or_default();
        if *load >= AGENT_MAX_LOAD {
            let busy = Err(StageError {
                code: "agent_busy".into(),
                message: format!("agent {} is at its load limit", stage.agent),
                retryable: true,
            });
            self.stage_done(ctx, run, stage, busy, false);
            return;
        }
        *load += 1;
        let took = ctx.rng.random_range(STAGE_US.0..STAGE_US.1);
        let result = if ctx.rng.random_bool(ctx.stage_failure) {
            // One failure in ten cannot be retried: the task fails.
            let retryable = ctx.rng.random_range(0..10) > 0;
            Err(StageError {
                code: if retryable {
                    "agent_error"
                } else {
                    "bad_output"
                }
                .into(),
                message: "the agent failed".into(),
                retryable,
            })
        } else {
            Ok(StageSuccess {
                text: format!("{} stage {} epoch {}", stage.task, stage.index, stage.epoch),
                prompt: String::new(),
                prompt_tokens: 10,
                completion_tokens: 20,
                duration_ms: took / 1000,
            })
        };
        ctx.schedule(
            ctx.now_us + took,
            Ev::StageDone {
                node: self.id,
                boot: self.boot,
                run,
                stage: Box::new(stage),
                result,
            },
        );
    }

    /// A stage this node ran as home is over: its result goes to the dispatcher that asked.
    pub(crate) fn stage_done(
        &mut self,
        ctx: &mut Ctx,
        run: u64,
        stage: RunStage,
        result: Result<StageSuccess, StageError>,
        counted: bool,
    ) {
        if counted && let Some(load) = self.tasks.hosting.get_mut(&stage.agent) {
            *load = load.saturating_sub(1);
        }
        let Some(r) = ctx.remote.remove(&run) else {
            return; // aborted, or its stream broke
        };
        let outcome = StageOutcome {
            task: stage.task,
            index: stage.index,
            epoch: stage.epoch,
            agent: stage.agent,
            node: name(self.id),
            result,
        };
        if r.owner == self.id && r.owner_boot == self.boot {
            self.on_outcome(ctx, outcome);
        } else {
            // To whatever process runs the owner now: a result from before its restart is
            // one the dispatcher must refuse.
            let env = self.envelope_to(r.owner, None, Msg::StageResult(Box::new(outcome)));
            ctx.send(env, Class::Datagram);
        }
    }

    /// A stage's result reached this dispatcher.
    pub(crate) fn on_outcome(&mut self, ctx: &mut Ctx, outcome: StageOutcome) {
        let now = ctx.now_ms(self.id);
        match self.tasks.d.stage_finished(now, outcome.clone()) {
            Ok(actions) => {
                for a in &actions {
                    if let Action::RecordStage(s) = a
                        && (s.epoch, s.index, s.agent.as_str())
                            != (outcome.epoch, outcome.index, outcome.agent.as_str())
                    {
                        ctx.history.fencing.push(format!(
                            "{} stage {} ran at epoch {} by {} was recorded at epoch {} by {} on {}",
                            outcome.task,
                            outcome.index,
                            outcome.epoch,
                            outcome.agent,
                            s.epoch,
                            s.agent,
                            name(self.id)
                        ));
                    }
                }
                self.tasks.running.remove(&outcome.task);
                self.execute(ctx, actions, None);
            }
            Err(Refusal::Stale { .. }) => ctx.counts.stale_results += 1,
            Err(_) => {}
        }
    }

    // ---- time and membership ----

    /// Look at membership (and scan for orphans when due), then tick the dispatcher.
    pub(crate) fn task_tick(&mut self, ctx: &mut Ctx, look: bool) {
        self.expire_calls(ctx);
        let now = ctx.now_us;
        if look {
            let live = ctx.view(self.id);
            if live != self.tasks.view {
                self.tasks.view = live;
                self.tasks.changed_us = now;
                self.tasks.scanned_us = None;
            }
            let due = match self.tasks.scanned_us {
                None => true,
                Some(t) if now - self.tasks.changed_us < SCAN_AFTER_CHANGE_FOR_US => {
                    now - t >= SCAN_AFTER_CHANGE_US
                }
                Some(t) => now - t >= SCAN_EVERY_US,
            };
            // Once the node has caught up, and has completed a round with every live peer
            // since membership last changed: the results the dead owner wrote are then here,
            // from whichever peer acknowledged them.
            let ready = early_scan(ctx) || {
                let peers = ctx.live_peers(self.id);
                let since = self.tasks.changed_us;
                self.serving && self.synced_since(ctx, &peers, since)
            };
            if due && ready {
                self.tasks.scanned_us = Some(now);
                self.adopt_orphans(ctx);
            }
        }
        let now_ms = ctx.now_ms(self.id);
        if look || self.tasks.d.next_wakeup().is_some_and(|t| t <= now_ms) {
            let actions = self.tasks.d.tick(now_ms);
            self.execute(ctx, actions, None);
        }
    }

    /// Adopt the unfinished tasks whose owner is not live and whose hash this node owns now,
    /// and those it owned before a restart.
    fn adopt_orphans(&mut self, ctx: &mut Ctx) {
        let me = name(self.id);
        let live: BTreeSet<String> = self.tasks.view.iter().cloned().collect();
        for rec in self.scan_tasks(ctx).iter() {
            if rec.status.is_finished() || self.tasks.d.task(&rec.id).is_some() {
                continue;
            }
            // Gone only when gossip says so: a member missing from a view that is still
            // forming (a restart) is not dead; one gossip has forgotten (down for minutes) is,
            // once this process has been up a while.
            let owner_alive = rec.owner != me
                && if early_scan(ctx) {
                    live.contains(&rec.owner)
                } else {
                    match super::node::index(&rec.owner).map(|o| ctx.gossip.state_seen(self.id, o))
                    {
                        Some(Some(MemberState::Down | MemberState::Left)) => false,
                        Some(Some(_)) => true,
                        Some(None) | None => self.uptime(ctx.now_us) < FORGOTTEN_AFTER_US,
                    }
                };
            // The sabotage: owners that live are not asked, their tasks taken anyway.
            let sabotage = ctx.sabotage == Some(Sabotage::AdoptFromLiveOwners);
            if owner_alive && !sabotage {
                continue;
            }
            let mine = rec.owner == me
                || rendezvous(&rec.hash, live.iter().map(String::as_str)) == Some(me.as_str())
                || sabotage;
            if !mine {
                continue;
            }
            let rec = self.resume_point(ctx, rec.clone());
            tracing::debug!(
                at_us = ctx.now_us,
                node = self.id,
                task = %rec.id,
                owner = %rec.owner,
                epoch = rec.epoch,
                "sim: orphan adopted"
            );
            let actions = self.tasks.d.adopt(ctx.now_ms(self.id), rec);
            self.execute(ctx, actions, None);
        }
    }

    /// `rec` with `stage` moved past every stage result recorded for it here.
    fn resume_point(&self, ctx: &Ctx, mut rec: TaskRecord) -> TaskRecord {
        let mut done = rec.stage;
        for (i, st) in stage_names(&rec.workflow).into_iter().enumerate() {
            let i = i as u32;
            if i < done {
                continue;
            }
            if self
                .read::<StageRecord>(ctx, &StageRecord::key(&rec.id, st))
                .is_some()
            {
                done = i + 1;
            } else {
                break;
            }
        }
        rec.stage = done.min(rec.stages_total);
        rec
    }

    /// Tasks this dispatcher holds pending or in progress.
    pub(crate) fn holding(&self) -> Vec<(String, String)> {
        self.tasks
            .d
            .tasks()
            .filter(|t| t.status.is_active())
            .map(|t| (t.id.clone(), t.hash.clone()))
            .collect()
    }
}

/// Whether the shell is sabotaged into the service's old ways ([`Sabotage::EarlyOrphanScan`]).
fn early_scan(ctx: &Ctx) -> bool {
    ctx.sabotage == Some(Sabotage::EarlyOrphanScan)
}

/// The answer of a home that cannot be reached.
pub(crate) fn unreachable(stage: &RunStage, owner: &str) -> StageOutcome {
    StageOutcome {
        task: stage.task.clone(),
        index: stage.index,
        epoch: stage.epoch,
        agent: stage.agent.clone(),
        node: String::new(),
        result: Err(StageError {
            code: "agent_unreachable".into(),
            message: format!("{owner} cannot reach the home of {}", stage.agent),
            retryable: true,
        }),
    }
}
