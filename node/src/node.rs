//! The composition root: `Node::start(cfg)` builds the store, auth, policy and gateway and serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use swarm_actors::agents::{Access, AgentRuntime, Roster};
use swarm_actors::tasks::{EventBus, QuicTaskPeers, TaskApi, TaskParts, TaskService};
use swarm_actors::{ActorCluster, Memory, RefusalHook, Replicator};
use swarm_config::secret::{ENV_JWT_SIGNING_KEY, ENV_MASTER_KEY, read_secret, read_secret_file};
use swarm_config::{ConfigError, NodeConfig};
use swarm_membership::Membership;
use swarm_storage::{AuditSink, MemoryLimits, SecretKey, Storage, StorageError, StorageOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::cluster;
use crate::gateway::{self, GatewayParts, Inner};
use crate::inference::Inference;
use crate::jwt::{self, Verifier};
use crate::policy::Policy;

/// How long a leaving node tries to complete a round with a peer before it goes anyway.
const HAND_OFF_LIMIT: Duration = Duration::from_secs(5);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("{what}: {message}")]
    Key { what: &'static str, message: String },
    #[error("actors: {0}")]
    Actors(String),
    #[error("cluster: {0}")]
    Membership(#[from] swarm_membership::MembershipError),
    #[error("gateway TLS: {path}: {message}")]
    GatewayTls {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("cannot bind the gateway to {addr}: {source} (is another node using this port?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl NodeError {
    pub fn kind(&self) -> &'static str {
        match self {
            NodeError::Config(e) => e.kind(),
            NodeError::Storage(e) => e.kind(),
            NodeError::Key { .. } => "bad_key",
            NodeError::Bind { .. } => "bind_failed",
            NodeError::GatewayTls { .. } => "gateway_tls",
            NodeError::Membership(e) => e.kind(),
            NodeError::Actors(_) => "actors",
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    pub name: String,
    /// The gateway's bound address.
    pub http_addr: SocketAddr,
    /// The cluster (QUIC) address.
    pub gossip_addr: SocketAddr,
    pub membership: Membership,
    pub actors: ActorCluster,
    pub state: gateway::AppState,
    /// Tasks and agents.
    pub tasks: TaskService,
    replicator: Option<Replicator>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
}

impl NodeHandle {
    /// Resolves when the node asked to be stopped (`POST /v1/cluster/leave`).
    pub async fn stop_requested(&self) {
        self.state.stop.notified().await;
    }

    /// Leave the cluster gracefully: stop taking work, hand what only this node holds to a
    /// peer (an anti-entropy round), announce the leave (peers see `left`), then shut down.
    pub async fn leave_and_shutdown(self) -> Result<(), NodeError> {
        self.stop(true).await
    }

    /// Reread the node config: announce to new seeds. Other changes need a restart.
    pub async fn reload(&self, cfg: &NodeConfig) -> Result<(), NodeError> {
        self.membership.add_seeds(cfg.gossip.seeds.clone()).await?;
        tracing::info!(
            seeds = cfg.gossip.seeds.len(),
            "config reloaded: announced to the seeds"
        );
        Ok(())
    }

    /// Stop accepting requests, finish those in flight, flush the store (peers find this node
    /// down, not left).
    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.stop(false).await
    }

    async fn stop(self, leave: bool) -> Result<(), NodeError> {
        let _ = self.shutdown.send(true);
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "gateway stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "gateway task failed"),
        }
        // The task service decides nothing more (writes already in flight finish on their own).
        self.tasks.shutdown();
        if leave {
            // A write no peer acknowledged (a stage result under loss) would leave with this
            // node, and the node adopting its tasks would run that stage again.
            if let Some(r) = &self.replicator
                && !r.hand_off(HAND_OFF_LIMIT).await
            {
                tracing::warn!(
                    limit = ?HAND_OFF_LIMIT,
                    "no anti-entropy round with a peer before leaving (none alive, or none \
                     answered in time): writes only this node holds wait for its return"
                );
            }
            if let Err(e) = self.membership.leave().await {
                tracing::warn!(error = %e, "graceful leave failed");
            }
        }
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            state.flush_audit();
            state.storage.sync()
        })
        .await
        .map_err(|e| StorageError::Engine(e.to_string()))??;
        if let Some(r) = &self.replicator {
            r.shutdown().await;
        }
        self.actors.shutdown().await;
        self.membership.shutdown().await;
        tracing::info!(node = %self.name, "node stopped");
        Ok(())
    }
}

