//! Actors across nodes: ractor_cluster sessions carried on QUIC.
//!
//! Each node runs one ractor_cluster `NodeServer` and one [`RouterMsg`] router in the process group
//! [`ROUTER_GROUP`]. The caller (the node crate) owns the QUIC connections and drives sessions from
//! membership events: for each peer it opens one bidirectional stream, writes [`StreamKind::Ractor`](crate::StreamKind::Ractor) and
//! hands it to [`ActorCluster::connect`]; the peer reads that byte and hands its end to
//! [`ActorCluster::accept`]; a member going down or leaving is [`ActorCluster::disconnect`].
//!
//! ractor_cluster's `NodeServer` always runs a TCP listener of its own (here on 127.0.0.1, port 0)
//! that any local user could dial, and its only check is the shared cookie. Sessions never use it
//! (they all ride QUIC streams), so it is wrapped in a TLS acceptor that has no certificate: every
//! handshake fails before ractor reads a byte, and no session, cookie or not, is ever opened on it.
//!
//! Identity: the QUIC peer's certificate names a node, and the ractor node name it claims must be
//! that name (`<name>@swarm`). Two checks enforce it. The incoming bytes of every QUIC session pass
//! through a sans-IO frame scanner (`wire`) that fails the stream as soon as an authentication
//! message names anyone else, before ractor decodes it; and when ractor reports a session
//! authenticated or ready, its peer name is compared with the certificate name again, and a
//! mismatch (or a session not opened through this module, e.g. on the loopback TCP listener) is
//! killed. Only matching sessions become usable: calls to a peer go to the router whose ractor node
//! id is that of the peer's session.

mod router;
mod sessions;
mod wire;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorRef};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{
    BoxRead, BoxWrite, ClusterBidiStream, NodeEventSubscription, NodeServer, NodeServerMessage,
    NodeSessionMessage,
};
use tokio::io::{AsyncRead, BufReader, ReadBuf};
use tokio::sync::watch;

use router::Router;
pub use router::{ROUTER_GROUP, RouterMsg};
pub use sessions::spawn_sessions;
use wire::{NameCheck, WireError};

use crate::Error;

/// Host part of every swarm ractor node name (`<certificate name>@swarm`).
const RACTOR_HOST: &str = "swarm";
/// How long [`ActorCluster::connect`] waits for the session to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Read buffer in front of a QUIC receive stream (ractor reads a frame in several small reads).
const READ_BUFFER: usize = 64 * 1024;
const SUBSCRIPTION: &str = "swarm.actors.sessions";

/// Where a session we opened or accepted stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Opening,
    Ready,
    Refused(String),
    Closed,
}

#[derive(Debug)]
struct Pending {
    /// The certificate name the session must claim.
    peer: String,
    phase: Phase,
    /// Someone waits on this entry (and removes it); otherwise it goes when the session closes.
    waited: bool,
    actor: Option<ActorRef<NodeSessionMessage>>,
}

#[derive(Debug)]
struct Ready {
    node_id: u64,
    label: String,
    actor: ActorRef<NodeSessionMessage>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By label: the QUIC label we gave the stream, or the TCP peer address.
    pending: HashMap<String, Pending>,
    /// Usable sessions by certificate name.
    ready: HashMap<String, Ready>,
}

/// State shared by the handle, the session event subscription and the stream guards.
#[derive(Debug)]
struct Shared {
    node: String,
    inner: Mutex<Inner>,
    /// Bumped on every session change; `connect` waits on it.
    changed: watch::Sender<u64>,
    next_label: AtomicU64,
    next_nonce: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn register(&self, label: &str, peer: &str, waited: bool) {
        self.lock().pending.insert(
            label.to_string(),
            Pending {
                peer: peer.to_string(),
                phase: Phase::Opening,
                waited,
                actor: None,
            },
        );
    }

    fn phase(&self, label: &str) -> Option<Phase> {
        self.lock().pending.get(label).map(|p| p.phase.clone())
    }

    fn forget(&self, label: &str) {
        self.lock().pending.remove(label);
    }

