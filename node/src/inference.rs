//! Inference on this node and across the cluster: the models this node serves (loaded in the
//! background, each with its own engine thread), routing a request to the least-loaded node that
//! serves the model (gossip metadata plus what this gateway has in flight there), and the QUIC
//! stream (kind [`STREAM_INFERENCE`]) that carries a request to a peer and its tokens back.
//!
//! Wire format on that stream: frames of a 4-byte big-endian length and a JSON body (at most
//! [`MAX_FRAME`]). The caller sends one [`WireRequest`]; the server answers `accepted` (or
//! `failed`), then `text` frames and a final `done` or `failed`. Either side dropping its end
//! cancels the sequence.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use swarm_config::{ModelEntry, NodeConfig};
use swarm_gpu::{
    ChatMessage, EngineConfig, EngineHandle, Event, InferError, InferenceMsg, InferenceSupervisor,
    SamplingParams, SchedulerConfig, Served, TextTokenizer, catalog,
};
use swarm_membership::{MemberState, Membership, ModelMeta};
use tokio::sync::mpsc;

use crate::error::AppError;

/// Stream kind of an inference request between peers.
pub const STREAM_INFERENCE: u8 = 4;
/// Largest frame on the inference stream.
pub const MAX_FRAME: usize = 1 << 20;
/// Restarts of a model's actor (each with a fresh engine) allowed per minute.
const RESTARTS_PER_MINUTE: usize = 3;
/// How long a peer may take to accept or refuse a request.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a generation could not run, as it travels between nodes and out to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// A stable code: `invalid_field`, `context_length_exceeded`, `overloaded`,
    /// `model_unavailable`, `model_not_found`, `internal`.
    pub code: String,
    pub field: Option<String>,
    pub message: String,
}

impl Failure {
    fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            field: None,
            message: message.into(),
        }
    }
}

impl From<InferError> for Failure {
    fn from(e: InferError) -> Self {
        let code = match e.kind() {
            "invalid_request" => "invalid_field",
            "context_length_exceeded" => "context_length_exceeded",
            "overloaded" => "overloaded",
            "model_unavailable" | "engine_stopped" => "model_unavailable",
            _ => "internal",
        };
        Self {
            code: code.into(),
            field: e.field().map(str::to_string),
            message: e.to_string(),
        }
    }
}

impl From<Failure> for AppError {
    fn from(f: Failure) -> Self {
        let bad_request = |code| AppError::BadRequest {
            code,
            message: f.message.clone(),
            field: f.field.clone(),
        };
        match f.code.as_str() {
            "invalid_field" => bad_request("invalid_field"),
            "context_length_exceeded" => bad_request("context_length_exceeded"),
            "overloaded" => AppError::Overloaded {
                class: "inference",
                retry_after_s: 1,
            },
            "model_not_found" => AppError::ModelNotFound(f.message),
            "model_unavailable" => AppError::ModelUnavailable(f.message),
            _ => AppError::Internal(f.message),
        }
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// Messages, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw prompt text.
    Prompt(String),
}

/// One request on the inference stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireRequest {
    pub model: String,
    pub input: Input,
    pub params: SamplingParams,
}

/// What comes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Chunk {
    Accepted {
        prompt_tokens: usize,
    },
    Text(String),
    Done {
        finish_reason: String,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(Failure),
}

/// Decodes one frame body (the bytes after the length).
pub fn decode_frame<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| Failure::new("internal", format!("bad frame: {e}")))
}

async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, value: &T) -> Result<(), Failure> {
    let body = serde_json::to_vec(value).map_err(|e| Failure::new("internal", e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| Failure::new("internal", "frame too large"))?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| Failure::new("model_unavailable", format!("peer stream: {e}")))?;
    send.write_all(&body)
        .await
        .map_err(|e| Failure::new("model_unavailable", format!("peer stream: {e}")))
}

async fn read_frame<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
) -> Result<T, Failure> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| Failure::new("model_unavailable", format!("peer stream: {e}")))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(Failure::new(
            "internal",
            format!("frame of {len} bytes is too large"),
        ));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| Failure::new("model_unavailable", format!("peer stream: {e}")))?;
    decode_frame(&body)
}

/// A model this node serves.
#[derive(Debug)]
pub struct LocalModel {
    pub name: String,
    state: RwLock<ModelState>,
    slots: usize,
}

