//! The history: every request the workload made and what came of it, with timestamps relative
//! to the start of the run. The checks read only this (and what they read from the nodes after
//! the heal); `history.jsonl` in the output folder holds it for a person to look at.

use std::sync::Mutex;

use serde::Serialize;

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Write,
    Read,
    Delete,
    /// A write under a data subject.
    SubjectWrite,
    Erase,
    Task,
    Chat,
}

/// A value's version as the gateway reports it: the HLC and the node that wrote it. Ordered as
/// the store orders versions (last writer wins).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Version {
    pub hlc: u64,
    pub origin: String,
}

impl Version {
    /// The version in a memory item's JSON (`version`, `origin`).
    pub fn of(item: &serde_json::Value) -> Option<Self> {
        let hlc = item["version"].as_str()?.parse().ok()?;
        let origin = item["origin"].as_str()?.to_string();
        Some(Self { hlc, origin })
    }
}

/// One request and its outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub id: u64,
    pub client: u32,
    /// The node (1-based) whose gateway it went to.
    pub node: u32,
    pub kind: OpKind,
    /// The memory key, the subject, the task's objective.
    pub key: String,
    /// The value written, or read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The version written or read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    /// The task created (or named as the twin of a deduplicated one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deduplicated: bool,
    /// Milliseconds from the start of the run.
    pub start_ms: u64,
    pub end_ms: u64,
    /// The HTTP status; `None` when no answer came.
    pub status: Option<u16>,
    /// The refusal's code (`no_answer` without an answer); empty on success.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub code: String,
    /// Whether the target node was up (running, not paused) for the whole request.
    pub node_live: bool,
    /// Whether a partition or a loss fault was on while it ran.
    pub in_partition: bool,
}

impl Op {
    /// Acknowledged: the gateway said it was done.
    pub fn acked(&self) -> bool {
        matches!(self.status, Some(200..=299))
    }

    /// Served: a success, a refusal of the request itself (4xx: bad input, a full queue, a
    /// finished task), or the refusal a partition calls for on a node cut off (a `w=2` write
    /// with no peer to acknowledge it; a task submission neither owner of its hash answered).
    /// Any other 5xx (a timeout, a model that is not there, an internal error), a dropped
    /// connection or no answer is a failure.
    pub fn served(&self) -> bool {
        match self.status {
            Some(s) if s < 500 => true,
            Some(_) => {
                self.in_partition
                    && matches!(
                        self.code.as_str(),
                        "no_replica" | "replication_timeout" | "owner_unreachable"
                    )
            }
            None => false,
        }
    }
}

/// The history being written by the clients: bounded by the run's length times its rate.
#[derive(Debug, Default)]
pub struct History {
    ops: Mutex<Vec<Op>>,
}

impl History {
    pub fn push(&self, op: Op) {
        if let Ok(mut ops) = self.ops.lock() {
            ops.push(op);
        }
    }

    /// Every op so far, in the order they ended.
    pub fn snapshot(&self) -> Vec<Op> {
        self.ops.lock().map(|o| o.clone()).unwrap_or_default()
    }
}
