//! The gateway's HTTP(S) server: our own accept loop around hyper's HTTP/1 connection.
//!
//! - Connection limits: a semaphore bounds open connections in total, a counter map bounds them
//!   per source IP (the map holds one entry per source with an open connection, so it is bounded
//!   by the total). A connection beyond either limit is closed at once, before any byte is read.
//! - TLS (rustls, ring) when the node config has `[gateway.tls]`; the handshake shares the
//!   header deadline.
//! - Timeouts, kept per connection by a small clock that the IO wrapper and the service drive:
//!   a request head must arrive within `header_read_timeout` (from the connection's start, or from
//!   the first byte after an idle pause), a keep-alive connection without a request for
//!   `idle_timeout` is closed, and a request body must arrive within `body_timeout` of its head
//!   (reading it past that fails, and the handler answers with an error).
//! - Handlers see `ConnectInfo<SocketAddr>` as with `axum::serve`.
//! - Shutdown: stop accepting, let requests in flight finish (idle connections close at once),
//!   and abort what still runs after [`ServeOptions::shutdown_grace`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use swarm_config::secret::read_secret_file;
use swarm_config::{GatewayConfig, NodeConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::node::NodeError;

/// How the server treats connections (from `[gateway]`).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub header_read_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    /// How long shutdown waits for requests in flight (a long stream) before it aborts them.
    pub shutdown_grace: Duration,
}

impl ServeOptions {
    pub fn from_config(g: &GatewayConfig) -> Self {
        Self {
            header_read_timeout: g.header_read_timeout.0,
            body_timeout: g.body_timeout.0,
            idle_timeout: g.idle_timeout.0,
            max_connections: g.max_connections,
            max_connections_per_source: g.max_connections_per_source,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// The TLS acceptor for `[gateway.tls]`, or `None` for plain HTTP (the config has checked that
/// plain HTTP is allowed). The key is read through the mode-checked secret reader.
pub fn tls_acceptor(cfg: &NodeConfig) -> Result<Option<TlsAcceptor>, NodeError> {
    let Some(t) = &cfg.gateway.tls else {
        return Ok(None);
    };
    let cert_path = cfg.resolve(&t.cert);
    let key_path = cfg.resolve(&t.key);
    let bad = |path: &std::path::Path, message: String| NodeError::GatewayTls {
        path: path.to_path_buf(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| bad(&cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(&cert_path, "no certificate in the file".into()));
    }
    let key_text = read_secret_file(&key_path)?;
    let key = PrivateKeyDer::from_pem_slice(key_text.as_bytes())
        .map_err(|e| bad(&key_path, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| bad(&cert_path, e.to_string()))?;
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(sc))))
}

/// Serve `app` on `listener` until `shutdown` turns true (or its sender is dropped).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    opts: ServeOptions,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let limits = Limits::new(opts.max_connections, opts.max_connections_per_source);
    let conn_shutdown = shutdown.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, or an aborted handshake: do not spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(permit) = limits.admit(peer.ip()) else {
                    tracing::debug!(%peer, "connection refused: connection limit reached");
                    drop(stream);
                    continue;
                };
                conns.spawn(connection(
                    stream,
                    peer,
                    permit,
                    app.clone(),
                    tls.clone(),
                    opts.clone(),
                    conn_shutdown.clone(),
                ));
            }
        }
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(opts.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            open = conns.len(),
            "connections still busy after the shutdown grace period; closing them"
        );
        conns.shutdown().await;
    }
    Ok(())
}

