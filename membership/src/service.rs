//! The running membership service: one QUIC endpoint, [`Gossip`] on datagrams, one connection
//! per peer pair, the member view as a watch channel.
//!
//! One task owns the [`Gossip`] state machine and its timers; connection tasks feed it frames
//! through a bounded channel (a full channel drops datagrams, as a lossy network would). Sending
//! to a member without a connection dials it (a seed by address, any certificate from the
//! cluster CA; a known member by address and name), with exponential backoff per address and a
//! few packets held until the connection is up. When both ends dial at once, the connection
//! dialed by the node with the smaller name is kept on both sides.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use foca::Timer;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::gossip::{Gossip, GossipSettings, MemberEvent, MemberInfo, NodeId};
use crate::transport::{Accepted, Endpoint, PeerConnection, TlsIdentity};
use crate::{MemberState, MembershipError, NodeMeta, lock};

/// Frames waiting for the state machine; beyond this, datagrams are dropped.
const FRAME_QUEUE: usize = 4096;
/// Packets held per address while its connection is being set up.
const PENDING_PER_PEER: usize = 16;
/// How long a dial may take (a peer that is down does not answer at all over UDP).
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an opened stream may take to say what it is.
const STREAM_KIND_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run the membership service.
#[derive(Debug)]
pub struct MembershipConfig {
    pub identity: TlsIdentity,
    /// UDP address the QUIC endpoint binds.
    pub bind: SocketAddr,
    /// Address peers dial (the bind address unless behind NAT).
    pub advertise: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    pub meta: NodeMeta,
    pub settings: GossipSettings,
    /// Open connections beyond this are refused.
    pub max_connections: usize,
    /// Where incoming bidirectional streams go (actor sessions, replication), tagged with the
    /// kind byte their opener wrote first. Without it, incoming streams are refused.
    pub streams: Option<mpsc::Sender<IncomingStream>>,
}

/// A bidirectional stream a peer opened.
#[derive(Debug)]
pub struct IncomingStream {
    /// The peer's certificate name.
    pub peer: String,
    pub kind: u8,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// The member list as this node sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// This node knows at least one active member (or is alone with no seeds).
    pub active: bool,
    pub members: Vec<MemberInfo>,
}

impl View {
    pub fn alive(&self) -> usize {
        self.members
            .iter()
            .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
            .count()
    }
}

/// A refused connection or frame, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub remote: String,
    pub reason: String,
}

enum Cmd {
    SetMeta(NodeMeta, oneshot::Sender<Result<(), MembershipError>>),
    AddSeeds(Vec<SocketAddr>),
    Leave(oneshot::Sender<()>),
    Shutdown,
}

enum ConnEvent {
    Up { pc: PeerConnection, dialed: bool },
    Lost { peer: String, id: usize },
    DialFailed { addr: SocketAddr, error: String },
}

type Conns = Arc<Mutex<HashMap<String, quinn::Connection>>>;

/// Handle to the running service (cheap to clone).
#[derive(Debug, Clone)]
pub struct Membership {
    name: String,
    endpoint: Endpoint,
    cmd: mpsc::Sender<Cmd>,
    view: watch::Receiver<View>,
    events: broadcast::Sender<MemberEvent>,
    conns: Conns,
    refusals: Arc<Mutex<VecDeque<Refusal>>>,
    stats: Arc<Mutex<Stats>>,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub frames_dropped: u64,
    pub frames_refused: u64,
    pub connections_refused: u64,
    pub dials_failed: u64,
}

