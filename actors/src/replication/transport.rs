//! What replication needs of the network: the live peers, membership events, and framed
//! bidirectional streams of a [`StreamKind`]. Two implementations: QUIC through the membership
//! service (mutual TLS), and [`MemNet`], an in-memory network for tests and simulations that can
//! drop and delay frames, partition nodes, kill them, and counts the bytes between each pair.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use swarm_membership::{MemberEvent, MemberState, Membership, NodeId};
use tokio::sync::{broadcast, mpsc};

use crate::Error;
use crate::stream::{FrameReader, FrameWriter, StreamKind};

/// A boxed future (object-safe async methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The network as replication sees it.
pub trait Peers: Send + Sync + 'static {
    /// This node's name.
    fn me(&self) -> &str;
    /// Peers alive now.
    fn live_peers(&self) -> Vec<String>;
    /// Every other member that has not left, and whether it is alive.
    fn members(&self) -> Vec<(String, bool)>;
    /// Membership changes.
    fn subscribe(&self) -> broadcast::Receiver<MemberEvent>;
    /// Open a stream of `kind` to `peer`.
    fn open(&self, peer: &str, kind: StreamKind) -> BoxFuture<'_, Result<Duplex, Error>>;
}

/// Both halves of a framed stream.
pub struct Duplex {
    pub tx: FrameTx,
    pub rx: FrameRx,
}

impl Duplex {
    /// The halves of a QUIC stream (its kind byte already written or read).
    pub fn quic(peer: &str, send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self {
            tx: FrameTx::Quic(FrameWriter::new(send, peer)),
            rx: FrameRx::Quic(FrameReader::new(recv, peer)),
        }
    }
}

impl std::fmt::Debug for Duplex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Duplex").finish_non_exhaustive()
    }
}

/// The sending half.
pub enum FrameTx {
    Quic(FrameWriter<quinn::SendStream>),
    Mem(MemTx),
}

impl FrameTx {
    pub async fn send(&mut self, frame: Bytes) -> Result<(), Error> {
        match self {
            FrameTx::Quic(w) => w.send(frame).await,
            FrameTx::Mem(m) => m.send(frame).await,
        }
    }

    /// End the stream cleanly.
    pub fn finish(&mut self) {
        match self {
            FrameTx::Quic(w) => {
                let _ = w.get_mut().finish();
            }
            FrameTx::Mem(m) => m.tx = None,
        }
    }
}

impl std::fmt::Debug for FrameTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameTx").finish_non_exhaustive()
    }
}

/// The receiving half.
pub enum FrameRx {
    Quic(FrameReader<quinn::RecvStream>),
    Mem(mpsc::Receiver<Bytes>),
}

impl FrameRx {
    /// The next frame; `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        match self {
            FrameRx::Quic(r) => Ok(r.next().await?.map(|b| b.freeze())),
            FrameRx::Mem(rx) => Ok(rx.recv().await),
        }
    }
}

impl std::fmt::Debug for FrameRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameRx").finish_non_exhaustive()
    }
}

impl Peers for Membership {
    fn me(&self) -> &str {
        self.name()
    }

    fn live_peers(&self) -> Vec<String> {
        Membership::live_peers(self)
    }

    fn members(&self) -> Vec<(String, bool)> {
        self.view()
            .members
            .into_iter()
            .filter(|m| m.name != self.name() && m.state != MemberState::Left)
            .map(|m| (m.name, m.state == MemberState::Alive))
            .collect()
    }

    fn subscribe(&self) -> broadcast::Receiver<MemberEvent> {
        Membership::subscribe(self)
    }

    fn open(&self, peer: &str, kind: StreamKind) -> BoxFuture<'_, Result<Duplex, Error>> {
        let peer = peer.to_string();
        Box::pin(async move {
            let (send, recv) =
                self.open_stream(&peer, kind.byte())
                    .await
                    .map_err(|e| Error::Stream {
                        peer: peer.clone(),
                        message: e.to_string(),
                    })?;
            Ok(Duplex::quic(&peer, send, recv))
        })
    }
}

/// A stream a peer opened on the in-memory network.
pub struct MemIncoming {
    pub peer: String,
    pub kind: StreamKind,
    pub duplex: Duplex,
}

impl std::fmt::Debug for MemIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemIncoming").finish_non_exhaustive()
    }
}

/// Frames in flight per direction of an in-memory stream.
const MEM_STREAM_FRAMES: usize = 64;

struct MemNode {
    alive: bool,
    incarnation: u64,
    incoming: mpsc::Sender<MemIncoming>,
    events: broadcast::Sender<MemberEvent>,
}

