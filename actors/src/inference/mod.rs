//! Inference as the rest of the cluster sees it: agents and the gateway call [`Inference`] (list
//! the cluster's models; generate from chat messages or a prompt), and get a [`Generation`]: a
//! bounded stream of text [`Chunk`]s ending in a [`Usage`] or a [`Failure`]. Dropping the
//! generation cancels the sequence wherever it runs.
//!
//! - this file: the trait, the request and answer types, and [`LocalModels`], what the cluster
//!   implementation needs of the models this node serves (`swarm-gpu` implements it; this crate
//!   cannot depend on the engine).
//! - `cluster`: [`ClusterInference`], which routes each request to the least-loaded node serving
//!   the model (gossip metadata plus what this node has in flight there), the peer protocol's
//!   client and server, and [`InferencePeers`], the network it needs (QUIC through the membership
//!   service).
//! - `mem`: [`MemInferenceNet`], an in-memory network of `ClusterInference`s for tests, where a
//!   node can die mid-stream.
//! - `wire`: the frames on an inference stream.

mod cluster;
mod mem;
mod wire;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use cluster::{ClusterInference, InferencePeers, StreamPair};
pub use mem::MemInferenceNet;
#[cfg(feature = "fuzzing")]
pub use wire::fuzz_decode_frames;

/// A boxed future, so that the traits here are object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Chunks a generation buffers between its producer and its reader; a slow reader slows the
/// producer (the engine keeps decoding; its events queue on their own bounded channel).
pub const GENERATION_BUFFER: usize = 64;

/// What agents and the gateway call to run a model anywhere in the cluster.
pub trait Inference: Send + Sync {
    /// Every model served in the cluster now, with the nodes that serve it, sorted by name.
    fn models(&self) -> Vec<ClusterModel>;

    /// Starts a generation on the least-loaded node serving `req.model`. Fails before any text
    /// when it cannot run (unknown model, invalid field, overloaded, no node reachable).
    fn generate(&self, req: Request) -> BoxFuture<'_, Result<Generation, Failure>>;
}

/// The models this node serves, as the cluster implementation calls them.
pub trait LocalModels: Send + Sync {
    /// Every model this node is configured to serve, whatever its state.
    fn models(&self) -> Vec<LocalModel>;

    /// Starts a generation on this node's engine (never forwarded). A model this node does not
    /// serve is `model_not_found`; one that is loading or down is `model_unavailable`.
    fn generate(&self, req: Request) -> BoxFuture<'_, Result<Generation, Failure>>;
}

/// A model served in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterModel {
    pub name: String,
    /// Nodes that serve it now (this node first when it does).
    pub nodes: Vec<String>,
}

/// A model this node is configured to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModel {
    pub name: String,
    pub status: ModelStatus,
    /// Sequences running plus waiting.
    pub load: u32,
    /// Most sequences it runs at once.
    pub slots: u32,
}

/// Where a local model is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelStatus {
    /// Weights loading, or its engine (re)starting.
    Loading,
    /// Its engine runs.
    Ready,
    /// It cannot serve; why.
    Unavailable(String),
}

impl fmt::Display for ModelStatus {
    /// `loading`, `ready` or `unavailable: why`, as `/health` shows them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelStatus::Loading => f.write_str("loading"),
            ModelStatus::Ready => f.write_str("ready"),
            ModelStatus::Unavailable(why) => write!(f, "unavailable: {why}"),
        }
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub model: String,
    pub input: Input,
    pub sampling: Sampling,
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// Messages, rendered with the model's chat template.
    Chat(Vec<Message>),
    /// Raw prompt text.
    Prompt(String),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
}

/// How tokens are picked and when generation ends. The serving node validates every field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Most new tokens; `None`: the serving node's `inference.default_max_tokens`.
    pub max_tokens: Option<u32>,
    /// 0 is greedy; at most 2.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f32,
    /// Seed of the request's random generator (random when absent).
    pub seed: Option<u64>,
    /// Generation ends before any of these strings; it is not part of the output.
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token (benchmarks).
    pub ignore_eos: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_tokens: None,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// One piece of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunk {
    /// New text.
    Text(String),
    /// The end, with usage counts.
    Done(Usage),
    /// The generation failed after it started; nothing follows.
    Failed(Failure),
}

/// Why a generation ended and what it cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// `stop` or `length`, as OpenAI names them.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Why a generation could not run, as it travels between nodes and out to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: FailureCode,
    /// The request field at fault, if any.
    pub field: Option<String>,
    pub message: String,
}

/// The stable codes of a [`Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureCode {
    /// A request field is wrong (`field` names it).
    InvalidField,
    /// The prompt plus `max_tokens` is longer than the model's context.
    ContextLengthExceeded,
    /// The serving engine's queue is full: try again later.
    Overloaded,
    /// The model exists but cannot serve now (loading, down, its node unreachable).
    ModelUnavailable,
    /// No node of the cluster serves the model.
    ModelNotFound,
    /// Anything else (a bug, a protocol error).
    Internal,
}