/// Load the master key: `SWARM_MASTER_KEY` or the configured file (mode 0600).
pub fn load_master_key(cfg: &NodeConfig) -> Result<SecretKey, NodeError> {
    let text = read_secret(
        "master key",
        ENV_MASTER_KEY,
        &cfg.resolve(&cfg.keys.master_key_file),
    )?;
    SecretKey::from_hex(&text).map_err(|e| NodeError::Key {
        what: "master key",
        message: e.to_string(),
    })
}

/// Load the JWT signing key: `SWARM_JWT_SIGNING_KEY` or the configured file (mode 0600).
pub fn load_signing_key(cfg: &NodeConfig) -> Result<ed25519_dalek::SigningKey, NodeError> {
    let text = read_secret(
        "JWT signing key",
        ENV_JWT_SIGNING_KEY,
        &cfg.resolve(&cfg.keys.jwt_signing_key_file),
    )?;
    jwt::signing_key_from_hex(&text).map_err(|message| NodeError::Key {
        what: "JWT signing key",
        message,
    })
}

/// Open this node's store.
pub fn open_storage(cfg: &NodeConfig) -> Result<Storage, NodeError> {
    let master = load_master_key(cfg)?;
    let mut opts = StorageOptions::new(cfg.node.name.clone());
    opts.limits = MemoryLimits {
        max_value_bytes: cfg.limits.max_value_bytes,
        max_name_len: cfg.limits.max_name_len,
        max_namespace_entries: cfg.limits.max_namespace_entries,
        read_cache_entries: cfg.limits.read_cache_entries,
        max_tags: cfg.limits.max_tags,
        max_tag_bytes: cfg.limits.max_tag_bytes,
    };
    Ok(Storage::open(&cfg.data_dir(), master, opts)?)
}

/// Verify a stopped node's audit log without opening (or repairing) anything else.
pub fn verify_audit(cfg: &NodeConfig) -> Result<swarm_storage::VerifyReport, NodeError> {
    let master = load_master_key(cfg)?;
    let engine = swarm_storage::SledEngine::open(&cfg.data_dir().join("sled"))?;
    let log = swarm_storage::AuditLog::for_verify(Arc::new(engine), &master);
    Ok(log.verify()?)
}

/// Agents pass the node's RBAC policy like any client.
#[derive(Debug)]
struct PolicyAccess(Policy);

impl Access for PolicyAccess {
    fn allowed(&self, role: &str, action: &str) -> bool {
        self.0.allows(role, action)
    }
}

