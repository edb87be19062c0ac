//! The node's place in the cluster: starts membership (QUIC + gossip) from the node config,
//! publishes this node's metadata, audits refused peers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use swarm_actors::{ActorCluster, Replicator, Services};
use swarm_config::NodeConfig;
use swarm_membership::{
    DeviceMeta, GossipSettings, IncomingStream, Membership, MembershipConfig, MembershipError,
    ModelMeta, NodeMeta, TlsIdentity,
};
use swarm_storage::AuditSink;
use tokio::sync::mpsc;

use crate::gateway::AppState;
use crate::inference::Inference;

/// Start the membership service for `cfg`; `gateway` is the address clients reach this node's
/// gateway at.
pub async fn start_membership(
    cfg: &NodeConfig,
    gateway: SocketAddr,
    streams: mpsc::Sender<IncomingStream>,
) -> Result<Membership, MembershipError> {
    let identity = TlsIdentity::load(
        &cfg.resolve(&cfg.tls.ca_cert),
        &cfg.resolve(&cfg.tls.cert),
        &cfg.resolve(&cfg.tls.key),
    )?;
    if identity.name() != cfg.node.name {
        tracing::warn!(
            cert = identity.name(),
            config = %cfg.node.name,
            "node.name differs from the certificate's name; the certificate's name is used in the cluster"
        );
    }
    let settings = GossipSettings {
        cluster_size: (cfg.gossip.seeds.len() as u32 + 1).max(16),
        ..GossipSettings::default()
    };
    Membership::start(MembershipConfig {
        identity,
        bind: cfg.gossip.bind,
        advertise: cfg.gossip_advertise(),
        seeds: cfg.gossip.seeds.clone(),
        meta: node_meta(gateway, 0, Vec::new(), cfg.agents.host),
        settings,
        max_connections: 1024,
        streams: Some(streams),
    })
    .await
}

/// This node's metadata: gateway address, roles (`agents` when it may host agents), devices,
/// load, version, served models.
pub fn node_meta(
    gateway: SocketAddr,
    load: u32,
    models: Vec<ModelMeta>,
    hosts_agents: bool,
) -> NodeMeta {
    let mut roles = vec!["gateway".to_string()];
    if hosts_agents {
        roles.push("agents".into());
    }
    NodeMeta {
        gateway: gateway.to_string(),
        roles,
        devices: devices(),
        load,
        version: env!("CARGO_PKG_VERSION").into(),
        models,
    }
}

/// This machine's devices, discovered once (with `cuda`, discovery opens each GPU's context;
/// metadata is republished every few seconds).
fn devices() -> Vec<DeviceMeta> {
    static DEVICES: std::sync::OnceLock<Vec<DeviceMeta>> = std::sync::OnceLock::new();
    DEVICES
        .get_or_init(|| {
            swarm_gpu::discover()
                .into_iter()
                .map(|d| match d {
                    swarm_gpu::Device::Cpu { cores } => DeviceMeta {
                        kind: "cpu".into(),
                        name: format!("{cores} cores"),
                        memory_total: 0,
                        memory_free: 0,
                    },
                    swarm_gpu::Device::Cuda {
                        ordinal,
                        name,
                        total_mib,
                    } => DeviceMeta {
                        kind: "cuda".into(),
                        name: format!("{ordinal}: {name}"),
                        memory_total: total_mib * 1024 * 1024,
                        memory_free: 0,
                    },
                })
                .collect()
        })
        .clone()
}

/// Background duties while the node runs: audit refused peers (into `audit`, the node's audit
/// writer), republish load when it changes.
pub fn spawn_duties(
    state: AppState,
    audit: Arc<dyn AuditSink>,
    membership: Membership,
    gateway: SocketAddr,
    hosts_agents: bool,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_load = 0u32;
        let mut last_models: Vec<ModelMeta> = Vec::new();
        let mut n = 0u64;
        loop {
            tick.tick().await;
            n += 1;
            for r in membership.take_refusals() {
                crate::gateway::audit_system(
                    audit.as_ref(),
                    &state.node,
                    "cluster.connect",
                    &r.remote,
                    "denied",
                    &r.reason,
                );
            }
            // Served models spread at once when they change (a model finished loading or
            // stopped); load changes at most every 2 s (gateway load every 5 s) so they do not
            // crowd out liveness.
            let load = if n.is_multiple_of(5) {
                u32::try_from(state.metrics.in_flight.load(Ordering::Relaxed)).unwrap_or(u32::MAX)
            } else {
                last_load
            };
            let models = state.inference.advertised();
            let names = |m: &[ModelMeta]| m.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
            let publish = names(&models) != names(&last_models)
                || (n.is_multiple_of(2) && models != last_models)
                || load != last_load;
            if publish {
                last_load = load;
                last_models = models.clone();
                if let Err(e) = membership
                    .set_meta(node_meta(gateway, load, models, hosts_agents))
                    .await
                {
                    tracing::debug!(error = %e, "metadata not published");
                }
            }
        }
    });
}

/// Hand streams peers open to whoever serves their kind; unknown kinds are refused.
pub fn spawn_streams(
    rx: mpsc::Receiver<IncomingStream>,
    actors: ActorCluster,
    replicator: Replicator,
    inference: Arc<Inference>,
    tasks: swarm_actors::tasks::TaskService,
) {
    Services {
        actors,
        replicator,
        inference: Some(inference.cluster.clone()),
        tasks: Some(Arc::new(tasks)),
    }
    .spawn_dispatch(rx);
}

/// The actor cluster's cookie, derived from the cluster CA certificate. It is NOT a secret
/// (`ca.pem` is public) and guards nothing: every actor session rides a QUIC stream whose peer
/// proved a cluster certificate (mutual TLS) and whose ractor name must equal that certificate's
/// name, and ractor's own TCP listener fails every TLS handshake, so no session opens there
/// whatever cookie it offers (`swarm_actors::ActorCluster::start`). It must only be equal on every
/// node, which is why it is not derived from a per-node secret (master key, TLS key); the one
/// secret all nodes share, the JWT signing key, would tie actor sessions to JWT key rotation.
pub fn actor_cookie(cfg: &NodeConfig) -> String {
    use sha2::{Digest, Sha256};
    let ca = std::fs::read(cfg.resolve(&cfg.tls.ca_cert)).unwrap_or_default();
    hex::encode(&Sha256::digest([b"swarm actor cookie\0".as_slice(), &ca].concat())[..16])
}
