//! The swarm file: the original `swarm-config.json` schema.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, HumanDuration};

const PRESET: &str = include_str!("../presets/swarm-config.json");

/// The whole swarm file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmFile {
    pub swarm: SwarmSection,
    pub agents: Vec<Agent>,
    pub coordination: Coordination,
    pub security: Security,
    pub performance: Performance,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmSection {
    pub id: String,
    pub name: String,
    pub version: String,
    pub topology: Topology,
    pub strategy: Strategy,
    pub max_agents: u32,
    pub security_level: SecurityLevel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Topology {
    Hierarchical,
    Mesh,
    Ring,
    Star,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Adaptive,
    Balanced,
    Specialized,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityLevel {
    Low,
    Medium,
    High,
    Maximum,
}

/// One agent of the swarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: AgentType,
    pub role: String,
    pub priority: u32,
    pub capabilities: Vec<String>,
    pub security_clearance: Clearance,
    pub audit_level: AuditLevel,
    pub specialization: String,
    pub memory: AgentMemory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentType {
    Coordinator,
    Specialist,
    Worker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clearance {
    Public,
    Confidential,
    Secret,
    TopSecret,
}

impl Clearance {
    /// As the swarm file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Clearance::Public => "public",
            Clearance::Confidential => "confidential",
            Clearance::Secret => "secret",
            Clearance::TopSecret => "top_secret",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditLevel {
    Minimal,
    Standard,
    Detailed,
    Comprehensive,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentMemory {
    pub persistent: bool,
    pub encryption: bool,
    pub retention: Retention,
}

/// How long an agent's memory (or the audit log) is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Retention {
    #[serde(rename = "1_year")]
    OneYear,
    #[serde(rename = "2_years")]
    TwoYears,
    #[serde(rename = "3_years")]
    ThreeYears,
    #[serde(rename = "7_years")]
    SevenYears,
    #[serde(rename = "permanent")]
    Permanent,
}

impl Retention {
    /// The retention period in milliseconds, `None` for permanent.
    pub fn as_millis(self) -> Option<u64> {
        const YEAR_MS: u64 = 365 * 86_400_000 + 6 * 3_600_000; // Julian year
        match self {
            Retention::OneYear => Some(YEAR_MS),
            Retention::TwoYears => Some(2 * YEAR_MS),
            Retention::ThreeYears => Some(3 * YEAR_MS),
            Retention::SevenYears => Some(7 * YEAR_MS),
            Retention::Permanent => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coordination {
    pub communication_patterns: Vec<CommunicationPattern>,
    pub message_encryption: bool,
    pub audit_logging: bool,
    pub anti_collision: AntiCollision,
    pub memory_sync: MemorySync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommunicationPattern {
    Hierarchical,
    PeerToPeer,
    Broadcast,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AntiCollision {
    pub enabled: bool,
    pub hash_tracking: bool,
    pub lru_fallback: bool,
    pub max_retries: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySync {
    pub strategy: SyncStrategy,
    pub encryption: bool,
    pub backup_enabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncStrategy {
    Crdt,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    pub zero_trust: bool,
    pub authentication_required: bool,
    pub audit_retention: Retention,
    pub compliance: Vec<String>,
    pub encryption: Encryption,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    pub at_rest: AtRestCipher,
    pub in_transit: InTransit,
    pub key_rotation: HumanDuration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AtRestCipher {
    #[serde(rename = "xchacha20-poly1305")]
    XChaCha20Poly1305,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InTransit {
    #[serde(rename = "tls1.3")]
    Tls13,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Performance {
    pub response_targets: ResponseTargets,
    pub concurrency_limits: ConcurrencyLimits,
}

/// Request timeouts per class of operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseTargets {
    pub orchestration: HumanDuration,
    pub security_ops: HumanDuration,
    pub vllm_ops: HumanDuration,
    pub memory_ops: HumanDuration,
}

/// Bulkhead sizes per class of operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyLimits {
    pub orchestration: u32,
    pub security_scanning: u32,
    pub memory_ops: u32,
    pub testing: u32,
}

impl SwarmFile {
    /// The embedded default (`config/presets/swarm-config.json`).
    pub fn preset() -> Result<Self, ConfigError> {
        Self::from_json("presets/swarm-config.json", PRESET)
    }

    /// The embedded default as text, for `swarm init` to write out.
    pub fn preset_text() -> &'static str {
        PRESET
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&path.display().to_string(), &text)
    }

    /// Parse and validate; `file` names the document in errors.
    pub fn from_json(file: &str, text: &str) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let parsed: SwarmFile =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
                file: file.to_string(),
                field: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        parsed.validate(file)?;
        Ok(parsed)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: String, message: &str| ConfigError::Invalid {
            file: file.to_string(),
            field,
            message: message.to_string(),
        };
        if self.agents.len() > self.swarm.max_agents as usize {
            return Err(invalid(
                "swarm.max_agents".into(),
                "fewer than the number of agents listed",
            ));
        }
        let mut seen = HashSet::new();
        for (i, a) in self.agents.iter().enumerate() {
            if a.id.is_empty() {
                return Err(invalid(format!("agents[{i}].id"), "must not be empty"));
            }
            if !seen.insert(a.id.as_str()) {
                return Err(invalid(format!("agents[{i}].id"), "duplicate agent id"));
            }
        }
        if self.coordination.anti_collision.max_retries > 10 {
            return Err(invalid(
                "coordination.anti_collision.max_retries".into(),
                "at most 10",
            ));
        }
        let rt = &self.performance.response_targets;
        for (name, d) in [
            ("orchestration", rt.orchestration),
            ("security_ops", rt.security_ops),
            ("vllm_ops", rt.vllm_ops),
            ("memory_ops", rt.memory_ops),
        ] {
            if d.0.is_zero() {
                return Err(invalid(
                    format!("performance.response_targets.{name}"),
                    "must be greater than zero",
                ));
            }
        }
        let cl = &self.performance.concurrency_limits;
        for (name, n) in [
            ("orchestration", cl.orchestration),
            ("security_scanning", cl.security_scanning),
            ("memory_ops", cl.memory_ops),
            ("testing", cl.testing),
        ] {
            if n == 0 || n > 100_000 {
                return Err(invalid(
                    format!("performance.concurrency_limits.{name}"),
                    "must be between 1 and 100000",
                ));
            }
        }
        Ok(())
    }

    /// The retention of an agent's memory, if the agent exists.
    pub fn agent_retention(&self, agent_id: &str) -> Option<Retention> {
        self.agents
            .iter()
            .find(|a| a.id == agent_id)
            .map(|a| a.memory.retention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset_value() -> serde_json::Value {
        serde_json::from_str(PRESET).expect("preset is JSON")
    }

    fn parse(v: &serde_json::Value) -> Result<SwarmFile, ConfigError> {
        SwarmFile::from_json("test.json", &v.to_string())
    }

    #[test]
    fn preset_has_eight_agents_in_priority_order() {
        let f = SwarmFile::preset().expect("preset parses");
        assert_eq!(f.agents.len(), 8);
        assert_eq!(f.agents[0].id, "orchestration-coordinator");
        assert!(f.agents.windows(2).all(|w| w[0].priority < w[1].priority));
        assert_eq!(f.performance.concurrency_limits.memory_ops, 20);
        assert_eq!(
            f.performance.response_targets.memory_ops.0,
            std::time::Duration::from_secs(3)
        );
        assert_eq!(f.security.audit_retention, Retention::SevenYears);
    }

    #[test]
    fn unknown_field_names_its_path() {
        let mut v = preset_value();
        v["agents"][2]["memory"]["colour"] = "blue".into();
        let e = parse(&v).expect_err("unknown field");
        assert_eq!(e.field(), Some("agents[2].memory.colour"));
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn unknown_retention_names_its_path() {
        let mut v = preset_value();
        v["agents"][1]["memory"]["retention"] = "5_years".into();
        let e = parse(&v).expect_err("bad retention");
        assert_eq!(e.field(), Some("agents[1].memory.retention"));
    }

    #[test]
    fn bad_duration_and_type_are_rejected() {
        let mut v = preset_value();
        v["performance"]["response_targets"]["memory_ops"] = "3 fortnights".into();
        assert_eq!(
            parse(&v).expect_err("bad duration").field(),
            Some("performance.response_targets.memory_ops")
        );
        let mut v = preset_value();
        v["performance"]["concurrency_limits"]["memory_ops"] = "many".into();
        assert_eq!(
            parse(&v).expect_err("bad type").field(),
            Some("performance.concurrency_limits.memory_ops")
        );
        let mut v = preset_value();
        v["performance"]["concurrency_limits"]["testing"] = 0.into();
        assert_eq!(
            parse(&v).expect_err("zero limit").field(),
            Some("performance.concurrency_limits.testing")
        );
    }

    #[test]
    fn duplicate_agent_rejected() {
        let mut v = preset_value();
        v["agents"][3]["id"] = "security-architect".into();
        assert_eq!(
            parse(&v).expect_err("duplicate").field(),
            Some("agents[3].id")
        );
    }

    #[test]
    fn retention_periods_are_ordered() {
        assert!(Retention::OneYear.as_millis() < Retention::SevenYears.as_millis());
        assert_eq!(Retention::Permanent.as_millis(), None);
    }
}
