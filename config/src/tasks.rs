//! The node TOML's `[tasks]` and `[agents]` sections: the task queue and dispatcher, the
//! workflows (SPARC is the preset), which agents run which stage kind, and where and as whom
//! agents run.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::swarm_file::Clearance;
use crate::{ConfigError, HumanDuration, SwarmFile};

/// The stage kind that runs no model: it completes at once with a fixed result. For benchmarks
/// and tests of the dispatcher only; the `bench-noop` workflow is its one stage.
pub const BENCH_NOOP_KIND: &str = "bench_noop";

/// The seven SPARC stages and the kind that runs each.
pub const SPARC_STAGES: [(&str, &str); 7] = [
    ("specification", "planner"),
    ("pseudocode", "planner"),
    ("architecture", "planner"),
    ("implementation", "coder"),
    ("refinement", "critic"),
    ("testing", "qa"),
    ("completion", "judge"),
];

/// `[tasks]`: the queue, the dispatcher and the workflows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// Tasks waiting on this node, over every priority; a submission past it gets 429.
    pub queue_bound: usize,
    /// Workflows running at once on this node; the swarm file's
    /// `performance.concurrency_limits.orchestration` when absent.
    pub concurrency: Option<u32>,
    /// Attempts of a stage on other agents after its first failure; the swarm file's
    /// `coordination.anti_collision.max_retries` when absent.
    pub max_retries: Option<u32>,
    /// Wait before a failed stage is tried again.
    pub retry_delay: HumanDuration,
    /// Longest one stage may run before it counts as failed.
    pub stage_timeout: HumanDuration,
    /// Deadline of a task that asks for none.
    pub default_deadline: HumanDuration,
    /// Tokens a task may spend over all its stages (a request may ask for fewer).
    pub token_budget: u32,
    /// Longest objective, in bytes.
    pub max_objective_bytes: usize,
    /// Largest `context` and `task_definition`, in bytes of JSON.
    pub max_context_bytes: usize,
    /// Workflow of a task that names none.
    pub default_workflow: String,
    /// Stage kind → the agents (swarm-file ids) that may run it. Merged over the defaults.
    pub kinds: BTreeMap<String, Vec<String>>,
    /// Named workflows, merged over the presets (`sparc`, `ask`, `bench-noop`).
    pub workflows: BTreeMap<String, WorkflowConfig>,
}

/// A named workflow: its stages, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowConfig {
    #[serde(default)]
    pub description: String,
    pub stages: Vec<StageConfig>,
}

/// One stage of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: String,
    /// Which agents run it (a key of `tasks.kinds`).
    pub kind: String,
    /// The stage's instruction; `{objective}` and `{definition}` are replaced.
    pub prompt: String,
    /// Most tokens the stage may generate.
    pub max_tokens: u32,
}

/// `[agents]`: whether this node hosts agents, with which models, as which roles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// This node may be an agent's home.
    pub host: bool,
    /// Agents (ids) whose home must be a node that serves a model.
    pub require_model: Vec<String>,
    /// Model every agent uses; the first model the cluster serves when absent.
    pub model: Option<String>,
    /// Agent id or agent type (`coordinator`, `specialist`, `worker`) → model; the id wins.
    pub models: BTreeMap<String, String>,
    /// Security clearance → the role an agent with it acts as (a built-in role or one of
    /// `[roles]`).
    pub clearance_roles: BTreeMap<Clearance, String>,
    /// Restarts an agent may take within `restart_window` before its failure escalates.
    pub restart_budget: u32,
    pub restart_window: HumanDuration,
    /// First restart delay; doubled on each restart within the window.
    pub restart_backoff: HumanDuration,
    /// Stages one agent runs at once.
    pub max_load: u32,
    /// Knowledge records of its own an agent reads into a prompt.
    pub knowledge_in_prompt: usize,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            queue_bound: 1024,
            concurrency: None,
            max_retries: None,
            retry_delay: HumanDuration(std::time::Duration::from_secs(1)),
            stage_timeout: HumanDuration(std::time::Duration::from_secs(600)),
            default_deadline: HumanDuration(std::time::Duration::from_secs(3600)),
            token_budget: 16_384,
            max_objective_bytes: 16 * 1024,
            max_context_bytes: 64 * 1024,
            default_workflow: "sparc".into(),
            kinds: BTreeMap::new(),
            workflows: BTreeMap::new(),
        }
    }
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            host: true,
            require_model: Vec::new(),
            model: None,
            models: BTreeMap::new(),
            clearance_roles: BTreeMap::new(),
            restart_budget: 5,
            restart_window: HumanDuration(std::time::Duration::from_secs(60)),
            restart_backoff: HumanDuration(std::time::Duration::from_millis(200)),
            max_load: 8,
            knowledge_in_prompt: 3,
        }
    }
}