    /// The stream guard saw another name; ractor is about to drop the session.
    fn refuse(&self, label: &str, claimed: &str) {
        let mut inner = self.lock();
        if let Some(p) = inner.pending.get_mut(label) {
            tracing::warn!(node = %self.node, peer = %p.peer, claimed, "ractor name does not match certificate; session refused");
            p.phase = Phase::Refused(claimed.to_string());
        }
        drop(inner);
        self.notify();
    }

    /// Does this session claim the name its label expects? Refuses (and says so) if not.
    fn admit(&self, ses: &NodeServerSessionInformation, ready: bool) -> bool {
        let claimed = ses
            .peer_name
            .as_ref()
            .map(|n| n.name.clone())
            .unwrap_or_default();
        let mut inner = self.lock();
        let Some(p) = inner.pending.get_mut(&ses.peer_addr) else {
            tracing::warn!(node = %self.node, label = %ses.peer_addr, claimed, "session not opened through swarm; refused");
            return false;
        };
        if matches!(p.phase, Phase::Refused(_)) {
            return false;
        }
        if claimed != ractor_name(&p.peer) {
            tracing::warn!(node = %self.node, peer = %p.peer, claimed, "ractor name does not match certificate; session refused");
            p.phase = Phase::Refused(claimed);
            drop(inner);
            self.notify();
            return false;
        }
        if ready {
            p.phase = Phase::Ready;
            let peer = p.peer.clone();
            tracing::info!(node = %self.node, %peer, node_id = ses.node_id, "actor session ready");
            inner.ready.insert(
                peer,
                Ready {
                    node_id: ses.node_id,
                    label: ses.peer_addr.clone(),
                    actor: ses.actor.clone(),
                },
            );
            drop(inner);
            self.notify();
        }
        true
    }

    fn opened(&self, ses: &NodeServerSessionInformation) {
        if let Some(p) = self.lock().pending.get_mut(&ses.peer_addr) {
            p.actor = Some(ses.actor.clone());
        }
    }

    fn closed(&self, ses: &NodeServerSessionInformation) {
        let mut inner = self.lock();
        let gone = inner
            .ready
            .iter()
            .find(|(_, r)| r.node_id == ses.node_id && r.label == ses.peer_addr)
            .map(|(peer, _)| peer.clone());
        if let Some(peer) = gone {
            tracing::info!(node = %self.node, %peer, "actor session closed");
            inner.ready.remove(&peer);
        }
        let forget = match inner.pending.get_mut(&ses.peer_addr) {
            Some(p) if p.waited => {
                if !matches!(p.phase, Phase::Refused(_)) {
                    p.phase = Phase::Closed;
                }
                false
            }
            Some(_) => true,
            None => false,
        };
        if forget {
            inner.pending.remove(&ses.peer_addr);
        }
        drop(inner);
        self.notify();
    }
}

/// The full ractor node name a peer with this certificate name must claim.
fn ractor_name(cert_name: &str) -> String {
    format!("{cert_name}@{RACTOR_HOST}")
}

/// Session events from the NodeServer (called inside its actor: quick, no awaits).
struct Events(Arc<Shared>);

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        self.0.opened(&ses);
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        self.0.closed(&ses);
    }

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        if !self.0.admit(&ses, false) {
            ses.actor.kill();
        }
    }

    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        if !self.0.admit(&ses, true) {
            ses.actor.kill();
        }
    }
}

/// A QUIC bidirectional stream as a ractor_cluster transport.
struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    label: String,
    expected: String,
    shared: Arc<Shared>,
}

impl ClusterBidiStream for QuicStream {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let this = *self;
        let reader = Guarded {
            inner: BufReader::with_capacity(READ_BUFFER, this.recv),
            check: NameCheck::new(this.expected),
            failed: None,
            label: this.label,
            shared: this.shared,
        };
        (Box::new(reader), Box::new(this.send))
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.label.clone())
    }
}

