//! The node TOML.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{AgentsConfig, ConfigError, HumanDuration, SwarmFile, TasksConfig};

/// One node's configuration (`node.toml`). Relative paths are resolved against the file's folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    #[serde(default)]
    pub gossip: GossipConfig,
    pub tls: TlsConfig,
    #[serde(default)]
    pub gateway: GatewayConfig,
    pub keys: KeysConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub replication: ReplicationConfig,
    #[serde(default)]
    pub inference: InferenceConfig,
    #[serde(default)]
    pub tasks: TasksConfig,
    #[serde(default)]
    pub agents: AgentsConfig,
    /// Extra roles: name → permissions (`memory.read`, `tasks.*`, `*`).
    #[serde(default)]
    pub roles: BTreeMap<String, Vec<String>>,
    /// Folder the file was loaded from; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's name; must equal the name in its certificate.
    pub name: String,
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// The swarm file; the embedded preset when absent.
    #[serde(default)]
    pub swarm_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GossipConfig {
    #[serde(default = "default_gossip_bind")]
    pub bind: SocketAddr,
    /// Address peers use to reach this node; `bind` when absent.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            bind: default_gossip_bind(),
            advertise: None,
            seeds: Vec::new(),
        }
    }
}

fn default_gossip_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7946))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default = "default_gateway_bind")]
    pub bind: SocketAddr,
    /// Largest accepted request body in bytes.
    #[serde(default = "default_body_limit")]
    pub body_limit: usize,
    /// HTTPS: the certificate and key the gateway presents. Without it the gateway speaks plain
    /// HTTP, which it only does on a loopback `bind` or with `allow_plain_http = true`.
    #[serde(default)]
    pub tls: Option<GatewayTls>,
    /// Serve plain HTTP on a non-loopback `bind` (bearer tokens then cross the network readable).
    #[serde(default)]
    pub allow_plain_http: bool,
    /// Time a client has to send a whole request head (and to finish the TLS handshake), counted
    /// from the connection's start or from the first byte after an idle keep-alive pause.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: HumanDuration,
    /// Time a client has to send a whole request body, counted from its head.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: HumanDuration,
    /// A keep-alive connection with no request for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Open connections at most; beyond it new ones are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections at most from one source IP address.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
}

/// The gateway's own certificate chain (PEM) and private key (PEM, mode 0600).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            bind: default_gateway_bind(),
            body_limit: default_body_limit(),
            tls: None,
            allow_plain_http: false,
            header_read_timeout: default_header_read_timeout(),
            body_timeout: default_body_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_source: default_max_connections_per_source(),
        }
    }
}

fn default_header_read_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
fn default_body_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_connections_per_source() -> usize {
    64
}

fn default_gateway_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_body_limit() -> usize {
    1 << 20
}

/// Key files. Each may instead come from the environment variable named in [`crate::secret`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// 32-byte master key (hex), wraps every data key. Env: `SWARM_MASTER_KEY`.
    pub master_key_file: PathBuf,
    /// Ed25519 seed (hex) that signs JWTs. Env: `SWARM_JWT_SIGNING_KEY`.
    pub jwt_signing_key_file: PathBuf,
    /// Public keys (hex) of retired signing keys still accepted for verification (rotation).
    #[serde(default)]
    pub jwt_previous_public_keys: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default = "default_issuer")]
    pub issuer: String,
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Allowed clock skew when checking `exp`/`nbf`.
    #[serde(default = "default_leeway")]
    pub leeway: HumanDuration,
    /// Longest lifetime `swarm token` and `POST /v1/keys` will issue.
    #[serde(default = "default_max_ttl")]
    pub max_token_ttl: HumanDuration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: default_issuer(),
            audience: default_audience(),
            leeway: default_leeway(),
            max_token_ttl: default_max_ttl(),
        }
    }
}