/// The default kind table: which of the preset's agents run each stage kind.
fn default_kinds() -> BTreeMap<String, Vec<String>> {
    let t: [(&str, &[&str]); 7] = [
        (
            "planner",
            &[
                "orchestration-coordinator",
                "security-architect",
                "api-architect",
            ],
        ),
        (
            "coder",
            &["vllm-specialist", "container-devops", "memory-systems"],
        ),
        ("critic", &["security-architect", "performance-engineer"]),
        ("qa", &["testing-qa", "performance-engineer"]),
        ("judge", &["orchestration-coordinator"]),
        (
            "answer",
            &[
                "orchestration-coordinator",
                "security-architect",
                "vllm-specialist",
                "container-devops",
                "memory-systems",
                "performance-engineer",
                "api-architect",
                "testing-qa",
            ],
        ),
        (
            BENCH_NOOP_KIND,
            &[
                "orchestration-coordinator",
                "security-architect",
                "vllm-specialist",
                "container-devops",
                "memory-systems",
                "performance-engineer",
                "api-architect",
                "testing-qa",
            ],
        ),
    ];
    t.iter()
        .map(|(k, ids)| (k.to_string(), ids.iter().map(|s| s.to_string()).collect()))
        .collect()
}

const SPARC_PROMPTS: [&str; 7] = [
    "Write the specification for: {objective}. List the requirements, constraints and acceptance criteria.",
    "Write step-by-step pseudocode that meets the specification for: {objective}.",
    "Describe the architecture (components, data flow, interfaces) for: {objective}.",
    "Write the implementation for: {objective}, following the pseudocode and the architecture.",
    "Review the implementation for: {objective}. Name its flaws and give the refined version.",
    "Write the tests for: {objective}: unit, edge and failure cases, and what each checks.",
    "Judge whether the work for: {objective} is complete. Summarise the result and any open risks.",
];

/// The preset workflows: `sparc` (seven stages), `ask` (one answer) and `bench-noop` (one stage
/// that runs no model; benchmarks and tests only).
pub fn preset_workflows() -> BTreeMap<String, WorkflowConfig> {
    let mut w = BTreeMap::new();
    w.insert(
        "sparc".to_string(),
        WorkflowConfig {
            description: "SPARC: specification, pseudocode, architecture, refinement, completion"
                .into(),
            stages: SPARC_STAGES
                .iter()
                .zip(SPARC_PROMPTS)
                .map(|((name, kind), prompt)| StageConfig {
                    name: name.to_string(),
                    kind: kind.to_string(),
                    prompt: prompt.to_string(),
                    max_tokens: 256,
                })
                .collect(),
        },
    );
    w.insert(
        "ask".to_string(),
        WorkflowConfig {
            description: "one agent answers a single question".into(),
            stages: vec![StageConfig {
                name: "answer".into(),
                kind: "answer".into(),
                prompt: "Answer: {objective}".into(),
                max_tokens: 256,
            }],
        },
    );
    w.insert(
        "bench-noop".to_string(),
        WorkflowConfig {
            description: "one stage that runs no model (benchmarks and tests of the dispatcher)"
                .into(),
            stages: vec![StageConfig {
                name: "noop".into(),
                kind: BENCH_NOOP_KIND.into(),
                prompt: String::new(),
                max_tokens: 0,
            }],
        },
    );
    w
}

