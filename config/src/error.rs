use std::path::PathBuf;

/// Everything that can go wrong while loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The document does not parse or a field has the wrong type or an unknown name.
    #[error("{file}: invalid field `{field}`: {message}")]
    Parse {
        file: String,
        field: String,
        message: String,
    },
    /// The document parses but a value is not allowed.
    #[error("{file}: invalid value for `{field}`: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
    /// A secret file is readable by group or others.
    #[error(
        "secret file {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)"
    )]
    InsecureSecret { path: PathBuf, mode: u32 },
    /// A secret is missing: neither its file nor its environment variable is set.
    #[error("secret `{name}` missing: set {env} or provide the file {path}")]
    MissingSecret {
        name: String,
        env: String,
        path: PathBuf,
    },
}

impl ConfigError {
    /// Stable short code for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigError::Io { .. } => "config_io",
            ConfigError::Parse { .. } => "config_parse",
            ConfigError::Invalid { .. } => "config_invalid",
            ConfigError::InsecureSecret { .. } => "insecure_secret",
            ConfigError::MissingSecret { .. } => "missing_secret",
        }
    }

    /// The path of the offending field, where there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Parse { field, .. } | ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}
