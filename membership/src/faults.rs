//! Network fault injection for the chaos suite only (issue #16): delay, jitter, reordering, loss
//! and duplication of the QUIC datagrams a node sends, for kernels without `tc netem`.
//!
//! Off unless the environment variable [`ENV_VAR`] (`SWARM_NET_FAULTS`) names a file; then every
//! endpoint [`server_endpoint`] binds wraps its UDP socket in a [`FaultySocket`], and a task
//! rereads the file every 200 ms. The file holds one line of `key=value` pairs separated by
//! spaces, e.g. `delay_ms=40 jitter_ms=40 reorder=0.1 loss=0.0 duplicate=0.0`; a missing key is 0,
//! an empty or missing file means no faults, and a bad line is logged and ignored (the previous
//! faults stay). See [`Faults`] for what each key does.
//!
//! Layout: [`Faults`] (the parsed line, and [`Faults::plan`], the sans-IO decision of one
//! datagram's fate), [`FaultControl`] (the current faults in atomics, shared with the socket),
//! [`FaultySocket`] (quinn's `AsyncUdpSocket` around the socket quinn's tokio runtime makes), the
//! reloader task, and [`server_endpoint`], the hook `Endpoint::bind` calls.
//!
//! With no fault set, [`FaultySocket`] passes every transmit straight to the inner socket: no copy,
//! no allocation, no lock, one atomic load.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// The environment variable naming the faults file. Test-only: never set it in production.
pub(crate) const ENV_VAR: &str = "SWARM_NET_FAULTS";

/// How often the reloader rereads the faults file.
const RELOAD_EVERY: Duration = Duration::from_millis(200);

/// Most delayed datagrams waiting to be sent per socket; beyond it a delayed datagram is dropped.
pub(crate) const MAX_IN_FLIGHT: usize = 4096;

/// How long a delayed datagram that met a full socket waits for room before it is lost.
const WRITABLE_WAIT: Duration = Duration::from_secs(1);

/// Largest `delay_ms` or `jitter_ms` the file may set.
const MAX_DELAY_MS: u64 = 60_000;

/// Faults applied to each datagram a node sends (chaos suite only). All zero: none.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Faults {
    /// `delay_ms`: fixed delay of every datagram.
    pub(crate) delay_ms: u64,
    /// `jitter_ms`: extra delay, uniform in `0..=jitter_ms` per datagram (this reorders).
    pub(crate) jitter_ms: u64,
    /// `reorder`: probability a datagram is held back a further `delay_ms + jitter_ms`.
    pub(crate) reorder: f64,
    /// `loss`: probability a datagram is dropped.
    pub(crate) loss: f64,
    /// `duplicate`: probability a datagram is sent twice.
    pub(crate) duplicate: f64,
}

/// What happens to one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    Drop,
    /// Send `copies` (1 or 2) after `after` (zero: now).
    Send {
        after: Duration,
        copies: u8,
    },
}

impl Faults {
    /// Whether any fault is set.
    pub(crate) fn is_none(&self) -> bool {
        *self == Faults::default()
    }

    /// Decide one datagram's fate.
    pub(crate) fn plan(&self, rng: &mut impl rand::Rng) -> Fate {
        if self.loss > 0.0 && rng.random::<f64>() < self.loss {
            return Fate::Drop;
        }
        let mut ms = self.delay_ms;
        if self.jitter_ms > 0 {
            ms += rng.random_range(0..=self.jitter_ms);
        }
        if self.reorder > 0.0 && rng.random::<f64>() < self.reorder {
            ms += self.delay_ms + self.jitter_ms;
        }
        let copies = if self.duplicate > 0.0 && rng.random::<f64>() < self.duplicate {
            2
        } else {
            1
        };
        Fate::Send {
            after: Duration::from_millis(ms),
            copies,
        }
    }
}

/// A faults line that cannot be used; names the offending key (or token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}`: {message}")]
pub(crate) struct BadFaults {
    pub(crate) key: String,
    pub(crate) message: String,
}

impl BadFaults {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

impl FromStr for Faults {
    type Err = BadFaults;