impl TasksConfig {
    /// The kind table in force: the defaults with the configured kinds over them.
    pub fn effective_kinds(&self) -> BTreeMap<String, Vec<String>> {
        let mut k = default_kinds();
        k.extend(self.kinds.clone());
        k
    }

    /// The workflows in force: the presets with the configured ones over them.
    pub fn effective_workflows(&self) -> BTreeMap<String, WorkflowConfig> {
        let mut w = preset_workflows();
        w.extend(self.workflows.clone());
        w
    }

    /// Workflows running at once per node.
    pub fn concurrency(&self, swarm: &SwarmFile) -> u32 {
        self.concurrency
            .unwrap_or(swarm.performance.concurrency_limits.orchestration)
            .max(1)
    }

    /// Retries of a failed stage.
    pub fn max_retries(&self, swarm: &SwarmFile) -> u32 {
        self.max_retries
            .unwrap_or(swarm.coordination.anti_collision.max_retries)
    }

    /// Every workflow's stage kinds are in the kind table, every agent named exists in the swarm
    /// file, and the numbers are usable.
    pub fn validate(&self, file: &str, swarm: &SwarmFile) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            file: file.to_string(),
            field,
            message,
        };
        if self.queue_bound == 0 {
            return Err(invalid(
                "tasks.queue_bound".into(),
                "must be at least 1".into(),
            ));
        }
        if self.token_budget == 0 {
            return Err(invalid(
                "tasks.token_budget".into(),
                "must be at least 1".into(),
            ));
        }
        if self.max_objective_bytes == 0 || self.max_context_bytes == 0 {
            return Err(invalid(
                "tasks.max_objective_bytes".into(),
                "limits must be at least 1".into(),
            ));
        }
        if self.default_deadline.0.is_zero() || self.stage_timeout.0.is_zero() {
            return Err(invalid(
                "tasks.default_deadline".into(),
                "deadlines and timeouts must be above zero".into(),
            ));
        }
        let ids: std::collections::HashSet<&str> =
            swarm.agents.iter().map(|a| a.id.as_str()).collect();
        let kinds = self.effective_kinds();
        for (kind, agents) in &kinds {
            for a in agents {
                if !ids.contains(a.as_str()) {
                    return Err(invalid(
                        format!("tasks.kinds.{kind}"),
                        format!("`{a}` is not an agent of the swarm file"),
                    ));
                }
            }
        }
        let workflows = self.effective_workflows();
        if !workflows.contains_key(&self.default_workflow) {
            return Err(invalid(
                "tasks.default_workflow".into(),
                format!("`{}` is not a workflow", self.default_workflow),
            ));
        }
        for (name, w) in &workflows {
            if !valid_name(name) {
                return Err(invalid(
                    format!("tasks.workflows.{name}"),
                    "use 1-64 lowercase letters, digits, `-` or `_`".into(),
                ));
            }
            if w.stages.is_empty() {
                return Err(invalid(
                    format!("tasks.workflows.{name}.stages"),
                    "a workflow needs at least one stage".into(),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for (i, s) in w.stages.iter().enumerate() {
                let field = format!("tasks.workflows.{name}.stages[{i}]");
                if !valid_name(&s.name) || !seen.insert(s.name.as_str()) {
                    return Err(invalid(
                        format!("{field}.name"),
                        format!(
                            "`{}`: stage names are unique, 1-64 lowercase letters, digits, `-` or `_`",
                            s.name
                        ),
                    ));
                }
                match kinds.get(&s.kind) {
                    Some(a) if !a.is_empty() => {}
                    _ => {
                        return Err(invalid(
                            format!("{field}.kind"),
                            format!("`{}` is not a kind of `tasks.kinds` with agents", s.kind),
                        ));
                    }
                }
                if s.kind != BENCH_NOOP_KIND && s.max_tokens == 0 {
                    return Err(invalid(
                        format!("{field}.max_tokens"),
                        "must be at least 1".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl AgentsConfig {
    /// The role an agent with `clearance` acts as: the configured one, else `user` for
    /// confidential and above and `viewer` for public.
    pub fn role_for(&self, clearance: Clearance) -> String {
        self.clearance_roles
            .get(&clearance)
            .cloned()
            .unwrap_or_else(|| match clearance {
                Clearance::Public => "viewer".into(),
                _ => "user".into(),
            })
    }

    /// Agents named exist, roles exist, and the numbers are usable.
    pub fn validate(
        &self,
        file: &str,
        swarm: &SwarmFile,
        roles: &BTreeMap<String, Vec<String>>,
    ) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            file: file.to_string(),
            field,
            message,
        };
        let ids: std::collections::HashSet<&str> =
            swarm.agents.iter().map(|a| a.id.as_str()).collect();
        for (i, a) in self.require_model.iter().enumerate() {
            if !ids.contains(a.as_str()) {
                return Err(invalid(
                    format!("agents.require_model[{i}]"),
                    format!("`{a}` is not an agent of the swarm file"),
                ));
            }
        }
        for key in self.models.keys() {
            let is_type = ["coordinator", "specialist", "worker"].contains(&key.as_str());
            if !is_type && !ids.contains(key.as_str()) {
                return Err(invalid(
                    format!("agents.models.{key}"),
                    "not an agent id or agent type".into(),
                ));
            }
        }
        for (clearance, role) in &self.clearance_roles {
            let builtin = ["admin", "user", "viewer"].contains(&role.as_str());
            if !builtin && !roles.contains_key(role) {
                return Err(invalid(
                    format!("agents.clearance_roles.{}", clearance.as_str()),
                    format!("`{role}` is not a role (built-in or under [roles])"),
                ));
            }
        }
        if self.max_load == 0 {
            return Err(invalid(
                "agents.max_load".into(),
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_against_the_preset_swarm_file() {
        let swarm = SwarmFile::preset().expect("preset");
        let t = TasksConfig::default();
        t.validate("node.toml", &swarm).expect("valid");
        let w = t.effective_workflows();
        assert_eq!(w["sparc"].stages.len(), 7);
        assert_eq!(w["ask"].stages.len(), 1);
        assert_eq!(t.concurrency(&swarm), 10);
        assert_eq!(t.max_retries(&swarm), 3);
        AgentsConfig::default()
            .validate("node.toml", &swarm, &BTreeMap::new())
            .expect("valid");
    }

    #[test]
    fn unknown_kinds_agents_and_roles_are_named() {
        let swarm = SwarmFile::preset().expect("preset");
        let mut t = TasksConfig::default();
        t.workflows.insert(
            "mine".into(),
            WorkflowConfig {
                description: String::new(),
                stages: vec![StageConfig {
                    name: "one".into(),
                    kind: "wizard".into(),
                    prompt: "x".into(),
                    max_tokens: 10,
                }],
            },
        );
        let e = t.validate("f", &swarm).expect_err("unknown kind");
        assert_eq!(e.field(), Some("tasks.workflows.mine.stages[0].kind"));
        let mut t = TasksConfig::default();
        t.kinds.insert("coder".into(), vec!["nobody".into()]);
        let e = t.validate("f", &swarm).expect_err("unknown agent");
        assert_eq!(e.field(), Some("tasks.kinds.coder"));
        let mut a = AgentsConfig::default();
        a.clearance_roles.insert(Clearance::Secret, "ghost".into());
        let e = a
            .validate("f", &swarm, &BTreeMap::new())
            .expect_err("unknown role");
        assert_eq!(e.field(), Some("agents.clearance_roles.secret"));
    }
}