/// The receive half, checked by [`NameCheck`] before ractor sees a byte of it.
struct Guarded<R> {
    inner: R,
    check: NameCheck,
    failed: Option<WireError>,
    label: String,
    shared: Arc<Shared>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Guarded<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let refused = |e: &WireError| {
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
        };
        if let Some(e) = &this.failed {
            return Poll::Ready(Err(refused(e)));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Err(e) = this.check.feed(&buf.filled()[before..]) {
            buf.set_filled(before);
            match &e {
                WireError::Mismatch { claimed } => this.shared.refuse(&this.label, claimed),
                WireError::Malformed(what) => {
                    tracing::warn!(node = %this.shared.node, label = %this.label, what, "malformed cluster stream")
                }
            }
            let err = refused(&e);
            this.failed = Some(e);
            return Poll::Ready(Err(err));
        }
        Poll::Ready(Ok(()))
    }
}

/// Serves no certificate, so every TLS handshake on ractor's own TCP listener fails: that listener
/// admits no session (sessions ride QUIC streams).
#[derive(Debug)]
struct NoCertificate;

impl rustls::server::ResolvesServerCert for NoCertificate {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
}

/// The TLS "encryption" of ractor's TCP listener: one that refuses every connection.
fn refuse_every_tcp_session() -> Result<ractor_cluster::IncomingEncryptionMode, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::ClusterStart(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate));
    Ok(ractor_cluster::IncomingEncryptionMode::Tls(
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    ))
}

/// This node's side of the actor cluster: the ractor NodeServer, the router and the sessions.
#[derive(Clone, Debug)]
pub struct ActorCluster {
    server: ActorRef<NodeServerMessage>,
    router: ActorRef<RouterMsg>,
    shared: Arc<Shared>,
}