/// Start this node's agents and task service.
#[allow(clippy::too_many_arguments)]
async fn start_tasks(
    cfg: &NodeConfig,
    swarm: &swarm_config::SwarmFile,
    storage: &Storage,
    replicator: &Replicator,
    audit: Arc<dyn AuditSink>,
    inference: &Arc<Inference>,
    policy: &Policy,
    membership: &Membership,
) -> Result<TaskService, NodeError> {
    let memory = Memory::new(
        cfg.node.name.clone(),
        storage.clone(),
        Some(replicator.clone()),
        audit,
    );
    let events = Arc::new(EventBus::new());
    spawn_member_events(membership.clone(), events.clone());
    let cluster_inference: Arc<dyn swarm_actors::Inference> = inference.cluster.clone();
    let agents = AgentRuntime::start(
        cfg.node.name.clone(),
        Roster::new(swarm, &cfg.agents),
        cfg.agents.clone(),
        cluster_inference.clone(),
        memory.clone(),
        Arc::new(PolicyAccess(policy.clone())),
        events.clone(),
    )
    .await
    .map_err(|e| NodeError::Actors(e.to_string()))?;
    Ok(TaskService::start(TaskParts {
        node: cfg.node.name.clone(),
        tasks: cfg.tasks.clone(),
        swarm: swarm.clone(),
        memory,
        inference: cluster_inference,
        agents,
        events,
        peers: Arc::new(QuicTaskPeers {
            membership: membership.clone(),
            replicator: replicator.clone(),
            hosts_here: cfg.agents.host,
        }),
        seed: rand::random(),
    }))
}

