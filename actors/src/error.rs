//! The crate's one error type. [`Error::kind`] is the stable code for logs, metrics and clients.

use std::time::Duration;

use swarm_storage::StorageError;

/// Why a stream, a replicated write, a round, an actor session or a router call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no live peer to hold a second copy")]
    NoReplica,
    #[error("no peer acknowledged the write as durable within {0:?}")]
    Timeout(Duration),
    #[error("stream to {peer}: {message}")]
    Stream { peer: String, message: String },
    #[error("bad frame from {peer}: {message}")]
    Frame { peer: String, message: String },
    #[error("frame of {size} bytes is over the {max}-byte limit")]
    FrameTooLarge { size: usize, max: usize },
    #[error("cannot encode a message: {0}")]
    Encode(String),
    #[error("{peer} refused the write: {code}")]
    Refused { peer: String, code: String },
    #[error("the replicator is stopped")]
    Stopped,
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A write is durable (and audited) on this node, but its push failed or, with `w=2`, no
    /// peer confirmed it. The code is the push's.
    #[error("written here but not confirmed by a peer: {0}")]
    NotReplicated(Box<Error>),
    /// A `w=2` write on a node that does not replicate.
    #[error("this node does not replicate")]
    NoReplicator,
    /// Nothing to act on, e.g. a delete of a key that is not there.
    #[error("{0} not found")]
    NotFound(String),

    // The actor cluster (`cluster`): ractor_cluster sessions over QUIC streams.
    #[error("cannot start the actor cluster: {0}")]
    ClusterStart(String),
    #[error("the actor cluster is stopped")]
    ClusterStopped,
    #[error("session with {peer} refused: it claims ractor node {claimed:?}")]
    NameMismatch { peer: String, claimed: String },
    #[error("session with {0} closed before it was ready")]
    SessionClosed(String),
    #[error("session with {0} not ready in time")]
    SessionTimeout(String),
    #[error("connect to {0}: {1}")]
    Connect(String, String),
    #[error("ractor's TCP transport is for loopback only, not {0}")]
    NotLoopback(std::net::SocketAddr),

    // Calls to a peer's router; every variant names the peer.
    #[error("no session with {0}")]
    NoSession(String),
    #[error("{0} has no router")]
    NoRouter(String),
    #[error("{0} did not answer in time")]
    RpcTimeout(String),
    #[error("{0} went away during the call")]
    PeerGone(String),
    /// Neither the owner of a task's hash nor the next choice answered a forwarded submission
    /// in time (a node cut off from both). Not accepted here; a retry is deduplicated against
    /// whatever either may have accepted.
    #[error("neither {first} nor {next}, the owners of this task's hash, answered in time")]
    OwnerUnreachable { first: String, next: String },
    #[error("{0} answered with the wrong reply")]
    BadReply(String),

    // Tasks and agents.
    /// A submission or query with a bad value; `field` names it.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The task queue is full; try again after `retry_after_s`.
    #[error("the task queue is full")]
    QueueFull { retry_after_s: u64 },
    /// No agent of the swarm has what the task needs.
    #[error("{field}: no agent has capability `{capability}`")]
    NoCapableAgent { field: String, capability: String },
    /// The task has finished; it cannot be cancelled or requeued.
    #[error("task {id} is already {status}")]
    TaskFinished { id: String, status: String },
    /// The task is not in the state the operation needs (e.g. requeue of a task not in the
    /// dead-letter queue).
    #[error("task {id} is {status}: {message}")]
    TaskState {
        id: String,
        status: String,
        message: String,
    },
    /// A stage result from an epoch an adopting owner superseded.
    #[error("stale result for task {task} stage {stage}: epoch {epoch} < {current}")]
    StaleEpoch {
        task: String,
        stage: String,
        epoch: u64,
        current: u64,
    },
    /// The stage would exceed the task's token budget.
    #[error("the task's token budget of {budget} tokens is spent")]
    BudgetExceeded { budget: u32 },
    /// No live node can run the operation now (no owner, no agent home, no model).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A stage's generation failed; the code is the inference failure's.
    #[error("stage failed: {code}: {message}")]
    StageFailed { code: String, message: String },
    /// The caller may not do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
}

impl Error {
    /// Stable short code.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NoReplica => "no_replica",
            Error::Timeout(_) => "replication_timeout",
            Error::Stream { .. } => "replication_stream",
            Error::Frame { .. } => "bad_frame",
            Error::FrameTooLarge { .. } => "frame_too_large",
            Error::Encode(_) => "encode",
            Error::Refused { .. } => "refused",
            Error::Stopped => "stopped",
            Error::Storage(e) => e.kind(),
            Error::NotReplicated(e) => e.kind(),
            Error::NoReplicator => "no_replica",
            Error::NotFound(_) => "not_found",
            Error::ClusterStart(_) => "start",
            Error::ClusterStopped => "stopped",
            Error::NameMismatch { .. } => "name_mismatch",
            Error::SessionClosed(_) => "closed",
            Error::SessionTimeout(_) | Error::RpcTimeout(_) => "timeout",
            Error::Connect(..) => "connect",
            Error::NotLoopback(_) => "not_loopback",
            Error::NoSession(_) => "no_session",
            Error::NoRouter(_) => "no_router",
            Error::PeerGone(_) => "peer_gone",
            Error::OwnerUnreachable { .. } => "owner_unreachable",
            Error::BadReply(_) => "bad_reply",
            Error::Invalid { .. } => "invalid_request",
            Error::QueueFull { .. } => "queue_full",
            Error::NoCapableAgent { .. } => "no_capable_agent",
            Error::TaskFinished { .. } => "task_finished",
            Error::TaskState { .. } => "task_state",
            Error::StaleEpoch { .. } => "stale_epoch",
            Error::BudgetExceeded { .. } => "budget_exceeded",
            Error::Unavailable(_) => "unavailable",
            Error::StageFailed { .. } => "stage_failed",
            Error::Forbidden(_) => "forbidden",
        }
    }
}