impl ActorCluster {
    /// Spawn the ractor_cluster NodeServer (`node_name` is this node's certificate name; isolated
    /// mode; its TCP listener on 127.0.0.1 port 0 fails every TLS handshake, so it admits no
    /// session whoever knows `cookie`) and this node's router, joined to [`ROUTER_GROUP`]. One per
    /// process: ractor's registry and groups are global.
    pub async fn start(node_name: &str, cookie: &str) -> Result<Self, Error> {
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            node: node_name.to_string(),
            inner: Mutex::new(Inner::default()),
            changed,
            next_label: AtomicU64::new(0),
            next_nonce: AtomicU64::new(1),
        });
        let server = NodeServer::new(
            0,
            cookie.to_string(),
            node_name.to_string(),
            RACTOR_HOST.to_string(),
            Some(refuse_every_tcp_session()?),
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(Ipv4Addr::LOCALHOST.into());
        let (server, _) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| Error::ClusterStart(e.to_string()))?;
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: SUBSCRIPTION.to_string(),
                subscription: Box::new(Events(shared.clone())),
            })
            .map_err(|e| Error::ClusterStart(e.to_string()))?;
        let router = match Actor::spawn(None, Router, node_name.to_string()).await {
            Ok((router, _)) => router,
            Err(e) => {
                server.stop(None);
                return Err(Error::ClusterStart(e.to_string()));
            }
        };
        ractor::pg::join(ROUTER_GROUP.to_string(), vec![router.get_cell()]);
        tracing::info!(node = node_name, "actor cluster started");
        Ok(Self {
            server,
            router,
            shared,
        })
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.shared.node
    }

    /// The dialing side (`is_server = false`): `send`/`recv` is a bidi stream the caller opened on
    /// the QUIC connection to `peer` and already wrote [`StreamKind::Ractor`](crate::StreamKind::Ractor) on; `peer` is the name in
    /// the peer's certificate. Returns once the session is ready (or refused, closed, timed out).
    pub async fn connect(
        &self,
        peer: String,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<(), Error> {
        let label = self.quic_label(&peer);
        self.shared.register(&label, &peer, true);
        let stream = self.stream(&label, &peer, send, recv);
        if let Err(e) = ractor_cluster::client_connect_external(&self.server, stream).await {
            self.shared.forget(&label);
            return Err(Error::Connect(peer, e.to_string()));
        }
        self.wait_ready(&label, peer).await
    }

    /// The accepting side (`is_server = true`): the caller accepted the bidi stream from `peer`
    /// (its certificate name) and read [`StreamKind::Ractor`](crate::StreamKind::Ractor).
    pub fn accept(
        &self,
        peer: String,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<(), Error> {
        let label = self.quic_label(&peer);
        self.shared.register(&label, &peer, false);
        let stream = self.stream(&label, &peer, send, recv);
        self.server
            .cast(NodeServerMessage::ConnectionOpenedExternal {
                stream,
                is_server: true,
            })
            .map_err(|_| {
                self.shared.forget(&label);
                Error::ClusterStopped
            })
    }

    /// Close every session with `peer` (member down or left). Calls in flight fail with
    /// [`Error::PeerGone`]; new ones with [`Error::NoSession`].
    pub fn disconnect(&self, peer: &str) {
        let mut inner = self.shared.lock();
        let mut actors: Vec<_> = inner
            .pending
            .values()
            .filter(|p| p.peer == peer)
            .filter_map(|p| p.actor.clone())
            .collect();
        if let Some(r) = inner.ready.remove(peer) {
            actors.push(r.actor);
        }
        drop(inner);
        for a in actors {
            a.stop(Some("member down".to_string()));
        }
        self.shared.notify();
    }

    /// Names of peers with a ready session, sorted.
    pub fn sessions(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shared.lock().ready.keys().cloned().collect();
        names.sort();
        names
    }

    /// Ping `peer`'s router; returns the round-trip time. Never waits past `timeout`.
    pub async fn ping(&self, peer: &str, timeout: Duration) -> Result<Duration, Error> {
        let started = Instant::now();
        let router = self.remote_router(peer)?;
        let nonce = self.shared.next_nonce.fetch_add(1, Ordering::Relaxed);
        let call = router.call(|reply| RouterMsg::Ping(nonce, reply), Some(timeout));
        match tokio::time::timeout(timeout, call).await {
            Err(_) | Ok(Ok(CallResult::Timeout)) => Err(Error::RpcTimeout(peer.to_string())),
            Ok(Err(_)) | Ok(Ok(CallResult::SenderError)) => Err(Error::PeerGone(peer.to_string())),
            Ok(Ok(CallResult::Success(n))) if n == nonce => Ok(started.elapsed()),
            Ok(Ok(CallResult::Success(_))) => Err(Error::BadReply(peer.to_string())),
        }
    }

    /// The router of exactly `peer`: the group member whose ractor node id is its session's.
    fn remote_router(&self, peer: &str) -> Result<ActorRef<RouterMsg>, Error> {
        let node_id = self
            .shared
            .lock()
            .ready
            .get(peer)
            .map(|r| r.node_id)
            .ok_or_else(|| Error::NoSession(peer.to_string()))?;
        ractor::pg::get_members(&ROUTER_GROUP.to_string())
            .into_iter()
            .find(|c| matches!(c.get_id(), ActorId::Remote { node_id: n, .. } if n == node_id))
            .map(ActorRef::from)
            .ok_or_else(|| Error::NoRouter(peer.to_string()))
    }

    /// Stop the router, the NodeServer and every session.
    pub async fn shutdown(&self) {
        self.server
            .cast(NodeServerMessage::UnsubscribeToEvents(
                SUBSCRIPTION.to_string(),
            ))
            .ok();
        self.router.stop(Some("shutdown".to_string()));
        if let Err(e) = self
            .server
            .stop_and_wait(Some("shutdown".to_string()), Some(READY_TIMEOUT))
            .await
        {
            tracing::warn!(node = %self.shared.node, error = %e, "node server did not stop in time");
        }
        let mut inner = self.shared.lock();
        inner.ready.clear();
        inner.pending.clear();
        drop(inner);
        self.shared.notify();
    }

    /// Benchmarks and tests only: dial `peer` over ractor_cluster's own (unencrypted) TCP
    /// transport at a loopback `addr`. The session's name is checked against `peer` like any other.
    #[cfg(any(test, feature = "test-util"))]
    pub async fn connect_loopback_tcp(
        &self,
        peer: String,
        addr: std::net::SocketAddr,
    ) -> Result<(), Error> {
        if !addr.ip().is_loopback() {
            return Err(Error::NotLoopback(addr));
        }
        let label = addr.to_string();
        self.shared.register(&label, &peer, true);
        if let Err(e) = ractor_cluster::client_connect(&self.server, addr).await {
            self.shared.forget(&label);
            return Err(Error::Connect(peer, e.to_string()));
        }
        self.wait_ready(&label, peer).await
    }

    fn quic_label(&self, peer: &str) -> String {
        let n = self.shared.next_label.fetch_add(1, Ordering::Relaxed);
        format!("quic:{peer}#{n}")
    }

    fn stream(
        &self,
        label: &str,
        peer: &str,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Box<QuicStream> {
        Box::new(QuicStream {
            send,
            recv,
            label: label.to_string(),
            expected: ractor_name(peer),
            shared: self.shared.clone(),
        })
    }

    async fn wait_ready(&self, label: &str, peer: String) -> Result<(), Error> {
        let mut changes = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let result = loop {
            match self.shared.phase(label) {
                Some(Phase::Ready) => break Ok(()),
                Some(Phase::Refused(claimed)) => {
                    break Err(Error::NameMismatch { peer, claimed });
                }
                Some(Phase::Closed) => break Err(Error::SessionClosed(peer)),
                None => break Err(Error::ClusterStopped),
                Some(Phase::Opening) => {}
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break Err(Error::ClusterStopped),
                Err(_) => {
                    let actor = self
                        .shared
                        .lock()
                        .pending
                        .get(label)
                        .and_then(|p| p.actor.clone());
                    if let Some(a) = actor {
                        a.stop(Some("not ready in time".to_string()));
                    }
                    break Err(Error::SessionTimeout(peer));
                }
            }
        };
        // A ready session stays registered until it closes; anything else is forgotten now.
        let mut inner = self.shared.lock();
        match inner.pending.get_mut(label) {
            Some(p) if result.is_ok() => p.waited = false,
            Some(_) => {
                inner.pending.remove(label);
            }
            None => {}
        }
        result
    }
}

/// Feed `data` to the login-name check of an incoming actor session, in chunks of
/// `chunk` bytes (for fuzzing the frame decoder; not an API).
#[cfg(feature = "fuzzing")]
pub fn fuzz_login_name_check(expected: &str, data: &[u8], chunk: usize) -> Result<(), String> {
    let mut check = NameCheck::new(expected.to_string());
    for part in data.chunks(chunk.max(1)) {
        check.feed(part).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_stable() {
        let p = || "node-2".to_string();
        let codes: Vec<_> = [
            Error::NoSession(p()),
            Error::NoRouter(p()),
            Error::RpcTimeout(p()),
            Error::PeerGone(p()),
            Error::BadReply(p()),
        ]
        .iter()
        .map(Error::kind)
        .collect();
        assert_eq!(
            codes,
            [
                "no_session",
                "no_router",
                "timeout",
                "peer_gone",
                "bad_reply"
            ]
        );
        let e = Error::NameMismatch {
            peer: p(),
            claimed: "mallory@swarm".into(),
        };
        assert_eq!(e.kind(), "name_mismatch");
        assert!(e.to_string().contains("mallory@swarm"));
    }

    #[test]
    fn ractor_names_carry_the_certificate_name() {
        assert_eq!(ractor_name("node-1"), "node-1@swarm");
    }

    #[tokio::test]
    async fn ping_without_a_session_is_a_typed_error_at_once() {
        let cluster = ActorCluster::start("solo", "cookie").await.expect("start");
        let started = Instant::now();
        let e = cluster
            .ping("nobody", Duration::from_secs(5))
            .await
            .expect_err("no session");
        assert!(matches!(&e, Error::NoSession(p) if p == "nobody"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(cluster.sessions().is_empty());
        let e = cluster
            .connect_loopback_tcp("x".into(), "10.0.0.1:1".parse().expect("addr"))
            .await
            .expect_err("not loopback");
        assert_eq!(e.kind(), "not_loopback");
        cluster.shutdown().await;
    }

    /// Ports of the loopback TCP listeners this process holds (Linux: /proc).
    #[cfg(target_os = "linux")]
    fn own_loopback_listeners() -> std::collections::BTreeSet<u16> {
        let inodes: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|l| {
                let l = l.to_string_lossy().into_owned();
                Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
            })
            .collect();
        let table = std::fs::read_to_string("/proc/self/net/tcp").expect("tcp table");
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let (ip, port) = f.get(1)?.split_once(':')?;
                let listening = *f.get(3)? == "0A" && ip == "0100007F";
                (listening && inodes.contains(*f.get(9)?))
                    .then(|| u16::from_str_radix(port, 16).ok())
                    .flatten()
            })
            .collect()
    }

    /// What a dialing ractor NodeServer sees of its sessions.
    struct Seen(tokio::sync::mpsc::Sender<&'static str>);

    impl NodeEventSubscription for Seen {
        fn node_session_opened(&self, _: NodeServerSessionInformation) {
            let _ = self.0.try_send("opened");
        }
        fn node_session_disconnected(&self, _: NodeServerSessionInformation) {
            let _ = self.0.try_send("disconnected");
        }
        fn node_session_authenticated(&self, _: NodeServerSessionInformation) {
            let _ = self.0.try_send("authenticated");
        }
        fn node_session_ready(&self, _: NodeServerSessionInformation) {
            let _ = self.0.try_send("ready");
        }
    }

    /// Regression (issue 13 item 12): ractor's own TCP listener let any local user who knew the
    /// cookie (derived from the world-readable `ca.pem`) authenticate a session. Now it fails every
    /// TLS handshake: a plain ractor node with the right cookie never gets past the first frame.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_tcp_listener_admits_nobody_even_with_the_cookie() {
        const COOKIE: &str = "known-to-the-attacker";
        let before = own_loopback_listeners();
        let cluster = ActorCluster::start("victim", COOKIE).await.expect("start");
        let ports: Vec<u16> = own_loopback_listeners()
            .difference(&before)
            .copied()
            .collect();
        assert!(!ports.is_empty(), "ractor's TCP listener was found");
        // What the victim's NodeServer sees: before, a session was opened (and authenticated by
        // the cookie, then killed by the name check); now nothing reaches it.
        let (victim_tx, mut victim_rx) = tokio::sync::mpsc::channel(16);
        cluster
            .server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "victim-seen".into(),
                subscription: Box::new(Seen(victim_tx)),
            })
            .expect("subscribe");
        for port in ports {
            let mallory = NodeServer::new(
                0,
                COOKIE.to_string(),
                "mallory".to_string(),
                RACTOR_HOST.to_string(),
                None,
                Some(NodeConnectionMode::Isolated),
            )
            .with_listen_addr(Ipv4Addr::LOCALHOST.into());
            let (mallory, _) = Actor::spawn(None, mallory, ()).await.expect("mallory");
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            mallory
                .cast(NodeServerMessage::SubscribeToEvents {
                    id: "seen".into(),
                    subscription: Box::new(Seen(tx)),
                })
                .expect("subscribe");
            // (A listener of a concurrent test that has shut down refuses the connection outright.)
            if ractor_cluster::client_connect(&mallory, (Ipv4Addr::LOCALHOST, port))
                .await
                .is_err()
            {
                mallory.stop(None);
                continue;
            }
            let mut seen = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !seen.contains(&"disconnected") {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(e)) => seen.push(e),
                    Ok(None) | Err(_) => break,
                }
            }
            mallory.stop(None);
            assert!(
                !seen.contains(&"authenticated") && !seen.contains(&"ready"),
                "port {port}: {seen:?}"
            );
            assert!(seen.contains(&"disconnected"), "port {port}: {seen:?}");
        }
        // Mallory's disconnect came after anything the victim's server would have reported.
        let mut victim_seen = Vec::new();
        while let Ok(e) = victim_rx.try_recv() {
            victim_seen.push(e);
        }
        assert!(victim_seen.is_empty(), "the victim opened {victim_seen:?}");
        assert!(cluster.sessions().is_empty());
        cluster.shutdown().await;
    }
}
