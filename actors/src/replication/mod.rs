//! Memory replication between peers: the IO shell around the sans-IO [`protocol`].
//!
//! - **Push.** A write is applied locally and made durable by the caller, then
//!   [`Replicator::push`] queues its [`Delta`] to every live peer (a bounded queue per peer, one
//!   long-lived stream each; a full queue drops the delta, and anti-entropy repairs it). With
//!   `w=2` the caller waits until one peer acknowledges the delta as durable, or gets an error.
//! - **Anti-entropy.** Periodically, and at once when a peer comes back, a node runs a round with
//!   a peer ([`protocol::Initiator`] / [`protocol::Responder`]); entries travel in bounded chunks.
//!   The destroyed-subject sets are exchanged first, so an erased subject is never revived.
//! - **Catch-up.** A restarted node calls [`Replicator::catch_up`] before it serves: it runs a
//!   round itself with a live peer, whatever the names.
//! - **Tombstones** are dropped once they are older than `tombstone_gc_after` and every member is
//!   alive and has completed an anti-entropy round with this node since.
//!
//! [`Replicator`] is a handle over a task it owns (a bounded command channel); every stream and
//! round it starts stops with [`Replicator::shutdown`]. The network is a [`Peers`]: QUIC through
//! the membership service, or the in-memory [`MemNet`] of the tests.

pub mod protocol;
pub mod transport;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use swarm_config::ReplicationConfig;
use swarm_membership::MemberEvent;
use swarm_storage::{AuditSink, Committed, Delta, Storage, StorageError};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Error;
use crate::stream::{StreamKind, decode, encode};
use protocol::{Ae, Initiator, Limits, Local, Push, Responder, Side, Step};
pub use transport::{Duplex, FrameRx, FrameTx, MemIncoming, MemNet, MemPeers, Peers};

/// Rounds a catch-up runs after its first with a peer, at most, until one brings nothing.
const CATCH_UP_ROUNDS_MORE: u32 = 3;
/// How long a node pushes its changes to a peer that opened a round while gossip did not call
/// it alive (a node catching up after a restart or a rejoin), unless gossip calls it alive or a
/// push to it fails first.
const CATCHING_UP_PUSH_FOR: Duration = Duration::from_secs(30);
/// Deltas applied per blocking batch on the receiving side.
const APPLY_BATCH: usize = 256;
/// A batch of at most this many deltas, of at most [`INLINE_APPLY_BYTES`] of values together,
/// is applied on the async worker (each is a read, a decryption and a write of one small
/// record: tens of microseconds together).
const INLINE_APPLY: usize = 4;
const INLINE_APPLY_BYTES: usize = 16 * 1024;
/// Commands queued to the replicator's task.
const COMMANDS: usize = 1024;
/// Longest wait for the peer's next message in a round.
const ROUND_IDLE: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ReplStats {
    pub deltas_sent: AtomicU64,
    pub deltas_dropped: AtomicU64,
    pub deltas_applied: AtomicU64,
    pub deltas_stale: AtomicU64,
    pub deltas_refused: AtomicU64,
    pub lag_ms_sum: AtomicU64,
    pub lag_ms_max: AtomicU64,
    pub ae_rounds: AtomicU64,
    pub ae_failed: AtomicU64,
    pub ae_bytes_sent: AtomicU64,
    pub ae_bytes_received: AtomicU64,
    pub ae_entries: AtomicU64,
    pub tombstones_dropped: AtomicU64,
    /// Refusals by code.
    pub refused_by_code: Mutex<BTreeMap<String, u64>>,
}

/// Called when a peer's delta is refused: (peer, code, detail). The node audits it.
pub type RefusalHook = Arc<dyn Fn(&str, &str, &str) + Send + Sync>;

type Waiters = Mutex<HashMap<u64, oneshot::Sender<Result<String, String>>>>;

enum Cmd {
    /// Queue frames to these peers, in order.
    Send {
        peers: Vec<String>,
        frames: Vec<Bytes>,
    },
    /// Serve a stream a peer opened.
    Serve {
        peer: String,
        kind: StreamKind,
        duplex: Box<Duplex>,
    },
}

