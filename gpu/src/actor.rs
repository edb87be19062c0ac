//! Inference actors: one ractor actor per served model, under one supervisor per node.
//!
//! The actor owns its model's engine (started in `pre_start` from the loaded weights) and takes
//! `Submit` messages; it checks the engine every second and fails when the engine has stopped
//! (crashed past its own restart budget). The supervisor then starts a fresh actor, and with it a
//! fresh engine, on the same weights: at most `restarts_per_minute` times a minute, after which
//! the model stays down and says why. Every (re)start is published on a watch channel, which is
//! how the gateway always reaches the current actor and engine.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;

use crate::engine::{EngineConfig, EngineHandle, Generation};
use crate::error::{InferError, Result};
use crate::model::LanguageModel;
use crate::sampling::SamplingParams;
use crate::tokenizer::TextTokenizer;

/// How often an actor checks that its engine still runs.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What an inference actor accepts (local only: peers reach it through the gateway's stream).
pub enum InferenceMsg {
    /// Queue a prompt; the reply is the generation or why it was refused.
    Submit(Vec<u32>, SamplingParams, RpcReplyPort<Result<Generation>>),
    /// Fail if the engine has stopped.
    Check,
}

impl ractor::Message for InferenceMsg {}

impl std::fmt::Debug for InferenceMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Submit(p, _, _) => f.debug_tuple("Submit").field(&p.len()).finish(),
            Self::Check => f.write_str("Check"),
        }
    }
}

/// The current actor of a model and its engine (for stats), or why there is none.
#[derive(Debug, Clone)]
pub enum Served {
    Starting,
    Running {
        actor: ActorRef<InferenceMsg>,
        engine: EngineHandle,
    },
    Down(String),
}

/// Starts an engine on a model's weights (type-erased, so actors are not generic).
pub type EngineStarter = Arc<dyn Fn() -> Result<EngineHandle> + Send + Sync>;

/// A starter for `model` with `tokenizer` and `config`.
pub fn starter<M: LanguageModel>(
    model: Arc<M>,
    tokenizer: Arc<TextTokenizer>,
    config: EngineConfig,
) -> EngineStarter {
    Arc::new(move || EngineHandle::start(model.clone(), tokenizer.clone(), config))
}

/// One model's actor.
#[derive(Debug)]
struct InferenceActor;

struct ActorState {
    engine: EngineHandle,
}

impl Actor for InferenceActor {
    type Msg = InferenceMsg;
    type State = ActorState;
    type Arguments = (EngineStarter, watch::Sender<Served>);

    async fn pre_start(
        &self,
        myself: ActorRef<InferenceMsg>,
        (start, served): Self::Arguments,
    ) -> Result<ActorState, ActorProcessingErr> {
        let engine = start()?;
        myself.send_interval(CHECK_EVERY, || InferenceMsg::Check);
        served.send_replace(Served::Running {
            actor: myself.clone(),
            engine: engine.clone(),
        });
        Ok(ActorState { engine })
    }

    async fn handle(
        &self,
        _myself: ActorRef<InferenceMsg>,
        msg: InferenceMsg,
        state: &mut ActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            InferenceMsg::Submit(prompt, params, reply) => {
                // The caller may have gone; nothing to do then (the generation drops: cancelled).
                let _ = reply.send(state.engine.submit(prompt, params));
            }
            InferenceMsg::Check => {
                if let Some(why) = state.engine.stopped_reason() {
                    return Err(format!("engine stopped: {why}").into());
                }
            }
        }
        Ok(())
    }
}

/// Supervises the inference actors of one node.
#[derive(Debug)]
struct Supervisor;

struct Child {
    name: String,
    start: EngineStarter,
    served: watch::Sender<Served>,
    restarts: Vec<Instant>,
}

struct SupervisorState {
    children: HashMap<ractor::ActorId, Child>,
    restarts_per_minute: usize,
}

/// Messages to the supervisor.
pub(crate) enum SupervisorMsg {
    /// Serve a model: spawn its actor (linked) and keep it running.
    Serve(String, EngineStarter, watch::Sender<Served>),
}

impl ractor::Message for SupervisorMsg {}

impl std::fmt::Debug for SupervisorMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Serve(name, _, _) => f.debug_tuple("Serve").field(name).finish(),
        }
    }
}

async fn spawn_child(myself: &ActorRef<SupervisorMsg>, child: Child, state: &mut SupervisorState) {
    let args = (child.start.clone(), child.served.clone());
    match Actor::spawn_linked(None, InferenceActor, args, myself.get_cell()).await {
        Ok((actor, _)) => {
            state.children.insert(actor.get_id(), child);
        }
        Err(e) => {
            tracing::error!(model = %child.name, error = %e, "inference actor did not start");
            child
                .served
                .send_replace(Served::Down(format!("the engine did not start: {e}")));
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = usize;

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        restarts_per_minute: usize,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            children: HashMap::new(),
            restarts_per_minute,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisorMsg::Serve(name, start, served) = msg;
        let child = Child {
            name,
            start,
            served,
            restarts: Vec::new(),
        };
        spawn_child(&myself, child, state).await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why): (ActorCell, String) = match evt {
            SupervisionEvent::ActorFailed(cell, e) => (cell, e.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let Some(mut child) = state.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        let now = Instant::now();
        child
            .restarts
            .retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        if child.restarts.len() >= state.restarts_per_minute {
            tracing::error!(model = %child.name, %why, "inference actor failed past its restart budget; the model stays down");
            child.served.send_replace(Served::Down(why));
            return Ok(());
        }
        child.restarts.push(now);
        tracing::warn!(model = %child.name, %why, "inference actor failed; restarting it with a fresh engine");
        child.served.send_replace(Served::Starting);
        spawn_child(&myself, child, state).await;
        Ok(())
    }
}

/// The node's inference supervisor.
#[derive(Debug, Clone)]
pub struct InferenceSupervisor {
    actor: ActorRef<SupervisorMsg>,
}

impl InferenceSupervisor {
    /// Starts the supervisor (unnamed: tests may run several in one process).
    pub async fn start(restarts_per_minute: usize) -> Result<Self> {
        let (actor, _) = Actor::spawn(None, Supervisor, restarts_per_minute)
            .await
            .map_err(|e| InferError::EngineStopped(format!("supervisor did not start: {e}")))?;
        Ok(Self { actor })
    }

    /// Serves a model; its actor's (re)starts are published on the returned channel.
    pub fn serve(&self, name: &str, start: EngineStarter) -> Result<watch::Receiver<Served>> {
        let (tx, rx) = watch::channel(Served::Starting);
        self.actor
            .send_message(SupervisorMsg::Serve(name.to_string(), start, tx))
            .map_err(|e| InferError::EngineStopped(format!("supervisor is gone: {e}")))?;
        Ok(rx)
    }

    pub fn stop(&self) {
        self.actor.stop(None);
    }
}

/// Asks a model's actor to queue a prompt.
pub async fn submit(
    actor: &ActorRef<InferenceMsg>,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> Result<Generation> {
    match actor
        .call(
            |reply| InferenceMsg::Submit(prompt, params, reply),
            Some(Duration::from_secs(10)),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(r)) => r,
        Ok(_) => Err(InferError::EngineStopped(
            "the inference actor did not answer".into(),
        )),
        Err(e) => Err(InferError::EngineStopped(format!(
            "the inference actor is gone: {e}"
        ))),
    }
}
