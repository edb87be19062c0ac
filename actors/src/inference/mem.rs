//! [`MemInferenceNet`]: an in-memory network of [`ClusterInference`] nodes, the test double of
//! QUIC and gossip. What a node serves is what it advertises (or what the test says gossip claims); a
//! stream is a pair of in-memory pipes to the peer's [`ClusterInference::serve`]; a killed node
//! is gone from every view and the streams it was serving break mid-generation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use swarm_membership::ModelMeta;
use tokio::task::AbortHandle;

use super::cluster::{ClusterInference, InferencePeers, StreamPair};
use super::{BoxFuture, LocalModels};
use crate::Error;

/// Bytes buffered per direction of an in-memory stream.
const PIPE_BYTES: usize = 64 * 1024;

#[derive(Default)]
struct Node {
    server: Weak<ClusterInference>,
    alive: bool,
    /// What gossip says the node serves; `None`: what it advertises now.
    models: Option<Vec<ModelMeta>>,
    /// Streams it serves, aborted when it dies.
    serving: Vec<AbortHandle>,
}

/// A network of named nodes, shared by the handles of each node (clone it freely).
#[derive(Clone, Default)]
pub struct MemInferenceNet {
    me: String,
    net: Arc<Mutex<BTreeMap<String, Node>>>,
}

impl std::fmt::Debug for MemInferenceNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemInferenceNet")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl MemInferenceNet {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Node>> {
        self.net.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or restarts) `name`, serving `local`: its cluster inference, which every live node
    /// of this network reaches while the returned handle lives (the network holds it weakly, so
    /// that a node and its view of the network do not keep each other alive).
    #[must_use = "the node leaves the network when its handle is dropped"]
    pub fn join(&self, name: &str, local: Arc<dyn LocalModels>) -> Arc<ClusterInference> {
        let view = MemInferenceNet {
            me: name.to_string(),
            net: self.net.clone(),
        };
        let inference = ClusterInference::new(name, local, Some(Arc::new(view)));
        self.lock().insert(
            name.to_string(),
            Node {
                server: Arc::downgrade(&inference),
                alive: true,
                ..Node::default()
            },
        );
        inference
    }

    /// What gossip says `name` serves, overriding what it advertises (to test routing).
    pub fn set_models(&self, name: &str, models: Vec<ModelMeta>) {
        if let Some(n) = self.lock().get_mut(name) {
            n.models = Some(models);
        }
    }

    /// `name` dies: no view lists it, no stream opens to it, and the streams it serves break.
    pub fn kill(&self, name: &str) {
        if let Some(n) = self.lock().get_mut(name) {
            n.alive = false;
            for h in n.serving.drain(..) {
                h.abort();
            }
        }
    }
}

impl InferencePeers for MemInferenceNet {
    fn served(&self) -> Vec<(String, Vec<ModelMeta>)> {
        let live: Vec<(String, Option<Vec<ModelMeta>>, Weak<ClusterInference>)> = self
            .lock()
            .iter()
            .filter(|(name, n)| **name != self.me && n.alive)
            .map(|(name, n)| (name.clone(), n.models.clone(), n.server.clone()))
            .collect();
        live.into_iter()
            .map(|(name, models, server)| {
                let models = models.unwrap_or_else(|| {
                    server.upgrade().map(|s| s.advertised()).unwrap_or_default()
                });
                (name, models)
            })
            .collect()
    }

    fn open(&self, peer: &str) -> BoxFuture<'_, Result<StreamPair, Error>> {
        let unreachable = Error::Stream {
            peer: peer.to_string(),
            message: "unreachable (in-memory network)".into(),
        };
        let mut net = self.lock();
        let me_alive = net.get(&self.me).is_some_and(|n| n.alive);
        let target = net
            .get_mut(peer)
            .filter(|n| n.alive && me_alive)
            .and_then(|n| n.server.upgrade().map(|s| (n, s)));
        let result = match target {
            None => Err(unreachable),
            Some((node, server)) => {
                let (client_send, server_recv) = tokio::io::duplex(PIPE_BYTES);
                let (server_send, client_recv) = tokio::io::duplex(PIPE_BYTES);
                let task = server.serve(self.me.clone(), server_send, server_recv);
                node.serving.retain(|h| !h.is_finished());
                node.serving.push(task.abort_handle());
                Ok(StreamPair {
                    send: Box::new(client_send),
                    recv: Box::new(client_recv),
                })
            }
        };
        drop(net);
        Box::pin(std::future::ready(result))
    }
}
