//! The models this node serves, behind [`LocalModels`] (what `swarm_actors::ClusterInference`
//! calls for them): each configured model loads on a thread of its own in the background (the
//! node serves meanwhile, and `/health` says `loading`), then runs in a supervised actor that
//! owns its engine and gets a fresh one after a crash, within a restart budget. A request is
//! rendered with the model's chat template (messages) or taken as it is (a prompt), tokenised,
//! queued on the engine, and its engine events become [`Chunk`]s. Dropping the generation drops
//! the engine's event receiver, which cancels the sequence and frees its KV blocks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use ractor::ActorRef;
use swarm_actors::inference::{
    BoxFuture, Chunk, Failure, FailureCode, Generation, Input, LocalModel, LocalModels,
    ModelStatus, Request, Sampling, Usage,
};
use swarm_config::{ModelEntry, NodeConfig};
use tokio::sync::watch;
use tracing::{Instrument, Span};

use crate::{
    ChatMessage, EngineConfig, EngineHandle, Event, FinishReason, InferError, InferenceMsg,
    InferenceSupervisor, SamplingParams, SchedulerConfig, Served, TextTokenizer, catalog,
};

/// Restarts of a model's actor (each with a fresh engine) allowed per minute.
const RESTARTS_PER_MINUTE: usize = 3;

impl From<InferError> for Failure {
    fn from(e: InferError) -> Self {
        let code = match e.kind() {
            "invalid_request" => FailureCode::InvalidField,
            "context_length_exceeded" => FailureCode::ContextLengthExceeded,
            "overloaded" => FailureCode::Overloaded,
            "model_unavailable" | "engine_stopped" => FailureCode::ModelUnavailable,
            _ => FailureCode::Internal,
        };
        Failure {
            code,
            field: e.field().map(str::to_string),
            message: e.to_string(),
        }
    }
}

/// A count for the wire (saturating: no generation comes near `u32::MAX` tokens).
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The engine's parameters for a request; `default_max_tokens` when it gives none.
fn sampling_params(s: Sampling, default_max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: s.max_tokens.map_or(default_max_tokens, |m| {
            usize::try_from(m).unwrap_or(usize::MAX)
        }),
        temperature: s.temperature,
        top_k: usize::try_from(s.top_k).unwrap_or(usize::MAX),
        top_p: s.top_p,
        seed: s.seed,
        stop: s.stop,
        ignore_eos: s.ignore_eos,
    }
}

fn chunk_of(ev: Option<Event>) -> Chunk {
    match ev {
        Some(Event::Text(t)) => Chunk::Text(t),
        Some(Event::Done {
            reason,
            prompt_tokens,
            completion_tokens,
        }) => Chunk::Done(Usage {
            finish_reason: match reason {
                FinishReason::Stop => swarm_actors::inference::FinishReason::Stop,
                FinishReason::Length => swarm_actors::inference::FinishReason::Length,
            },
            prompt_tokens: count(prompt_tokens),
            completion_tokens: count(completion_tokens),
        }),
        Some(Event::Failed(e)) => Chunk::Failed(e.into()),
        None => Chunk::Failed(Failure::unavailable(
            "the inference engine restarted; the request was lost",
        )),
    }
}

/// Where a configured model's files are: its `path`, else the catalog's folder for it under
/// `inference.model_dir`, else `<model_dir>/<name>.gguf` or `<model_dir>/<name>`.
pub fn resolve_model(cfg: &NodeConfig, m: &ModelEntry) -> Result<PathBuf, String> {
    if let Some(p) = &m.path {
        return Ok(cfg.resolve(p));
    }
    let dir = cfg.resolve(&cfg.inference.model_dir);
    if let Some(entry) = catalog::find(&m.name) {
        return catalog::installed(&entry, &dir).ok_or_else(|| {
            format!(
                "{} is not in {}: run `swarm model pull {}`",
                m.name,
                dir.display(),
                m.name
            )
        });
    }
    let candidates = [dir.join(format!("{}.gguf", m.name)), dir.join(&m.name)];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| format!("no {} in {} and not in the catalog", m.name, dir.display()))
}

/// One model this node serves.
#[derive(Debug)]
pub struct ServedModel {
    name: String,
    state: RwLock<ModelState>,
    slots: usize,
}

#[derive(Debug, Clone)]
enum ModelState {
    Loading,
    /// Weights loaded; the supervised actor's current state is on `served`.
    Loaded {
        served: watch::Receiver<Served>,
        tokenizer: Arc<TextTokenizer>,
    },
    Unavailable(String),
}

impl ServedModel {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn state(&self) -> ModelState {
        self.state
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set(&self, state: ModelState) {
        let mut g = self.state.write().unwrap_or_else(|p| p.into_inner());
        *g = state;
    }