impl Membership {
    /// Bind the endpoint, start gossip and announce to the seeds.
    pub async fn start(cfg: MembershipConfig) -> Result<Self, MembershipError> {
        let mut endpoint = Endpoint::bind(&cfg.identity, cfg.bind)?;
        endpoint.set_max_connections(cfg.max_connections);
        let name = cfg.identity.name().to_string();
        let incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let me = NodeId {
            name: name.clone(),
            addr: cfg.advertise,
            incarnation,
        };
        let mut gossip = Gossip::new(me, cfg.meta, &cfg.settings, incarnation)?;
        gossip.set_seeds(cfg.seeds);
        let (view_tx, view) = watch::channel(View {
            active: false,
            members: gossip.members(),
        });
        let (events, _) = broadcast::channel(1024);
        let (cmd, cmd_rx) = mpsc::channel(64);
        let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
        let (conn_tx, conn_rx) = mpsc::channel(256);
        let m = Self {
            name: name.clone(),
            endpoint: endpoint.clone(),
            cmd,
            view,
            events: events.clone(),
            conns: Arc::default(),
            refusals: Arc::default(),
            stats: Arc::default(),
        };
        let wiring = Wiring {
            name,
            endpoint: endpoint.clone(),
            frames: frames_tx,
            conn_events: conn_tx.clone(),
            streams: cfg.streams,
            refusals: Arc::clone(&m.refusals),
            stats: Arc::clone(&m.stats),
        };
        tokio::spawn(accept_loop(wiring.clone()));
        let driver = Driver {
            gossip,
            wiring,
            conns: Arc::clone(&m.conns),
            entries: HashMap::new(),
            addr_names: HashMap::new(),
            pending: HashMap::new(),
            dialing: HashSet::new(),
            backoff: HashMap::new(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            view: view_tx,
            events,
        };
        tokio::spawn(driver.run(cmd_rx, frames_rx, conn_rx));
        Ok(m)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The QUIC address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, MembershipError> {
        self.endpoint.local_addr()
    }

    /// The current member view.
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    /// Names of the other members that are alive or suspect (without copying the view).
    pub fn live_peers(&self) -> Vec<String> {
        self.view
            .borrow()
            .members
            .iter()
            .filter(|m| m.name != self.name)
            .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
            .map(|m| m.name.clone())
            .collect()
    }

    /// The member view as a watch channel.
    pub fn watch(&self) -> watch::Receiver<View> {
        self.view.clone()
    }

    /// Member events (up, down, left, metadata); a slow subscriber misses the oldest.
    pub fn subscribe(&self) -> broadcast::Receiver<MemberEvent> {
        self.events.subscribe()
    }

    pub fn stats(&self) -> Stats {
        lock(&self.stats).clone()
    }

    /// Refused connections and frames since the last call (at most 256 are kept).
    pub fn take_refusals(&self) -> Vec<Refusal> {
        lock(&self.refusals).drain(..).collect()
    }

    /// Publish new metadata (a new version spreads by gossip).
    pub async fn set_meta(&self, meta: NodeMeta) -> Result<(), MembershipError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::SetMeta(meta, tx))
            .await
            .map_err(|_| MembershipError::Stopped)?;
        rx.await.map_err(|_| MembershipError::Stopped)?
    }

    /// Announce to more seeds (config reload).
    pub async fn add_seeds(&self, seeds: Vec<SocketAddr>) -> Result<(), MembershipError> {
        self.cmd
            .send(Cmd::AddSeeds(seeds))
            .await
            .map_err(|_| MembershipError::Stopped)
    }

    /// Leave the cluster gracefully; returns once the notice is on the wire.
    pub async fn leave(&self) -> Result<(), MembershipError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Leave(tx))
            .await
            .map_err(|_| MembershipError::Stopped)?;
        rx.await.map_err(|_| MembershipError::Stopped)?;
        // Datagrams leave asynchronously; give them a moment before anyone closes the endpoint.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }

    /// QUIC connections open now.
    pub fn open_connections(&self) -> usize {
        self.endpoint.open_connections()
    }

    /// The live connection to `peer`, if any.
    pub fn connection(&self, peer: &str) -> Option<quinn::Connection> {
        lock(&self.conns).get(peer).cloned()
    }

    /// Open a bidirectional stream to `peer` and write its kind byte.
    pub async fn open_stream(
        &self,
        peer: &str,
        kind: u8,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), MembershipError> {
        let conn = self
            .connection(peer)
            .ok_or_else(|| MembershipError::NoConnection(peer.to_string()))?;
        let err = |e: &dyn std::fmt::Display| MembershipError::Stream {
            peer: peer.to_string(),
            message: e.to_string(),
        };
        let (mut send, recv) = conn.open_bi().await.map_err(|e| err(&e))?;
        send.write_all(&[kind]).await.map_err(|e| err(&e))?;
        Ok((send, recv))
    }

    /// Stop gossip and close every connection.
    pub async fn shutdown(&self) {
        let _ = self.cmd.send(Cmd::Shutdown).await;
        self.endpoint.close();
    }
}

/// What connection tasks need.
#[derive(Clone)]
struct Wiring {
    name: String,
    endpoint: Endpoint,
    frames: mpsc::Sender<(String, Bytes)>,
    conn_events: mpsc::Sender<ConnEvent>,
    streams: Option<mpsc::Sender<IncomingStream>>,
    refusals: Arc<Mutex<VecDeque<Refusal>>>,
    stats: Arc<Mutex<Stats>>,
}