/// State shared by the handle, its task and the streams it runs.
struct Shared {
    me: String,
    local: Local,
    peers: Arc<dyn Peers>,
    cfg: ReplicationConfig,
    limits: Limits,
    seq: AtomicU64,
    waiters: Waiters,
    /// Deltas queued to peers and not yet written.
    queued: AtomicU64,
    last_sync: Mutex<HashMap<String, u64>>,
    /// When the last completed round with each peer, started by either side, began (ms): a
    /// round exchanges entries both ways, so what the peer held then is here.
    exchanged: Mutex<HashMap<String, u64>>,
    syncing: Mutex<HashSet<String>>,
    /// Peers that opened a round while not alive to gossip, and until when this node pushes to
    /// them as well: a write acknowledged here after the round took its digest reaches the
    /// peer before it serves.
    catching_up: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Set once [`Replicator::catch_up`] has returned.
    caught_up: AtomicBool,
    /// Becomes true after the first completed anti-entropy round.
    first_sync: watch::Sender<bool>,
    stop: CancellationToken,
    /// What makes applied deltas durable before they are acknowledged (the node's audit
    /// writer); `None`: a sync of the store here.
    durable: Option<Arc<dyn AuditSink>>,
}

impl Shared {
    fn stats(&self) -> &ReplStats {
        &self.local.stats
    }

    /// Called right after applying: the outcome, to come, of a sync that covers what was
    /// applied. Through the node's audit writer when there is one (its sync shared with the
    /// writer's batch, no thread sleeping on it), else a sync of the store. On the async
    /// workers (`blocking` false) nothing here blocks: what would is moved to a blocking thread.
    fn sync_after_apply(&self, blocking: bool) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        let done: Committed = Box::new(move |r| {
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
        match (&self.durable, blocking) {
            (Some(sink), true) => sink.sync_then(done),
            (Some(sink), false) => {
                if let Err(c) = sink.try_sync_then(done) {
                    let sink = sink.clone();
                    drop(tokio::task::spawn_blocking(move || sink.sync_then(c.done)));
                }
            }
            (None, true) => done(self.local.storage.sync()),
            (None, false) => {
                let storage = self.local.storage.clone();
                drop(tokio::task::spawn_blocking(move || done(storage.sync())));
            }
        }
        rx
    }

    /// Run `fut` until it ends or the replicator stops.
    fn spawn(self: &Arc<Self>, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = fut => {}
            }
        });
    }

    /// The live peers and those catching up (see [`Shared::catching_up`]); whether any is live.
    fn push_targets(&self) -> (Vec<String>, bool) {
        let mut peers = self.peers.live_peers();
        let any_live = !peers.is_empty();
        let mut catching = lock(&self.catching_up);
        if !catching.is_empty() {
            let now = tokio::time::Instant::now();
            catching.retain(|p, until| *until > now && !peers.contains(p));
            peers.extend(catching.keys().cloned());
        }
        (peers, any_live)
    }

    /// `peer` opened a round: when gossip does not call it alive here, it is catching up.
    fn round_opened_by(&self, peer: &str) {
        if peer != self.me && !self.peers.live_peers().iter().any(|p| p == peer) {
            lock(&self.catching_up).insert(
                peer.to_string(),
                tokio::time::Instant::now() + CATCHING_UP_PUSH_FOR,
            );
        }
    }

    /// A round with `peer` that began at `started` completed.
    fn exchanged_with(&self, peer: &str, started: u64) {
        let mut m = lock(&self.exchanged);
        let t = m.entry(peer.to_string()).or_insert(started);
        *t = (*t).max(started);
    }

    fn resolve(&self, seq: u64, r: Result<String, String>) {
        if let Some(tx) = lock(&self.waiters).remove(&seq) {
            let _ = tx.send(r);
        }
    }
}

/// This node's replication: pushes, acknowledgements, anti-entropy.
#[derive(Clone)]
pub struct Replicator {
    shared: Arc<Shared>,
    cmd: mpsc::Sender<Cmd>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("me", &self.shared.me)
            .finish_non_exhaustive()
    }
}

impl Replicator {
    /// Start the replicator's task (anti-entropy, tombstone GC, the queues to peers); streams
    /// peers open arrive through [`Replicator::serve`].
    /// Applied deltas are made durable through `durable` (the node's audit writer, whose syncs
    /// they share) or, with `None`, by a sync of `storage`.
    pub fn start(
        storage: Storage,
        peers: impl Peers,
        cfg: ReplicationConfig,
        on_refused: RefusalHook,
        durable: Option<Arc<dyn AuditSink>>,
    ) -> Self {
        Self::with_limits(
            storage,
            Arc::new(peers),
            cfg,
            on_refused,
            durable,
            Limits::default(),
        )
    }