#[derive(Debug, Clone)]
enum ModelState {
    Loading,
    /// Weights loaded; the supervised actor's current state is on `served`.
    Loaded {
        served: tokio::sync::watch::Receiver<Served>,
        tokenizer: Arc<TextTokenizer>,
    },
    Unavailable(String),
}

impl LocalModel {
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

    /// `ready`, `loading`, or `unavailable: why`.
    pub fn status(&self) -> String {
        match self.state() {
            ModelState::Loading => "loading".into(),
            ModelState::Loaded { served, .. } => match &*served.borrow() {
                Served::Starting => "loading".into(),
                Served::Running { engine, .. } => match engine.stopped_reason() {
                    None => "ready".into(),
                    Some(why) => format!("unavailable: {why}"),
                },
                Served::Down(why) => format!("unavailable: {why}"),
            },
            ModelState::Unavailable(why) => format!("unavailable: {why}"),
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

    /// The engine, when the model is loaded and its engine runs.
    pub fn engine(&self) -> Option<EngineHandle> {
        self.running().map(|(_, e)| e)
    }

    fn ready(&self) -> Result<(ActorRef<InferenceMsg>, Arc<TextTokenizer>), Failure> {
        let tokenizer = match self.state() {
            ModelState::Loaded { tokenizer, .. } => tokenizer,
            ModelState::Loading => {
                return Err(Failure::new(
                    "model_unavailable",
                    format!("model {} is still loading", self.name),
                ));
            }
            ModelState::Unavailable(why) => {
                return Err(Failure::new(
                    "model_unavailable",
                    format!("model {} is unavailable: {why}", self.name),
                ));
            }
        };
        match self.running() {
            Some((actor, _)) => Ok((actor, tokenizer)),
            None => Err(Failure::new(
                "model_unavailable",
                format!("model {} is unavailable: {}", self.name, self.status()),
            )),
        }
    }
}

/// A started generation: its prompt size and its chunks (`text`, then `done` or `failed`).
#[derive(Debug)]
pub struct Started {
    pub prompt_tokens: usize,
    pub chunks: mpsc::Receiver<Chunk>,
    /// The node that runs it.
    pub node: String,
}

/// Where a request runs.
#[derive(Debug, Clone)]
enum Target {
    Local(Arc<LocalModel>),
    Remote(String),
}

/// Models served here and routing to peers.
#[derive(Debug)]
pub struct Inference {
    node: String,
    local: HashMap<String, Arc<LocalModel>>,
    membership: Option<Membership>,
    /// Requests this gateway has running on each peer (fresher than gossip).
    sent: Mutex<HashMap<String, Arc<AtomicU64>>>,
    default_max_tokens: usize,
}

/// Where a configured model's files are.
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

impl Inference {
    /// Starts loading every configured model in the background (the node serves meanwhile;
    /// `/health` says `loading`).
    pub async fn start(cfg: &NodeConfig, membership: Option<Membership>) -> Arc<Self> {
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
            membership,
            supervisor,
        )
    }

    /// Serves `models` (name, file or folder) with engines of `engine`'s limits.
    pub fn new(
        node: &str,
        models: Vec<(String, Result<PathBuf, String>)>,
        engine: EngineConfig,
        default_max_tokens: usize,
        membership: Option<Membership>,
        supervisor: Option<InferenceSupervisor>,
    ) -> Arc<Self> {
        let mut local = HashMap::new();
        for (name, path) in models {
            let model = Arc::new(LocalModel {
                name: name.clone(),
                state: RwLock::new(ModelState::Loading),
                slots: engine.scheduler.max_running,
            });
            local.insert(name.clone(), model.clone());
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
            local,
            membership,
            sent: Mutex::default(),
            default_max_tokens,
        })
    }

    /// `max_tokens` of a request that gives none.
    pub fn default_max_tokens(&self) -> usize {
        self.default_max_tokens
    }

    /// Models served here, by name.
    pub fn local(&self) -> impl Iterator<Item = &Arc<LocalModel>> {
        self.local.values()
    }