impl Wiring {
    fn refuse(&self, remote: String, reason: String) {
        tracing::warn!(%remote, %reason, "cluster connection refused");
        lock(&self.stats).connections_refused += 1;
        let mut q = lock(&self.refusals);
        if q.len() >= 256 {
            q.pop_front();
        }
        q.push_back(Refusal { remote, reason });
    }
}

async fn accept_loop(w: Wiring) {
    while let Some(pending) = w.endpoint.incoming().await {
        let w = w.clone();
        tokio::spawn(async move {
            match pending.finish().await {
                Accepted::Peer(pc) => {
                    let _ = w
                        .conn_events
                        .send(ConnEvent::Up { pc, dialed: false })
                        .await;
                }
                Accepted::Refused { remote, reason } => w.refuse(remote.to_string(), reason),
            }
        });
    }
}

/// Read datagrams and streams of one kept connection until it closes.
fn serve_connection(w: &Wiring, pc: &PeerConnection) {
    use tracing::Instrument;
    // One span per peer connection; each accepted stream gets its own below it.
    let span = tracing::debug_span!(
        "peer_connection",
        peer = %pc.peer,
        remote = %pc.conn.remote_address(),
        id = pc.conn.stable_id()
    );
    let (conn, peer) = (pc.conn.clone(), pc.peer.clone());
    let w2 = w.clone();
    tokio::spawn(
        async move {
            while let Ok(d) = conn.read_datagram().await {
                if w2.frames.try_send((peer.clone(), d)).is_err() {
                    lock(&w2.stats).frames_dropped += 1;
                }
            }
            let _ = w2
                .conn_events
                .send(ConnEvent::Lost {
                    peer,
                    id: conn.stable_id(),
                })
                .await;
        }
        .instrument(span.clone()),
    );
    let (conn, peer) = (pc.conn.clone(), pc.peer.clone());
    let w = w.clone();
    tokio::spawn(
        async move {
            while let Ok((send, mut recv)) = conn.accept_bi().await {
                let Some(streams) = w.streams.clone() else {
                    let _ = recv.stop(1u32.into());
                    continue;
                };
                let peer = peer.clone();
                tokio::spawn(
                    async move {
                        let mut kind = [0u8; 1];
                        match tokio::time::timeout(STREAM_KIND_TIMEOUT, recv.read_exact(&mut kind))
                            .await
                        {
                            Ok(Ok(())) => {
                                let s = IncomingStream {
                                    peer,
                                    kind: kind[0],
                                    send,
                                    recv,
                                };
                                if let Err(e) = streams.try_send(s) {
                                    let mut s = e.into_inner();
                                    let _ = s.recv.stop(2u32.into());
                                }
                            }
                            _ => {
                                tracing::debug!(%peer, "stream said nothing; dropped");
                                let _ = recv.stop(1u32.into());
                            }
                        }
                    }
                    .instrument(tracing::debug_span!("peer_stream")),
                );
            }
        }
        .instrument(span),
    );
}

struct Entry {
    conn: quinn::Connection,
    /// Dialed by this node (else accepted).
    dialed: bool,
    since: Instant,
}

/// Two connections to one peer set up within this window are a simultaneous dial; a newer one
/// after it means the peer restarted (its old connection is dead but not yet timed out).
const DIAL_RACE: Duration = Duration::from_secs(2);

struct Backoff {
    not_before: Instant,
    delay: Duration,
    failures: u64,
}

struct Driver {
    gossip: Gossip,
    wiring: Wiring,
    conns: Conns,
    entries: HashMap<String, Entry>,
    addr_names: HashMap<SocketAddr, String>,
    pending: HashMap<SocketAddr, VecDeque<Bytes>>,
    dialing: HashSet<SocketAddr>,
    backoff: HashMap<SocketAddr, Backoff>,
    timers: BinaryHeap<Reverse<(Instant, u64, TimerBox)>>,
    timer_seq: u64,
    view: watch::Sender<View>,
    events: broadcast::Sender<MemberEvent>,
}

/// A foca timer in the heap (ordered by deadline and sequence only).
struct TimerBox(Timer<NodeId>);