    /// [`Replicator::start`] with the round's chunk sizes given (tests use small ones).
    pub fn with_limits(
        storage: Storage,
        peers: Arc<dyn Peers>,
        cfg: ReplicationConfig,
        on_refused: RefusalHook,
        durable: Option<Arc<dyn AuditSink>>,
        limits: Limits,
    ) -> Self {
        let shared = Arc::new(Shared {
            me: peers.me().to_string(),
            local: Local {
                storage,
                stats: Arc::new(ReplStats::default()),
                on_refused,
            },
            peers,
            cfg,
            limits,
            seq: AtomicU64::new(1),
            waiters: Mutex::default(),
            queued: AtomicU64::new(0),
            last_sync: Mutex::default(),
            exchanged: Mutex::default(),
            syncing: Mutex::default(),
            catching_up: Mutex::default(),
            caught_up: AtomicBool::new(false),
            first_sync: watch::channel(false).0,
            stop: CancellationToken::new(),
            durable,
        });
        let (cmd, rx) = mpsc::channel(COMMANDS);
        let task = tokio::spawn(
            run(shared.clone(), rx)
                .instrument(tracing::info_span!("replicator", node = %shared.me)),
        );
        Self {
            shared,
            cmd,
            task: Arc::new(Mutex::new(Some(task))),
        }
    }

