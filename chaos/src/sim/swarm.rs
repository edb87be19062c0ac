//! The swarm every simulated node runs: its agents and workflows (the dispatcher's catalog),
//! the dispatcher's limits, and a new task as the gateway builds it.

use std::collections::BTreeMap;

use swarm_actors::tasks::TaskRecord;
use swarm_actors::tasks::dispatcher::{AgentProfile, Catalog, Limits, StageDef};

use super::node::name;

/// Stages an agent runs at once.
pub(crate) const AGENT_MAX_LOAD: u32 = 2;
/// A stage that runs longer counts as failed (and is retried).
const STAGE_TIMEOUT_MS: u64 = 20_000;

/// The workflows: name → stages (name, kind).
const WORKFLOWS: [(&str, &[(&str, &str)]); 2] = [
    (
        "sparc",
        &[("plan", "planner"), ("code", "coder"), ("review", "critic")],
    ),
    ("quick", &[("answer", "coder")]),
];
/// Agents: id, capabilities, kinds it runs.
const AGENTS: [(&str, &str, &[&str]); 5] = [
    ("a1", "planning", &["planner"]),
    ("a2", "planning", &["planner", "coder"]),
    ("a3", "rust", &["coder"]),
    ("a4", "review", &["coder", "critic"]),
    ("a5", "testing", &["critic"]),
];

/// The swarm every dispatcher knows.
pub(crate) fn catalog() -> Catalog {
    let workflows = WORKFLOWS
        .iter()
        .map(|(w, stages)| {
            let defs = stages
                .iter()
                .map(|(s, kind)| StageDef {
                    name: s.to_string(),
                    kind: kind.to_string(),
                    max_tokens: 256,
                })
                .collect();
            (w.to_string(), defs)
        })
        .collect();
    let mut kinds: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, _, runs) in AGENTS {
        for k in runs {
            kinds.entry(k.to_string()).or_default().push(id.to_string());
        }
    }
    let agents = AGENTS
        .iter()
        .map(|(id, cap, _)| AgentProfile {
            id: id.to_string(),
            capabilities: vec![cap.to_string()],
            specialization: cap.to_string(),
            max_load: AGENT_MAX_LOAD,
        })
        .collect();
    Catalog {
        workflows,
        kinds,
        agents,
        coordinator: "a1".into(),
    }
}

/// The names of a workflow's stages.
pub(crate) fn stage_names(workflow: &str) -> Vec<&'static str> {
    WORKFLOWS
        .iter()
        .find(|(w, _)| *w == workflow)
        .map(|(_, s)| s.iter().map(|(n, _)| *n).collect())
        .unwrap_or_default()
}

/// Workflow names, for the workload.
pub(crate) fn workflow_names() -> Vec<&'static str> {
    WORKFLOWS.iter().map(|(w, _)| *w).collect()
}

/// A new task as the gateway builds it before the dispatcher takes it.
pub(crate) fn new_record(id: String, objective: &str, workflow: &str, now_ms: u64) -> TaskRecord {
    TaskRecord {
        token_budget: 1_000_000,
        ..TaskRecord::new(
            &id,
            objective,
            serde_json::Value::Null,
            workflow,
            "client",
            now_ms,
        )
    }
}

/// Every agent's id.
pub(crate) fn agent_ids() -> Vec<String> {
    AGENTS.iter().map(|(id, _, _)| id.to_string()).collect()
}

/// The limits of node `node`'s dispatcher; `seed` seeds its score jitter.
pub(crate) fn limits(node: u32, seed: u64) -> Limits {
    Limits {
        node: name(node),
        queue_bound: 64,
        concurrency: 3,
        max_retries: 3,
        retry_delay_ms: 1000,
        stage_timeout_ms: STAGE_TIMEOUT_MS,
        seed,
    }
}
