//! Memory replication between peers: delta pushes and anti-entropy, over QUIC streams of the
//! membership service.
//!
//! - **Push.** A write is applied locally and made durable by the caller, then
//!   [`Replicator::push`] queues its [`Delta`] to every live peer (a bounded queue per peer, one
//!   long-lived stream each; a full queue drops the delta, and anti-entropy repairs it). With
//!   `w=2` the caller waits until one peer acknowledges the delta as durable, or gets an error.
//! - **Anti-entropy.** Periodically, and at once when a peer comes back, a node compares
//!   namespace digests with a peer, then bucket digests of the namespaces that differ, then the
//!   (key, version) lists of the buckets that differ, and only the entries that differ travel.
//!   The destroyed-subject sets are exchanged first, so an erased subject is never revived.
//! - **Tombstones** are dropped once they are older than `tombstone_gc_after` and every member is
//!   alive and has completed an anti-entropy round with this node since.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use swarm_config::ReplicationConfig;
use swarm_membership::{MemberEvent, MemberState, Membership};
use swarm_storage::{ApplyOutcome, Delta, Storage, StorageError, Version};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Stream kind: a long-lived stream of pushed deltas (and their acknowledgements).
pub const STREAM_DELTAS: u8 = 2;
/// Stream kind: one anti-entropy round.
pub const STREAM_ANTI_ENTROPY: u8 = 3;

/// Largest frame on a replication stream.
const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Deltas applied per blocking batch on the receiving side.
const APPLY_BATCH: usize = 256;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a replicated write or a round failed. `code()` is stable.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("no live peer to hold a second copy")]
    NoReplica,
    #[error("no peer acknowledged the write as durable within {0:?}")]
    Timeout(Duration),
    #[error("replication stream to {peer}: {message}")]
    Stream { peer: String, message: String },
    #[error("bad replication frame from {peer}: {message}")]
    Frame { peer: String, message: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ReplError {
    pub fn code(&self) -> &'static str {
        match self {
            ReplError::NoReplica => "no_replica",
            ReplError::Timeout(_) => "replication_timeout",
            ReplError::Stream { .. } => "replication_stream",
            ReplError::Frame { .. } => "bad_frame",
            ReplError::Storage(e) => e.kind(),
        }
    }
}

/// Messages on a delta stream.
#[derive(Debug, Serialize, Deserialize)]
enum Push {
    /// Apply; acknowledge once durable when `ack`.
    Delta { seq: u64, ack: bool, delta: Delta },
    /// These subjects were erased.
    Erase { subjects: Vec<String> },
    /// Reply: `seq` is durable here.
    Ack { seq: u64 },
    /// Reply: `seq` was refused here (`code`).
    Refused { seq: u64, code: String },
}

/// Messages of an anti-entropy round (initiator A, responder B).
#[derive(Debug, Serialize, Deserialize)]
enum Ae {
    /// A→B: A's destroyed subjects and namespace roots.
    Hello {
        destroyed: Vec<String>,
        namespaces: Vec<(String, u64, u64)>,
    },
    /// B→A: B's destroyed subjects and the namespaces that differ.
    HelloReply {
        destroyed: Vec<String>,
        differ: Vec<String>,
    },
    /// A→B: A's bucket digests of `ns`.
    Buckets { ns: String, buckets: Vec<u64> },
    /// B→A: buckets of `ns` that differ.
    BucketDiff { ns: String, differ: Vec<u16> },
    /// A→B: A's (key, version, expires_at) in those buckets.
    Summaries {
        ns: String,
        items: Vec<(String, Version, Option<u64>)>,
    },
    /// B→A: what A lacks (or has older), and the keys B wants from A.
    Exchange {
        ns: String,
        deltas: Vec<Delta>,
        want: Vec<String>,
    },
    /// A→B: the entries B asked for.
    Deltas { ns: String, deltas: Vec<Delta> },
    /// A→B: end of round.
    Done,
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

type Outgoing = Arc<Vec<u8>>;

struct Inner {
    me: String,
    storage: Storage,
    membership: Membership,
    cfg: ReplicationConfig,
    stats: ReplStats,
    seq: AtomicU64,
    links: Mutex<HashMap<String, mpsc::Sender<Outgoing>>>,
    waiters: Mutex<HashMap<u64, oneshot::Sender<Result<String, String>>>>,
    last_sync: Mutex<HashMap<String, u64>>,
    syncing: Mutex<HashSet<String>>,
    on_refused: RefusalHook,
    /// Becomes true after the first completed anti-entropy round.
    first_sync: tokio::sync::watch::Sender<bool>,
}

/// This node's replication: pushes, acknowledgements, anti-entropy.
#[derive(Clone)]
pub struct Replicator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("me", &self.inner.me)
            .finish_non_exhaustive()
    }
}