    /// Stop the task and every stream and round it runs; later pushes fail with
    /// [`Error::Stopped`]. Idempotent.
    pub async fn shutdown(&self) {
        self.shared.stop.cancel();
        let task = lock(&self.task).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Catch up before serving: run rounds with live peers until one completes (true). When no
    /// peer is alive for `alone` (a cold start, or the only node), or no round completes
    /// within `limit`, returns false: the node serves its local data as it is.
    pub async fn catch_up(&self, alone: Duration, limit: Duration) -> bool {
        let caught = self.catch_up_inner(alone, limit).await;
        self.shared.caught_up.store(true, Ordering::Release);
        caught
    }

    async fn catch_up_inner(&self, alone: Duration, limit: Duration) -> bool {
        let start = tokio::time::Instant::now();
        loop {
            let peers = self.shared.peers.live_peers();
            if let Some((p, n)) = self.round_with_any(&peers).await {
                // A peer's digest is taken when its round begins; from then on it pushes its
                // writes here (a round opened while gossip does not call this node alive marks
                // it as catching up). So every live peer gets a round, and each peer's rounds
                // repeat until one brings nothing (or a few more).
                let mut rounds = self.rounds_until_quiet(&p, n).await;
                for q in self.shared.peers.live_peers() {
                    if start.elapsed() >= limit {
                        break;
                    }
                    if q != p
                        && let Ok(n) = self.sync_with(&q).await
                    {
                        rounds += self.rounds_until_quiet(&q, n).await;
                    }
                }
                tracing::info!(peer = %p, rounds, "caught up with the peers before serving");
                return true;
            }
            if *self.shared.first_sync.borrow() {
                return true;
            }
            let waited = start.elapsed();
            if (peers.is_empty() && waited >= alone) || waited >= limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Rounds with `peer` after one that brought `n` entries, until one brings nothing (at
    /// most [`CATCH_UP_ROUNDS_MORE`]); returns the rounds run, the first included.
    async fn rounds_until_quiet(&self, peer: &str, mut n: u64) -> u32 {
        let mut more = 0;
        while n > 0 && more < CATCH_UP_ROUNDS_MORE {
            more += 1;
            match self.sync_with(peer).await {
                Ok(m) => n = m,
                Err(_) => break,
            }
        }
        1 + more
    }

    /// Before a graceful leave: run rounds with live peers until one completes, so that what
    /// only this node holds (a write no peer acknowledged, under loss or a cut) is on a peer
    /// when it goes, where the node that adopts its work finds it. False when no peer is
    /// alive, or none completes a round within `limit`.
    pub async fn hand_off(&self, limit: Duration) -> bool {
        let since = now_ms();
        let rounds = async {
            loop {
                let peers = self.shared.peers.live_peers();
                if peers.is_empty() {
                    return false;
                }
                if let Some((p, n)) = self.round_with_any(&peers).await {
                    tracing::info!(peer = %p, entries = n, "handed off to a peer before leaving");
                    return true;
                }
                // A round a peer started (or one of ours already running) counts as well.
                if lock(&self.shared.exchanged).values().any(|t| *t >= since) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(limit, rounds).await.unwrap_or(false)
    }

    /// A round with each of `peers` in turn until one completes: that peer and the entries
    /// exchanged.
    async fn round_with_any(&self, peers: &[String]) -> Option<(String, u64)> {
        for p in peers {
            match self.sync_with(p).await {
                Ok(n) => return Some((p.clone(), n)),
                Err(e) => tracing::debug!(peer = %p, error = %e, "round failed"),
            }
        }
        None
    }

    pub fn stats(&self) -> &ReplStats {
        self.shared.stats()
    }

    /// Whether this node has caught up ([`Replicator::catch_up`] has returned) and has completed
    /// a round with each of `peers` that began at or after `since_ms`, so that what they held
    /// then is here. Starts a round with each peer that has not (one at a time per peer).
    pub fn synced_since(&self, peers: &[String], since_ms: u64) -> bool {
        if !self.shared.caught_up.load(Ordering::Acquire) {
            return false;
        }
        let behind: Vec<String> = {
            let exchanged = lock(&self.shared.exchanged);
            peers
                .iter()
                .filter(|p| exchanged.get(*p).is_none_or(|t| *t < since_ms))
                .cloned()
                .collect()
        };
        for p in &behind {
            if !lock(&self.shared.syncing).contains(p) {
                let (s, p) = (self.shared.clone(), p.clone());
                self.shared.spawn(async move { round_logged(&s, p).await });
            }
        }
        behind.is_empty()
    }

    /// Deltas queued to peers and not yet written to their streams.
    pub fn pending(&self) -> u64 {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Queue `delta` to every live peer. With `w2`, wait until one of them has it durable.
    pub async fn push(&self, delta: &Delta, w2: bool) -> Result<(), Error> {
        self.push_many(std::slice::from_ref(delta), w2).await
    }

    /// [`Replicator::push`] for the deltas of changes made together: queued to each peer in
    /// order as one command, and with `w2` each confirmed by one peer (the first refusal or
    /// timeout is returned).
    pub async fn push_many(&self, deltas: &[Delta], w2: bool) -> Result<(), Error> {
        if self.shared.stop.is_cancelled() {
            return Err(Error::Stopped);
        }
        // Alone: nothing to encode or queue (anti-entropy brings peers up to date when they come).
        let (peers, any_live) = self.shared.push_targets();
        if peers.is_empty() {
            return if w2 { Err(Error::NoReplica) } else { Ok(()) };
        }
        let mut frames = Vec::with_capacity(deltas.len());
        let mut seqs = Vec::with_capacity(deltas.len());
        for delta in deltas {
            let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
            frames.push(encode(&Push::Delta {
                seq,
                ack: w2,
                delta: delta.clone(),
            })?);
            seqs.push(seq);
        }
        // The waiters leave the map however this ends (an answer, a timeout, the caller gone).
        let waiting = Waiting {
            shared: &self.shared,
            seqs: if w2 { seqs } else { Vec::new() },
        };
        let waiters: Vec<_> = {
            let mut waiters = lock(&self.shared.waiters);
            waiting
                .seqs
                .iter()
                .map(|seq| {
                    let (tx, rx) = oneshot::channel();
                    waiters.insert(*seq, tx);
                    rx
                })
                .collect()
        };
        if self.cmd.send(Cmd::Send { peers, frames }).await.is_err() {
            return Err(Error::Stopped);
        }
        if !w2 {
            return Ok(());
        }
        let t = self.shared.cfg.w2_timeout.0;
        // Sent only to peers catching up (no live one): one that does not answer is as no
        // replica at all, as it would have been without them.
        let unanswered = || {
            if any_live {
                Error::Timeout(t)
            } else {
                Error::NoReplica
            }
        };
        let Ok(answers) = tokio::time::timeout(t, futures_util::future::join_all(waiters)).await
        else {
            return Err(unanswered());
        };
        drop(waiting);
        for a in answers {
            match a {
                Ok(Ok(_peer)) => {}
                Ok(Err(code)) => {
                    return Err(Error::Refused {
                        peer: "peer".into(),
                        code,
                    });
                }
                Err(_) => return Err(unanswered()),
            }
        }
        Ok(())
    }

    /// Tell every live peer that these subjects were erased (best effort: anti-entropy
    /// exchanges the destroyed sets first in every round).
    pub fn push_erasure(&self, subjects: Vec<String>) {
        let Ok(frame) = encode(&Push::Erase { subjects }) else {
            return;
        };
        let (peers, _) = self.shared.push_targets();
        let frames = vec![frame];
        if self.cmd.try_send(Cmd::Send { peers, frames }).is_err() {
            tracing::debug!("replicator busy or stopped; erasure left to anti-entropy");
        }
    }

    /// Serve a QUIC stream a peer opened (its kind byte already read).
    pub fn serve_quic(
        &self,
        peer: String,
        kind: StreamKind,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let duplex = Duplex::quic(&peer, send, recv);
        self.serve(peer, kind, duplex);
    }

    /// Serve a stream a peer opened (kind [`StreamKind::Deltas`] or
    /// [`StreamKind::AntiEntropy`]); other kinds are dropped.
    pub fn serve(&self, peer: String, kind: StreamKind, duplex: Duplex) {
        let duplex = Box::new(duplex);
        if let Err(e) = self.cmd.try_send(Cmd::Serve { peer, kind, duplex }) {
            tracing::debug!(error = %e, "replicator busy or stopped; stream dropped");
        }
    }

    /// One anti-entropy round with `peer`, as initiator; returns the entries exchanged.
    pub async fn sync_with(&self, peer: &str) -> Result<u64, Error> {
        round_as_initiator(&self.shared, peer).await
    }
}

/// A push's acknowledgement waiters; they leave the map when this drops.
struct Waiting<'a> {
    shared: &'a Shared,
    seqs: Vec<u64>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.seqs.is_empty() {
            return;
        }
        let mut waiters = lock(&self.shared.waiters);
        for seq in &self.seqs {
            waiters.remove(seq);
        }
    }
}

/// The replicator's task: commands, membership events, the anti-entropy tick.
async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Cmd>) {
    let mut events = shared.peers.subscribe();
    let mut tick = tokio::time::interval(shared.cfg.anti_entropy_every.0);
    let mut links: HashMap<String, mpsc::Sender<Bytes>> = HashMap::new();
    let mut rounds = 0u64;
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => break,
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Cmd::Send { peers, frames }) => {
                    for p in peers {
                        let tx = link(&shared, &mut links, &p);
                        // In order, and none after one dropped: a peer never gets a change of a
                        // batch without those before it (anti-entropy brings it the rest).
                        let sent = frames
                            .iter()
                            .take_while(|frame| tx.try_send((*frame).clone()).is_ok())
                            .count() as u64;
                        shared.queued.fetch_add(sent, Ordering::Relaxed);
                        let stats = shared.stats();
                        stats.deltas_sent.fetch_add(sent, Ordering::Relaxed);
                        stats
                            .deltas_dropped
                            .fetch_add(frames.len() as u64 - sent, Ordering::Relaxed);
                    }
                }
                Some(Cmd::Serve { peer, kind, duplex }) => serve(&shared, peer, kind, *duplex),
            },
            ev = events.recv() => match ev {
                Ok(MemberEvent::Up(id)) => {
                    // A member that comes back: repair at once (give its connection a moment).
                    // Only the smaller name starts it, so the two do not run the same round
                    // twice; the member itself catches up with a round of its own at start.
                    if shared.me < id.name {
                        let s = shared.clone();
                        shared.spawn(async move {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            round_logged(&s, id.name).await;
                        });
                    }
                }
                Ok(MemberEvent::Down(id) | MemberEvent::Left(id)) => {
                    links.remove(&id.name);
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    // No more membership events (the membership service stopped): keep serving
                    // commands and ticks.
                    events = broadcast::channel(1).1;
                }
            },
            _ = tick.tick() => {
                rounds += 1;
                let peers = shared.peers.live_peers();
                if !peers.is_empty() {
                    let peer = peers[rand_index(peers.len())].clone();
                    let s = shared.clone();
                    shared.spawn(async move { round_logged(&s, peer).await });
                }
                if rounds.is_multiple_of(12) {
                    let s = shared.clone();
                    shared.spawn(async move { gc_tombstones(&s).await });
                }
            }
        }
    }
    shared.stop.cancel();
    tracing::debug!("replicator stopped");
}

