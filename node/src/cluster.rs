//! The node's place in the cluster: starts membership (QUIC + gossip) from the node config,
//! publishes this node's metadata, audits refused peers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use swarm_config::NodeConfig;
use swarm_membership::{
    DeviceMeta, GossipSettings, IncomingStream, Membership, MembershipConfig, MembershipError,
    NodeMeta, TlsIdentity,
};
use tokio::sync::mpsc;

use crate::gateway::AppState;

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
        meta: node_meta(gateway, 0),
        settings,
        max_connections: 1024,
        streams: Some(streams),
    })
    .await
}

/// This node's metadata: gateway address, roles, devices, load, version.
pub fn node_meta(gateway: SocketAddr, load: u32) -> NodeMeta {
    let devices = swarm_gpu::discover()
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
        .collect();
    NodeMeta {
        gateway: gateway.to_string(),
        roles: vec!["gateway".into(), "agents".into()],
        devices,
        load,
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Background duties while the node runs: audit refused peers, republish load when it changes.
pub fn spawn_duties(state: AppState, membership: Membership, gateway: SocketAddr) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_load = 0u32;
        let mut n = 0u64;
        loop {
            tick.tick().await;
            n += 1;
            for r in membership.take_refusals() {
                state.audit_system("cluster.connect", &r.remote, "denied", &r.reason);
            }
            // Load changes spread by gossip; at most every 5 s so they do not crowd out liveness.
            if n.is_multiple_of(5) {
                let load = u32::try_from(state.metrics.in_flight.load(Ordering::Relaxed))
                    .unwrap_or(u32::MAX);
                if load != last_load {
                    last_load = load;
                    if let Err(e) = membership.set_meta(node_meta(gateway, load)).await {
                        tracing::debug!(error = %e, "metadata not published");
                    }
                }
            }
            if Arc::strong_count(&state) <= 1 {
                break;
            }
        }
    });
}

/// Hand streams peers open to whoever serves their kind; unknown kinds are refused.
pub fn spawn_streams(mut rx: mpsc::Receiver<IncomingStream>) {
    tokio::spawn(async move {
        while let Some(mut s) = rx.recv().await {
            tracing::debug!(peer = %s.peer, kind = s.kind, "stream of unknown kind refused");
            let _ = s.recv.stop(3u32.into());
        }
    });
}