impl Replicator {
    /// Start the anti-entropy and tombstone duties; streams arrive through [`Replicator::serve`].
    pub fn start(
        storage: Storage,
        membership: Membership,
        cfg: ReplicationConfig,
        on_refused: RefusalHook,
    ) -> Self {
        let r = Self {
            inner: Arc::new(Inner {
                me: membership.name().to_string(),
                storage,
                membership,
                cfg,
                stats: ReplStats::default(),
                seq: AtomicU64::new(1),
                links: Mutex::default(),
                waiters: Mutex::default(),
                last_sync: Mutex::default(),
                syncing: Mutex::default(),
                on_refused,
                first_sync: tokio::sync::watch::channel(false).0,
            }),
        };
        tokio::spawn(r.clone().duties());
        r
    }

    /// Wait (at most `limit`) until one anti-entropy round has completed; says whether it did.
    /// A restarted node calls this before serving, so it does not serve what the cluster has
    /// since deleted or erased.
    pub async fn wait_first_sync(&self, limit: Duration) -> bool {
        let mut rx = self.inner.first_sync.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|done| *done))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn stats(&self) -> &ReplStats {
        &self.inner.stats
    }

    /// Deltas queued to peers and not yet written to their streams.
    pub fn pending(&self) -> u64 {
        lock(&self.inner.links)
            .values()
            .map(|tx| (tx.max_capacity() - tx.capacity()) as u64)
            .sum()
    }

    fn live_peers(&self) -> Vec<String> {
        self.inner.membership.live_peers()
    }

    /// Queue `delta` to every live peer. With `w2`, wait until one of them has it durable.
    pub async fn push(&self, delta: &Delta, w2: bool) -> Result<(), ReplError> {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&Push::Delta {
            seq,
            ack: w2,
            delta: delta.clone(),
        })?;
        let peers = self.live_peers();
        if w2 && peers.is_empty() {
            return Err(ReplError::NoReplica);
        }
        let waiter = if w2 {
            let (tx, rx) = oneshot::channel();
            lock(&self.inner.waiters).insert(seq, tx);
            Some(rx)
        } else {
            None
        };
        self.send_to(&peers, Arc::new(frame));
        let Some(rx) = waiter else {
            return Ok(());
        };
        let t = self.inner.cfg.w2_timeout.0;
        let r = tokio::time::timeout(t, rx).await;
        lock(&self.inner.waiters).remove(&seq);
        match r {
            Ok(Ok(Ok(_peer))) => Ok(()),
            Ok(Ok(Err(code))) => Err(ReplError::Stream {
                peer: "peer".into(),
                message: format!("refused: {code}"),
            }),
            Ok(Err(_)) | Err(_) => Err(ReplError::Timeout(t)),
        }
    }

    /// Tell every live peer that these subjects were erased.
    pub fn push_erasure(&self, subjects: Vec<String>) {
        let Ok(frame) = encode(&Push::Erase { subjects }) else {
            return;
        };
        let peers = self.live_peers();
        self.send_to(&peers, Arc::new(frame));
    }

    fn send_to(&self, peers: &[String], frame: Arc<Vec<u8>>) {
        for p in peers {
            let tx = self.link(p);
            match tx.try_send(frame.clone()) {
                Ok(()) => {
                    self.inner.stats.deltas_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.inner
                        .stats
                        .deltas_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The queue to `peer`, starting its sender task when there is none.
    fn link(&self, peer: &str) -> mpsc::Sender<Outgoing> {
        let mut links = lock(&self.inner.links);
        if let Some(tx) = links.get(peer)
            && !tx.is_closed()
        {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.inner.cfg.peer_queue);
        links.insert(peer.to_string(), tx.clone());
        tokio::spawn(self.clone().sender(peer.to_string(), rx));
        tx
    }

    /// One peer's outgoing delta stream; ends (dropping what is queued) when the stream breaks.
    async fn sender(self, peer: String, mut rx: mpsc::Receiver<Outgoing>) {
        let (mut send, mut recv) = match self
            .inner
            .membership
            .open_stream(&peer, STREAM_DELTAS)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "no delta stream");
                self.drop_link(&peer, rx);
                return;
            }
        };
        // Acknowledgements come back on the same stream.
        let me = self.clone();
        let ack_peer = peer.clone();
        let acks = tokio::spawn(async move {
            while let Ok(Some(bytes)) = read_frame(&mut recv).await {
                match postcard::from_bytes::<Push>(&bytes) {
                    Ok(Push::Ack { seq }) => me.resolve(seq, Ok(ack_peer.clone())),
                    Ok(Push::Refused { seq, code }) => me.resolve(seq, Err(code)),
                    _ => {}
                }
            }
        });
        while let Some(frame) = rx.recv().await {
            if let Err(e) = write_frame(&mut send, &frame).await {
                tracing::debug!(%peer, error = %e, "delta stream broke");
                break;
            }
        }
        acks.abort();
        self.drop_link(&peer, rx);
    }

    fn drop_link(&self, peer: &str, mut rx: mpsc::Receiver<Outgoing>) {
        lock(&self.inner.links).remove(peer);
        rx.close();
        let mut lost = 0;
        while rx.try_recv().is_ok() {
            lost += 1;
        }
        self.inner
            .stats
            .deltas_dropped
            .fetch_add(lost, Ordering::Relaxed);
    }

    fn resolve(&self, seq: u64, r: Result<String, String>) {
        if let Some(tx) = lock(&self.inner.waiters).remove(&seq) {
            let _ = tx.send(r);
        }
    }

    /// Serve a stream a peer opened (kind [`STREAM_DELTAS`] or [`STREAM_ANTI_ENTROPY`]).
    pub fn serve(&self, peer: String, kind: u8, send: quinn::SendStream, recv: quinn::RecvStream) {
        let me = self.clone();
        match kind {
            STREAM_DELTAS => {
                tokio::spawn(async move { me.receive_deltas(peer, send, recv).await });
            }
            STREAM_ANTI_ENTROPY => {
                tokio::spawn(async move {
                    match me.respond_round(&peer, send, recv).await {
                        Ok(()) => {
                            me.inner.first_sync.send_replace(true);
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "anti-entropy round (responder) failed")
                        }
                    }
                });
            }
            _ => {}
        }
    }

    async fn receive_deltas(
        &self,
        peer: String,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        // A reader task decodes frames into a bounded queue; this loop applies what has
        // arrived in batches (one sync per batch).
        let (tx, mut rx) = mpsc::channel::<Push>(APPLY_BATCH * 4);
        let me = self.clone();
        let p2 = peer.clone();
        let reader = tokio::spawn(async move {
            loop {
                match read_frame(&mut recv).await {
                    Ok(Some(b)) => {
                        if let Some(p) = me.decode_push(&p2, &b)
                            && tx.send(p).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        me.refused(&p2, "bad_frame", &e);
                        return;
                    }
                }
            }
        });
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < APPLY_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let me = self.clone();
            let p2 = peer.clone();
            let Ok(replies) = tokio::task::spawn_blocking(move || me.apply_batch(&p2, batch)).await
            else {
                break;
            };
            for r in replies {
                let Ok(bytes) = encode(&r) else { continue };
                if write_frame(&mut send, &bytes).await.is_err() {
                    reader.abort();
                    return;
                }
            }
        }
        reader.abort();
    }

    fn decode_push(&self, peer: &str, bytes: &[u8]) -> Option<Push> {
        match postcard::from_bytes::<Push>(bytes) {
            Ok(p) => Some(p),
            Err(e) => {
                self.refused(peer, "bad_frame", &e.to_string());
                None
            }
        }
    }

    /// Apply a batch of pushes; returns the acknowledgements to send (after one sync).
    fn apply_batch(&self, peer: &str, batch: Vec<Push>) -> Vec<Push> {
        let mut replies = Vec::new();
        let now = now_ms();
        for p in batch {
            match p {
                Push::Delta { seq, ack, delta } => match self.apply(peer, &delta, now) {
                    Ok(()) => {
                        if ack {
                            replies.push(Push::Ack { seq });
                        }
                    }
                    Err(code) => {
                        if ack {
                            replies.push(Push::Refused { seq, code });
                        }
                    }
                },
                Push::Erase { subjects } => {
                    if let Err(e) = self.inner.storage.memory.merge_destroyed(&subjects, now) {
                        tracing::warn!(%peer, error = %e, "erasure from peer not applied");
                    }
                }
                Push::Ack { .. } | Push::Refused { .. } => {}
            }
        }
        if !replies.is_empty()
            && let Err(e) = self.inner.storage.sync()
        {
            tracing::error!(error = %e, "sync after replicated writes failed");
            return replies
                .into_iter()
                .map(|r| match r {
                    Push::Ack { seq } => Push::Refused {
                        seq,
                        code: "storage".into(),
                    },
                    other => other,
                })
                .collect();
        }
        replies
    }

    /// Apply one delta; the refusal code when refused.
    fn apply(&self, peer: &str, delta: &Delta, now: u64) -> Result<(), String> {
        let s = &self.inner.stats;
        match self.inner.storage.memory.apply_delta(delta, now) {
            Ok(ApplyOutcome::Applied) => {
                s.deltas_applied.fetch_add(1, Ordering::Relaxed);
                let lag = now.saturating_sub(delta.version.hlc.wall_ms());
                s.lag_ms_sum.fetch_add(lag, Ordering::Relaxed);
                s.lag_ms_max.fetch_max(lag, Ordering::Relaxed);
                Ok(())
            }
            Ok(ApplyOutcome::Stale) => {
                s.deltas_stale.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let detail = format!("{}/{}: {e}", delta.namespace, delta.key);
                self.refused(peer, e.kind(), &detail);
                Err(e.kind().to_string())
            }
        }
    }

    fn refused(&self, peer: &str, code: &str, detail: &str) {
        let s = &self.inner.stats;
        s.deltas_refused.fetch_add(1, Ordering::Relaxed);
        *lock(&s.refused_by_code)
            .entry(code.to_string())
            .or_default() += 1;
        tracing::warn!(%peer, code, detail, "replicated change refused");
        (self.inner.on_refused)(peer, code, detail);
    }

    /// Periodic anti-entropy, immediate rounds when a peer comes back, tombstone GC.
    async fn duties(self) {
        let mut events = self.inner.membership.subscribe();
        let mut tick = tokio::time::interval(self.inner.cfg.anti_entropy_every.0);
        let mut rounds = 0u64;
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(MemberEvent::Up(id)) if self.inner.me < id.name => {
                        // A member that comes back: repair at once (give its connection a
                        // moment). Only the smaller name starts it, so the two do not run the
                        // same round twice.
                        let me = self.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            me.round_logged(id.name).await;
                        });
                    }
                    Ok(MemberEvent::Down(id) | MemberEvent::Left(id)) => {
                        lock(&self.inner.links).remove(&id.name);
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    rounds += 1;
                    let peers = self.live_peers();
                    if !peers.is_empty() {
                        let me = self.clone();
                        let peer = peers[rand_index(peers.len())].clone();
                        tokio::spawn(async move { me.round_logged(peer).await });
                    }
                    if rounds.is_multiple_of(12) {
                        self.gc_tombstones().await;
                    }
                }
            }
        }
    }

    async fn round_logged(&self, peer: String) {
        {
            let mut s = lock(&self.inner.syncing);
            if !s.insert(peer.clone()) {
                return;
            }
        }
        let started = now_ms();
        let r = self.sync_with(&peer).await;
        lock(&self.inner.syncing).remove(&peer);
        match r {
            Ok(n) => {
                self.inner.stats.ae_rounds.fetch_add(1, Ordering::Relaxed);
                lock(&self.inner.last_sync).insert(peer.clone(), started);
                self.inner.first_sync.send_replace(true);
                if n > 0 {
                    tracing::info!(%peer, entries = n, "anti-entropy repaired entries");
                }
            }
            Err(e) => {
                self.inner.stats.ae_failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = %e, "anti-entropy round failed");
            }
        }
    }

    /// One anti-entropy round with `peer`, as initiator; returns the entries exchanged.
    pub async fn sync_with(&self, peer: &str) -> Result<u64, ReplError> {
        let stream_err = |e: &dyn std::fmt::Display| ReplError::Stream {
            peer: peer.to_string(),
            message: e.to_string(),
        };
        let (mut send, mut recv) = self
            .inner
            .membership
            .open_stream(peer, STREAM_ANTI_ENTROPY)
            .await
            .map_err(|e| stream_err(&e))?;
        let mut io = AeIo {
            peer: peer.to_string(),
            stats: &self.inner.stats,
        };
        let store = self.inner.storage.memory.clone();
        let (destroyed, namespaces) = blocking(move || {
            let destroyed = store.destroyed_subjects()?;
            let mut ns = Vec::new();
            for n in store.namespaces()? {
                let d = store.digest(&n)?;
                ns.push((n, d.root, d.count));
            }
            Ok((destroyed, ns))
        })
        .await?;
        io.send(
            &mut send,
            &Ae::Hello {
                destroyed,
                namespaces,
            },
        )
        .await?;
        let Ae::HelloReply { destroyed, differ } = io.recv(&mut recv).await? else {
            return Err(io.unexpected());
        };
        self.merge_destroyed(destroyed).await?;
        let mut entries = 0u64;
        for ns in differ {
            let store = self.inner.storage.memory.clone();
            let n2 = ns.clone();
            let buckets = blocking(move || Ok(store.digest(&n2)?.buckets)).await?;
            io.send(
                &mut send,
                &Ae::Buckets {
                    ns: ns.clone(),
                    buckets,
                },
            )
            .await?;
            let Ae::BucketDiff { differ, .. } = io.recv(&mut recv).await? else {
                return Err(io.unexpected());
            };
            let store = self.inner.storage.memory.clone();
            let n2 = ns.clone();
            let items = blocking(move || Ok(store.bucket_summaries(&n2, &differ)?)).await?;
            io.send(
                &mut send,
                &Ae::Summaries {
                    ns: ns.clone(),
                    items,
                },
            )
            .await?;
            let Ae::Exchange { deltas, want, .. } = io.recv(&mut recv).await? else {
                return Err(io.unexpected());
            };
            entries += (deltas.len() + want.len()) as u64;
            self.apply_all(peer, deltas).await;
            let store = self.inner.storage.memory.clone();
            let n2 = ns.clone();
            let deltas = blocking(move || {
                let mut out = Vec::with_capacity(want.len());
                for k in want {
                    if let Some(d) = store.delta(&n2, &k)? {
                        out.push(d);
                    }
                }
                Ok(out)
            })
            .await?;
            io.send(&mut send, &Ae::Deltas { ns, deltas }).await?;
        }
        io.send(&mut send, &Ae::Done).await?;
        let _ = send.finish();
        self.inner
            .stats
            .ae_entries
            .fetch_add(entries, Ordering::Relaxed);
        Ok(entries)
    }

    /// The responder's side of a round.
    async fn respond_round(
        &self,
        peer: &str,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), ReplError> {
        let mut io = AeIo {
            peer: peer.to_string(),
            stats: &self.inner.stats,
        };
        let Ae::Hello {
            destroyed,
            namespaces,
        } = io.recv(&mut recv).await?
        else {
            return Err(io.unexpected());
        };
        self.merge_destroyed(destroyed).await?;
        let store = self.inner.storage.memory.clone();
        let (mine, differ) = blocking(move || {
            let mine = store.destroyed_subjects()?;
            let theirs: HashMap<String, (u64, u64)> = namespaces
                .into_iter()
                .map(|(n, root, count)| (n, (root, count)))
                .collect();
            let mut differ = Vec::new();
            let mut local = HashSet::new();
            for n in store.namespaces()? {
                let d = store.digest(&n)?;
                if theirs.get(&n) != Some(&(d.root, d.count)) {
                    differ.push(n.clone());
                }
                local.insert(n);
            }
            differ.extend(theirs.into_keys().filter(|n| !local.contains(n)));
            Ok((mine, differ))
        })
        .await?;
        io.send(
            &mut send,
            &Ae::HelloReply {
                destroyed: mine,
                differ,
            },
        )
        .await?;
        loop {
            match io.recv(&mut recv).await? {
                Ae::Done => return Ok(()),
                Ae::Buckets { ns, buckets } => {
                    let store = self.inner.storage.memory.clone();
                    let n2 = ns.clone();
                    let differ = blocking(move || {
                        let mine = store.digest(&n2)?.buckets;
                        Ok((0..mine.len().max(buckets.len()))
                            .filter(|&i| mine.get(i) != buckets.get(i))
                            .filter_map(|i| u16::try_from(i).ok())
                            .collect::<Vec<u16>>())
                    })
                    .await?;
                    io.send(
                        &mut send,
                        &Ae::BucketDiff {
                            ns: ns.clone(),
                            differ: differ.clone(),
                        },
                    )
                    .await?;
                    let Ae::Summaries { items, .. } = io.recv(&mut recv).await? else {
                        return Err(io.unexpected());
                    };
                    let store = self.inner.storage.memory.clone();
                    let n2 = ns.clone();
                    let (deltas, want) = blocking(move || {
                        let mine: HashMap<String, (Version, Option<u64>)> = store
                            .bucket_summaries(&n2, &differ)?
                            .into_iter()
                            .map(|(k, v, e)| (k, (v, e)))
                            .collect();
                        let theirs: HashMap<String, (Version, Option<u64>)> =
                            items.into_iter().map(|(k, v, e)| (k, (v, e))).collect();
                        // Every entry whose summary differs travels both ways: merging is
                        // idempotent, and the merge (not this comparison) decides who wins.
                        let mut deltas = Vec::new();
                        for (k, mv) in &mine {
                            if theirs.get(k) != Some(mv)
                                && let Some(d) = store.delta(&n2, k)?
                            {
                                deltas.push(d);
                            }
                        }
                        let want: Vec<String> = theirs
                            .into_iter()
                            .filter(|(k, tv)| mine.get(k) != Some(tv))
                            .map(|(k, _)| k)
                            .collect();
                        Ok((deltas, want))
                    })
                    .await?;
                    io.send(
                        &mut send,
                        &Ae::Exchange {
                            ns: ns.clone(),
                            deltas,
                            want,
                        },
                    )
                    .await?;
                    let Ae::Deltas { deltas, .. } = io.recv(&mut recv).await? else {
                        return Err(io.unexpected());
                    };
                    self.apply_all(peer, deltas).await;
                }
                _ => return Err(io.unexpected()),
            }
        }
    }

    async fn apply_all(&self, peer: &str, deltas: Vec<Delta>) {
        if deltas.is_empty() {
            return;
        }
        let me = self.clone();
        let peer = peer.to_string();
        let _ = tokio::task::spawn_blocking(move || {
            let now = now_ms();
            for d in &deltas {
                let _ = me.apply(&peer, d, now);
            }
            if let Err(e) = me.inner.storage.sync() {
                tracing::error!(error = %e, "sync after anti-entropy failed");
            }
        })
        .await;
    }

    async fn merge_destroyed(&self, subjects: Vec<String>) -> Result<(), ReplError> {
        if subjects.is_empty() {
            return Ok(());
        }
        let store = self.inner.storage.memory.clone();
        let n = blocking(move || Ok(store.merge_destroyed(&subjects, now_ms())?)).await?;
        if n > 0 {
            tracing::info!(subjects = n, "erasures from a peer applied");
        }
        Ok(())
    }

    /// Drop tombstones every member has had the chance to see.
    async fn gc_tombstones(&self) {
        let view = self.inner.membership.view();
        let peers: Vec<_> = view
            .members
            .iter()
            .filter(|m| m.name != self.inner.me && m.state != MemberState::Left)
            .collect();
        if peers.iter().any(|m| m.state != MemberState::Alive) {
            return; // someone may come back with old state
        }
        let synced = lock(&self.inner.last_sync).clone();
        let mut horizon = now_ms().saturating_sub(
            u64::try_from(self.inner.cfg.tombstone_gc_after.0.as_millis()).unwrap_or(u64::MAX),
        );
        for m in &peers {
            match synced.get(&m.name) {
                Some(t) => horizon = horizon.min(*t),
                None => return,
            }
        }
        let store = self.inner.storage.memory.clone();
        match blocking(move || Ok(store.gc_tombstones(horizon)?)).await {
            Ok(n) => {
                self.inner
                    .stats
                    .tombstones_dropped
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "tombstone GC failed"),
        }
    }
}