impl FailureCode {
    /// A stable, lowercase code.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::InvalidField => "invalid_field",
            FailureCode::ContextLengthExceeded => "context_length_exceeded",
            FailureCode::Overloaded => "overloaded",
            FailureCode::ModelUnavailable => "model_unavailable",
            FailureCode::ModelNotFound => "model_not_found",
            FailureCode::Internal => "internal",
        }
    }
}

impl Failure {
    pub fn new(code: FailureCode, message: impl Into<String>) -> Self {
        Self {
            code,
            field: None,
            message: message.into(),
        }
    }

    /// A wrong request field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: FailureCode::InvalidField,
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(FailureCode::ModelUnavailable, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for Failure {}

/// A started generation: where it runs, its prompt size, and its chunks. Read it with
/// [`Generation::next`] (or as a `Stream`); drop it to cancel the sequence.
#[derive(Debug)]
pub struct Generation {
    node: String,
    prompt_tokens: u32,
    rx: mpsc::Receiver<Chunk>,
    ended: bool,
}

/// The producing side of a [`Generation`].
#[derive(Debug, Clone)]
pub struct ChunkSender {
    tx: mpsc::Sender<Chunk>,
}

/// The generation's reader is gone: stop producing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl ChunkSender {
    /// Waits for room, then queues `chunk`; `Cancelled` once the reader dropped the generation.
    pub async fn send(&self, chunk: Chunk) -> Result<(), Cancelled> {
        self.tx.send(chunk).await.map_err(|_| Cancelled)
    }

    /// Resolves when the reader drops the generation (to cancel work that sends nothing yet).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

impl Generation {
    /// A generation running on `node`, fed by the returned sender (at most
    /// [`GENERATION_BUFFER`] chunks buffered).
    pub fn channel(node: impl Into<String>, prompt_tokens: u32) -> (ChunkSender, Generation) {
        let (tx, rx) = mpsc::channel(GENERATION_BUFFER);
        (
            ChunkSender { tx },
            Generation {
                node: node.into(),
                prompt_tokens,
                rx,
                ended: false,
            },
        )
    }

    /// The node that runs it.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Tokens in the prompt (after the chat template).
    pub fn prompt_tokens(&self) -> u32 {
        self.prompt_tokens
    }

    /// The next chunk; `None` after `Done` or `Failed`. A producer that stops without either
    /// yields one `model_unavailable` failure, so a reader always sees how it ended.
    pub async fn next(&mut self) -> Option<Chunk> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let chunk = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(c)) => c,
            Poll::Ready(None) => Chunk::Failed(Failure::unavailable("the generation ended early")),
        };
        self.ended = !matches!(chunk, Chunk::Text(_));
        if self.ended {
            self.rx.close();
        }
        Poll::Ready(Some(chunk))
    }
}

impl futures_util::Stream for Generation {
    type Item = Chunk;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        self.get_mut().poll_chunk(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use super::*;

    #[tokio::test]
    async fn a_generation_ends_once_and_a_silent_producer_is_a_failure() {
        let (tx, mut g) = Generation::channel("n1", 3);
        assert_eq!((g.node(), g.prompt_tokens()), ("n1", 3));
        tx.send(Chunk::Text("a".into())).await.unwrap();
        drop(tx);
        assert_eq!(g.next().await, Some(Chunk::Text("a".into())));
        match g.next().await {
            Some(Chunk::Failed(f)) => assert_eq!(f.code, FailureCode::ModelUnavailable),
            other => panic!("{other:?}"),
        }
        assert_eq!(g.next().await, None);

        let (tx, mut g) = Generation::channel("n1", 1);
        let usage = Usage {
            finish_reason: FinishReason::Length,
            prompt_tokens: 1,
            completion_tokens: 2,
        };
        tx.send(Chunk::Done(usage)).await.unwrap();
        assert_eq!(g.next().await, Some(Chunk::Done(usage)));
        assert_eq!(g.next().await, None);
        // Nothing is read after the end: the producer sees the generation closed.
        assert_eq!(tx.send(Chunk::Text("late".into())).await, Err(Cancelled));
    }

    #[tokio::test]
    async fn dropping_a_generation_tells_its_producer() {
        let (tx, g) = Generation::channel("n1", 1);
        drop(g);
        tokio::time::timeout(std::time::Duration::from_secs(1), tx.closed())
            .await
            .unwrap();
        assert_eq!(tx.send(Chunk::Text("x".into())).await, Err(Cancelled));
    }

    #[test]
    fn status_reads_as_health_shows_it() {
        assert_eq!(ModelStatus::Ready.to_string(), "ready");
        assert_eq!(ModelStatus::Loading.to_string(), "loading");
        assert_eq!(
            ModelStatus::Unavailable("no file".into()).to_string(),
            "unavailable: no file"
        );
    }
}