fn default_issuer() -> String {
    "swarm".into()
}
fn default_audience() -> String {
    "swarm".into()
}
fn default_leeway() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}
fn default_max_ttl() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(365 * 86_400))
}

/// How memory replicates between peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// How often a node compares digests with a random live peer (also at once when a peer
    /// comes back).
    #[serde(default = "default_anti_entropy_every")]
    pub anti_entropy_every: HumanDuration,
    /// How long a `?w=2` write waits for a peer to have it durable before failing.
    #[serde(default = "default_w2_timeout")]
    pub w2_timeout: HumanDuration,
    /// Tombstones older than this, that every live member has synced past, are dropped.
    #[serde(default = "default_tombstone_gc_after")]
    pub tombstone_gc_after: HumanDuration,
    /// Deltas queued per peer before new ones are dropped (anti-entropy repairs them).
    #[serde(default = "default_peer_queue")]
    pub peer_queue: usize,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            anti_entropy_every: default_anti_entropy_every(),
            w2_timeout: default_w2_timeout(),
            tombstone_gc_after: default_tombstone_gc_after(),
            peer_queue: default_peer_queue(),
        }
    }
}

fn default_anti_entropy_every() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(5))
}
fn default_w2_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(2))
}
fn default_tombstone_gc_after() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(3600))
}
fn default_peer_queue() -> usize {
    8192
}

/// The models this node serves and its engine's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    /// Models served here (none: this node serves no model, its gateway routes to peers).
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    /// Where `swarm model pull` puts catalog models and where names without a path are looked up.
    #[serde(default = "default_model_dir")]
    pub model_dir: PathBuf,
    /// Sequences decoding together at most (1: one request at a time).
    #[serde(default = "default_max_running")]
    pub max_running: usize,
    /// Requests waiting for a slot before new ones get 429.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
    /// Prompt tokens prefilled in one engine step.
    #[serde(default = "default_prefill_tokens")]
    pub prefill_tokens: usize,
    /// KV-cache budget in tokens, over all running sequences (each reserves prompt + max_tokens).
    #[serde(default = "default_kv_tokens")]
    pub kv_tokens: usize,
    /// Tokens per KV block.
    #[serde(default = "default_kv_block")]
    pub kv_block_tokens: usize,
    /// Prompt tokens whose KV is kept after their prefill, so later prompts sharing a prefix (a
    /// system prompt, a conversation so far) skip computing it; held besides `kv_tokens`
    /// (0: off).
    #[serde(default = "default_prefix_cache_tokens")]
    pub prefix_cache_tokens: usize,
    /// `max_tokens` when a request gives none.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: usize,
}

/// One served model: a catalog name, or any name with a `path` (a `.gguf` file or a Hugging Face
/// folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    #[serde(default)]
    pub path: Option<PathBuf>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            model_dir: default_model_dir(),
            max_running: default_max_running(),
            max_waiting: default_max_waiting(),
            prefill_tokens: default_prefill_tokens(),
            kv_tokens: default_kv_tokens(),
            kv_block_tokens: default_kv_block(),
            prefix_cache_tokens: default_prefix_cache_tokens(),
            default_max_tokens: default_max_tokens(),
        }
    }
}

