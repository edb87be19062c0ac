//! The agents: one supervised actor per agent of the swarm file, each at one home node.
//!
//! - this file: the [`Roster`] (the swarm file's agents in priority order, with their parent in
//!   the supervision tree, role, model and retention) and [`place`] (each agent's home: the
//!   rendezvous choice among the live members that may host it).
//! - `runtime`: [`AgentRuntime`], this node's agents: the supervisor actor that starts the
//!   agents homed here in priority order and restarts a crashed one with backoff (past its
//!   budget the failure escalates to its parent), and what an agent does with a stage or a
//!   question (prompt, [`crate::Inference`], history and knowledge through [`crate::Memory`]).

mod runtime;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use swarm_config::{Agent, AgentType, AgentsConfig, SwarmFile};

pub use runtime::{Access, AgentRuntime, DELTA_BUFFER, confidence};

use crate::tasks::rendezvous;

/// The supervision tree of the preset swarm (DESIGN §6): agent → parent.
const PRESET_TREE: [(&str, &str); 7] = [
    ("security-architect", "orchestration-coordinator"),
    ("vllm-specialist", "orchestration-coordinator"),
    ("container-devops", "orchestration-coordinator"),
    ("memory-systems", "security-architect"),
    ("performance-engineer", "vllm-specialist"),
    ("api-architect", "container-devops"),
    ("testing-qa", "memory-systems"),
];

/// One agent with what the node config adds to its swarm-file entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSpec {
    pub agent: Agent,
    /// Its parent in the supervision tree; `None` for the root (the coordinator).
    pub parent: Option<String>,
    /// The policy role it acts as (from its clearance).
    pub role: String,
    /// Its configured model; the cluster's first model when `None`.
    pub model: Option<String>,
    /// Its home must serve a model.
    pub require_model: bool,
    /// How long its memory is kept (ms); `None`: permanent.
    pub retention_ms: Option<u64>,
}

/// The swarm file's agents, in priority order (then id).
#[derive(Debug, Clone, PartialEq)]
pub struct Roster {
    pub specs: Vec<AgentSpec>,
    pub swarm_name: String,
}

impl Roster {
    pub fn new(swarm: &SwarmFile, cfg: &AgentsConfig) -> Self {
        let mut agents = swarm.agents.clone();
        agents.sort_by(|a, b| a.priority.cmp(&b.priority).then(a.id.cmp(&b.id)));
        let root = agents
            .iter()
            .find(|a| a.kind == AgentType::Coordinator)
            .or_else(|| agents.first())
            .map(|a| a.id.clone());
        let specs = agents
            .into_iter()
            .map(|agent| {
                let parent = if Some(&agent.id) == root.as_ref() {
                    None
                } else {
                    PRESET_TREE
                        .iter()
                        .find(|(child, _)| *child == agent.id)
                        .map(|(_, p)| p.to_string())
                        .filter(|p| swarm.agents.iter().any(|a| &a.id == p))
                        .or_else(|| root.clone())
                };
                let kind = match agent.kind {
                    AgentType::Coordinator => "coordinator",
                    AgentType::Specialist => "specialist",
                    AgentType::Worker => "worker",
                };
                AgentSpec {
                    parent,
                    role: cfg.role_for(agent.security_clearance),
                    model: cfg
                        .models
                        .get(&agent.id)
                        .or_else(|| cfg.models.get(kind))
                        .or(cfg.model.as_ref())
                        .cloned(),
                    require_model: cfg.require_model.contains(&agent.id),
                    retention_ms: agent.memory.retention.as_millis(),
                    agent,
                }
            })
            .collect();
        Self {
            specs,
            swarm_name: swarm.swarm.name.clone(),
        }
    }

    pub fn get(&self, id: &str) -> Option<&AgentSpec> {
        self.specs.iter().find(|s| s.agent.id == id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.specs.iter().map(|s| s.agent.id.as_str())
    }
}

/// A live member as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    /// It hosts agents (`agents.host`, gossiped as the `agents` role).
    pub hosts_agents: bool,
    /// It serves at least one model now.
    pub serves_model: bool,
}

/// Each agent's home: the rendezvous choice of its id among the live members that may host it
/// (`None` when none may). Only the agents whose choice involves a joining or leaving member
/// move.
pub fn place(roster: &Roster, hosts: &[Host]) -> BTreeMap<String, Option<String>> {
    roster
        .specs
        .iter()
        .map(|s| {
            let eligible = hosts
                .iter()
                .filter(|h| h.hosts_agents && (!s.require_model || h.serves_model))
                .map(|h| h.name.as_str());
            (
                s.agent.id.clone(),
                rendezvous(&s.agent.id, eligible).map(String::from),
            )
        })
        .collect()
}

/// An agent's state as its home node records it under
/// [`crate::tasks::model::AGENTS_NAMESPACE`]`/{id}` (replicated, so any node can show it and a
/// new home continues its counters).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: String,
    pub node: String,
    /// `idle`, `busy` or `error`.
    pub state: String,
    pub current_task: Option<String>,
    pub load: u32,
    pub completed: u64,
    pub failed: u64,
    pub total_stage_ms: u64,
    pub restarts: u32,
    /// Its failure went past the restart budget; the parent was told.
    pub escalated: bool,
    pub updated_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster() -> Roster {
        Roster::new(
            &SwarmFile::preset().expect("preset"),
            &AgentsConfig::default(),
        )
    }

    #[test]
    fn the_roster_is_in_priority_order_with_the_design_tree() {
        let r = roster();
        let ids: Vec<&str> = r.ids().collect();
        assert_eq!(ids[0], "orchestration-coordinator");
        assert_eq!(ids[7], "testing-qa");
        assert_eq!(r.specs[0].parent, None);
        assert_eq!(
            r.get("testing-qa").and_then(|s| s.parent.as_deref()),
            Some("memory-systems")
        );
        assert_eq!(r.get("testing-qa").map(|s| s.role.as_str()), Some("user"));
    }

    #[test]
    fn a_joining_node_moves_only_the_agents_it_wins() {
        let r = roster();
        let h = |n: &str| Host {
            name: n.into(),
            hosts_agents: true,
            serves_model: true,
        };
        let two = place(&r, &[h("node-1"), h("node-2")]);
        let three = place(&r, &[h("node-1"), h("node-2"), h("node-3")]);
        for (id, home) in &three {
            if home.as_deref() != Some("node-3") {
                assert_eq!(home, &two[id], "{id} moved between old nodes");
            }
        }
        let opted_out = place(
            &r,
            &[
                h("node-1"),
                Host {
                    name: "node-2".into(),
                    hosts_agents: false,
                    serves_model: true,
                },
            ],
        );
        assert!(opted_out.values().all(|n| n.as_deref() == Some("node-1")));
        assert!(place(&r, &[]).values().all(Option::is_none));
    }
}

#[cfg(test)]
pub(crate) mod runtime_tests;