    /// What this node advertises in gossip: its ready models and their load.
    pub fn advertised(&self) -> Vec<ModelMeta> {
        let mut out: Vec<ModelMeta> = self
            .local
            .values()
            .filter_map(|m| {
                m.engine().map(|e| ModelMeta {
                    name: m.name.clone(),
                    load: u32::try_from(e.stats().load()).unwrap_or(u32::MAX),
                    slots: u32::try_from(m.slots).unwrap_or(u32::MAX),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Every model served in the cluster now, with the nodes that serve it.
    pub fn cluster_models(&self) -> Vec<(String, Vec<String>)> {
        let mut by_model: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for m in self.local.values() {
            if m.engine().is_some() {
                by_model
                    .entry(m.name.clone())
                    .or_default()
                    .push(self.node.clone());
            }
        }
        if let Some(ms) = &self.membership {
            for member in ms.view().members {
                if member.name == self.node || !matches!(member.state, MemberState::Alive) {
                    continue;
                }
                for model in member.meta.map(|m| m.models).unwrap_or_default() {
                    by_model
                        .entry(model.name)
                        .or_default()
                        .push(member.name.clone());
                }
            }
        }
        by_model.into_iter().collect()
    }

    /// Picks the least-loaded node serving `model` (load per slot; this node wins ties).
    fn route(&self, model: &str) -> Result<Target, Failure> {
        let mut best: Option<(f64, Target)> = None;
        let local = self.local.get(model);
        if let Some(m) = local
            && let Some(engine) = m.engine()
        {
            let score = engine.stats().load() as f64 / m.slots.max(1) as f64;
            best = Some((score, Target::Local(m.clone())));
        }
        if let Some(ms) = &self.membership {
            let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            for member in ms.view().members {
                if member.name == self.node || !matches!(member.state, MemberState::Alive) {
                    continue;
                }
                let Some(meta) = member.meta else { continue };
                let Some(mm) = meta.models.iter().find(|m| m.name == model) else {
                    continue;
                };
                let mine = sent.get(&member.name).map_or(0, |c| c.load(Relaxed));
                let load = u64::from(mm.load).max(mine);
                let score = load as f64 / f64::from(mm.slots.max(1));
                if best.as_ref().is_none_or(|(b, _)| score < *b) {
                    best = Some((score, Target::Remote(member.name.clone())));
                }
            }
        }
        match (best, local) {
            (Some((_, t)), _) => Ok(t),
            (None, Some(m)) => m.ready().map(|_| Target::Local(m.clone())),
            (None, None) => Err(Failure::new(
                "model_not_found",
                format!("no node of this cluster serves model `{model}`"),
            )),
        }
    }

    /// Routes and starts a generation; fails before any token when it cannot run.
    pub async fn generate(self: &Arc<Self>, req: WireRequest) -> Result<Started, Failure> {
        match self.route(&req.model)? {
            Target::Local(m) => {
                let (n, rx) = start_local(&m, req.input, req.params).await?;
                Ok(Started {
                    prompt_tokens: n,
                    chunks: rx,
                    node: self.node.clone(),
                })
            }
            Target::Remote(peer) => self.start_remote(peer, req).await,
        }
    }

    async fn start_remote(
        self: &Arc<Self>,
        peer: String,
        req: WireRequest,
    ) -> Result<Started, Failure> {
        let ms = self
            .membership
            .as_ref()
            .ok_or_else(|| Failure::new("model_unavailable", "no cluster"))?;
        let (mut send, mut recv) = ms
            .open_stream(&peer, STREAM_INFERENCE)
            .await
            .map_err(|e| Failure::new("model_unavailable", format!("{peer}: {e}")))?;
        write_frame(&mut send, &req).await?;
        let first = tokio::time::timeout(ACCEPT_TIMEOUT, read_frame::<Chunk>(&mut recv))
            .await
            .map_err(|_| Failure::new("model_unavailable", format!("{peer} did not answer")))??;
        let prompt_tokens = match first {
            Chunk::Accepted { prompt_tokens } => prompt_tokens,
            Chunk::Failed(f) => return Err(f),
            other => {
                return Err(Failure::new(
                    "internal",
                    format!("{peer} answered {other:?} first"),
                ));
            }
        };
        let counter = {
            let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            sent.entry(peer.clone()).or_default().clone()
        };
        counter.fetch_add(1, Relaxed);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let chunk = tokio::select! {
                    c = read_frame::<Chunk>(&mut recv) => c.unwrap_or_else(Chunk::Failed),
                    _ = tx.closed() => break,
                };
                let end = matches!(chunk, Chunk::Done { .. } | Chunk::Failed(_));
                if tx.send(chunk).await.is_err() || end {
                    break;
                }
            }
            // Dropping both halves tells the peer to stop (cancels the sequence there).
            let _ = send.reset(0u32.into());
            counter.fetch_sub(1, Relaxed);
        });
        Ok(Started {
            prompt_tokens,
            chunks: rx,
            node: peer,
        })
    }

    /// Serves a peer's request on this node's own models (never forwarded again).
    pub fn serve_peer(
        self: &Arc<Self>,
        peer: String,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let req = match tokio::time::timeout(
                ACCEPT_TIMEOUT,
                read_frame::<WireRequest>(&mut recv),
            )
            .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(f)) => {
                    tracing::debug!(%peer, error = %f.message, "bad inference request from a peer");
                    let _ = write_frame(&mut send, &Chunk::Failed(f)).await;
                    return;
                }
                Err(_) => return,
            };
            let started = match me.local.get(&req.model) {
                Some(m) => start_local(m, req.input, req.params).await,
                None => Err(Failure::new(
                    "model_not_found",
                    format!("{} does not serve model `{}`", me.node, req.model),
                )),
            };
            let (prompt_tokens, mut chunks) = match started {
                Ok(s) => s,
                Err(f) => {
                    let _ = write_frame(&mut send, &Chunk::Failed(f)).await;
                    let _ = send.finish();
                    return;
                }
            };
            if write_frame(&mut send, &Chunk::Accepted { prompt_tokens })
                .await
                .is_err()
            {
                return;
            }
            loop {
                let chunk = tokio::select! {
                    c = chunks.recv() => c,
                    _ = send.stopped() => None,
                };
                let Some(chunk) = chunk else { break };
                let end = matches!(chunk, Chunk::Done { .. } | Chunk::Failed(_));
                if write_frame(&mut send, &chunk).await.is_err() || end {
                    break;
                }
            }
            let _ = send.finish();
        });
    }
}