    /// Parse `delay_ms=40 jitter_ms=40 reorder=0.1 loss=0.0 duplicate=0.0` (any order, any
    /// subset; empty: no faults).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let millis = |key: &str, value: &str| -> Result<u64, BadFaults> {
            let ms: u64 = value.parse().map_err(|_| {
                BadFaults::new(
                    key,
                    format!("`{value}` is not a whole number of milliseconds"),
                )
            })?;
            if ms > MAX_DELAY_MS {
                return Err(BadFaults::new(
                    key,
                    format!("{ms} ms is over the {MAX_DELAY_MS} ms limit"),
                ));
            }
            Ok(ms)
        };
        let probability = |key: &str, value: &str| -> Result<f64, BadFaults> {
            match value.parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
                _ => Err(BadFaults::new(
                    key,
                    format!("`{value}` is not a probability between 0 and 1"),
                )),
            }
        };
        let mut f = Faults::default();
        for token in s.split_whitespace() {
            let Some((key, value)) = token.split_once('=') else {
                return Err(BadFaults::new(token, "expected key=value"));
            };
            match key {
                "delay_ms" => f.delay_ms = millis(key, value)?,
                "jitter_ms" => f.jitter_ms = millis(key, value)?,
                "reorder" => f.reorder = probability(key, value)?,
                "loss" => f.loss = probability(key, value)?,
                "duplicate" => f.duplicate = probability(key, value)?,
                _ => {
                    return Err(BadFaults::new(
                        key,
                        "unknown key (expected delay_ms, jitter_ms, reorder, loss or duplicate)",
                    ));
                }
            }
        }
        Ok(f)
    }
}

/// The current faults, shared by a [`FaultySocket`] and whatever changes them (the reloader, a
/// test). Atomics: a datagram reads them without a lock.
#[derive(Debug, Default)]
pub(crate) struct FaultControl {
    /// Any fault set; the fast path reads only this.
    active: AtomicBool,
    delay_ms: AtomicU64,
    jitter_ms: AtomicU64,
    /// `f64` bits.
    reorder: AtomicU64,
    loss: AtomicU64,
    duplicate: AtomicU64,
}

impl FaultControl {
    /// Apply `f` from now on. A datagram sent during the change may see a mix of old and new.
    pub(crate) fn set(&self, f: &Faults) {
        self.delay_ms.store(f.delay_ms, Ordering::Relaxed);
        self.jitter_ms.store(f.jitter_ms, Ordering::Relaxed);
        self.reorder.store(f.reorder.to_bits(), Ordering::Relaxed);
        self.loss.store(f.loss.to_bits(), Ordering::Relaxed);
        self.duplicate
            .store(f.duplicate.to_bits(), Ordering::Relaxed);
        self.active.store(!f.is_none(), Ordering::Release);
    }

    /// The faults in force; `None` when there are none.
    pub(crate) fn get(&self) -> Option<Faults> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        Some(Faults {
            delay_ms: self.delay_ms.load(Ordering::Relaxed),
            jitter_ms: self.jitter_ms.load(Ordering::Relaxed),
            reorder: f64::from_bits(self.reorder.load(Ordering::Relaxed)),
            loss: f64::from_bits(self.loss.load(Ordering::Relaxed)),
            duplicate: f64::from_bits(self.duplicate.load(Ordering::Relaxed)),
        })
    }
}