/// The queue to `peer`, starting its stream when there is none.
fn link(
    shared: &Arc<Shared>,
    links: &mut HashMap<String, mpsc::Sender<Bytes>>,
    peer: &str,
) -> mpsc::Sender<Bytes> {
    if let Some(tx) = links.get(peer)
        && !tx.is_closed()
    {
        return tx.clone();
    }
    let (tx, rx) = mpsc::channel(shared.cfg.peer_queue.max(1));
    links.insert(peer.to_string(), tx.clone());
    let s = shared.clone();
    let span = tracing::debug_span!("delta_stream", peer = %peer, dir = "out");
    let peer = peer.to_string();
    shared.spawn(sender(s, peer, rx).instrument(span));
    tx
}

/// One peer's outgoing delta stream; ends (dropping what is queued) when the stream breaks.
async fn sender(shared: Arc<Shared>, peer: String, mut rx: mpsc::Receiver<Bytes>) {
    let mut duplex = match shared.peers.open(&peer, StreamKind::Deltas).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "no delta stream");
            lock(&shared.catching_up).remove(&peer);
            drop_queue(&shared, rx);
            return;
        }
    };
    let acks_for = shared.cfg.w2_timeout.0;
    let mut linger: Option<tokio::time::Instant> = None;
    loop {
        let until = linger.unwrap_or_else(|| tokio::time::Instant::now() + acks_for);
        tokio::select! {
            frame = rx.recv(), if linger.is_none() => {
                let Some(frame) = frame else {
                    // No more to send (the link was dropped): wait a while for the
                    // acknowledgements of what was sent, then close.
                    linger = Some(tokio::time::Instant::now() + acks_for);
                    continue;
                };
                shared.queued.fetch_sub(1, Ordering::Relaxed);
                if let Err(e) = duplex.tx.send(frame).await {
                    tracing::debug!(error = %e, "delta stream broke");
                    break;
                }
            }
            reply = duplex.rx.next() => match reply {
                Ok(Some(bytes)) => match decode::<Push>(&bytes) {
                    Ok(Push::Ack { seq }) => shared.resolve(seq, Ok(peer.clone())),
                    Ok(Push::Refused { seq, code }) => shared.resolve(seq, Err(code)),
                    _ => {}
                },
                // The peer closed its side or the stream broke: stop sending on it.
                Ok(None) | Err(_) => break,
            },
            _ = tokio::time::sleep_until(until), if linger.is_some() => break,
        }
    }
    drop_queue(&shared, rx);
}

