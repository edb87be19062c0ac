/// Everything the store can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine error: {0}")]
    Engine(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("decryption failed for {0}: wrong key or tampered data")]
    Decrypt(String),
    #[error("invalid {field}: {message}")]
    InvalidInput {
        field: &'static str,
        message: String,
    },
    #[error("value too large: {size} bytes, limit {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("namespace `{0}` is full")]
    NamespaceFull(String),
    #[error("subject `{0}` has been erased")]
    Erased(String),
    #[error("timestamp is {ahead_ms} ms ahead of the local clock (max skew {max_ms} ms)")]
    ClockSkew { ahead_ms: u64, max_ms: u64 },
    #[error("bad master key: {0}")]
    BadMasterKey(String),
}

impl StorageError {
    /// Stable short code for metrics and API errors.
    pub fn kind(&self) -> &'static str {
        match self {
            StorageError::Engine(_) => "storage_engine",
            StorageError::Corrupt(_) => "storage_corrupt",
            StorageError::Decrypt(_) => "decrypt_failed",
            StorageError::InvalidInput { .. } => "invalid_input",
            StorageError::TooLarge { .. } => "too_large",
            StorageError::NamespaceFull(_) => "namespace_full",
            StorageError::Erased(_) => "subject_erased",
            StorageError::ClockSkew { .. } => "clock_skew",
            StorageError::BadMasterKey(_) => "bad_master_key",
        }
    }
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        StorageError::Engine(e.to_string())
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