fn load(
    model: &LocalModel,
    path: Result<PathBuf, String>,
    config: EngineConfig,
    supervisor: Option<InferenceSupervisor>,
) {
    let started = std::time::Instant::now();
    let result = path.map_err(InferError::ModelUnavailable).and_then(|path| {
        let supervisor = supervisor
            .ok_or_else(|| InferError::EngineStopped("no inference supervisor".into()))?;
        let (weights, tokenizer) = swarm_gpu::load(&path)?;
        let tokenizer = Arc::new(tokenizer);
        let start = swarm_gpu::starter(Arc::new(weights), tokenizer.clone(), config);
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

/// Tokenizes and queues on this node's engine; a task forwards its events as chunks.
async fn start_local(
    model: &LocalModel,
    input: Input,
    params: SamplingParams,
) -> Result<(usize, mpsc::Receiver<Chunk>), Failure> {
    let (actor, tokenizer) = model.ready()?;
    let text = match input {
        Input::Chat(messages) => tokenizer.apply_chat_template(&messages)?,
        Input::Prompt(p) => p,
    };
    let ids = tokenizer.encode(&text)?;
    let mut generation = swarm_gpu::submit(&actor, ids, params).await?;
    let prompt_tokens = generation.prompt_tokens;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                ev = generation.events.recv() => ev,
                // The client went away: dropping the generation cancels the sequence.
                _ = tx.closed() => break,
            };
            let chunk = match ev {
                Some(Event::Text(t)) => Chunk::Text(t),
                Some(Event::Done {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => Chunk::Done {
                    finish_reason: reason.as_str().into(),
                    prompt_tokens,
                    completion_tokens,
                },
                Some(Event::Failed(e)) => Chunk::Failed(e.into()),
                None => Chunk::Failed(Failure::new(
                    "model_unavailable",
                    "the inference engine restarted; the request was lost",
                )),
            };
            let end = !matches!(chunk, Chunk::Text(_));
            if tx.send(chunk).await.is_err() || end {
                break;
            }
        }
    });
    Ok((prompt_tokens, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let req = WireRequest {
            model: "m".into(),
            input: Input::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }]),
            params: SamplingParams {
                max_tokens: 3,
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                seed: Some(1),
                stop: vec!["x".into()],
                ignore_eos: false,
            },
        };
        let body = serde_json::to_vec(&req).unwrap_or_default();
        assert_eq!(decode_frame::<WireRequest>(&body), Ok(req));
        assert!(decode_frame::<Chunk>(b"\xff\x00{").is_err());
        let f: Failure = InferError::Overloaded(3).into();
        assert_eq!(f.code, "overloaded");
    }
}
