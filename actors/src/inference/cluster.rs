//! [`ClusterInference`]: [`Inference`] across the cluster. A request runs on the node with the
//! lowest load per slot among this node (when its engine runs) and the live peers whose gossip
//! metadata says they serve the model; a peer's load is the larger of what it last gossiped
//! and what this node has in flight there now, since gossip lags a burst by seconds. A remote
//! request rides one QUIC stream of kind [`StreamKind::Inference`] (protocol in `wire`); the
//! server side is [`ClusterInference::serve`], which runs it on this node's [`LocalModels`] only.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use swarm_membership::{MemberState, Membership, ModelMeta};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::{Instrument, Span};

use super::wire::Reply;
use super::{
    BoxFuture, Chunk, ClusterModel, Failure, FailureCode, Generation, Inference, LocalModel,
    LocalModels, ModelStatus, Request,
};
use crate::stream::{FrameReader, FrameWriter, StreamKind};
use crate::{Error, StreamService};

/// How long a peer may take to open the stream and accept or refuse a request (a request waits
/// at most this long for a node that died since gossip last spoke of it).
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Both halves of a stream to a peer, its kind byte already written.
pub struct StreamPair {
    pub send: Box<dyn AsyncWrite + Send + Unpin>,
    pub recv: Box<dyn AsyncRead + Send + Unpin>,
}

impl std::fmt::Debug for StreamPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamPair").finish_non_exhaustive()
    }
}

/// What inference needs of the network: who serves what (gossip), and streams to them.
/// Implemented by [`Membership`] (QUIC, mutual TLS) and [`super::MemInferenceNet`] (in memory).
pub trait InferencePeers: Send + Sync {
    /// The other members alive now, in view order, with the models their metadata lists.
    fn served(&self) -> Vec<(String, Vec<ModelMeta>)>;

    /// Opens an inference stream to `peer`.
    fn open(&self, peer: &str) -> BoxFuture<'_, Result<StreamPair, Error>>;
}

impl InferencePeers for Membership {
    fn served(&self) -> Vec<(String, Vec<ModelMeta>)> {
        self.view()
            .members
            .into_iter()
            .filter(|m| m.name != self.name() && m.state == MemberState::Alive)
            .map(|m| (m.name, m.meta.map(|meta| meta.models).unwrap_or_default()))
            .collect()
    }

    fn open(&self, peer: &str) -> BoxFuture<'_, Result<StreamPair, Error>> {
        let peer = peer.to_string();
        Box::pin(async move {
            let (send, recv) = self
                .open_stream(&peer, StreamKind::Inference.byte())
                .await
                .map_err(|e| Error::Stream {
                    peer: peer.clone(),
                    message: e.to_string(),
                })?;
            Ok(StreamPair {
                send: Box::new(send),
                recv: Box::new(recv),
            })
        })
    }
}

/// Where a request runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Local,
    Remote(String),
}

/// Picks where `model` runs (see the module doc): the lowest load per slot; this node wins
/// ties, then the earlier peer in view order. With no candidate, a model configured here
/// (loading or down) still runs here, so that the caller learns its state; otherwise no node
/// serves it.
fn route(
    model: &str,
    local: Option<&LocalModel>,
    peers: &[(String, Vec<ModelMeta>)],
    in_flight: &dyn Fn(&str) -> u64,
) -> Result<Target, Failure> {
    let per_slot = |load: u64, slots: u32| load as f64 / f64::from(slots.max(1));
    let mut best: Option<(f64, Target)> = local
        .filter(|m| m.status == ModelStatus::Ready)
        .map(|m| (per_slot(u64::from(m.load), m.slots), Target::Local));
    for (peer, models) in peers {
        let Some(mm) = models.iter().find(|m| m.name == model) else {
            continue;
        };
        let load = u64::from(mm.load).max(in_flight(peer));
        let score = per_slot(load, mm.slots);
        if best.as_ref().is_none_or(|(b, _)| score < *b) {
            best = Some((score, Target::Remote(peer.clone())));
        }
    }
    match (best, local) {
        (Some((_, t)), _) => Ok(t),
        (None, Some(_)) => Ok(Target::Local),
        (None, None) => Err(Failure::new(
            FailureCode::ModelNotFound,
            format!("no node of this cluster serves model `{model}`"),
        )),
    }
}

/// A stream error as a failure: a broken stream means the node is unreachable; a frame this
/// node cannot read is a protocol error.
fn failure_of(e: &Error) -> Failure {
    match e {
        Error::Frame { .. } | Error::FrameTooLarge { .. } | Error::Encode(_) => {
            Failure::new(FailureCode::Internal, e.to_string())
        }
        _ => Failure::unavailable(e.to_string()),
    }
}