/// Membership changes as events (`member.up`, `member.down`, `member.left`), as this node
/// sees them; every node publishes its own view (they are not relayed).
fn spawn_member_events(membership: Membership, events: Arc<EventBus>) {
    use swarm_membership::MemberEvent;
    let mut rx = membership.subscribe();
    let node = membership.name().to_string();
    tokio::spawn(async move {
        loop {
            let e = match rx.recv().await {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            let (kind, member) = match e {
                MemberEvent::Up(id) => ("member.up", id.name),
                MemberEvent::Down(id) => ("member.down", id.name),
                MemberEvent::Left(id) => ("member.left", id.name),
                _ => continue,
            };
            events.publish(swarm_actors::tasks::NewEvent {
                kind: kind.into(),
                task: None,
                agent: None,
                submitter: None,
                node: node.clone(),
                data: serde_json::json!({"member": member}),
            });
        }
    });
}

/// The `swarm` node.
#[derive(Debug)]
pub struct Node;

impl Node {
    /// Start a node from its config and serve the gateway until shut down.
    pub async fn start(cfg: NodeConfig) -> Result<NodeHandle, NodeError> {
        let swarm = cfg.swarm_file()?;
        let signing_key = load_signing_key(&cfg)?;
        let mut verify_keys = vec![signing_key.verifying_key()];
        for p in &cfg.keys.jwt_previous_public_keys {
            let text = read_secret_file(&cfg.resolve(p)).or_else(|_| {
                std::fs::read_to_string(cfg.resolve(p)).map_err(|source| ConfigError::Io {
                    path: cfg.resolve(p),
                    source,
                })
            })?;
            verify_keys.push(jwt::verifying_key_from_hex(&text).map_err(|message| {
                NodeError::Key {
                    what: "previous JWT public key",
                    message,
                }
            })?);
        }
        let storage = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || open_storage(&cfg))
                .await
                .map_err(|e| StorageError::Engine(e.to_string()))??
        };
        let verifier = Verifier::new(
            verify_keys,
            cfg.auth.issuer.clone(),
            cfg.auth.audience.clone(),
            cfg.auth.leeway.0.as_secs(),
            cfg.auth.max_token_ttl.0.as_secs(),
        );
        let auth = Authenticator::new(verifier, signing_key.clone(), &storage)?;
        let tls = crate::server::tls_acceptor(&cfg)?;
        let listener = tokio::net::TcpListener::bind(cfg.gateway.bind)
            .await
            .map_err(|source| NodeError::Bind {
                addr: cfg.gateway.bind,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| NodeError::Bind {
            addr: cfg.gateway.bind,
            source,
        })?;
        let (streams_tx, streams_rx) = tokio::sync::mpsc::channel(64);
        let membership = cluster::start_membership(&cfg, http_addr, streams_tx).await?;
        let actors = ActorCluster::start(membership.name(), &cluster::actor_cookie(&cfg))
            .await
            .map_err(|e| NodeError::Actors(e.to_string()))?;
        // One audit writer, before anything that audits: refused replicated changes, refused
        // peers, the memory service and the gateway all write into it.
        let audit_writer = Arc::new(
            gateway::AuditWriter::spawn(storage.audit.clone(), storage.engine.clone())
                .map_err(|e| StorageError::Engine(format!("start the audit writer: {e}")))?,
        );
        let audit: Arc<dyn AuditSink> = audit_writer.clone();
        let hook: RefusalHook = {
            let (audit, node) = (audit.clone(), cfg.node.name.clone());
            Arc::new(move |peer: &str, code: &str, detail: &str| {
                gateway::audit_system(
                    audit.as_ref(),
                    &node,
                    "memory.replicate",
                    peer,
                    "denied",
                    &format!("{code}: {detail}"),
                );
            })
        };
        let replicator = Replicator::start(
            storage.clone(),
            membership.clone(),
            cfg.replication.clone(),
            hook,
            Some(audit.clone()),
        );
        let inference = Inference::start(&cfg, Some(membership.clone())).await;
        let policy = Policy::new(&cfg.roles);
        let tasks = start_tasks(
            &cfg,
            &swarm,
            &storage,
            &replicator,
            audit.clone(),
            &inference,
            &policy,
            &membership,
        )
        .await?;
        let state = Inner::with_audit(
            GatewayParts {
                node: cfg.node.name.clone(),
                storage,
                auth,
                policy,
                swarm,
                limits: cfg.limits.clone(),
                body_limit: cfg.gateway.body_limit,
                max_token_ttl_s: cfg.auth.max_token_ttl.0.as_secs(),
                signing_key,
                issuer: cfg.auth.issuer.clone(),
                audience: cfg.auth.audience.clone(),
                membership: Some(membership.clone()),
                actors: Some(actors.clone()),
                replicator: Some(replicator.clone()),
                inference: inference.clone(),
                tasks: Some(Arc::new(tasks.clone()) as Arc<dyn TaskApi>),
                workflows: gateway::workflow_stages(&cfg.tasks),
            },
            audit_writer,
        );
        cluster::spawn_duties(
            state.clone(),
            audit,
            membership.clone(),
            http_addr,
            cfg.agents.host,
        );
        cluster::spawn_streams(
            streams_rx,
            actors.clone(),
            replicator.clone(),
            inference,
            tasks.clone(),
        );
        swarm_actors::spawn_sessions(membership.clone(), actors.clone());
        // A node with seeds catches up with a peer before it serves (streams are already
        // dispatched, so rounds peers start towards it are served too), whatever its name: a
        // node that was down must not hand out, or take writes for, what the cluster deleted or
        // erased meanwhile. With no live peer for two seconds (a cold start) it serves as it is;
        // a node without seeds, at once. The task service looks for orphaned tasks only after.
        let alone = if cfg.gossip.seeds.is_empty() {
            Duration::ZERO
        } else {
            Duration::from_secs(2)
        };
        if !replicator.catch_up(alone, Duration::from_secs(10)).await
            && !cfg.gossip.seeds.is_empty()
        {
            tracing::warn!("no anti-entropy round with a peer yet; serving local data as it is");
        }
        let (tx, rx) = watch::channel(false);
        let app = gateway::router(Arc::clone(&state));
        let https = tls.is_some();
        let server = tokio::spawn(crate::server::serve(
            listener,
            app,
            tls,
            crate::server::ServeOptions::from_config(&cfg.gateway),
            rx,
        ));
        let gossip_addr = membership.local_addr()?;
        tracing::info!(node = %cfg.node.name, %http_addr, https, %gossip_addr, secured = state.secured, audited = state.audited, "node started");
        Ok(NodeHandle {
            name: cfg.node.name.clone(),
            http_addr,
            gossip_addr,
            membership,
            actors,
            state,
            tasks,
            replicator: Some(replicator),
            shutdown: tx,
            server,
        })
    }
}