fn drop_queue(shared: &Shared, mut rx: mpsc::Receiver<Bytes>) {
    rx.close();
    let mut lost = 0;
    while rx.try_recv().is_ok() {
        lost += 1;
    }
    shared.queued.fetch_sub(lost, Ordering::Relaxed);
    shared
        .stats()
        .deltas_dropped
        .fetch_add(lost, Ordering::Relaxed);
}

fn serve(shared: &Arc<Shared>, peer: String, kind: StreamKind, duplex: Duplex) {
    let s = shared.clone();
    match kind {
        StreamKind::Deltas => {
            let span = tracing::debug_span!("delta_stream", peer = %peer, dir = "in");
            shared.spawn(receive_deltas(s, peer, duplex).instrument(span));
        }
        StreamKind::AntiEntropy => {
            let span = tracing::debug_span!("anti_entropy", peer = %peer, role = "responder");
            let started = now_ms();
            shared.spawn(
                async move {
                    match round_as_responder(&s, &peer, duplex).await {
                        Ok(()) => {
                            s.exchanged_with(&peer, started);
                            s.first_sync.send_replace(true);
                        }
                        Err(e) => tracing::debug!(error = %e, "anti-entropy round failed"),
                    }
                }
                .instrument(span),
            );
        }
        other => tracing::debug!(%peer, kind = other.name(), "not a replication stream"),
    }
}

