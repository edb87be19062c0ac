//! [`AgentRuntime`]: the agents homed on this node, as ractor actors under one supervisor.
//!
//! The supervisor starts the agents placed here in priority order and stops the ones that
//! moved away. An agent that crashes (its handler fails, or a stage it runs panics) is
//! restarted after a backoff that doubles within `agents.restart_window`; past
//! `agents.restart_budget` restarts in the window its failure escalates: the agent stays down in
//! state `error` and its parent in the supervision tree is told (event `agent.escalated`).
//! ractor supervision is node-local, so an agent whose parent lives on another node is linked
//! to this node's supervisor, which names the parent in the escalation.
//!
//! An agent works a stage by calling [`Inference`] with a system prompt built from its
//! swarm-file entry (constant per agent, so the engines' prefix cache reuses it across tasks),
//! and a user message with the objective, the earlier stages' results, its relevant knowledge
//! and the stage's instruction. It then writes what it did (history) and learned (knowledge)
//! under its own namespace through [`Memory`], as itself: each read and write passes the
//! policy check of its role, and the audit entries name the agent and the task.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use swarm_config::{AgentsConfig, BENCH_NOOP_KIND};
use swarm_storage::{MemoryType, PutRequest};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::{AgentRecord, AgentSpec, Roster};
use crate::inference::{Chunk, FinishReason, Input, Message, Request, Sampling};
use crate::tasks::dispatcher::{StageError, StageSuccess};
use crate::tasks::model::AGENTS_NAMESPACE;
use crate::tasks::wire::StageJob;
use crate::tasks::{AgentAnswer, AgentQuery, EventBus, NewEvent, now_ms};
use crate::{Caller, Error, Inference, Memory};

/// How often changed agent records are written to replicated memory.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Longest earlier-stage text quoted in a prompt (bytes, cut on a character boundary).
const PREVIOUS_CLIP: usize = 1200;
/// Longest knowledge or summary text kept.
const SUMMARY_CLIP: usize = 300;
/// Text chunks a stage may have buffered towards a slow follower before chunks are dropped.
pub const DELTA_BUFFER: usize = 256;

/// The policy check agents pass like any client (the node implements it with its RBAC policy).
pub trait Access: Send + Sync + 'static {
    /// May `role` perform `action` (e.g. `memory.write`)?
    fn allowed(&self, role: &str, action: &str) -> bool;
}

/// This node's agents.
pub struct AgentRuntime {
    node: String,
    roster: Roster,
    cfg: AgentsConfig,
    inference: Arc<dyn Inference>,
    memory: Memory,
    access: Arc<dyn Access>,
    events: Arc<EventBus>,
    local: Mutex<HashMap<String, Local>>,
    supervisor: Mutex<Option<ActorRef<HostMsg>>>,
}

impl std::fmt::Debug for AgentRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRuntime")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// An agent homed here.
struct Local {
    actor: Option<ActorRef<AgentMsg>>,
    rec: AgentRecord,
    /// Restarts within the window.
    crashes: VecDeque<Instant>,
    dirty: bool,
}

fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl AgentRuntime {
    /// Start the supervisor (no agents yet: [`Self::set_homes`] places them) and the loop that
    /// records agent state.
    pub async fn start(
        node: impl Into<String>,
        roster: Roster,
        cfg: AgentsConfig,
        inference: Arc<dyn Inference>,
        memory: Memory,
        access: Arc<dyn Access>,
        events: Arc<EventBus>,
    ) -> Result<Arc<Self>, Error> {
        let rt = Arc::new(Self {
            node: node.into(),
            roster,
            cfg,
            inference,
            memory,
            access,
            events,
            local: Mutex::new(HashMap::new()),
            supervisor: Mutex::new(None),
        });
        let (sup, _) = Actor::spawn(None, HostActor, rt.clone())
            .await
            .map_err(|e| Error::ClusterStart(format!("agent supervisor: {e}")))?;
        *lock(&rt.supervisor) = Some(sup);
        let weak = Arc::downgrade(&rt);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            loop {
                tick.tick().await;
                let Some(rt) = weak.upgrade() else { return };
                rt.flush().await;
            }
        });
        Ok(rt)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// Stages one agent runs at once.
    pub fn max_load(&self) -> u32 {
        self.cfg.max_load
    }

    /// The agents placed on this node now, in any order: start the missing ones (in priority
    /// order), stop the ones placed elsewhere.
    pub fn set_homes(&self, homes: &[String]) {
        let Some(sup) = lock(&self.supervisor).clone() else {
            return;
        };
        let mut local = lock(&self.local);
        let gone: Vec<String> = local
            .keys()
            .filter(|id| !homes.contains(id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(l) = local.remove(&id)
                && let Some(a) = l.actor
            {
                a.stop(Some("moved".into()));
            }
            self.publish("agent.moved", &id, serde_json::json!({"from": self.node}));
        }
        for spec in &self.roster.specs {
            let id = &spec.agent.id;
            if !homes.contains(id) || local.contains_key(id) {
                continue;
            }
            // A new home continues the counters the agent's previous home recorded.
            let mut rec = self.stored_record(id).unwrap_or_default();
            rec.id = id.clone();
            rec.node = self.node.clone();
            rec.state = "idle".into();
            rec.current_task = None;
            rec.load = 0;
            rec.escalated = false;
            local.insert(
                id.clone(),
                Local {
                    actor: None,
                    rec,
                    crashes: VecDeque::new(),
                    dirty: true,
                },
            );
            if let Err(e) = sup.cast(HostMsg::Spawn(id.clone())) {
                tracing::warn!(agent = %id, error = %e, "agent supervisor gone");
            }
        }
    }

    /// Run a stage on agent `job.agent`, homed here. Stage text goes to `deltas` as it is
    /// generated (dropped when the follower is slow). Dropping the future cancels the stage:
    /// its generation stops and the engine frees its sequence.
    pub async fn run_stage(
        &self,
        job: StageJob,
        deltas: mpsc::Sender<String>,
    ) -> Result<StageSuccess, StageError> {
        let actor = self.claim(&job.agent, Some(&job.task))?;
        let (tx, rx) = oneshot::channel();
        let msg = AgentMsg::Run(Box::new(RunMsg {
            job: job.clone(),
            deltas,
            reply: tx,
        }));
        if actor.cast(msg).is_err() {
            self.release(&job.agent, false, 0);
            return Err(retryable("agent_down", "the agent stopped"));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(retryable("agent_crashed", "the agent stopped mid-stage")),
        }
    }

    /// Ask agent `agent`, homed here, a question directly.
    pub async fn query(&self, agent: &str, q: AgentQuery) -> Result<AgentAnswer, Error> {
        let actor = self
            .claim(agent, None)
            .map_err(|e| Error::Unavailable(format!("{}: {}", e.code, e.message)))?;
        let (tx, rx) = oneshot::channel();
        if actor
            .cast(AgentMsg::Query(Box::new(QueryMsg { q, reply: tx })))
            .is_err()
        {
            self.release(agent, false, 0);
            return Err(Error::Unavailable("the agent stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::Unavailable("the agent stopped mid-answer".into())))
    }

    /// The records of the agents homed here now.
    pub fn records(&self) -> Vec<AgentRecord> {
        lock(&self.local).values().map(|l| l.rec.clone()).collect()
    }

    /// Stop every agent (node shutdown).
    pub fn shutdown(&self) {
        if let Some(sup) = lock(&self.supervisor).take() {
            sup.stop(Some("node stopping".into()));
        }
        lock(&self.local).clear();
    }

    /// Take a slot of `agent` for a stage or a question: its actor, once it is known to be
    /// homed here, up and below its load limit.
    fn claim(&self, agent: &str, task: Option<&str>) -> Result<ActorRef<AgentMsg>, StageError> {
        let mut local = lock(&self.local);
        let Some(l) = local.get_mut(agent) else {
            return Err(retryable(
                "agent_moved",
                "the agent is not homed on this node",
            ));
        };
        let Some(actor) = l.actor.clone() else {
            return Err(retryable(
                "agent_down",
                "the agent is restarting or escalated",
            ));
        };
        if l.rec.load >= self.cfg.max_load {
            return Err(retryable("agent_busy", "the agent is at its load limit"));
        }
        l.rec.load += 1;
        l.rec.state = "busy".into();
        if let Some(t) = task {
            l.rec.current_task = Some(t.to_string());
        }
        l.dirty = true;
        Ok(actor)
    }

    /// Give back a slot taken by [`Self::claim`]; `done` counts a completed stage.
    fn release(&self, agent: &str, done: bool, ms: u64) {
        let mut local = lock(&self.local);
        if let Some(l) = local.get_mut(agent) {
            l.rec.load = l.rec.load.saturating_sub(1);
            if done {
                l.rec.completed += 1;
                l.rec.total_stage_ms += ms;
            }
            if l.rec.load == 0 {
                l.rec.current_task = None;
                if l.rec.state == "busy" {
                    l.rec.state = "idle".into();
                }
            }
            l.dirty = true;
        }
    }

    fn failed(&self, agent: &str) {
        if let Some(l) = lock(&self.local).get_mut(agent) {
            l.rec.failed += 1;
            l.dirty = true;
        }
    }

    fn stored_record(&self, id: &str) -> Option<AgentRecord> {
        crate::tasks::model::read_json(&self.memory, AGENTS_NAMESPACE, id)
    }

    /// Write the changed records (best effort: the next flush retries a failed one).
    async fn flush(&self) {
        let dirty: Vec<AgentRecord> = {
            let mut local = lock(&self.local);
            local
                .values_mut()
                .filter(|l| l.dirty)
                .map(|l| {
                    l.dirty = false;
                    l.rec.updated_ms = now_ms();
                    l.rec.clone()
                })
                .collect()
        };
        for rec in dirty {
            let Ok(value_json) = serde_json::to_string(&rec) else {
                continue;
            };
            let caller = Caller::new(
                "system",
                "agents.state",
                format!("memory/{AGENTS_NAMESPACE}/{}", rec.id),
            );
            let req = PutRequest {
                value_json,
                memory_type: MemoryType::Agent,
                ttl_ms: None,
                subject: None,
                tags: Vec::new(),
            };
            if let Err(e) = self
                .memory
                .put_record(caller, AGENTS_NAMESPACE.into(), rec.id.clone(), req)
                .await
            {
                tracing::debug!(agent = %rec.id, error = %e, "agent record not written");
                if let Some(l) = lock(&self.local).get_mut(&rec.id) {
                    l.dirty = true;
                }
            }
        }
    }

    /// A crashed agent: restart it after a backoff, or past its budget escalate to its parent.
    /// Returns the delay before the restart, `None` when it escalated (or moved away).
    fn crashed(&self, agent: &str, why: &str) -> Option<Duration> {
        let window = self.cfg.restart_window.0;
        let budget = self.cfg.restart_budget;
        let mut local = lock(&self.local);
        let l = local.get_mut(agent)?;
        l.actor = None;
        let now = Instant::now();
        while l
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            l.crashes.pop_front();
        }
        l.dirty = true;
        l.rec.load = 0;
        l.rec.current_task = None;
        if l.crashes.len() >= budget as usize {
            l.rec.state = "error".into();
            l.rec.escalated = true;
            let parent = self
                .roster
                .get(agent)
                .and_then(|s| s.parent.clone())
                .unwrap_or_else(|| "operator".into());
            drop(local);
            tracing::error!(%agent, %parent, why, "agent failed past its restart budget; escalated");
            self.publish(
                "agent.escalated",
                agent,
                serde_json::json!({"parent": parent, "reason": why, "restarts": budget}),
            );
            return None;
        }
        l.crashes.push_back(now);
        l.rec.restarts += 1;
        l.rec.state = "restarting".into();
        let n = l.crashes.len() as u32;
        let delay = self
            .cfg
            .restart_backoff
            .0
            .saturating_mul(1u32 << n.saturating_sub(1).min(10));
        drop(local);
        tracing::warn!(%agent, why, ?delay, "agent crashed; restarting");
        self.publish(
            "agent.restarted",
            agent,
            serde_json::json!({"reason": why, "delay_ms": delay.as_millis() as u64}),
        );
        Some(delay)
    }

    fn publish(&self, kind: &str, agent: &str, data: serde_json::Value) {
        self.events.publish(NewEvent {
            kind: kind.into(),
            task: None,
            agent: Some(agent.into()),
            submitter: None,
            node: self.node.clone(),
            data,
        });
    }

    /// The model `spec` uses: its configured one, else the first the cluster serves.
    fn model_for(&self, spec: &AgentSpec) -> Option<String> {
        spec.model
            .clone()
            .or_else(|| self.inference.models().into_iter().next().map(|m| m.name))
    }

    /// The system prompt of a direct question: who the agent is.
    fn system_prompt(&self, spec: &AgentSpec) -> String {
        format!("{} Answer concretely and briefly.", self.identity(spec))
    }

    /// The agent's swarm-file entry in words.
    fn identity(&self, spec: &AgentSpec) -> String {
        let a = &spec.agent;
        format!(
            "You are {} ({}), the {} of the {} agent swarm. Your specialization is {}; your \
             capabilities: {}.",
            a.name,
            a.id,
            a.role,
            self.roster.swarm_name,
            a.specialization.replace('_', " "),
            a.capabilities.join(", ").replace('_', " "),
        )
    }

    /// The agent in a stage's prompt, short: it is the part of the prompt a stage cannot share
    /// with the stage before it, so every token of it is computed again.
    fn stage_identity(&self, spec: &AgentSpec) -> String {
        let a = &spec.agent;
        format!(
            "You are {}, specialized in {}.",
            a.name,
            a.specialization.replace('_', " ")
        )
    }

    /// The system prompt of every stage, the same for every agent and task: with the task
    /// first and the agent after it in the user message, the stages of one workflow share
    /// their prompt up to the latest earlier stage, which the engine's prefix cache keeps.
    fn stage_system_prompt(&self) -> String {
        format!(
            "You are one of the specialist agents of the {} agent swarm, who work on a task \
             one step each. Do only the step you are asked for, concretely and briefly.",
            self.roster.swarm_name
        )
    }

    /// Knowledge of `spec`'s own about stage kind `kind`, when its role may read it.
    fn knowledge(&self, spec: &AgentSpec, kind: &str, task: &str) -> Vec<String> {
        let id = &spec.agent.id;
        let caller = Caller::new(id.clone(), "memory.read", format!("memory/{id}"))
            .with_request_id(task.to_string());
        if !self.access.allowed(&spec.role, "memory.read") {
            self.memory.refuse(
                &caller,
                &Error::Forbidden(format!("role {} may not read memory", spec.role)),
            );
            return Vec::new();
        }
        let items = self
            .memory
            .storage()
            .memory
            .list(
                id,
                &format!("knowledge:{kind}:"),
                None,
                self.cfg.knowledge_in_prompt,
                now_ms(),
            )
            .unwrap_or_default();
        items
            .into_iter()
            .filter_map(|i| serde_json::from_str::<Knowledge>(&i.value_json).ok())
            .map(|k| k.content)
            .collect()
    }

    /// A stage's messages and its own turn (recorded with its result). `level` 0 has
    /// everything: the earlier stages as the conversation they were (each one's turn and its
    /// whole answer, so this prompt extends the one before it word for word and the engine's
    /// prefix cache computes only the new turn), or, when an earlier stage recorded no turn,
    /// quoted. Each level up leaves more out, for a model whose context cannot take it all: 1
    /// quotes the earlier stages clipped harder and drops the knowledge, 2 keeps only the last
    /// earlier stage and no context, 3 only the objective and the instruction.
    fn stage_messages(
        &self,
        spec: &AgentSpec,
        job: &StageJob,
        knowledge: &[String],
        level: u8,
    ) -> (Vec<Message>, String) {
        let turn = self.turn(spec, job, knowledge, level);
        let message = |role: &str, content: String| Message {
            role: role.into(),
            content,
        };
        let mut messages = vec![message("system", self.stage_system_prompt())];
        let header = Self::task_header(job, level);
        if level == 0 && job.turns.len() == job.index as usize {
            let mut first = true;
            for t in &job.turns {
                let user = if first {
                    format!("{header}\n{}", t.user)
                } else {
                    t.user.clone()
                };
                first = false;
                messages.push(message("user", user));
                messages.push(message("assistant", t.assistant.clone()));
            }
            let user = if first {
                format!("{header}\n{turn}")
            } else {
                turn.clone()
            };
            messages.push(message("user", user));
        } else {
            let earlier = Self::earlier_quoted(job, level);
            messages.push(message("user", format!("{header}{earlier}\n{turn}")));
        }
        (messages, turn)
    }

    /// The task: objective, definition, context.
    fn task_header(job: &StageJob, level: u8) -> String {
        let mut p = format!("Objective: {}\n", job.objective);
        if let Some(d) = &job.task_definition
            && level < 3
        {
            p.push_str(&format!("Definition: {}\n", clip(d, 1200 >> level)));
        }
        if job.context.is_object() && level < 2 {
            p.push_str(&format!(
                "Context: {}\n",
                clip(&job.context.to_string(), 600)
            ));
        }
        p
    }

    /// The earlier stages quoted (clipped), for prompts that cannot replay them as turns.
    fn earlier_quoted(job: &StageJob, level: u8) -> String {
        let previous: &[(String, String, String)] = match level {
            0 | 1 => &job.previous,
            2 => job.previous.last().map(std::slice::from_ref).unwrap_or(&[]),
            _ => &[],
        };
        let mut p = String::new();
        if !previous.is_empty() {
            p.push_str("\nEarlier stages:\n");
            for (stage, agent, text) in previous {
                p.push_str(&format!(
                    "## {stage} ({agent})\n{}\n",
                    clip(text, PREVIOUS_CLIP >> (2 * level))
                ));
            }
        }
        p
    }

    /// What differs between the stages of a task: the agent, its knowledge, the step.
    fn turn(&self, spec: &AgentSpec, job: &StageJob, knowledge: &[String], level: u8) -> String {
        let mut p = format!("{}\n", self.stage_identity(spec));
        if !knowledge.is_empty() && level == 0 {
            p.push_str("What you learned on earlier tasks:\n");
            for k in knowledge {
                p.push_str(&format!("- {}\n", clip(k, SUMMARY_CLIP)));
            }
        }
        let instruction = job
            .prompt
            .replace("{objective}", &job.objective)
            .replace("{definition}", job.task_definition.as_deref().unwrap_or(""));
        p.push_str(&format!("Your step: {}. {instruction}", job.stage));
        p
    }

    /// Generate from `messages`, sending text to `deltas`; returns the text, the usage and the
    /// time taken.
    async fn generate(
        &self,
        model: String,
        messages: Vec<Message>,
        max_tokens: u32,
        seed: u64,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<(String, crate::inference::Usage), StageError> {
        let req = Request {
            model,
            input: Input::Chat(messages),
            sampling: Sampling {
                max_tokens: Some(max_tokens.max(1)),
                temperature: 0.3,
                top_k: 40,
                top_p: 0.9,
                seed: Some(seed),
                ..Sampling::default()
            },
        };
        let mut generation = self.inference.generate(req).await.map_err(|f| StageError {
            code: f.code.as_str().to_string(),
            message: f.message,
            retryable: true,
        })?;
        let mut text = String::new();
        while let Some(chunk) = generation.next().await {
            match chunk {
                Chunk::Text(t) => {
                    if let Some(d) = deltas {
                        // A slow follower misses text; the stage never waits for it.
                        let _ = d.try_send(t.clone());
                    }
                    text.push_str(&t);
                }
                Chunk::Done(usage) => return Ok((text, usage)),
                Chunk::Failed(f) => {
                    return Err(StageError {
                        code: f.code.as_str().to_string(),
                        message: f.message,
                        retryable: true,
                    });
                }
            }
        }
        Err(retryable(
            "generation_ended",
            "the generation ended without a result",
        ))
    }

    /// What an agent does with a stage.
    async fn execute(
        &self,
        spec: &AgentSpec,
        job: &StageJob,
        deltas: &mpsc::Sender<String>,
    ) -> Result<StageSuccess, StageError> {
        let started = Instant::now();
        if job.kind == BENCH_NOOP_KIND {
            return Ok(StageSuccess {
                text: "noop".into(),
                prompt: String::new(),
                prompt_tokens: 0,
                completion_tokens: 0,
                duration_ms: 0,
            });
        }
        let model = self.model_for(spec).ok_or_else(|| {
            retryable("model_unavailable", "no node of the cluster serves a model")
        })?;
        let knowledge = self.knowledge(spec, &job.kind, &job.task);
        let seed = seed_of(&job.task, job.index, job.attempt);
        // A prompt the model's context cannot take is shortened (and, when the prompt fits but
        // not with the stage's tokens, the tokens halved) before the stage gives up.
        let mut max_tokens = job.max_tokens;
        let mut level = 0u8;
        let (text, usage, turn) = loop {
            let (messages, turn) = self.stage_messages(spec, job, &knowledge, level);
            match self
                .generate(model.clone(), messages, max_tokens, seed, Some(deltas))
                .await
            {
                Err(e) if e.code == "context_length_exceeded" && level < 3 => {
                    level += 1;
                    if e.message.starts_with("max_tokens") {
                        max_tokens = (max_tokens / 2).max(16);
                    }
                }
                Err(mut e) if e.code == "context_length_exceeded" => {
                    // Shortening did not help: retrying elsewhere will not either.
                    e.retryable = false;
                    return Err(e);
                }
                r => {
                    let (text, usage) = r?;
                    break (text, usage, turn);
                }
            }
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        if job.budget_capped
            && max_tokens == job.max_tokens
            && usage.finish_reason == FinishReason::Length
        {
            return Err(StageError {
                code: "budget_exceeded".into(),
                message: format!(
                    "the stage reached the {} tokens left of the task's budget",
                    job.max_tokens
                ),
                retryable: false,
            });
        }
        let success = StageSuccess {
            text,
            prompt: turn,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            duration_ms,
        };
        self.remember(spec, job, &success).await;
        Ok(success)
    }

    /// Write the stage into the agent's history and knowledge (its namespace, its retention),
    /// as the agent; a write the policy denies is audited and skipped.
    async fn remember(&self, spec: &AgentSpec, job: &StageJob, s: &StageSuccess) {
        let id = &spec.agent.id;
        let summary = clip(s.text.trim(), SUMMARY_CLIP).to_string();
        let history = History {
            task: job.task.clone(),
            hash: job.hash.clone(),
            agent: id.clone(),
            stage: job.stage.clone(),
            status: "completed".into(),
            started_ms: now_ms().saturating_sub(s.duration_ms),
            finished_ms: now_ms(),
            duration_ms: s.duration_ms,
            result_summary: summary.clone(),
            learned_patterns: vec![format!("{}:{}", job.kind, job.stage)],
            metrics: serde_json::json!({
                "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens,
                "tokens_per_s": if s.duration_ms > 0 {
                    f64::from(s.completion_tokens) * 1000.0 / s.duration_ms as f64
                } else { 0.0 },
            }),
        };
        let knowledge = Knowledge {
            kind: "stage_result".into(),
            domain: job.kind.clone(),
            content: format!(
                "{} for \"{}\": {summary}",
                job.stage,
                clip(&job.objective, 80)
            ),
            confidence: confidence(&s.text, true),
            usage: 0,
            success_rate: 1.0,
        };
        let writes = [
            (
                format!("history:{}:{}", job.task, job.stage),
                serde_json::to_string(&history),
            ),
            (
                format!("knowledge:{}:{}", job.kind, job.task),
                serde_json::to_string(&knowledge),
            ),
        ];
        for (key, value) in writes {
            let Ok(value_json) = value else { continue };
            let caller = Caller::new(id.clone(), "memory.write", format!("memory/{id}/{key}"))
                .with_request_id(job.task.clone());
            if !self.access.allowed(&spec.role, "memory.write") {
                self.memory.refuse(
                    &caller,
                    &Error::Forbidden(format!("role {} may not write memory", spec.role)),
                );
                continue;
            }
            let req = PutRequest {
                value_json,
                memory_type: MemoryType::Agent,
                ttl_ms: spec.retention_ms,
                subject: None,
                tags: vec![format!("task:{}", job.task)],
            };
            if let Err(e) = self.memory.put(caller, id.clone(), key, req, false).await {
                tracing::debug!(agent = %id, error = %e, "agent memory not written");
            }
        }
    }

    /// What an agent does with a direct question.
    async fn answer(&self, spec: &AgentSpec, q: &AgentQuery) -> Result<AgentAnswer, Error> {
        let started = Instant::now();
        let model = self
            .model_for(spec)
            .ok_or_else(|| Error::Unavailable("no node of the cluster serves a model".into()))?;
        let messages = vec![
            Message {
                role: "system".into(),
                content: self.system_prompt(spec),
            },
            Message {
                role: "user".into(),
                content: q.question.clone(),
            },
        ];
        let seed = seed_of(&q.request_id, 0, 0);
        let (text, usage) = self
            .generate(model, messages, q.max_tokens.unwrap_or(256), seed, None)
            .await
            .map_err(|e| Error::StageFailed {
                code: e.code,
                message: e.message,
            })?;
        Ok(AgentAnswer {
            agent: spec.agent.id.clone(),
            node: self.node.clone(),
            confidence: confidence(&text, usage.finish_reason == FinishReason::Stop),
            answer: text,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }
}

/// A reproducible sampling seed per (task, stage, attempt).
fn seed_of(task: &str, index: u32, attempt: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (task, index, attempt).hash(&mut h);
    h.finish()
}

/// Confidence computed from a generation: how it ended (a natural stop, or cut at its token
/// limit) times how little it repeats itself (distinct words / words). Empty text is 0.
pub fn confidence(text: &str, stopped: bool) -> f64 {
    let words: Vec<String> = text
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        return 0.0;
    }
    let distinct = words.iter().collect::<std::collections::HashSet<_>>().len();
    let variety = distinct as f64 / words.len() as f64;
    let ending = if stopped { 1.0 } else { 0.7 };
    (ending * variety).clamp(0.0, 1.0)
}

fn retryable(code: &str, message: &str) -> StageError {
    StageError {
        code: code.into(),
        message: message.into(),
        retryable: true,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An `agent_task_history` record.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct History {
    task: String,
    hash: String,
    agent: String,
    stage: String,
    status: String,
    started_ms: u64,
    finished_ms: u64,
    duration_ms: u64,
    result_summary: String,
    learned_patterns: Vec<String>,
    metrics: serde_json::Value,
}

/// An `agent_knowledge` record.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Knowledge {
    #[serde(rename = "type")]
    kind: String,
    domain: String,
    content: String,
    confidence: f64,
    usage: u64,
    success_rate: f64,
}

// ---- the actors ----

/// The node's agent supervisor.
struct HostActor;

enum HostMsg {
    /// Start an agent homed here (again, after a crash).
    Spawn(String),
}

impl ractor::Message for HostMsg {}

struct HostState {
    rt: Arc<AgentRuntime>,
    /// Child actor → agent id.
    children: HashMap<ractor::ActorId, String>,
}

impl Actor for HostActor {
    type Msg = HostMsg;
    type State = HostState;
    type Arguments = Arc<AgentRuntime>;

    async fn pre_start(
        &self,
        _myself: ActorRef<HostMsg>,
        rt: Arc<AgentRuntime>,
    ) -> Result<HostState, ActorProcessingErr> {
        Ok(HostState {
            rt,
            children: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<HostMsg>,
        msg: HostMsg,
        st: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        let HostMsg::Spawn(id) = msg;
        let homed_and_down = lock(&st.rt.local)
            .get(&id)
            .is_some_and(|l| l.actor.is_none() && !l.rec.escalated);
        if !homed_and_down {
            return Ok(());
        }
        match Actor::spawn_linked(
            None,
            AgentActor,
            (st.rt.clone(), id.clone()),
            myself.get_cell(),
        )
        .await
        {
            Ok((actor, _)) => {
                st.children.insert(actor.get_id(), id.clone());
                let restarted = {
                    let mut local = lock(&st.rt.local);
                    match local.get_mut(&id) {
                        Some(l) => {
                            l.actor = Some(actor);
                            l.rec.state = "idle".into();
                            l.dirty = true;
                            l.rec.restarts > 0
                        }
                        None => {
                            // Moved away while it started.
                            actor.stop(None);
                            return Ok(());
                        }
                    }
                };
                let kind = if restarted {
                    "agent.running"
                } else {
                    "agent.started"
                };
                st.rt
                    .publish(kind, &id, serde_json::json!({"node": st.rt.node}));
            }
            Err(e) => {
                tracing::warn!(agent = %id, error = %e, "agent did not start");
                if let Some(delay) = st.rt.crashed(&id, &e.to_string()) {
                    respawn_later(myself, id, delay);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<HostMsg>,
        evt: SupervisionEvent,
        st: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, why) => {
                if let Some(id) = st.children.remove(&cell.get_id())
                    && let Some(delay) = st.rt.crashed(&id, &why.to_string())
                {
                    respawn_later(myself, id, delay);
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                st.children.remove(&cell.get_id());
            }
            _ => {}
        }
        Ok(())
    }
}

fn respawn_later(sup: ActorRef<HostMsg>, id: String, delay: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = sup.cast(HostMsg::Spawn(id));
    });
}

/// One agent.
struct AgentActor;

struct RunMsg {
    job: StageJob,
    deltas: mpsc::Sender<String>,
    reply: oneshot::Sender<Result<StageSuccess, StageError>>,
}

struct QueryMsg {
    q: AgentQuery,
    reply: oneshot::Sender<Result<AgentAnswer, Error>>,
}

enum AgentMsg {
    Run(Box<RunMsg>),
    Query(Box<QueryMsg>),
    /// Work it ran panicked: the agent fails, and its supervisor restarts it.
    Crash(String),
}

impl ractor::Message for AgentMsg {}

struct AgentState {
    rt: Arc<AgentRuntime>,
    spec: Arc<AgentSpec>,
}

impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = (Arc<AgentRuntime>, String);

    async fn pre_start(
        &self,
        _myself: ActorRef<AgentMsg>,
        (rt, id): (Arc<AgentRuntime>, String),
    ) -> Result<AgentState, ActorProcessingErr> {
        let spec = rt
            .roster
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("agent {id} is not in the swarm file"))?;
        Ok(AgentState {
            rt,
            spec: Arc::new(spec),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg>,
        msg: AgentMsg,
        st: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AgentMsg::Run(run) => {
                let (rt, spec) = (st.rt.clone(), st.spec.clone());
                let span = tracing::info_span!(
                    "agent_stage",
                    agent = %spec.agent.id,
                    task = %run.job.task,
                    stage = %run.job.stage,
                    epoch = run.job.epoch,
                    attempt = run.job.attempt,
                );
                tokio::spawn(
                    async move {
                        let RunMsg {
                            job,
                            deltas,
                            mut reply,
                        } = *run;
                        let work =
                            AssertUnwindSafe(rt.execute(&spec, &job, &deltas)).catch_unwind();
                        let outcome = tokio::select! {
                            r = work => r,
                            // The owner stopped waiting (cancel, timeout, gone): drop the
                            // generation, which frees the engine's sequence.
                            _ = reply.closed() => {
                                rt.release(&spec.agent.id, false, 0);
                                return;
                            }
                        };
                        match outcome {
                            Ok(result) => {
                                match &result {
                                    Ok(s) => rt.release(&spec.agent.id, true, s.duration_ms),
                                    Err(_) => {
                                        rt.failed(&spec.agent.id);
                                        rt.release(&spec.agent.id, false, 0);
                                    }
                                }
                                let _ = reply.send(result);
                            }
                            Err(_) => {
                                rt.failed(&spec.agent.id);
                                rt.release(&spec.agent.id, false, 0);
                                let _ = reply.send(Err(retryable(
                                    "agent_crashed",
                                    "the agent crashed during the stage",
                                )));
                                let _ = myself.cast(AgentMsg::Crash("a stage panicked".into()));
                            }
                        }
                    }
                    .instrument(span),
                );
            }
            AgentMsg::Query(qm) => {
                let (rt, spec) = (st.rt.clone(), st.spec.clone());
                tokio::spawn(async move {
                    let QueryMsg { q, reply } = *qm;
                    let r = AssertUnwindSafe(rt.answer(&spec, &q)).catch_unwind().await;
                    rt.release(&spec.agent.id, false, 0);
                    match r {
                        Ok(r) => {
                            let _ = reply.send(r);
                        }
                        Err(_) => {
                            let _ = reply.send(Err(Error::Unavailable("the agent crashed".into())));
                            let _ = myself.cast(AgentMsg::Crash("a question panicked".into()));
                        }
                    }
                });
            }
            AgentMsg::Crash(why) => return Err(why.into()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_comes_from_the_text() {
        assert_eq!(confidence("", true), 0.0);
        let varied = confidence("the plan has three distinct steps", true);
        let looping = confidence("the the the the the the", true);
        assert!(varied > looping);
        assert!(confidence("the plan has three distinct steps", false) < varied);
    }
}