/// quinn's UDP socket with [`Faults`] applied on send (chaos suite only). Receiving, addresses and
/// writability are the inner socket's.
pub(crate) struct FaultySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    control: Arc<FaultControl>,
    rng: Mutex<StdRng>,
    /// Delayed datagrams not yet sent.
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for FaultySocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultySocket")
            .field("inner", &self.inner)
            .field("faults", &self.control.get())
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl FaultySocket {
    /// Wrap `inner`; `runtime` runs the delayed sends, `seed` seeds the fault dice.
    pub(crate) fn new(
        inner: Arc<dyn AsyncUdpSocket>,
        control: Arc<FaultControl>,
        runtime: tokio::runtime::Handle,
        seed: u64,
    ) -> Self {
        Self {
            inner,
            control,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            limit: MAX_IN_FLIGHT,
            runtime,
        }
    }

    /// Send a copy of `t` `copies` times after `after`, from a task; dropped if too many wait.
    fn send_later(&self, t: &Transmit<'_>, after: Duration, copies: u8) {
        let Some(slot) = Slot::take(&self.in_flight, self.limit) else {
            tracing::debug!(limit = self.limit, "too many delayed datagrams; dropped");
            return;
        };
        let owned = OwnedTransmit {
            destination: t.destination,
            ecn: t.ecn,
            contents: t.contents.to_vec(),
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        let inner = self.inner.clone();
        self.runtime.spawn(async move {
            tokio::time::sleep(after).await;
            let t = owned.as_transmit();
            for _ in 0..copies {
                send_or_lose(&inner, &t).await;
            }
            drop(slot);
        });
    }
}

/// Send `t` now; if the socket is full, once more when it is writable again (waiting at most
/// [`WRITABLE_WAIT`]); else it is lost.
async fn send_or_lose(inner: &Arc<dyn AsyncUdpSocket>, t: &Transmit<'_>) {
    match inner.try_send(t) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        _ => return,
    }
    // The failed send cleared the socket's write readiness, and quinn, whose sends the wrapper
    // answered with `Ok`, may never wait for it again: wait here, so later sends can succeed.
    let mut poller = inner.clone().create_io_poller();
    let writable = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx));
    if let Ok(Ok(())) = tokio::time::timeout(WRITABLE_WAIT, writable).await {
        let _ = inner.try_send(t);
    }
}

impl AsyncUdpSocket for FaultySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let Some(faults) = self.control.get() else {
            return self.inner.try_send(transmit);
        };
        let fate = faults.plan(&mut *crate::lock(&self.rng));
        match fate {
            Fate::Drop => Ok(()),
            Fate::Send { after, copies } if after.is_zero() => {
                self.inner.try_send(transmit)?;
                if copies > 1 {
                    let _ = self.inner.try_send(transmit);
                }
                Ok(())
            }
            Fate::Send { after, copies } => {
                self.send_later(transmit, after, copies);
                Ok(())
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// One datagram per transmit while faults are set, so each datagram meets its own fate (a
    /// batch built just before faults were set is treated as one datagram).
    fn max_transmit_segments(&self) -> usize {
        if self.control.get().is_some() {
            1
        } else {
            self.inner.max_transmit_segments()
        }
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A delayed datagram's copy.
struct OwnedTransmit {
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    contents: Vec<u8>,
    segment_size: Option<usize>,
    src_ip: Option<IpAddr>,
}

impl OwnedTransmit {
    fn as_transmit(&self) -> Transmit<'_> {
        Transmit {
            destination: self.destination,
            ecn: self.ecn,
            contents: &self.contents,
            segment_size: self.segment_size,
            src_ip: self.src_ip,
        }
    }
}

/// One of a socket's in-flight places, given back on drop (also when the task is cancelled).
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the reloader last read: the file's text (empty when missing) or the read error.
type Seen = Option<Result<String, String>>;

/// Read the faults file once and apply it if it changed; a bad line or unreadable file is logged
/// and the previous faults stay.
fn reload_once(path: &Path, control: &FaultControl, seen: &mut Seen) {
    // A few bytes, every 200 ms, in a test-only hook: a blocking read is fine here.
    let current = match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e.to_string()),
    };
    if seen.as_ref() == Some(&current) {
        return;
    }
    match &current {
        Ok(text) => match text.parse::<Faults>() {
            Ok(faults) => {
                control.set(&faults);
                tracing::info!(path = %path.display(), ?faults, "network faults set");
            }
            Err(error) => tracing::warn!(
                path = %path.display(),
                %error,
                "bad network faults line ignored; the previous faults stay"
            ),
        },
        Err(error) => tracing::warn!(
            path = %path.display(),
            %error,
            "cannot read the network faults file; the previous faults stay"
        ),
    }
    *seen = Some(current);
}

/// Reread `path` every `every` until the socket holding `control` is gone.
async fn reload(path: PathBuf, control: Weak<FaultControl>, mut seen: Seen, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(control) = control.upgrade() else {
            return;
        };
        reload_once(&path, &control, &mut seen);
    }
}

/// A seed for the fault dice, from the OS (the clock if that fails).
fn fresh_seed() -> u64 {
    rand::TryRng::try_next_u64(&mut rand::rngs::SysRng).unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    })
}