async fn receive_deltas(shared: Arc<Shared>, peer: String, duplex: Duplex) {
    let Duplex { mut tx, mut rx } = duplex;
    // A reader decodes frames into a bounded queue; this loop applies what has arrived in
    // batches (one sync per batch).
    let (qtx, mut qrx) = mpsc::channel::<Push>(APPLY_BATCH * 4);
    let s = shared.clone();
    let p2 = peer.clone();
    let reader = async move {
        loop {
            match rx.next().await {
                Ok(Some(b)) => match decode::<Push>(&b) {
                    Ok(p) => {
                        if qtx.send(p).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => s.local.refused(&p2, "bad_frame", &e),
                },
                Ok(None) => return,
                Err(e) => {
                    s.local.refused(&p2, "bad_frame", &e.to_string());
                    return;
                }
            }
        }
    };
    let applier = async {
        while let Some(first) = qrx.recv().await {
            let mut batch = vec![first];
            while batch.len() < APPLY_BATCH {
                match qrx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            // Only what is acknowledged needs the sync before its reply.
            let (replies, sync) = if small_batch(&batch) {
                // A few deltas (a task's step): applied here, less than a blocking thread's
                // wake-up and back.
                let replies = protocol::apply_pushes(&shared.local, &peer, batch, now_ms());
                let sync = (!replies.is_empty()).then(|| shared.sync_after_apply(false));
                (replies, sync)
            } else {
                let s = shared.clone();
                let p2 = peer.clone();
                let Ok(applied) = tokio::task::spawn_blocking(move || {
                    let replies = protocol::apply_pushes(&s.local, &p2, batch, now_ms());
                    let sync = (!replies.is_empty()).then(|| s.sync_after_apply(true));
                    (replies, sync)
                })
                .await
                else {
                    return;
                };
                applied
            };
            let replies = match sync {
                Some(rx) => {
                    let r = rx
                        .await
                        .unwrap_or_else(|_| Err("the sync was dropped".into()));
                    protocol::synced(replies, r)
                }
                None => replies,
            };
            for r in replies {
                let Ok(bytes) = encode(&r) else { continue };
                if tx.send(bytes).await.is_err() {
                    return;
                }
            }
        }
    };
    // The reader ends at the end of the stream; the applier then finishes what was queued.
    tokio::join!(reader, applier);
}

/// Whether `batch` is small enough to apply on the async worker.
fn small_batch(batch: &[Push]) -> bool {
    let bytes: usize = batch
        .iter()
        .map(|p| match p {
            Push::Delta { delta, .. } => delta.value.as_ref().map_or(0, |v| v.value_json.len()),
            Push::Erase { subjects } => subjects.iter().map(String::len).sum(),
            Push::Ack { .. } | Push::Refused { .. } => 0,
        })
        .sum();
    batch.len() <= INLINE_APPLY && bytes <= INLINE_APPLY_BYTES
}

async fn round_logged(shared: &Arc<Shared>, peer: String) {
    match round_as_initiator(shared, &peer).await {
        Ok(n) if n > 0 => tracing::info!(%peer, entries = n, "anti-entropy repaired entries"),
        Ok(_) => {}
        Err(e) => tracing::debug!(%peer, error = %e, "anti-entropy round failed"),
    }
}

/// A round running as initiator with `peer`; dropping it frees the peer for the next one.
struct Syncing<'a> {
    shared: &'a Shared,
    peer: &'a str,
}

impl Drop for Syncing<'_> {
    fn drop(&mut self) {
        lock(&self.shared.syncing).remove(self.peer);
    }
}

/// Run a blocking step of the protocol off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Storage(StorageError::Engine(e.to_string())))
}

/// Frames of a round, counting bytes.
struct RoundIo<'a> {
    shared: &'a Shared,
    peer: &'a str,
    duplex: Duplex,
}

impl RoundIo<'_> {
    async fn send_all(&mut self, step: &Step) -> Result<(), Error> {
        for m in &step.send {
            let bytes = encode(m)?;
            self.shared
                .stats()
                .ae_bytes_sent
                .fetch_add(bytes.len() as u64 + 4, Ordering::Relaxed);
            self.duplex.tx.send(bytes).await?;
        }
        Ok(())
    }

    fn broken(&self, message: &str) -> Error {
        Error::Stream {
            peer: self.peer.to_string(),
            message: message.to_string(),
        }
    }

    async fn recv(&mut self) -> Result<Ae, Error> {
        let bytes = tokio::time::timeout(ROUND_IDLE, self.duplex.rx.next())
            .await
            .map_err(|_| self.broken("no message within the round's idle limit"))??
            .ok_or_else(|| self.broken("stream ended mid-round"))?;
        self.shared
            .stats()
            .ae_bytes_received
            .fetch_add(bytes.len() as u64 + 4, Ordering::Relaxed);
        decode(&bytes).map_err(|message| Error::Frame {
            peer: self.peer.to_string(),
            message,
        })
    }

    /// Wait for the peer to end its side of the stream (nothing more may come).
    async fn end(&mut self) -> Result<(), Error> {
        match tokio::time::timeout(ROUND_IDLE, self.duplex.rx.next()).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(_))) => Err(self.broken("a frame after the end of the round")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.broken("the peer did not end the round within its idle limit")),
        }
    }
}