/// One request this node has running on a peer; dropping it takes the request off the count.
struct InFlight(Arc<AtomicU64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// [`Inference`] over the cluster: this node's models and its peers'.
pub struct ClusterInference {
    node: String,
    local: Arc<dyn LocalModels>,
    /// `None`: a node alone (tests of the gateway), which only runs its own models.
    peers: Option<Arc<dyn InferencePeers>>,
    /// Requests this node has running on each peer (fresher than gossip).
    in_flight: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl std::fmt::Debug for ClusterInference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterInference")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl ClusterInference {
    pub fn new(
        node: impl Into<String>,
        local: Arc<dyn LocalModels>,
        peers: Option<Arc<dyn InferencePeers>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            node: node.into(),
            local,
            peers,
            in_flight: Mutex::default(),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// What this node advertises in gossip: its ready models and their load, by name.
    pub fn advertised(&self) -> Vec<ModelMeta> {
        let mut out: Vec<ModelMeta> = self
            .local
            .models()
            .into_iter()
            .filter(|m| m.status == ModelStatus::Ready)
            .map(|m| ModelMeta {
                name: m.name,
                load: m.load,
                slots: m.slots,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Requests this node has running on `peer` now.
    pub fn in_flight(&self, peer: &str) -> u64 {
        self.counters().get(peer).map_or(0, |c| c.load(Relaxed))
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicU64>>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn served(&self) -> Vec<(String, Vec<ModelMeta>)> {
        self.peers.as_ref().map(|p| p.served()).unwrap_or_default()
    }

    async fn start(&self, req: Request) -> Result<Generation, Failure> {
        let local = self
            .local
            .models()
            .into_iter()
            .find(|m| m.name == req.model);
        let peers = self.served();
        let target = {
            let counters = self.counters();
            let in_flight = |p: &str| counters.get(p).map_or(0, |c| c.load(Relaxed));
            route(&req.model, local.as_ref(), &peers, &in_flight)?
        };
        let span = Span::current();
        match target {
            Target::Local => {
                span.record("node", self.node.as_str());
                self.local.generate(req).await
            }
            Target::Remote(peer) => {
                span.record("node", peer.as_str());
                self.start_remote(peer, req).await
            }
        }
    }

    /// Sends `req` to `peer` and, once accepted, forwards its chunks from a task of their own.
    async fn start_remote(&self, peer: String, req: Request) -> Result<Generation, Failure> {
        let peers = self
            .peers
            .as_ref()
            .ok_or_else(|| Failure::unavailable("this node is not in a cluster"))?;
        let counter = self.counters().entry(peer.clone()).or_default().clone();
        counter.fetch_add(1, Relaxed);
        let guard = InFlight(counter);
        let opened = tokio::time::timeout(ACCEPT_TIMEOUT, async {
            let pair = peers.open(&peer).await.map_err(|e| failure_of(&e))?;
            let mut writer = FrameWriter::new(pair.send, &peer);
            let mut reader = FrameReader::new(pair.recv, &peer);
            writer.send_msg(&req).await.map_err(|e| failure_of(&e))?;
            match reader.next_msg::<Reply>().await {
                Ok(Some(Reply::Accepted { prompt_tokens })) => Ok((writer, reader, prompt_tokens)),
                Ok(Some(Reply::Chunk(Chunk::Failed(f)))) => Err(f),
                Ok(Some(other)) => Err(Failure::new(
                    FailureCode::Internal,
                    format!("{peer} answered {other:?} first"),
                )),
                Ok(None) => Err(Failure::unavailable(format!(
                    "{peer} closed the stream without an answer"
                ))),
                Err(e) => Err(failure_of(&e)),
            }
        })
        .await;
        let (writer, mut reader, prompt_tokens) = match opened {
            Ok(r) => r?,
            Err(_) => {
                return Err(Failure::unavailable(format!(
                    "{peer} did not answer within {ACCEPT_TIMEOUT:?}"
                )));
            }
        };
        tracing::debug!(prompt_tokens, "generation accepted by a peer");
        let (tx, generation) = Generation::channel(peer.clone(), prompt_tokens);
        let forward = async move {
            let _guard = guard;
            // The opener's half stays open while the peer generates: ending it (here, when this
            // task ends) is how the peer learns to cancel the sequence.
            let _writer = writer;
            loop {
                let reply = tokio::select! {
                    r = reader.next_msg::<Reply>() => r,
                    _ = tx.closed() => {
                        tracing::debug!("generation dropped; cancelling it on the peer");
                        break;
                    }
                };
                let chunk = match reply {
                    Ok(Some(Reply::Chunk(c))) => c,
                    Ok(Some(Reply::Accepted { .. })) => Chunk::Failed(Failure::new(
                        FailureCode::Internal,
                        format!("{peer} accepted the request twice"),
                    )),
                    Ok(None) => Chunk::Failed(Failure::unavailable(format!(
                        "{peer} ended the stream before the generation finished"
                    ))),
                    Err(e) => Chunk::Failed(failure_of(&e)),
                };
                if let Chunk::Failed(f) = &chunk {
                    tracing::debug!(code = f.code.as_str(), error = %f.message, "remote generation failed");
                }
                let end = !matches!(chunk, Chunk::Text(_));
                if tx.send(chunk).await.is_err() || end {
                    break;
                }
            }
        };
        tokio::spawn(forward.instrument(Span::current()));
        Ok(generation)
    }

    /// Serves an inference stream `peer` opened (its kind byte already read): runs the request
    /// on this node's own models (never forwarded again) and streams the chunks back. The
    /// sequence is cancelled when the opener ends its half or stops reading.
    pub fn serve<W, R>(&self, peer: String, send: W, recv: R) -> JoinHandle<()>
    where
        W: AsyncWrite + Send + Unpin + 'static,
        R: AsyncRead + Send + Unpin + 'static,
    {
        let (node, local) = (self.node.clone(), self.local.clone());
        let span = tracing::info_span!("inference_peer", %peer, model = tracing::field::Empty);
        let served = async move { serve_stream(&node, &*local, &peer, send, recv).await };
        tokio::spawn(served.instrument(span))
    }
}

/// Peers' inference streams, as the node's stream dispatcher hands them over.
impl StreamService for ClusterInference {
    fn serve(&self, peer: String, send: quinn::SendStream, recv: quinn::RecvStream) {
        ClusterInference::serve(self, peer, send, recv);
    }
}

/// The server side of one inference stream (see [`ClusterInference::serve`]).
async fn serve_stream<W, R>(node: &str, local: &dyn LocalModels, peer: &str, send: W, recv: R)
where
    W: AsyncWrite + Send + Unpin,
    R: AsyncRead + Send + Unpin,
{
    let mut writer = FrameWriter::new(send, peer);
    let mut reader = FrameReader::new(recv, peer);
    let req = match tokio::time::timeout(ACCEPT_TIMEOUT, reader.next_msg::<Request>()).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "bad inference request from a peer");
            let f = failure_of(&e);
            let _ = writer.send_msg(&Reply::Chunk(Chunk::Failed(f))).await;
            let _ = writer.get_mut().shutdown().await;
            return;
        }
        Err(_) => {
            tracing::debug!("no inference request in time");
            return;
        }
    };
    Span::current().record("model", req.model.as_str());
    let serves = local.models().iter().any(|m| m.name == req.model);
    let started = if serves {
        local.generate(req).await
    } else {
        Err(Failure::new(
            FailureCode::ModelNotFound,
            format!("{node} does not serve model `{}`", req.model),
        ))
    };
    let mut generation = match started {
        Ok(g) => g,
        Err(f) => {
            tracing::debug!(code = f.code.as_str(), error = %f.message, "peer request refused");
            let _ = writer.send_msg(&Reply::Chunk(Chunk::Failed(f))).await;
            let _ = writer.get_mut().shutdown().await;
            return;
        }
    };
    let accepted = Reply::Accepted {
        prompt_tokens: generation.prompt_tokens(),
    };
    if writer.send_msg(&accepted).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            chunk = generation.next() => {
                let Some(chunk) = chunk else { break };
                let end = !matches!(chunk, Chunk::Text(_));
                if let Err(e) = writer.send_msg(&Reply::Chunk(chunk)).await {
                    tracing::debug!(error = %e, "opener stopped reading; sequence cancelled");
                    return;
                }
                if end {
                    break;
                }
            }
            // The opener sends nothing after its request: any end of its half (or a stray
            // frame) means it went away. Dropping the generation cancels the sequence.
            _ = reader.next() => {
                tracing::debug!("opener went away; sequence cancelled");
                return;
            }
        }
    }
    let _ = writer.get_mut().shutdown().await;
}

impl Inference for ClusterInference {
    fn models(&self) -> Vec<ClusterModel> {
        let mut by_model: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in self.local.models() {
            if m.status == ModelStatus::Ready {
                by_model.entry(m.name).or_default().push(self.node.clone());
            }
        }
        for (peer, models) in self.served() {
            for m in models {
                by_model.entry(m.name).or_default().push(peer.clone());
            }
        }
        by_model
            .into_iter()
            .map(|(name, nodes)| ClusterModel { name, nodes })
            .collect()
    }

    fn generate(&self, req: Request) -> BoxFuture<'_, Result<Generation, Failure>> {
        let span = tracing::info_span!(
            "inference",
            model = %req.model,
            node = tracing::field::Empty
        );
        Box::pin(self.start(req).instrument(span))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use super::*;

    fn local(status: ModelStatus, load: u32, slots: u32) -> LocalModel {
        LocalModel {
            name: "m".into(),
            status,
            load,
            slots,
        }
    }

    fn meta(name: &str, load: u32, slots: u32) -> ModelMeta {
        ModelMeta {
            name: name.into(),
            load,
            slots,
        }
    }

    fn peers(list: &[(&str, u32, u32)]) -> Vec<(String, Vec<ModelMeta>)> {
        list.iter()
            .map(|(p, load, slots)| (p.to_string(), vec![meta("m", *load, *slots)]))
            .collect()
    }

    fn none(_: &str) -> u64 {
        0
    }

    #[test]
    fn the_lowest_load_per_slot_wins_and_this_node_wins_ties() {
        let ready = local(ModelStatus::Ready, 2, 4);
        let ps = peers(&[("a", 1, 2), ("b", 1, 8)]);
        assert_eq!(
            route("m", Some(&ready), &ps, &none),
            Ok(Target::Remote("b".into()))
        );
        let ps = peers(&[("a", 4, 8)]);
        assert_eq!(route("m", Some(&ready), &ps, &none), Ok(Target::Local));
        // Equal peers: the first in view order.
        let ps = peers(&[("a", 0, 8), ("b", 0, 8)]);
        assert_eq!(route("m", None, &ps, &none), Ok(Target::Remote("a".into())));
        // Slots of 0 count as 1 rather than dividing by zero.
        let ps = peers(&[("a", 1, 0), ("b", 3, 8)]);
        assert_eq!(route("m", None, &ps, &none), Ok(Target::Remote("b".into())));
    }

    #[test]
    fn what_this_node_has_in_flight_counts_when_gossip_lags() {
        let ps = peers(&[("a", 0, 4), ("b", 1, 4)]);
        let busy_a = |p: &str| if p == "a" { 3 } else { 0 };
        assert_eq!(
            route("m", None, &ps, &busy_a),
            Ok(Target::Remote("b".into()))
        );
        // Gossip higher than what this node sent: gossip counts.
        let busy_b = |p: &str| if p == "b" { 1 } else { 0 };
        let ps = peers(&[("a", 3, 4), ("b", 0, 4)]);
        assert_eq!(
            route("m", None, &ps, &busy_b),
            Ok(Target::Remote("b".into()))
        );
    }

    #[test]
    fn a_model_nobody_serves_is_not_found_and_one_down_here_reports_itself() {
        let ps = vec![("a".to_string(), vec![meta("other", 0, 1)])];
        let err = route("m", None, &ps, &none).err().map(|f| f.code);
        assert_eq!(err, Some(FailureCode::ModelNotFound));
        let down = local(ModelStatus::Unavailable("gone".into()), 0, 4);
        assert_eq!(route("m", Some(&down), &ps, &none), Ok(Target::Local));
        // A loading model here does not keep a request from a ready peer.
        let loading = local(ModelStatus::Loading, 0, 4);
        let ps = peers(&[("a", 7, 8)]);
        assert_eq!(
            route("m", Some(&loading), &ps, &none),
            Ok(Target::Remote("a".into()))
        );
    }

    struct Nothing;

    impl LocalModels for Nothing {
        fn models(&self) -> Vec<LocalModel> {
            Vec::new()
        }

        fn generate(&self, _: Request) -> BoxFuture<'_, Result<Generation, Failure>> {
            Box::pin(std::future::ready(Err(Failure::new(
                FailureCode::Internal,
                "never called",
            ))))
        }
    }

    #[tokio::test]
    async fn a_garbage_request_is_answered_with_a_failure_and_the_stream_ends() {
        let inf = ClusterInference::new("n1", Arc::new(Nothing), None);
        let (client_send, server_recv) = tokio::io::duplex(4096);
        let (server_send, client_recv) = tokio::io::duplex(4096);
        let task = inf.serve("peer".into(), server_send, server_recv);
        let mut w = FrameWriter::new(client_send, "n1");
        let mut r = FrameReader::new(client_recv, "n1");
        w.send(bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]))
            .await
            .unwrap();
        match r.next_msg::<Reply>().await.unwrap() {
            Some(Reply::Chunk(Chunk::Failed(f))) => assert_eq!(f.code, FailureCode::Internal),
            other => panic!("{other:?}"),
        }
        assert!(r.next().await.unwrap().is_none());
        task.await.unwrap();
    }
}
