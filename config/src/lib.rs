//! Typed configuration for swarm.
//!
//! Two documents configure a node:
//! - the **node TOML** ([`NodeConfig`]): identity, data directory, gossip and gateway addresses,
//!   TLS and key files, auth settings, limits and extra roles;
//! - the **swarm file** ([`SwarmFile`]): the original `swarm-config.json` schema with the agents,
//!   coordination, security and performance settings. The default ships embedded
//!   ([`SwarmFile::preset`]) from `config/presets/swarm-config.json`.
//!
//! Both are parsed with unknown fields rejected; every error names the path of the offending field.
//! Secrets never live in the TOML: [`secret`] reads them from files (mode checked) or environment
//! variables. No tokio here.

mod duration;
mod error;
mod node;
pub mod secret;
mod swarm_file;
mod tasks;

pub use duration::HumanDuration;
pub use error::ConfigError;
pub use node::{
    AuthConfig, GatewayConfig, GatewayTls, GossipConfig, InferenceConfig, KeysConfig, LimitsConfig,
    ModelEntry, NodeConfig, NodeSection, ReplicationConfig, TlsConfig,
};
pub use swarm_file::{
    Agent, AgentMemory, AgentType, AntiCollision, AuditLevel, Clearance, ConcurrencyLimits,
    Coordination, Encryption, MemorySync, Performance, ResponseTargets, Retention, Security,
    SwarmFile, SwarmSection,
};
pub use tasks::{
    AgentsConfig, BENCH_NOOP_KIND, SPARC_STAGES, StageConfig, TasksConfig, WorkflowConfig,
    preset_workflows,
};