    /// Loading (weights, or the actor (re)starting its engine), ready, or unavailable and why.
    pub fn status(&self) -> ModelStatus {
        match self.state() {
            ModelState::Loading => ModelStatus::Loading,
            ModelState::Loaded { served, .. } => match &*served.borrow() {
                Served::Starting => ModelStatus::Loading,
                Served::Running { engine, .. } => match engine.stopped_reason() {
                    None => ModelStatus::Ready,
                    Some(why) => ModelStatus::Unavailable(why),
                },
                Served::Down(why) => ModelStatus::Unavailable(why.clone()),
            },
            ModelState::Unavailable(why) => ModelStatus::Unavailable(why),
        }
    }

    /// The running actor and its engine.
    fn running(&self) -> Option<(ActorRef<InferenceMsg>, EngineHandle)> {
        match self.state() {
            ModelState::Loaded { served, .. } => match &*served.borrow() {
                Served::Running { actor, engine } if engine.stopped_reason().is_none() => {
                    Some((actor.clone(), engine.clone()))
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// The engine, when the model is loaded and its engine runs (for its statistics).
    pub fn engine(&self) -> Option<EngineHandle> {
        self.running().map(|(_, e)| e)
    }

    fn ready(&self) -> Result<(ActorRef<InferenceMsg>, Arc<TextTokenizer>), Failure> {
        let tokenizer = match self.state() {
            ModelState::Loaded { tokenizer, .. } => tokenizer,
            ModelState::Loading => {
                return Err(Failure::unavailable(format!(
                    "model {} is still loading",
                    self.name
                )));
            }
            ModelState::Unavailable(why) => {
                return Err(Failure::unavailable(format!(
                    "model {} is unavailable: {why}",
                    self.name
                )));
            }
        };
        match self.running() {
            Some((actor, _)) => Ok((actor, tokenizer)),
            None => Err(Failure::unavailable(format!(
                "model {} is unavailable: {}",
                self.name,
                self.status()
            ))),
        }
    }
}

/// The models this node serves.
#[derive(Debug)]
pub struct LocalServer {
    node: String,
    models: BTreeMap<String, Arc<ServedModel>>,
    default_max_tokens: usize,
}

impl LocalServer {
    /// Starts loading every model of `cfg.inference` in the background.
    pub async fn start(cfg: &NodeConfig) -> Arc<Self> {
        let inf = &cfg.inference;
        let engine = EngineConfig {
            scheduler: SchedulerConfig {
                max_waiting: inf.max_waiting,
                max_running: inf.max_running,
                prefill_tokens: inf.prefill_tokens,
            },
            kv_tokens: inf.kv_tokens,
            block_size: inf.kv_block_tokens,
            prefix_cache_tokens: inf.prefix_cache_tokens,
            ..EngineConfig::default()
        };
        let models = inf
            .models
            .iter()
            .map(|m| (m.name.clone(), resolve_model(cfg, m)))
            .collect();
        let supervisor = match InferenceSupervisor::start(RESTARTS_PER_MINUTE).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "no inference supervisor; models are unavailable");
                None
            }
        };
        Self::new(
            &cfg.node.name,
            models,
            engine,
            inf.default_max_tokens,
            supervisor,
        )
    }

    /// Serves `models` (name, file or folder, or why there is none) with engines of `engine`'s
    /// limits under `supervisor` (none: every model is unavailable). A request without
    /// `max_tokens` gets `default_max_tokens`.
    pub fn new(
        node: &str,
        models: Vec<(String, Result<PathBuf, String>)>,
        engine: EngineConfig,
        default_max_tokens: usize,
        supervisor: Option<InferenceSupervisor>,
    ) -> Arc<Self> {
        let mut served = BTreeMap::new();
        for (name, path) in models {
            let model = Arc::new(ServedModel {
                name: name.clone(),
                state: RwLock::new(ModelState::Loading),
                slots: engine.scheduler.max_running,
            });
            served.insert(name.clone(), model.clone());
            let sup = supervisor.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("load-{name}"))
                .spawn(move || load(&model, path, engine, sup));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a model loader thread");
            }
        }
        Arc::new(Self {
            node: node.to_string(),
            models: served,
            default_max_tokens,
        })
    }

    /// Every configured model, by name.
    pub fn served(&self) -> impl Iterator<Item = &Arc<ServedModel>> {
        self.models.values()
    }