/// One round with `peer` as initiator (at most one at a time per peer).
async fn round_as_initiator(shared: &Arc<Shared>, peer: &str) -> Result<u64, Error> {
    if !lock(&shared.syncing).insert(peer.to_string()) {
        return Err(Error::Stream {
            peer: peer.to_string(),
            message: "a round with this peer is already running".into(),
        });
    }
    // The peer is free again however the round ends, a caller giving up on it included.
    let _syncing = Syncing { shared, peer };
    let started = now_ms();
    let r = initiate(shared, peer)
        .instrument(tracing::debug_span!("anti_entropy", %peer, role = "initiator"))
        .await;
    let stats = shared.stats();
    match &r {
        Ok(n) => {
            stats.ae_rounds.fetch_add(1, Ordering::Relaxed);
            stats.ae_entries.fetch_add(*n, Ordering::Relaxed);
            lock(&shared.last_sync).insert(peer.to_string(), started);
            shared.exchanged_with(peer, started);
            shared.first_sync.send_replace(true);
        }
        Err(_) => {
            stats.ae_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    r
}

async fn initiate(shared: &Arc<Shared>, peer: &str) -> Result<u64, Error> {
    let duplex = shared.peers.open(peer, StreamKind::AntiEntropy).await?;
    let mut io = RoundIo {
        shared,
        peer,
        duplex,
    };
    let (local, p, limits) = (shared.local.clone(), peer.to_string(), shared.limits);
    let (round, step) = blocking(move || Initiator::start(&local, &p, limits)).await??;
    io.send_all(&step).await?;
    let round = drive(&mut io, round).await?;
    io.duplex.tx.finish();
    // The responder ends its side once it has applied the last entries: only then is what this
    // node holds on the peer (a leaving node's hand-off counts on it).
    io.end().await?;
    Ok(round.entries)
}

/// Feed the peer's messages to `round` (off the async workers) and send what it answers, until
/// it is finished.
async fn drive<S: Side>(io: &mut RoundIo<'_>, mut round: S) -> Result<S, Error> {
    while !round.is_finished() {
        let msg = io.recv().await?;
        let local = io.shared.local.clone();
        let (r, step) = blocking(move || {
            let step = round.on_message(&local, msg, now_ms());
            (round, step)
        })
        .await?;
        round = r;
        io.send_all(&step?).await?;
    }
    Ok(round)
}

async fn round_as_responder(shared: &Arc<Shared>, peer: &str, duplex: Duplex) -> Result<(), Error> {
    // Before the round takes its digest: what is written here from now on is pushed to the peer.
    shared.round_opened_by(peer);
    let mut io = RoundIo {
        shared,
        peer,
        duplex,
    };
    drive(&mut io, Responder::new(peer, shared.limits)).await?;
    io.duplex.tx.finish();
    Ok(())
}

/// Drop tombstones every member has had the chance to see.
async fn gc_tombstones(shared: &Arc<Shared>) {
    let members = shared.peers.members();
    if members.iter().any(|(_, alive)| !alive) {
        return; // someone may come back with old state
    }
    let synced = lock(&shared.last_sync).clone();
    let mut horizon = now_ms().saturating_sub(
        u64::try_from(shared.cfg.tombstone_gc_after.0.as_millis()).unwrap_or(u64::MAX),
    );
    for (name, _) in &members {
        match synced.get(name) {
            Some(t) => horizon = horizon.min(*t),
            None => return,
        }
    }
    let store = shared.local.storage.memory.clone();
    match blocking(move || store.gc_tombstones(horizon)).await {
        Ok(Ok(n)) => {
            shared
                .stats()
                .tombstones_dropped
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "tombstone GC failed"),
        Err(e) => tracing::warn!(error = %e, "tombstone GC failed"),
    }
}

fn rand_index(n: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    (h.finish() % n.max(1) as u64) as usize
}

/// Decode a replication frame (fuzzing hook; not an API).
#[cfg(feature = "fuzzing")]
pub fn fuzz_decode_frames(data: &[u8]) -> usize {
    let a = decode::<Push>(data).is_ok() as usize;
    let b = decode::<Ae>(data).is_ok() as usize;
    a + b
}

#[cfg(test)]
mod tests;