impl PartialEq for TimerBox {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for TimerBox {}
impl PartialOrd for TimerBox {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerBox {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl Driver {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut frames: mpsc::Receiver<(String, Bytes)>,
        mut conn_events: mpsc::Receiver<ConnEvent>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        self.flush();
        loop {
            let next = self
                .timers
                .peek()
                .map(|Reverse((at, _, _))| *at)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None | Some(Cmd::Shutdown) => break,
                    Some(Cmd::SetMeta(meta, reply)) => {
                        let _ = reply.send(self.gossip.set_meta(meta));
                    }
                    Some(Cmd::AddSeeds(seeds)) => self.gossip.set_seeds(seeds),
                    Some(Cmd::Leave(reply)) => {
                        self.gossip.leave();
                        self.flush();
                        let _ = reply.send(());
                    }
                },
                Some((peer, data)) = frames.recv() => {
                    lock(&self.wiring.stats).frames_in += 1;
                    if let Err(e) = self.gossip.handle_frame(&peer, &data) {
                        lock(&self.wiring.stats).frames_refused += 1;
                        match e {
                            MembershipError::IdentityMismatch { .. }
                            | MembershipError::ForgedClaim { .. } => {
                                self.wiring.refuse(peer, e.to_string())
                            }
                            _ => tracing::debug!(%peer, error = %e, "frame refused"),
                        }
                    }
                }
                Some(ev) = conn_events.recv() => self.connection_event(ev),
                _ = tokio::time::sleep_until(next) => {
                    let now = Instant::now();
                    while let Some(Reverse((at, _, _))) = self.timers.peek() {
                        if *at > now {
                            break;
                        }
                        if let Some(Reverse((_, _, TimerBox(t)))) = self.timers.pop() {
                            self.gossip.handle_timer(t);
                        }
                    }
                }
                _ = tick.tick() => {
                    self.gossip.tick();
                    self.publish_view();
                }
            }
            self.flush();
        }
        tracing::info!(node = %self.wiring.name, "membership stopped");
    }