#[cfg(test)]
thread_local! {
    /// Tests: the control for endpoints this thread binds, instead of the environment.
    static TEST_CONTROL: std::cell::RefCell<Option<Arc<FaultControl>>> =
        const { std::cell::RefCell::new(None) };
}

/// Tests: run `f` (which binds endpoints) with `control` on their sockets.
#[cfg(test)]
pub(crate) fn with_control<R>(control: &Arc<FaultControl>, f: impl FnOnce() -> R) -> R {
    TEST_CONTROL.with(|c| *c.borrow_mut() = Some(control.clone()));
    let r = f();
    TEST_CONTROL.with(|c| *c.borrow_mut() = None);
    r
}

/// Bind a quinn server endpoint at `addr` as `quinn::Endpoint::server` does; when
/// [`ENV_VAR`] names a file (chaos suite only), with a [`FaultySocket`] driven by that file.
pub(crate) fn server_endpoint(
    config: quinn::ServerConfig,
    addr: SocketAddr,
) -> io::Result<quinn::Endpoint> {
    #[cfg(test)]
    if let Some(control) = TEST_CONTROL.with(|c| c.borrow().clone()) {
        return endpoint_with(config, addr, control, fresh_seed());
    }
    let path = match std::env::var_os(ENV_VAR) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => return quinn::Endpoint::server(config, addr),
    };
    // Read the file before the first datagram, so faults hold from the start.
    let control = Arc::new(FaultControl::default());
    let mut seen = None;
    reload_once(&path, &control, &mut seen);
    let seed = fresh_seed();
    let endpoint = endpoint_with(config, addr, control.clone(), seed)?;
    tracing::warn!(
        path = %path.display(),
        local = ?endpoint.local_addr().ok(),
        seed,
        "network faults are injected from this file ({ENV_VAR}; chaos testing only)"
    );
    tokio::spawn(reload(path, Arc::downgrade(&control), seen, RELOAD_EVERY));
    Ok(endpoint)
}