struct NetState {
    nodes: HashMap<String, MemNode>,
    /// Unordered pairs that cannot reach each other.
    cut: HashSet<(String, String)>,
    /// (viewer, node): the viewer's gossip does not call the node alive, though it is reachable
    /// (a node that restarted and is not yet known to be back).
    unseen: HashSet<(String, String)>,
    loss: f64,
    delay: (Duration, Duration),
    rng: StdRng,
    bytes: HashMap<(String, String), u64>,
    dropped: u64,
    max_frame: usize,
}

impl NetState {
    fn reachable(&self, a: &str, b: &str) -> bool {
        let alive = |n: &str| self.nodes.get(n).is_some_and(|m| m.alive);
        alive(a) && alive(b) && !self.cut.contains(&pair(a, b))
    }

    /// Whether `viewer`'s gossip calls `node` alive.
    fn seen_alive(&self, viewer: &str, node: &str) -> bool {
        self.reachable(viewer, node)
            && !self
                .unseen
                .contains(&(viewer.to_string(), node.to_string()))
    }

    fn id(&self, name: &str) -> NodeId {
        NodeId {
            name: name.to_string(),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            incarnation: self.nodes.get(name).map_or(0, |n| n.incarnation),
        }
    }

    /// Tell `observer` about `subject`.
    fn tell(&self, observer: &str, ev: MemberEvent) {
        if let Some(n) = self.nodes.get(observer)
            && n.alive
        {
            let _ = n.events.send(ev);
        }
    }
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// An in-memory network of named nodes (seeded: the same seed drops the same frames given the
/// same sends).
#[derive(Clone)]
pub struct MemNet {
    state: Arc<Mutex<NetState>>,
}

impl std::fmt::Debug for MemNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemNet").finish_non_exhaustive()
    }
}