    /// Tokenises and queues on this node's engine; a task forwards its events as chunks.
    async fn start_local(&self, req: Request) -> Result<Generation, Failure> {
        let model = self.models.get(&req.model).ok_or_else(|| {
            Failure::new(
                FailureCode::ModelNotFound,
                format!("{} does not serve model `{}`", self.node, req.model),
            )
        })?;
        let (actor, tokenizer) = model.ready()?;
        let text = match req.input {
            Input::Chat(messages) => {
                let messages: Vec<ChatMessage> = messages
                    .into_iter()
                    .map(|m| ChatMessage {
                        role: m.role,
                        content: m.content,
                    })
                    .collect();
                tokenizer.apply_chat_template(&messages)?
            }
            Input::Prompt(p) => p,
        };
        let ids = tokenizer.encode(&text)?;
        let params = sampling_params(req.sampling, self.default_max_tokens);
        let mut queued = crate::submit(&actor, ids, params).await?;
        tracing::debug!(prompt_tokens = queued.prompt_tokens, "generation queued");
        let (tx, generation) = Generation::channel(self.node.clone(), count(queued.prompt_tokens));
        let forward = async move {
            loop {
                let ev = tokio::select! {
                    ev = queued.events.recv() => ev,
                    // The reader went away: dropping `queued` cancels the sequence.
                    _ = tx.closed() => break,
                };
                let chunk = chunk_of(ev);
                let end = !matches!(chunk, Chunk::Text(_));
                if tx.send(chunk).await.is_err() || end {
                    break;
                }
            }
        };
        tokio::spawn(forward.instrument(Span::current()));
        Ok(generation)
    }
}

impl LocalModels for LocalServer {
    fn models(&self) -> Vec<LocalModel> {
        self.models
            .values()
            .map(|m| LocalModel {
                name: m.name.clone(),
                status: m.status(),
                load: m
                    .engine()
                    .map_or(0, |e| u32::try_from(e.stats().load()).unwrap_or(u32::MAX)),
                slots: count(m.slots),
            })
            .collect()
    }

    fn generate(&self, req: Request) -> BoxFuture<'_, Result<Generation, Failure>> {
        Box::pin(self.start_local(req))
    }
}

fn load(
    model: &ServedModel,
    path: Result<PathBuf, String>,
    config: EngineConfig,
    supervisor: Option<InferenceSupervisor>,
) {
    let started = std::time::Instant::now();
    let result = path.map_err(InferError::ModelUnavailable).and_then(|path| {
        let supervisor = supervisor
            .ok_or_else(|| InferError::EngineStopped("no inference supervisor".into()))?;
        let (weights, tokenizer) = crate::load(&path)?;
        let tokenizer = Arc::new(tokenizer);
        let start = crate::starter(Arc::new(weights), tokenizer.clone(), config);
        let served = supervisor.serve(&model.name, start)?;
        Ok((served, tokenizer))
    });
    match result {
        Ok((served, tokenizer)) => {
            tracing::info!(model = %model.name, secs = started.elapsed().as_secs_f32(), "model loaded");
            model.set(ModelState::Loaded { served, tokenizer });
        }
        Err(e) => {
            tracing::error!(model = %model.name, error = %e, "model unavailable");
            model.set(ModelState::Unavailable(e.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_keep_their_code_and_field() {
        let f: Failure = InferError::Overloaded(3).into();
        assert_eq!(f.code, FailureCode::Overloaded);
        let f: Failure = InferError::ContextLength {
            field: "max_tokens",
            tokens: 9,
            limit: 4,
        }
        .into();
        assert_eq!(
            (f.code, f.field.as_deref()),
            (FailureCode::ContextLengthExceeded, Some("max_tokens"))
        );
        let f: Failure = InferError::EngineStopped("x".into()).into();
        assert_eq!(f.code, FailureCode::ModelUnavailable);
    }

    #[test]
    fn a_request_without_max_tokens_gets_the_default() {
        let p = sampling_params(Sampling::default(), 16);
        assert_eq!((p.max_tokens, p.temperature, p.top_k), (16, 1.0, 0));
        let p = sampling_params(
            Sampling {
                max_tokens: Some(3),
                top_k: 5,
                ..Sampling::default()
            },
            16,
        );
        assert_eq!((p.max_tokens, p.top_k), (3, 5));
    }

    #[tokio::test]
    async fn a_model_without_a_file_is_unavailable_and_says_why() {
        let server = LocalServer::new(
            "n1",
            vec![("ghost".into(), Err("no ghost.gguf".into()))],
            EngineConfig::default(),
            16,
            None,
        );
        let mut status = ModelStatus::Loading;
        for _ in 0..200 {
            status = server.models()[0].status.clone();
            if status != ModelStatus::Loading {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            matches!(&status, ModelStatus::Unavailable(why) if why.contains("no ghost.gguf")),
            "{status}"
        );
        let req = Request {
            model: "ghost".into(),
            input: Input::Prompt("x".into()),
            sampling: Sampling::default(),
        };
        let f = server.generate(req.clone()).await.err().map(|f| f.code);
        assert_eq!(f, Some(FailureCode::ModelUnavailable));
        let other = Request {
            model: "other".into(),
            ..req
        };
        let f = server.generate(other).await.err().map(|f| f.code);
        assert_eq!(f, Some(FailureCode::ModelNotFound));
    }
}