fn default_model_dir() -> PathBuf {
    PathBuf::from("../models")
}
fn default_max_running() -> usize {
    32
}
fn default_max_waiting() -> usize {
    256
}
fn default_prefill_tokens() -> usize {
    2048
}
fn default_kv_tokens() -> usize {
    65_536
}
fn default_kv_block() -> usize {
    16
}
fn default_prefix_cache_tokens() -> usize {
    4096
}
fn default_max_tokens() -> usize {
    256
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest stored value in bytes: its JSON text plus its tags.
    #[serde(default = "default_max_value")]
    pub max_value_bytes: usize,
    /// Most tags on one value.
    #[serde(default = "default_max_tags")]
    pub max_tags: usize,
    /// Longest tag, in bytes.
    #[serde(default = "default_max_tag_bytes")]
    pub max_tag_bytes: usize,
    /// Byte budget of one list page (names, values and tags of its items): a page stops before
    /// the item that would exceed it and points to the rest with `next`.
    #[serde(default = "default_max_list_bytes")]
    pub max_list_bytes: usize,
    /// Longest namespace or key name.
    #[serde(default = "default_max_name")]
    pub max_name_len: usize,
    /// Most entries one namespace may hold.
    #[serde(default = "default_max_entries")]
    pub max_namespace_entries: usize,
    /// Most items a list request returns.
    #[serde(default = "default_max_list")]
    pub max_list: usize,
    /// Decrypted values kept in memory for hot reads (0: off). Erasing a subject drops its own.
    #[serde(default = "default_read_cache")]
    pub read_cache_entries: usize,
    /// Requests per second one source (an IPv4 address, an IPv6 /64) may make, checked before
    /// authentication; above it the gateway answers 429 with `Retry-After`. Loopback included.
    #[serde(default = "default_source_rate")]
    pub requests_per_second_per_source: u32,
    /// Requests a source may make at once on top of its rate (the token bucket's size).
    #[serde(default = "default_source_burst")]
    pub burst_per_source: u32,
    /// Most sources tracked at once (rate buckets, refusal counters). When full, requests from
    /// a source not yet tracked are refused (fail closed), never tracked without bound.
    #[serde(default = "default_max_sources")]
    pub max_tracked_sources: usize,
    /// Anonymous refusals (401, and 4xx of unauthenticated requests, 429 of the rate limit) are
    /// counted per source over this interval and audited as one `http.refused` entry.
    #[serde(default = "default_refusal_audit_interval")]
    pub refusal_audit_interval: HumanDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_value_bytes: default_max_value(),
            max_tags: default_max_tags(),
            max_tag_bytes: default_max_tag_bytes(),
            max_list_bytes: default_max_list_bytes(),
            max_name_len: default_max_name(),
            max_namespace_entries: default_max_entries(),
            max_list: default_max_list(),
            read_cache_entries: default_read_cache(),
            requests_per_second_per_source: default_source_rate(),
            burst_per_source: default_source_burst(),
            max_tracked_sources: default_max_sources(),
            refusal_audit_interval: default_refusal_audit_interval(),
        }
    }
}