fn rand_index(n: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    (h.finish() % n.max(1) as u64) as usize
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReplError> + Send + 'static,
) -> Result<T, ReplError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ReplError::Storage(StorageError::Engine(e.to_string())))?
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, ReplError> {
    postcard::to_stdvec(v).map_err(|e| ReplError::Frame {
        peer: String::new(),
        message: e.to_string(),
    })
}

/// One length-prefixed frame.
async fn write_frame(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), String> {
    let len = u32::try_from(bytes.len()).map_err(|_| "frame too large".to_string())?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())
}

/// The next frame; `None` at a clean end of stream.
async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>, String> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(format!(
            "frame of {n} bytes is over the {MAX_FRAME}-byte limit"
        ));
    }
    let mut buf = vec![0u8; n];
    recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(Some(buf))
}

/// Framing of an anti-entropy round, counting bytes.
struct AeIo<'a> {
    peer: String,
    stats: &'a ReplStats,
}

impl AeIo<'_> {
    async fn send(&mut self, s: &mut quinn::SendStream, m: &Ae) -> Result<(), ReplError> {
        let bytes = encode(m)?;
        self.stats
            .ae_bytes_sent
            .fetch_add(bytes.len() as u64 + 4, Ordering::Relaxed);
        write_frame(s, &bytes)
            .await
            .map_err(|message| ReplError::Stream {
                peer: self.peer.clone(),
                message,
            })
    }

    async fn recv(&mut self, r: &mut quinn::RecvStream) -> Result<Ae, ReplError> {
        let bytes = read_frame(r)
            .await
            .map_err(|message| ReplError::Stream {
                peer: self.peer.clone(),
                message,
            })?
            .ok_or_else(|| ReplError::Stream {
                peer: self.peer.clone(),
                message: "stream ended mid-round".into(),
            })?;
        self.stats
            .ae_bytes_received
            .fetch_add(bytes.len() as u64 + 4, Ordering::Relaxed);
        postcard::from_bytes(&bytes).map_err(|e| ReplError::Frame {
            peer: self.peer.clone(),
            message: e.to_string(),
        })
    }

    fn unexpected(&self) -> ReplError {
        ReplError::Frame {
            peer: self.peer.clone(),
            message: "unexpected message in an anti-entropy round".into(),
        }
    }
}

/// Decode a delta-stream frame (fuzzing hook; not an API).
#[doc(hidden)]
pub fn fuzz_decode_frames(data: &[u8]) -> usize {
    let a = postcard::from_bytes::<Push>(data).is_ok() as usize;
    let b = postcard::from_bytes::<Ae>(data).is_ok() as usize;
    a + b
}
