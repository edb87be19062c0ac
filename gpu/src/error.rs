//! The one error type of the inference engine.

/// Why a model could not be pulled or loaded, or a request could not be served. `kind()` is a
/// stable code for metrics and API errors.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The model file or folder is missing, unreadable or not a model we can serve.
    #[error("model unavailable: {0}")]
    ModelUnavailable(String),
    /// A request field is wrong; `field` names it.
    #[error("{field}: {message}")]
    InvalidRequest {
        field: &'static str,
        message: String,
    },
    /// The prompt plus `max_tokens` is longer than the model's context.
    #[error("{field}: {tokens} tokens is longer than the context of {limit} tokens")]
    ContextLength {
        field: &'static str,
        tokens: usize,
        limit: usize,
    },
    /// The waiting queue is full: try again later.
    #[error("the engine queue is full ({0} waiting)")]
    Overloaded(usize),
    /// The engine thread stopped (shut down, or crashed past its restart budget) or restarted
    /// while this request ran.
    #[error("the inference engine is not running: {0}")]
    EngineStopped(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    // `swarm model pull` (see `catalog`).
    /// The catalog has no model of that name.
    #[error("unknown model `{0}` (see `swarm model list`)")]
    UnknownModel(String),
    #[error("download {url}: {message}")]
    Download { url: String, message: String },
    /// A download or an unpacked file does not match its published SHA-256.
    #[error("{what} has SHA-256 {got}, expected {want}: refusing it")]
    Checksum {
        what: String,
        got: String,
        want: String,
    },
    #[error("{member} is not in {url}")]
    NotInArchive { member: String, url: String },
    #[error("bad archive {url}: {message}")]
    Archive { url: String, message: String },
    /// Reading or writing a model file failed.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl InferError {
    /// A stable, lowercase code.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ModelUnavailable(_) => "model_unavailable",
            Self::InvalidRequest { .. } => "invalid_request",
            Self::ContextLength { .. } => "context_length_exceeded",
            Self::Overloaded(_) => "overloaded",
            Self::EngineStopped(_) => "engine_stopped",
            Self::Tensor(_) => "tensor_error",
            Self::Tokenizer(_) => "tokenizer_error",
            Self::UnknownModel(_) => "unknown_model",
            Self::Download { .. } => "download",
            Self::Checksum { .. } => "checksum",
            Self::NotInArchive { .. } => "not_in_archive",
            Self::Archive { .. } => "bad_archive",
            Self::Io { .. } => "io",
        }
    }

    /// The request field at fault, if any.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::InvalidRequest { field, .. } | Self::ContextLength { field, .. } => Some(field),
            _ => None,
        }
    }

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            field,
            message: message.into(),
        }
    }
}

pub(crate) type Result<T, E = InferError> = std::result::Result<T, E>;