fn default_max_value() -> usize {
    256 * 1024
}
fn default_max_tags() -> usize {
    32
}
fn default_max_tag_bytes() -> usize {
    128
}
fn default_max_list_bytes() -> usize {
    4 << 20
}
fn default_max_name() -> usize {
    128
}
fn default_max_entries() -> usize {
    1_000_000
}
fn default_max_list() -> usize {
    1000
}
fn default_read_cache() -> usize {
    10_000
}
/// Sustained requests per second from one source: far above what one client program needs,
/// far below what it takes to fill the disk or the audit log.
fn default_source_rate() -> u32 {
    1000
}
fn default_source_burst() -> u32 {
    2000
}
fn default_max_sources() -> usize {
    10_000
}
fn default_refusal_audit_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::from_toml(&path.display().to_string(), &text, base)
    }

    pub fn from_toml(file: &str, text: &str, base_dir: PathBuf) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::new(text);
        let mut cfg: NodeConfig =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
                file: file.to_string(),
                field: e.path().to_string(),
                message: e.inner().message().to_string(),
            })?;
        cfg.base_dir = base_dir;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            field: field.to_string(),
            message,
        };
        let name = &self.node.name;
        if name.is_empty()
            || name.len() > 63
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "node.name",
                format!("`{name}`: use 1-63 letters, digits, `-` or `_`"),
            ));
        }
        if self.gateway.body_limit == 0 {
            return Err(invalid(
                "gateway.body_limit",
                "must be greater than zero".into(),
            ));
        }
        self.validate_gateway(file)?;
        let r = &self.replication;
        if r.anti_entropy_every.0.is_zero() || r.w2_timeout.0.is_zero() {
            return Err(invalid(
                "replication",
                "anti_entropy_every and w2_timeout must be greater than zero".into(),
            ));
        }
        if r.peer_queue == 0 {
            return Err(invalid(
                "replication.peer_queue",
                "must be greater than zero".into(),
            ));
        }
        if self.limits.max_value_bytes == 0 || self.limits.max_list == 0 {
            return Err(invalid("limits", "limits must be greater than zero".into()));
        }
        if self.limits.max_list_bytes < self.limits.max_value_bytes {
            return Err(invalid(
                "limits.max_list_bytes",
                "must be at least limits.max_value_bytes (a page holds at least one value)".into(),
            ));
        }
        let l = &self.limits;
        for (field, zero) in [
            (
                "limits.requests_per_second_per_source",
                l.requests_per_second_per_source == 0,
            ),
            ("limits.burst_per_source", l.burst_per_source == 0),
            ("limits.max_tracked_sources", l.max_tracked_sources == 0),
            (
                "limits.refusal_audit_interval",
                l.refusal_audit_interval.0.is_zero(),
            ),
        ] {
            if zero {
                return Err(invalid(field, "must be greater than zero".into()));
            }
        }
        let inf = &self.inference;
        for (field, v) in [
            ("inference.max_running", inf.max_running),
            ("inference.max_waiting", inf.max_waiting),
            ("inference.prefill_tokens", inf.prefill_tokens),
            ("inference.kv_block_tokens", inf.kv_block_tokens),
            ("inference.default_max_tokens", inf.default_max_tokens),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be greater than zero".into()));
            }
        }
        if inf.kv_tokens < inf.kv_block_tokens {
            return Err(invalid(
                "inference.kv_tokens",
                "must hold at least one block".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in inf.models.iter().enumerate() {
            let ok = !m.name.is_empty()
                && m.name.len() <= 64
                && m.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
            if !ok {
                return Err(invalid(
                    &format!("inference.models[{i}].name"),
                    format!(
                        "`{}`: use 1-64 letters, digits, `-`, `_`, `.` or `:`",
                        m.name
                    ),
                ));
            }
            if !names.insert(m.name.as_str()) {
                return Err(invalid(
                    &format!("inference.models[{i}].name"),
                    format!("`{}` is listed twice", m.name),
                ));
            }
        }
        for (role, perms) in &self.roles {
            if ["admin", "user", "viewer"].contains(&role.as_str()) {
                return Err(invalid(
                    &format!("roles.{role}"),
                    "built-in roles cannot be redefined".into(),
                ));
            }
            for p in perms {
                if !valid_permission(p) {
                    return Err(invalid(
                        &format!("roles.{role}"),
                        format!("`{p}` is not a permission (e.g. `memory.read`, `tasks.*`, `*`)"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Connection limits, timeouts, and HTTPS off a loopback address.
    fn validate_gateway(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            field: field.to_string(),
            message,
        };
        let g = &self.gateway;
        for (field, d) in [
            ("gateway.header_read_timeout", g.header_read_timeout),
            ("gateway.body_timeout", g.body_timeout),
            ("gateway.idle_timeout", g.idle_timeout),
        ] {
            if d.0.is_zero() {
                return Err(invalid(field, "must be greater than zero".into()));
            }
        }
        if g.max_connections == 0 {
            return Err(invalid(
                "gateway.max_connections",
                "must be greater than zero".into(),
            ));
        }
        if g.max_connections_per_source == 0 || g.max_connections_per_source > g.max_connections {
            return Err(invalid(
                "gateway.max_connections_per_source",
                "must be between 1 and gateway.max_connections".into(),
            ));
        }
        if g.tls.is_none() && !g.allow_plain_http && !g.bind.ip().is_loopback() {
            return Err(invalid(
                "gateway.tls",
                format!(
                    "the gateway binds {}, which is not a loopback address, without TLS: bearer \
                     tokens would cross the network readable; add [gateway.tls] cert and key \
                     (`swarm init` writes them), or set gateway.allow_plain_http = true",
                    g.bind
                ),
            ));
        }
        Ok(())
    }

    /// Resolve a configured path against the config file's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.resolve(&self.node.data_dir)
    }

    /// The swarm file this node uses: the configured one, or the embedded preset. The
    /// `[tasks]` and `[agents]` sections are checked against it (they name its agents).
    pub fn swarm_file(&self) -> Result<SwarmFile, ConfigError> {
        let swarm = match &self.node.swarm_file {
            Some(p) => SwarmFile::load(&self.resolve(p))?,
            None => SwarmFile::preset()?,
        };
        self.tasks.validate("node.toml", &swarm)?;
        self.agents.validate("node.toml", &swarm, &self.roles)?;
        Ok(swarm)
    }

    pub fn gossip_advertise(&self) -> SocketAddr {
        self.gossip.advertise.unwrap_or(self.gossip.bind)
    }
}

/// `*`, or two or more dot-separated parts, each `*` or lowercase letters, digits and `_`
/// (`memory.read`, `tasks.*`, `*.read`).
fn valid_permission(p: &str) -> bool {
    if p == "*" {
        return true;
    }
    let parts: Vec<&str> = p.split('.').collect();
    parts.len() >= 2
        && parts.iter().all(|part| {
            *part == "*"
                || (!part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[node]
name = "node-1"
data_dir = "data"

[tls]
ca_cert = "../ca.pem"
cert = "node.pem"
key = "node.key"

[keys]
master_key_file = "master.key"
jwt_signing_key_file = "../jwt.key"
"#;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::from_toml("node.toml", text, PathBuf::from("/etc/swarm/node-1"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).expect("parses");
        assert_eq!(c.gateway.body_limit, 1 << 20);
        assert_eq!(c.auth.issuer, "swarm");
        assert_eq!(c.data_dir(), PathBuf::from("/etc/swarm/node-1/data"));
        assert!(c.swarm_file().is_ok());
    }

    #[test]
    fn unknown_field_is_rejected_with_path() {
        let text = format!("{MINIMAL}\n[gateway]\nbind = \"127.0.0.1:1\"\nport = 3\n");
        let e = parse(&text).expect_err("unknown field");
        assert_eq!(e.field(), Some("gateway.port"), "{e}");
    }

    #[test]
    fn wrong_type_is_rejected_with_path() {
        let text = MINIMAL.replace("name = \"node-1\"", "name = 7");
        let e = parse(&text).expect_err("wrong type");
        assert_eq!(e.field(), Some("node.name"), "{e}");
    }

    #[test]
    fn bad_node_name_is_rejected() {
        let text = MINIMAL.replace("node-1", "node/1");
        assert_eq!(
            parse(&text).expect_err("bad name").field(),
            Some("node.name")
        );
    }

    #[test]
    fn custom_roles_are_validated() {
        let ok = format!("{MINIMAL}\n[roles]\nauditor = [\"audit.read\", \"memory.*\"]\n");
        assert!(parse(&ok).is_ok());
        let bad = format!("{MINIMAL}\n[roles]\nauditor = [\"Audit Read\"]\n");
        assert_eq!(
            parse(&bad).expect_err("bad perm").field(),
            Some("roles.auditor")
        );
        let builtin = format!("{MINIMAL}\n[roles]\nadmin = [\"memory.read\"]\n");
        assert!(parse(&builtin).is_err());
    }

    #[test]
    fn per_source_rate_limit_has_defaults_and_is_validated() {
        let c = parse(MINIMAL).expect("parses");
        assert_eq!(c.limits.requests_per_second_per_source, 1000);
        assert_eq!(c.limits.burst_per_source, 2000);
        assert_eq!(c.limits.max_tracked_sources, 10_000);
        assert_eq!(c.limits.refusal_audit_interval.0.as_secs(), 60);
        let raised = format!(
            "{MINIMAL}\n[limits]\nrequests_per_second_per_source = 100000\nburst_per_source = 100000\nrefusal_audit_interval = \"10s\"\n"
        );
        let c = parse(&raised).expect("parses");
        assert_eq!(c.limits.requests_per_second_per_source, 100_000);
        for field in [
            "requests_per_second_per_source = 0",
            "burst_per_source = 0",
            "max_tracked_sources = 0",
            "refusal_audit_interval = \"0s\"",
        ] {
            let text = format!("{MINIMAL}\n[limits]\n{field}\n");
            let e = parse(&text).expect_err("zero");
            let name = field.split(' ').next().unwrap_or_default();
            assert_eq!(e.field(), Some(format!("limits.{name}").as_str()), "{e}");
        }
    }

    #[test]
    fn gateway_off_loopback_needs_tls_or_an_explicit_opt_in() {
        let c = parse(MINIMAL).expect("parses");
        assert_eq!(c.gateway.header_read_timeout.0.as_secs(), 10);
        assert_eq!(c.gateway.max_connections_per_source, 64);
        assert!(c.gateway.tls.is_none());
        let open = format!("{MINIMAL}\n[gateway]\nbind = \"0.0.0.0:8080\"\n");
        let e = parse(&open).expect_err("plain HTTP off loopback");
        assert_eq!(e.field(), Some("gateway.tls"), "{e}");
        assert_eq!(e.kind(), "config_invalid");
        let routable = format!("{MINIMAL}\n[gateway]\nbind = \"10.1.2.3:8080\"\n");
        assert!(parse(&routable).is_err());
        let opt_in = format!("{open}allow_plain_http = true\n");
        assert!(parse(&opt_in).is_ok());
        let tls = format!("{open}\n[gateway.tls]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n");
        let c = parse(&tls).expect("TLS off loopback");
        assert_eq!(
            c.gateway.tls.map(|t| t.key),
            Some(PathBuf::from("gateway.key"))
        );
        let v6 = format!("{MINIMAL}\n[gateway]\nbind = \"[::1]:8080\"\n");
        assert!(parse(&v6).is_ok());
    }

    #[test]
    fn gateway_limits_are_validated() {
        let t = format!(
            "{MINIMAL}\n[gateway]\nheader_read_timeout = \"2s\"\nidle_timeout = \"5m\"\nmax_connections = 10\nmax_connections_per_source = 10\n"
        );
        let c = parse(&t).expect("parses");
        assert_eq!(c.gateway.idle_timeout.0.as_secs(), 300);
        assert_eq!(c.gateway.max_connections, 10);
        let zero = format!("{MINIMAL}\n[gateway]\nbody_timeout = \"0s\"\n");
        assert_eq!(
            parse(&zero).expect_err("zero").field(),
            Some("gateway.body_timeout")
        );
        let over =
            format!("{MINIMAL}\n[gateway]\nmax_connections = 4\nmax_connections_per_source = 5\n");
        assert_eq!(
            parse(&over).expect_err("over").field(),
            Some("gateway.max_connections_per_source")
        );
        let unknown = format!("{MINIMAL}\n[gateway.tls]\ncert = \"a\"\nkey = \"b\"\nca = \"c\"\n");
        assert_eq!(
            parse(&unknown).expect_err("unknown").field(),
            Some("gateway.tls.ca")
        );
    }

    #[test]
    fn permission_syntax() {
        for ok in ["*", "memory.read", "memory.*", "x.y.z", "*.read"] {
            assert!(valid_permission(ok), "{ok}");
        }
        for bad in ["", "memory", "memory.", "Memory.read", "a..b"] {
            assert!(!valid_permission(bad), "{bad}");
        }
    }
}
