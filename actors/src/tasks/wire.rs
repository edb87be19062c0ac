//! The frames of a [`crate::StreamKind::Tasks`] stream, JSON-encoded (task records carry
//! free-form JSON context). The opener sends one [`Req`]; the server answers with zero or more
//! [`Reply::Delta`]s (a stage's text as it is generated) and one final reply, then both close.
//! Errors travel as [`WireError`], which keeps the code and the field.

use serde::{Deserialize, Serialize};

use super::dispatcher::{StageError, StageSuccess};
use super::{AgentAnswer, AgentQuery, NewEvent, Submit, Submitted, TaskRecord};
use crate::Error;

/// A stage, as the owner sends it to the agent's home node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageJob {
    pub task: String,
    pub submitter: String,
    pub hash: String,
    pub objective: String,
    pub task_definition: Option<String>,
    pub context: serde_json::Value,
    pub workflow: String,
    pub stage: String,
    pub index: u32,
    pub kind: String,
    /// The stage's instruction (`{objective}` and `{definition}` not yet replaced).
    pub prompt: String,
    pub max_tokens: u32,
    /// `max_tokens` is what is left of the task's budget, not the stage's own limit: a
    /// generation that hits it exceeded the budget.
    pub budget_capped: bool,
    pub agent: String,
    pub epoch: u64,
    pub attempt: u32,
    pub deadline_ms: u64,
    /// Earlier stages' results: (stage, agent, text), clipped.
    pub previous: Vec<(String, String, String)>,
    /// Earlier stages as the conversation they were: each one's turn and its whole text, when
    /// every earlier stage recorded its turn (empty otherwise).
    #[serde(default)]
    pub turns: Vec<Turn>,
}

/// One earlier stage as a turn of the conversation: what it was asked, what it answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub user: String,
    pub assistant: String,
}

/// What a stream opener asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Req {
    /// A submission for the owner of its hash, sent at `sent_ms` (the sender's wall clock),
    /// to be refused when read more than `stale_ms` later (the sender has given up on it by
    /// then; absent: the owner's default).
    Submit {
        submit: Submit,
        sent_ms: u64,
        #[serde(default)]
        stale_ms: Option<u64>,
    },
    /// Cancel (on the task's owner).
    Cancel {
        id: String,
        by: String,
        request_id: String,
    },
    /// Requeue a dead letter (on the task's owner).
    Requeue {
        id: String,
        by: String,
        request_id: String,
    },
    /// Run a stage on an agent homed at the server.
    RunStage(StageJob),
    /// Ask an agent homed at the server.
    Query(AgentQuery),
    /// Events that happened on the opener, for the server's subscribers.
    Events(Vec<NewEvent>),
}

/// What the server answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Submitted(Result<Submitted, WireError>),
    Task(Result<TaskRecord, WireError>),
    /// Text of the running stage.
    Delta(String),
    Stage(Result<StageSuccess, StageError>),
    Answer(Result<AgentAnswer, WireError>),
    /// Events taken.
    Ack,
}

/// An [`Error`] as it travels: its code, message and what it needs to be rebuilt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    pub code: String,
    pub message: String,
    pub field: Option<String>,
    pub retry_after_s: Option<u64>,
    pub id: Option<String>,
    pub status: Option<String>,
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        let mut w = WireError {
            code: e.kind().to_string(),
            message: e.to_string(),
            field: None,
            retry_after_s: None,
            id: None,
            status: None,
        };
        match e {
            Error::Invalid { field, message } => {
                w.field = Some(field.clone());
                w.message = message.clone();
            }
            Error::NoCapableAgent { field, capability } => {
                w.field = Some(field.clone());
                w.message = capability.clone();
            }
            Error::QueueFull { retry_after_s } => w.retry_after_s = Some(*retry_after_s),
            Error::TaskFinished { id, status } => {
                w.id = Some(id.clone());
                w.status = Some(status.clone());
            }
            Error::TaskState {
                id,
                status,
                message,
            } => {
                w.id = Some(id.clone());
                w.status = Some(status.clone());
                w.message = message.clone();
            }
            Error::NotFound(what) => w.message = what.clone(),
            Error::StageFailed { code, message } => {
                w.field = Some(code.clone());
                w.message = message.clone();
            }
            _ => {}
        }
        w
    }
}

impl From<WireError> for Error {
    fn from(w: WireError) -> Self {
        let field = w.field.clone().unwrap_or_default();
        match w.code.as_str() {
            "invalid_request" => Error::Invalid {
                field,
                message: w.message,
            },
            "no_capable_agent" => Error::NoCapableAgent {
                field,
                capability: w.message,
            },
            "queue_full" => Error::QueueFull {
                retry_after_s: w.retry_after_s.unwrap_or(1),
            },
            "task_finished" => Error::TaskFinished {
                id: w.id.unwrap_or_default(),
                status: w.status.unwrap_or_default(),
            },
            "task_state" => Error::TaskState {
                id: w.id.unwrap_or_default(),
                status: w.status.unwrap_or_default(),
                message: w.message,
            },
            "not_found" => Error::NotFound(w.message),
            "stage_failed" => Error::StageFailed {
                code: field,
                message: w.message,
            },
            "forbidden" => Error::Forbidden(w.message),
            "budget_exceeded" => Error::BudgetExceeded { budget: 0 },
            _ => Error::Unavailable(format!("{}: {}", w.code, w.message)),
        }
    }
}

/// Decode one request frame.
pub fn decode_req(body: &[u8]) -> Result<Req, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Decode arbitrary bytes as each frame of a tasks stream (the fuzz target's entry); the
/// answer is ignored, only a panic or a hang would be a failure.
#[cfg(feature = "fuzzing")]
pub fn fuzz_decode_frames(data: &[u8]) {
    let _ = decode_req(data);
    let _ = serde_json::from_slice::<Reply>(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_code_and_field_across_the_wire() {
        for e in [
            Error::Invalid {
                field: "priority".into(),
                message: "unknown".into(),
            },
            Error::QueueFull { retry_after_s: 3 },
            Error::TaskFinished {
                id: "t".into(),
                status: "completed".into(),
            },
            Error::NoCapableAgent {
                field: "capabilities[0]".into(),
                capability: "x".into(),
            },
        ] {
            let w = WireError::from(&e);
            let text = serde_json::to_vec(&w).expect("encode");
            let back: WireError = serde_json::from_slice(&text).expect("decode");
            let e2 = Error::from(back);
            assert_eq!(e.kind(), e2.kind());
            assert_eq!(e.to_string(), e2.to_string());
        }
        assert!(decode_req(b"\xff\x00garbage").is_err());
    }
}
