//! The accept loop of peer streams: each stream a peer opens goes to the service of its
//! [`StreamKind`]; an unknown kind is refused.

use std::sync::Arc;

use swarm_membership::IncomingStream;
use tokio::sync::mpsc;

use crate::{ActorCluster, Replicator, StreamKind};

/// A service that serves whole streams of one kind (e.g. inference requests from peers).
pub trait StreamService: Send + Sync + 'static {
    /// Serve a stream `peer` opened (its kind byte already read). Must not block.
    fn serve(&self, peer: String, send: quinn::SendStream, recv: quinn::RecvStream);
}

/// The services of this node that peers open streams to.
#[derive(Clone)]
pub struct Services {
    pub actors: ActorCluster,
    pub replicator: Replicator,
    pub inference: Option<Arc<dyn StreamService>>,
    /// The task service (forwarded submissions, stage runs, events); `None` on a node without
    /// one.
    pub tasks: Option<Arc<dyn StreamService>>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").finish_non_exhaustive()
    }
}

impl Services {
    /// Hand every stream from `rx` to the service of its kind, until `rx` closes.
    pub fn spawn_dispatch(self, mut rx: mpsc::Receiver<IncomingStream>) {
        tokio::spawn(async move {
            while let Some(s) = rx.recv().await {
                self.dispatch(s);
            }
        });
    }

    /// Hand one stream to the service of its kind.
    pub fn dispatch(&self, mut s: IncomingStream) {
        let kind = StreamKind::from_byte(s.kind);
        let _span = tracing::debug_span!(
            "peer_stream",
            peer = %s.peer,
            kind = kind.map_or("unknown", StreamKind::name)
        )
        .entered();
        match kind {
            Some(StreamKind::Ractor) => {
                let peer = s.peer.clone();
                if let Err(e) = self.actors.accept(s.peer, s.send, s.recv) {
                    tracing::warn!(%peer, error = %e, "actor session refused");
                }
            }
            Some(kind @ (StreamKind::Deltas | StreamKind::AntiEntropy)) => {
                self.replicator.serve_quic(s.peer, kind, s.send, s.recv);
            }
            Some(StreamKind::Inference) if self.inference.is_some() => {
                if let Some(inf) = &self.inference {
                    inf.serve(s.peer, s.send, s.recv);
                }
            }
            Some(StreamKind::Tasks) if self.tasks.is_some() => {
                if let Some(t) = &self.tasks {
                    t.serve(s.peer, s.send, s.recv);
                }
            }
            Some(StreamKind::Inference | StreamKind::Tasks) | None => {
                tracing::debug!(kind = s.kind, "stream of a kind nobody serves refused");
                let _ = s.recv.stop(3u32.into());
            }
        }
    }
}
