//! The crate's one error type.

/// What can go wrong in a chaos run or a simulation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The scenario file is wrong; `field` names the part.
    #[error("scenario: {field}: {message}")]
    Scenario { field: String, message: String },
    /// A file or process could not be used.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A node or the cluster did not do what the runner needs to go on (start, answer, join).
    #[error("cluster: {0}")]
    Cluster(String),
    /// An iptables rule could not be added or removed.
    #[error("network: {0}")]
    Network(String),
    /// A simulation seed broke an invariant (its message names the seed that replays it).
    #[error("simulation: {0}")]
    Sim(String),
}

impl Error {
    /// A stable code for the report and the exit message.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Scenario { .. } => "bad_scenario",
            Error::Io { .. } => "io",
            Error::Cluster(_) => "cluster",
            Error::Network(_) => "network",
            Error::Sim(_) => "sim",
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn scenario(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Scenario {
            field: field.into(),
            message: message.into(),
        }
    }
}