impl MemNet {
    pub fn new(seed: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(NetState {
                nodes: HashMap::new(),
                cut: HashSet::new(),
                unseen: HashSet::new(),
                loss: 0.0,
                delay: (Duration::ZERO, Duration::ZERO),
                rng: StdRng::seed_from_u64(seed),
                bytes: HashMap::new(),
                dropped: 0,
                max_frame: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add (or restart) `name`; every reachable node sees it come up, and it sees them. Returns
    /// its view of the network and the streams peers open to it.
    pub fn join(&self, name: &str) -> (MemPeers, mpsc::Receiver<MemIncoming>) {
        let (tx, rx) = mpsc::channel(64);
        let mut s = self.lock();
        let incarnation = s.nodes.get(name).map_or(0, |n| n.incarnation + 1);
        let events = broadcast::channel(256).0;
        s.nodes.insert(
            name.to_string(),
            MemNode {
                alive: true,
                incarnation,
                incoming: tx,
                events: events.clone(),
            },
        );
        let others: Vec<String> = s.nodes.keys().filter(|n| *n != name).cloned().collect();
        for o in others {
            if s.reachable(name, &o) {
                s.tell(&o, MemberEvent::Up(s.id(name)));
                s.tell(name, MemberEvent::Up(s.id(&o)));
            }
        }
        drop(s);
        (
            MemPeers {
                me: name.to_string(),
                net: self.clone(),
                events,
            },
            rx,
        )
    }

    /// `name` dies: its streams break, everyone sees it down.
    pub fn kill(&self, name: &str) {
        let mut s = self.lock();
        if let Some(n) = s.nodes.get_mut(name) {
            n.alive = false;
        }
        let others: Vec<String> = s.nodes.keys().filter(|n| *n != name).cloned().collect();
        for o in others {
            s.tell(&o, MemberEvent::Down(s.id(name)));
        }
    }

    /// Cut every node of `a` off from every node of `b` (both see the others down).
    pub fn partition(&self, a: &[&str], b: &[&str]) {
        let mut s = self.lock();
        for x in a {
            for y in b {
                if s.reachable(x, y) {
                    s.tell(x, MemberEvent::Down(s.id(y)));
                    s.tell(y, MemberEvent::Down(s.id(x)));
                }
                s.cut.insert(pair(x, y));
            }
        }
    }

    /// Remove every cut (the nodes see each other come back).
    pub fn heal(&self) {
        let mut s = self.lock();
        let cut: Vec<_> = s.cut.drain().collect();
        for (x, y) in cut {
            if s.reachable(&x, &y) {
                s.tell(&x, MemberEvent::Up(s.id(&y)));
                s.tell(&y, MemberEvent::Up(s.id(&x)));
            }
        }
    }

    /// Whether `viewer`'s gossip calls `node` alive while it is reachable (streams open either
    /// way regardless).
    pub fn set_seen(&self, viewer: &str, node: &str, seen: bool) {
        let mut s = self.lock();
        let key = (viewer.to_string(), node.to_string());
        if seen {
            s.unseen.remove(&key);
        } else {
            s.unseen.insert(key);
        }
    }

    /// Probability that a frame is lost (the stream then stalls, as a stream whose packets
    /// never arrive would, until its reader gives up).
    pub fn set_loss(&self, p: f64) {
        self.lock().loss = p;
    }

    /// Each frame waits a delay uniform in `[min, max)` before it is delivered (in order).
    pub fn set_delay(&self, min: Duration, max: Duration) {
        self.lock().delay = (min, max.max(min));
    }

    /// Bytes sent from `from` to `to` so far.
    pub fn bytes(&self, from: &str, to: &str) -> u64 {
        self.lock()
            .bytes
            .get(&(from.to_string(), to.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// The largest frame sent so far, in bytes.
    pub fn max_frame(&self) -> usize {
        self.lock().max_frame
    }

    /// Frames lost so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn open(&self, from: &str, to: &str, kind: StreamKind) -> Result<Duplex, Error> {
        let s = self.lock();
        let unreachable = || Error::Stream {
            peer: to.to_string(),
            message: "unreachable (in-memory network)".into(),
        };
        if !s.reachable(from, to) {
            return Err(unreachable());
        }
        let target = s.nodes.get(to).ok_or_else(unreachable)?;
        let (atx, arx) = mpsc::channel(MEM_STREAM_FRAMES);
        let (btx, brx) = mpsc::channel(MEM_STREAM_FRAMES);
        let theirs = Duplex {
            tx: FrameTx::Mem(MemTx::new(self, to, from, btx)),
            rx: FrameRx::Mem(arx),
        };
        target
            .incoming
            .try_send(MemIncoming {
                peer: from.to_string(),
                kind,
                duplex: theirs,
            })
            .map_err(|_| unreachable())?;
        Ok(Duplex {
            tx: FrameTx::Mem(MemTx::new(self, from, to, atx)),
            rx: FrameRx::Mem(brx),
        })
    }
}

/// The sending half of an in-memory stream.
pub struct MemTx {
    net: MemNet,
    from: String,
    to: String,
    tx: Option<mpsc::Sender<Bytes>>,
}

impl MemTx {
    fn new(net: &MemNet, from: &str, to: &str, tx: mpsc::Sender<Bytes>) -> Self {
        Self {
            net: net.clone(),
            from: from.to_string(),
            to: to.to_string(),
            tx: Some(tx),
        }
    }

    async fn send(&mut self, frame: Bytes) -> Result<(), Error> {
        let broken = |m: &str| Error::Stream {
            peer: self.to.clone(),
            message: m.to_string(),
        };
        let (lost, delay) = {
            let mut s = self.net.lock();
            if !s.reachable(&self.from, &self.to) {
                self.tx = None;
                return Err(broken("unreachable (in-memory network)"));
            }
            *s.bytes
                .entry((self.from.clone(), self.to.clone()))
                .or_default() += frame.len() as u64;
            s.max_frame = s.max_frame.max(frame.len());
            let loss = s.loss;
            let lost = loss > 0.0 && s.rng.random_bool(loss.min(1.0));
            if lost {
                s.dropped += 1;
            }
            let (lo, hi) = s.delay;
            let delay = if hi > lo {
                s.rng.random_range(lo..hi)
            } else {
                lo
            };
            (lost, delay)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if lost {
            // The frame never arrives, and nothing after it does either: a stream is ordered.
            self.tx = None;
            return Ok(());
        }
        match &self.tx {
            Some(tx) => tx
                .send(frame)
                .await
                .map_err(|_| broken("stream closed by the peer")),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for MemTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemTx").finish_non_exhaustive()
    }
}

/// One node's view of a [`MemNet`].
#[derive(Clone)]
pub struct MemPeers {
    me: String,
    net: MemNet,
    events: broadcast::Sender<MemberEvent>,
}

impl std::fmt::Debug for MemPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemPeers").finish_non_exhaustive()
    }
}

impl Peers for MemPeers {
    fn me(&self) -> &str {
        &self.me
    }

    fn live_peers(&self) -> Vec<String> {
        let s = self.net.lock();
        let mut out: Vec<String> = s
            .nodes
            .keys()
            .filter(|n| **n != self.me && s.seen_alive(&self.me, n))
            .cloned()
            .collect();
        out.sort();
        out
    }

    fn members(&self) -> Vec<(String, bool)> {
        let s = self.net.lock();
        let mut out: Vec<(String, bool)> = s
            .nodes
            .keys()
            .filter(|n| **n != self.me)
            .map(|n| (n.clone(), s.seen_alive(&self.me, n)))
            .collect();
        out.sort();
        out
    }

    fn subscribe(&self) -> broadcast::Receiver<MemberEvent> {
        self.events.subscribe()
    }

    fn open(&self, peer: &str, kind: StreamKind) -> BoxFuture<'_, Result<Duplex, Error>> {
        let r = self.net.open(&self.me, peer, kind);
        Box::pin(async move { r })
    }
}