    fn connection_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Up { pc, dialed } => {
                let addr = pc.conn.remote_address();
                if dialed {
                    self.dialing.remove(&addr);
                    self.backoff.remove(&addr);
                }
                let keep_new = match self.entries.get(&pc.peer) {
                    Some(old)
                        if old.conn.close_reason().is_none() && old.since.elapsed() < DIAL_RACE =>
                    {
                        // Both dialed: keep the connection the smaller name dialed.
                        let me_smaller = self.wiring.name < pc.peer;
                        if old.dialed == dialed {
                            true
                        } else {
                            dialed == me_smaller
                        }
                    }
                    _ => true,
                };
                if !keep_new {
                    pc.conn.close(2u32.into(), b"duplicate");
                    self.flush_pending(addr, &pc.peer);
                    return;
                }
                if let Some(old) = self.entries.insert(
                    pc.peer.clone(),
                    Entry {
                        conn: pc.conn.clone(),
                        dialed,
                        since: Instant::now(),
                    },
                ) && old.conn.stable_id() != pc.conn.stable_id()
                {
                    old.conn.close(2u32.into(), b"duplicate");
                }
                lock(&self.conns).insert(pc.peer.clone(), pc.conn.clone());
                self.addr_names.insert(addr, pc.peer.clone());
                serve_connection(&self.wiring, &pc);
                tracing::debug!(peer = %pc.peer, %addr, dialed, "peer connected");
                self.flush_pending(addr, &pc.peer);
            }
            ConnEvent::Lost { peer, id } => {
                if self
                    .entries
                    .get(&peer)
                    .is_some_and(|e| e.conn.stable_id() == id)
                {
                    self.entries.remove(&peer);
                    lock(&self.conns).remove(&peer);
                    tracing::debug!(%peer, "peer connection closed");
                }
            }
            ConnEvent::DialFailed { addr, error } => {
                lock(&self.wiring.stats).dials_failed += 1;
                self.dialing.remove(&addr);
                self.pending.remove(&addr);
                let b = self.backoff.entry(addr).or_insert(Backoff {
                    not_before: Instant::now(),
                    delay: Duration::from_millis(125),
                    failures: 0,
                });
                b.delay = (b.delay * 2).min(Duration::from_secs(5));
                b.not_before = Instant::now() + b.delay;
                b.failures += 1;
                // Loud on the first failure and about once a minute after that.
                if b.failures == 1 || b.failures.is_multiple_of(12) {
                    tracing::warn!(%addr, %error, failures = b.failures, retry_in = ?b.delay, "cannot reach peer");
                } else {
                    tracing::debug!(%addr, %error, retry_in = ?b.delay, "dial failed");
                }
            }
        }
    }

    fn flush_pending(&mut self, addr: SocketAddr, peer: &str) {
        let Some(q) = self.pending.remove(&addr) else {
            return;
        };
        if let Some(e) = self.entries.get(peer) {
            for b in q {
                let _ = e.conn.send_datagram(b);
            }
        }
    }

    /// Send what gossip produced, schedule its timers, publish its events.
    fn flush(&mut self) {
        for (to, data) in self.gossip.take_output() {
            self.send(to, data);
        }
        for (after, t) in self.gossip.take_timers() {
            self.timer_seq += 1;
            self.timers.push(Reverse((
                Instant::now() + after,
                self.timer_seq,
                TimerBox(t),
            )));
        }
        let events = self.gossip.take_events();
        if !events.is_empty() {
            for ev in events {
                match &ev {
                    MemberEvent::Up(id) => {
                        tracing::info!(member = %id.name, addr = %id.addr, "member up")
                    }
                    MemberEvent::Down(id) => tracing::warn!(member = %id.name, "member down"),
                    MemberEvent::Left(id) => tracing::info!(member = %id.name, "member left"),
                    MemberEvent::Joined => tracing::info!("joined the cluster"),
                    _ => {}
                }
                let _ = self.events.send(ev);
            }
            self.publish_view();
        }
    }

    fn publish_view(&self) {
        let v = View {
            active: self.gossip.is_active(),
            members: self.gossip.members(),
        };
        self.view.send_if_modified(|old| {
            if *old == v {
                false
            } else {
                *old = v;
                true
            }
        });
    }

    fn send(&mut self, to: NodeId, data: Bytes) {
        lock(&self.wiring.stats).frames_out += 1;
        let name = if to.name.is_empty() {
            self.addr_names.get(&to.addr).cloned()
        } else {
            Some(to.name.clone())
        };
        if let Some(e) = name.as_ref().and_then(|n| self.entries.get(n))
            && e.conn.close_reason().is_none()
        {
            if let Err(err) = e.conn.send_datagram(data) {
                tracing::debug!(peer = ?name, error = %err, "datagram not sent");
            }
            return;
        }
        // No live connection: hold the packet and dial (unless backing off).
        let q = self.pending.entry(to.addr).or_default();
        if q.len() < PENDING_PER_PEER {
            q.push_back(data);
        }
        if self.dialing.contains(&to.addr) {
            return;
        }
        if self
            .backoff
            .get(&to.addr)
            .is_some_and(|b| b.not_before > Instant::now())
        {
            self.pending.remove(&to.addr);
            return;
        }
        self.dialing.insert(to.addr);
        let w = self.wiring.clone();
        let (addr, expected) = (to.addr, name);
        tokio::spawn(async move {
            let dial = async {
                match &expected {
                    Some(n) => w.endpoint.connect(addr, n).await,
                    None => w.endpoint.connect_any(addr).await,
                }
            };
            let ev = match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
                Ok(Ok(pc)) => ConnEvent::Up { pc, dialed: true },
                Ok(Err(e)) => ConnEvent::DialFailed {
                    addr,
                    error: e.to_string(),
                },
                Err(_) => ConnEvent::DialFailed {
                    addr,
                    error: format!("no answer within {DIAL_TIMEOUT:?}"),
                },
            };
            let _ = w.conn_events.send(ev).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testpki::Pki;

    fn local() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    async fn start(
        pki: &Pki,
        name: &str,
        seeds: Vec<SocketAddr>,
        streams: Option<mpsc::Sender<IncomingStream>>,
    ) -> Membership {
        // Bind first to learn the port, then advertise it.
        let probe = std::net::UdpSocket::bind(local()).expect("probe");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        Membership::start(MembershipConfig {
            identity: pki.node(name),
            bind: addr,
            advertise: addr,
            seeds,
            meta: NodeMeta {
                gateway: format!("{name}:8080"),
                ..NodeMeta::default()
            },
            settings: GossipSettings::default(),
            max_connections: 64,
            streams,
        })
        .await
        .expect("start")
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn state_of(m: &Membership, name: &str) -> Option<MemberState> {
        m.view()
            .members
            .into_iter()
            .find(|x| x.name == name)
            .map(|x| x.state)
    }

    #[tokio::test]
    async fn services_form_a_cluster_carry_streams_and_leave() {
        let pki = Pki::new("cluster");
        let (tx, mut incoming) = mpsc::channel(4);
        let a = start(&pki, "node-1", vec![], Some(tx)).await;
        let seed = a.local_addr().expect("addr");
        let b = start(&pki, "node-2", vec![seed], None).await;
        let c = start(&pki, "node-3", vec![seed], None).await;
        for m in [&a, &b, &c] {
            until("three alive", || m.view().alive() == 3).await;
            // Metadata comes from each member itself (signed), right after it is seen.
            until("metadata", || {
                m.view().members.iter().all(|x| x.meta.is_some())
            })
            .await;
        }
        // A stream opened by node-3 arrives at node-1 with its kind and its certificate name.
        let (mut send, _recv) = c.open_stream("node-1", 7).await.expect("stream");
        send.write_all(b"hi").await.expect("write");
        let s = tokio::time::timeout(Duration::from_secs(5), incoming.recv())
            .await
            .expect("in time")
            .expect("stream");
        assert_eq!((s.peer.as_str(), s.kind), ("node-3", 7));
        // Graceful leave: `left` on the others.
        c.leave().await.expect("leave");
        c.shutdown().await;
        until("left", || state_of(&a, "node-3") == Some(MemberState::Left)).await;
        until("left", || state_of(&b, "node-3") == Some(MemberState::Left)).await;
        // A crash: `down`.
        b.shutdown().await;
        until("down", || state_of(&a, "node-2") == Some(MemberState::Down)).await;
        a.shutdown().await;
    }

    #[tokio::test]
    async fn garbage_silence_and_unreachable_seeds_do_not_stop_the_service() {
        let pki = Pki::new("cluster");
        // A seed nobody listens on.
        let dead = std::net::UdpSocket::bind(local()).expect("probe");
        let dead_addr = dead.local_addr().expect("addr");
        drop(dead);
        let a = start(&pki, "node-1", vec![dead_addr], None).await;
        let addr = a.local_addr().expect("addr");
        // A peer with a valid certificate that sends garbage datagrams, then a stream with
        // nothing on it, then stays silent.
        let rogue = Endpoint::bind(&pki.node("node-9"), local()).expect("bind");
        let pc = rogue.connect(addr, "node-1").await.expect("connect");
        for junk in [
            &b""[..],
            &[1u8][..],
            &[1, 0xff, 0xff][..],
            &[4, 9, 9, 9][..],
            &[77; 900][..],
        ] {
            let _ = pc.conn.send_datagram(Bytes::copy_from_slice(junk));
        }
        let (_s, _r) = pc.conn.open_bi().await.expect("bi");
        // The node still takes a real peer in.
        let b = start(&pki, "node-2", vec![addr], None).await;
        until("two alive", || a.view().alive() == 2).await;
        until("refusals counted", || a.stats().frames_refused >= 3).await;
        until("dials to the dead seed fail", || {
            a.stats().dials_failed >= 1
        })
        .await;
        assert!(
            state_of(&a, "node-9").is_none(),
            "garbage made nobody a member"
        );
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn simultaneous_dials_settle_on_one_connection() {
        let pki = Pki::new("cluster");
        let pa = std::net::UdpSocket::bind(local()).expect("probe");
        let pb = std::net::UdpSocket::bind(local()).expect("probe");
        let (aa, ba) = (pa.local_addr().expect("a"), pb.local_addr().expect("b"));
        drop((pa, pb));
        let cfg = |name: &str, me: SocketAddr, seed: SocketAddr| MembershipConfig {
            identity: pki.node(name),
            bind: me,
            advertise: me,
            seeds: vec![seed],
            meta: NodeMeta::default(),
            settings: GossipSettings::default(),
            max_connections: 8,
            streams: None,
        };
        // Each names the other as its seed, so both dial at once.
        let (a, b) = tokio::join!(
            Membership::start(cfg("node-1", aa, ba)),
            Membership::start(cfg("node-2", ba, aa))
        );
        let (a, b) = (a.expect("a"), b.expect("b"));
        until("joined", || a.view().alive() == 2 && b.view().alive() == 2).await;
        until("one connection each", || {
            a.open_connections() == 1 && b.open_connections() == 1
        })
        .await;
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn a_port_in_use_is_a_clear_error() {
        let pki = Pki::new("cluster");
        let a = start(&pki, "node-1", vec![], None).await;
        let taken = a.local_addr().expect("addr");
        let e = Membership::start(MembershipConfig {
            identity: pki.node("node-2"),
            bind: taken,
            advertise: taken,
            seeds: vec![],
            meta: NodeMeta::default(),
            settings: GossipSettings::default(),
            max_connections: 8,
            streams: None,
        })
        .await
        .expect_err("in use");
        assert_eq!(e.kind(), "bind");
        assert!(e.to_string().contains(&taken.to_string()), "{e}");
    }
}