/// One accepted connection: TLS handshake (bounded), then HTTP/1 under the connection clock.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    _permit: ConnPermit,
    app: Router,
    tls: Option<TlsAcceptor>,
    opts: ServeOptions,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    match tls {
        None => drive(stream, peer, app, opts, shutdown).await,
        Some(acceptor) => {
            match tokio::time::timeout(opts.header_read_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => drive(tls_stream, peer, app, opts, shutdown).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn drive<IO>(
    io: IO,
    peer: SocketAddr,
    app: Router,
    opts: ServeOptions,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let clock = Arc::new(ConnClock::new());
    let svc_clock = clock.clone();
    let body_timeout = opts.body_timeout;
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = InFlight::start(svc_clock.clone());
        let deadline = Instant::now() + body_timeout;
        let body_read = Arc::new(AtomicBool::new(false));
        let mut req = req.map(|b| {
            Body::new(DeadlineBody::new(
                b,
                deadline,
                body_timeout,
                body_read.clone(),
            ))
        });
        req.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move {
            let mut resp = match app.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            // A body the handler left unread (an early refusal, a 413) leaves the connection at
            // an unknown place, so hyper closes it after this response: say so (RFC 9112 §9.6),
            // or a client that sends its next request on it finds it closed mid-request.
            if !body_read.load(Ordering::Acquire) {
                resp.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(resp.map(|inner| Guarded {
                inner,
                _guard: guard,
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The connection clock below keeps the header deadline (hyper's would also cut idle
    // keep-alive connections at the header timeout).
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(
        TokioIo::new(Watched {
            inner: io,
            clock: clock.clone(),
        }),
        svc,
    );
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let deadline = clock.deadline(&opts);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = sleep_until(deadline) => {
                if let Some(why) = clock.expired(Instant::now(), &opts) {
                    tracing::debug!(%peer, why, "closing connection");
                    return;
                }
            }
            _ = clock.changed.notified() => {}
            () = stopped(&mut shutdown), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// Resolves when shutdown is asked for (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Open connections, in total and per source address.
#[derive(Debug)]
struct Limits {
    total: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    max_per_source: usize,
}

impl Limits {
    fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(max_total.min(Semaphore::MAX_PERMITS))),
            per_source: Mutex::default(),
            max_per_source,
        })
    }

    fn sources(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A permit for one more connection from `ip`, or `None` when a limit is reached.
    /// (An IPv6 source is its /64, as for the rate limit: a host holds a whole /64.)
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnPermit> {
        let ip = crate::gateway::source_ip(ip);
        let total = self.total.clone().try_acquire_owned().ok()?;
        let mut sources = self.sources();
        let n = sources.entry(ip).or_insert(0);
        if *n >= self.max_per_source {
            return None;
        }
        *n += 1;
        Some(ConnPermit {
            _total: total,
            limits: self.clone(),
            ip,
        })
    }
}

/// Held by a connection's task; frees its places on drop.
#[derive(Debug)]
struct ConnPermit {
    _total: OwnedSemaphorePermit,
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut sources = self.limits.sources();
        if let Some(n) = sources.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                sources.remove(&self.ip);
            }
        }
    }
}

/// Where a connection is: waiting for (or reading) a request head, serving requests, or idle
/// between requests; and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Busy,
    Idle,
}

#[derive(Debug)]
struct ClockState {
    phase: Phase,
    since: Instant,
    in_flight: usize,
}

#[derive(Debug)]
struct ConnClock {
    state: Mutex<ClockState>,
    changed: Notify,
}

impl ConnClock {
    fn new() -> Self {
        Self {
            state: Mutex::new(ClockState {
                phase: Phase::Head,
                since: Instant::now(),
                in_flight: 0,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ClockState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, s: &mut ClockState, phase: Phase) {
        s.phase = phase;
        s.since = Instant::now();
        self.changed.notify_one();
    }

    /// Bytes arrived: after an idle pause they start the next request head.
    fn on_read(&self) {
        let mut s = self.lock();
        if s.phase == Phase::Idle {
            self.set(&mut s, Phase::Head);
        }
    }

    fn request_started(&self) {
        let mut s = self.lock();
        s.in_flight += 1;
        if s.phase != Phase::Busy {
            self.set(&mut s, Phase::Busy);
        }
    }

    fn request_done(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            self.set(&mut s, Phase::Idle);
        }
    }

    fn deadline(&self, opts: &ServeOptions) -> Option<Instant> {
        let s = self.lock();
        match s.phase {
            Phase::Head => Some(s.since + opts.header_read_timeout),
            Phase::Idle => Some(s.since + opts.idle_timeout),
            Phase::Busy => None,
        }
    }

    /// Why the connection must close at `now`, if it must.
    fn expired(&self, now: Instant, opts: &ServeOptions) -> Option<&'static str> {
        let s = self.lock();
        let waited = now.saturating_duration_since(s.since);
        match s.phase {
            Phase::Head if waited >= opts.header_read_timeout => Some("header read timeout"),
            Phase::Idle if waited >= opts.idle_timeout => Some("idle timeout"),
            _ => None,
        }
    }
}

/// A request being served; the connection is busy until its response body is dropped.
#[derive(Debug)]
struct InFlight(Arc<ConnClock>);

impl InFlight {
    fn start(clock: Arc<ConnClock>) -> Self {
        clock.request_started();
        Self(clock)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// The connection's IO, telling the clock when bytes arrive.
#[derive(Debug)]
struct Watched<IO> {
    inner: IO,
    clock: Arc<ConnClock>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_read();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body that fails once its deadline passes, and sets `read` once it has been read to
/// its end (or had none).
#[derive(Debug)]
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    read: Arc<AtomicBool>,
}

impl DeadlineBody {
    fn new(inner: Incoming, deadline: Instant, timeout: Duration, read: Arc<AtomicBool>) -> Self {
        if http_body::Body::is_end_stream(&inner) {
            read.store(true, Ordering::Release);
        }
        Self {
            inner,
            deadline,
            timeout,
            sleep: None,
            read,
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_none() || http_body::Body::is_end_stream(&this.inner) {
                this.read.store(true, Ordering::Release);
            }
            return Poll::Ready(frame.map(|r| r.map_err(io::Error::other)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "request body not received within {:?} (gateway.body_timeout)",
                    this.timeout
                ),
            ))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
#[derive(Debug)]
struct Guarded {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