/// Bind `addr` with a [`FaultySocket`] under `control`, everything else as
/// `quinn::Endpoint::server`. Needs a tokio runtime.
pub(crate) fn endpoint_with(
    config: quinn::ServerConfig,
    addr: SocketAddr,
    control: Arc<FaultControl>,
    seed: u64,
) -> io::Result<quinn::Endpoint> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| io::Error::other("no async runtime found"))?;
    let socket = std::net::UdpSocket::bind(addr)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket)?;
    let socket = Arc::new(FaultySocket::new(inner, control, handle, seed));
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        runtime,
    )
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::Endpoint;
    use crate::testpki::Pki;

    fn local() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn faults(line: &str) -> Faults {
        line.parse().expect("faults line")
    }

    #[test]
    fn a_full_line_parses() {
        assert_eq!(
            faults("delay_ms=40 jitter_ms=40 reorder=0.1 loss=0.0 duplicate=0.25\n"),
            Faults {
                delay_ms: 40,
                jitter_ms: 40,
                reorder: 0.1,
                loss: 0.0,
                duplicate: 0.25,
            }
        );
    }

    #[test]
    fn missing_keys_are_zero_and_empty_is_none() {
        assert_eq!(
            faults("loss=0.5"),
            Faults {
                loss: 0.5,
                ..Faults::default()
            }
        );
        assert!(faults("").is_none());
        assert!(faults("  \n").is_none());
        assert!(faults("delay_ms=0 loss=0").is_none());
    }

    #[test]
    fn garbage_names_the_key() {
        for (line, key) in [
            ("delay_ms=soon", "delay_ms"),
            ("jitter_ms=-5", "jitter_ms"),
            ("delay_ms=999999", "delay_ms"),
            ("loss=1.5", "loss"),
            ("reorder=NaN", "reorder"),
            ("duplicate=", "duplicate"),
            ("delay_ms=10 lag_ms=3", "lag_ms"),
            ("delay_ms=10 garbage", "garbage"),
        ] {
            let e = line.parse::<Faults>().expect_err(line);
            assert_eq!(e.key, key, "{line}");
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn plan_follows_the_faults() {
        let mut rng = StdRng::seed_from_u64(7);
        let now = Fate::Send {
            after: Duration::ZERO,
            copies: 1,
        };
        assert_eq!(Faults::default().plan(&mut rng), now);
        assert_eq!(faults("loss=1").plan(&mut rng), Fate::Drop);
        assert_eq!(
            faults("duplicate=1").plan(&mut rng),
            Fate::Send {
                after: Duration::ZERO,
                copies: 2
            }
        );
        assert_eq!(
            faults("delay_ms=30 reorder=1").plan(&mut rng),
            Fate::Send {
                after: Duration::from_millis(60),
                copies: 1
            }
        );
        let jitter = faults("delay_ms=10 jitter_ms=20");
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            match jitter.plan(&mut rng) {
                Fate::Send { after, copies: 1 } => {
                    seen.insert(after.as_millis());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen.first(), Some(&10));
        assert_eq!(seen.last(), Some(&30));
        let half = faults("loss=0.5");
        let dropped = (0..1000)
            .filter(|_| half.plan(&mut rng) == Fate::Drop)
            .count();
        assert!((400..600).contains(&dropped), "{dropped}");
    }

    #[test]
    fn control_round_trips_and_none_is_inactive() {
        let c = FaultControl::default();
        assert_eq!(c.get(), None);
        let f = faults("delay_ms=5 jitter_ms=6 reorder=0.1 loss=0.2 duplicate=0.3");
        c.set(&f);
        assert_eq!(c.get(), Some(f));
        c.set(&Faults::default());
        assert_eq!(c.get(), None);
    }

    #[test]
    fn reload_applies_good_lines_and_keeps_faults_over_bad_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("faults");
        let c = FaultControl::default();
        let mut seen = None;
        reload_once(&path, &c, &mut seen);
        assert_eq!(c.get(), None, "missing file: no faults");
        std::fs::write(&path, "delay_ms=40 loss=0.1\n").expect("write");
        reload_once(&path, &c, &mut seen);
        let good = faults("delay_ms=40 loss=0.1");
        assert_eq!(c.get(), Some(good));
        std::fs::write(&path, "delay_ms=forty\n").expect("write");
        reload_once(&path, &c, &mut seen);
        assert_eq!(c.get(), Some(good), "a bad line keeps the previous faults");
        std::fs::write(&path, "").expect("write");
        reload_once(&path, &c, &mut seen);
        assert_eq!(c.get(), None, "empty file: no faults");
        std::fs::write(&path, "jitter_ms=3").expect("write");
        reload_once(&path, &c, &mut seen);
        std::fs::remove_file(&path).expect("rm");
        reload_once(&path, &c, &mut seen);
        assert_eq!(c.get(), None, "removed file: no faults");
    }

    #[tokio::test]
    async fn the_reloader_follows_the_file_and_stops_with_its_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("faults");
        let c = Arc::new(FaultControl::default());
        let task = tokio::spawn(reload(
            path.clone(),
            Arc::downgrade(&c),
            None,
            Duration::from_millis(10),
        ));
        std::fs::write(&path, "delay_ms=7").expect("write");
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.get() != Some(faults("delay_ms=7")) {
            assert!(Instant::now() < deadline, "file never applied");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("reloader stops once the control is gone")
            .expect("reloader");
    }

    /// A socket under `control`, at most `limit` datagrams delayed, sending to a plain receiver.
    async fn socket_pair(
        control: &Arc<FaultControl>,
        limit: usize,
    ) -> (Arc<FaultySocket>, std::net::UdpSocket) {
        let rx = std::net::UdpSocket::bind(local()).expect("bind rx");
        rx.set_nonblocking(true).expect("nonblocking");
        let tx = std::net::UdpSocket::bind(local()).expect("bind tx");
        let inner = quinn::TokioRuntime.wrap_udp_socket(tx).expect("wrap");
        let mut socket =
            FaultySocket::new(inner, control.clone(), tokio::runtime::Handle::current(), 1);
        socket.limit = limit;
        let socket = Arc::new(socket);
        // A fresh tokio socket is writable only once the reactor has said so.
        let mut poller = socket.clone().create_io_poller();
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .expect("writable");
        (socket, rx)
    }

    fn drain(rx: &std::net::UdpSocket) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = rx.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    fn send(socket: &FaultySocket, to: SocketAddr, contents: &[u8]) {
        socket
            .try_send(&Transmit {
                destination: to,
                ecn: None,
                contents,
                segment_size: None,
                src_ip: None,
            })
            .expect("send");
    }

    #[tokio::test]
    async fn delayed_datagrams_arrive_later_and_are_bounded() {
        let control = Arc::new(FaultControl::default());
        let (socket, rx) = socket_pair(&control, 2).await;
        let to = rx.local_addr().expect("addr");
        // No faults: straight through.
        send(&socket, to, b"now");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(drain(&rx), vec![b"now".to_vec()]);
        // Delayed, duplicated, and at most `limit` waiting.
        control.set(&faults("delay_ms=50 duplicate=1"));
        for m in [b"a", b"b", b"c"] {
            send(&socket, to, m);
        }
        assert_eq!(socket.in_flight.load(Ordering::Relaxed), 2);
        assert!(drain(&rx).is_empty(), "nothing before the delay");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = drain(&rx);
        got.sort();
        assert_eq!(
            got,
            vec![b"a".to_vec(), b"a".to_vec(), b"b".to_vec(), b"b".to_vec()]
        );
        assert_eq!(socket.in_flight.load(Ordering::Relaxed), 0);
    }

    /// Echo every bidirectional stream on `b`'s first peer.
    fn echo_server(b: Endpoint) {
        tokio::spawn(async move {
            while let Some(pc) = b.accept_peer().await {
                tokio::spawn(async move {
                    while let Ok((mut send, mut recv)) = pc.conn.accept_bi().await {
                        let Ok(msg) = recv.read_to_end(1024).await else {
                            return;
                        };
                        let _ = send.write_all(&msg).await;
                        let _ = send.finish();
                    }
                });
            }
        });
    }

    async fn round_trip(conn: &quinn::Connection) -> Duration {
        let start = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(b"ping").await.expect("write");
        send.finish().expect("finish");
        assert_eq!(recv.read_to_end(1024).await.expect("read"), b"ping");
        start.elapsed()
    }

    #[tokio::test]
    async fn delay_slows_quic_round_trips_and_no_faults_is_fast() {
        let pki = Pki::new("cluster");
        let control = Arc::new(FaultControl::default());
        let a = with_control(&control, || Endpoint::bind(&pki.node("node-1"), local()))
            .expect("bind a");
        let b = Endpoint::bind(&pki.node("node-2"), local()).expect("bind b");
        let b_addr = b.local_addr().expect("addr");
        echo_server(b);

        let pc = a.connect(b_addr, "node-2").await.expect("connect");
        let mut fast = Duration::MAX;
        for _ in 0..3 {
            fast = fast.min(round_trip(&pc.conn).await);
        }
        assert!(fast < Duration::from_millis(100), "no faults: {fast:?}");

        control.set(&faults("delay_ms=100"));
        let slow = round_trip(&pc.conn).await;
        assert!(slow >= Duration::from_millis(100), "delay_ms=100: {slow:?}");
        let start = Instant::now();
        let again = a.connect(b_addr, "node-2").await.expect("connect");
        let connect = start.elapsed();
        assert!(
            connect >= Duration::from_millis(100),
            "delay_ms=100 connect: {connect:?}"
        );
        again.conn.close(0u32.into(), b"done");
        pc.conn.close(0u32.into(), b"done");
    }

    #[tokio::test]
    async fn total_loss_stops_a_connect() {
        let pki = Pki::new("cluster");
        let control = Arc::new(FaultControl::default());
        control.set(&faults("loss=1.0"));
        let a = with_control(&control, || Endpoint::bind(&pki.node("node-1"), local()))
            .expect("bind a");
        let b = Endpoint::bind(&pki.node("node-2"), local()).expect("bind b");
        let b_addr = b.local_addr().expect("addr");
        echo_server(b);

        let lost =
            tokio::time::timeout(Duration::from_millis(500), a.connect(b_addr, "node-2")).await;
        assert!(
            !matches!(lost, Ok(Ok(_))),
            "loss=1.0 connect must fail or time out"
        );
        control.set(&Faults::default());
        let pc = a
            .connect(b_addr, "node-2")
            .await
            .expect("connects once the loss is gone");
        round_trip(&pc.conn).await;
    }
}
