use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::{get, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

fn opts(
    header_ms: u64,
    idle_ms: u64,
    body_ms: u64,
    total: usize,
    per_source: usize,
) -> ServeOptions {
    ServeOptions {
        header_read_timeout: Duration::from_millis(header_ms),
        body_timeout: Duration::from_millis(body_ms),
        idle_timeout: Duration::from_millis(idle_ms),
        max_connections: total,
        max_connections_per_source: per_source,
        shutdown_grace: Duration::from_secs(2),
    }
}

fn app() -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }),
        )
        .route(
            "/echo",
            post(|body: Bytes| async move { body.len().to_string() }),
        )
}

async fn start(
    o: ServeOptions,
    tls: Option<TlsAcceptor>,
) -> (
    SocketAddr,
    watch::Sender<bool>,
    tokio::task::JoinHandle<io::Result<()>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(serve(listener, app(), tls, o, rx));
    (addr, tx, task)
}

/// Send one request on `s` and read one response (up to the end of a small body).
async fn request(s: &mut TcpStream, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).to_string()
}

/// True when the peer closes `s` (EOF or reset) within `bound`.
async fn closed_within(s: &mut TcpStream, bound: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(bound, read_all).await.is_ok()
}

#[tokio::test]
async fn half_headers_are_closed_and_health_still_answers() {
    let (addr, _tx, _task) = start(opts(300, 10_000, 10_000, 256, 256), None).await;
    let mut slow = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            .await
            .expect("write");
        slow.push(s);
    }
    // Answered meanwhile on a fresh connection.
    let mut ok = TcpStream::connect(addr).await.expect("connect");
    assert!(
        request(&mut ok, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    );
    for s in &mut slow {
        assert!(
            closed_within(s, Duration::from_secs(10)).await,
            "a half-sent head was not cut off"
        );
    }
    let mut ok = TcpStream::connect(addr).await.expect("connect");
    assert!(
        request(&mut ok, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test]
async fn a_trickled_head_is_cut_off_at_the_header_deadline() {
    let (addr, _tx, _task) = start(opts(400, 10_000, 10_000, 16, 16), None).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // One byte every 100 ms never completes a head: activity does not extend the deadline.
    let mut cut = false;
    for b in b"GET /health HTTP/1.1\r\nHost: t\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        .iter()
        .cycle()
        .take(300)
    {
        if s.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cut || closed_within(&mut s, Duration::from_secs(1)).await);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout_then_closes() {
    let (addr, _tx, _task) = start(opts(200, 1500, 10_000, 16, 16), None).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    assert!(request(&mut s, "/health").await.starts_with("HTTP/1.1 200"));
    // Idle longer than the header timeout, shorter than the idle timeout: still usable.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(request(&mut s, "/peer").await.contains("127.0.0.1"));
    assert!(
        closed_within(&mut s, Duration::from_secs(10)).await,
        "idle connection never closed"
    );
}

#[tokio::test]
async fn a_stalled_body_fails_within_the_body_timeout() {
    let (addr, _tx, _task) = start(opts(10_000, 10_000, 300, 16, 16), None).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabcd")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer within the bound")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        text.starts_with("HTTP/1.1 4") || n == 0,
        "stalled body was not refused: {text}"
    );
    // A complete body still works.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nabcd")
        .await
        .expect("write");
    let n = s.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn connections_beyond_the_per_source_limit_are_closed() {
    let (addr, _tx, _task) = start(opts(10_000, 10_000, 10_000, 64, 3), None).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        assert!(request(&mut s, "/health").await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut over = TcpStream::connect(addr).await.expect("connect");
    assert!(
        closed_within(&mut over, Duration::from_secs(5)).await,
        "a fourth connection from one source was kept"
    );
    // Closing one frees its place.
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s
            .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .await;
        let mut buf = [0u8; 256];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await
            && n > 0
        {
            again = Some(String::from_utf8_lossy(&buf[..n]).to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some_and(|t| t.starts_with("HTTP/1.1 200")));
}

#[test]
fn limits_count_total_and_per_source() {
    let limits = Limits::new(3, 2);
    let a: IpAddr = "10.0.0.1".parse().expect("ip");
    let b: IpAddr = "10.0.0.2".parse().expect("ip");
    let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
    let a1 = limits.admit(a).expect("a1");
    let a2 = limits.admit(mapped).expect("a2 (same source, v4-mapped)");
    assert!(limits.admit(a).is_none(), "per-source limit");
    let b1 = limits.admit(b).expect("b1");
    assert!(limits.admit(b).is_none(), "total limit");
    drop(a1);
    assert!(limits.admit(a).is_some());
    drop((a2, b1));
    assert!(
        limits.sources().is_empty(),
        "entries are dropped with their last connection"
    );
    // An IPv6 host holds a whole /64: rotating addresses inside it is still one source.
    let v6a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
    let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
    let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
    let _c1 = limits.admit(v6a).expect("first");
    let _c2 = limits.admit(v6b).expect("second");
    assert!(limits.admit(v6a).is_none(), "same /64, over its limit");
    let _c3 = limits.admit(other).expect("another /64");
}

/// A CA and a gateway certificate for 127.0.0.1 written into `dir`, and a config using them.
fn tls_setup(dir: &std::path::Path) -> (NodeConfig, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_key = KeyPair::generate().expect("key");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    p.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let key = KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, &issuer).expect("cert");
    std::fs::write(dir.join("gateway.pem"), cert.pem()).expect("write");
    swarm_config::secret::write_secret_file(&dir.join("gateway.key"), &key.serialize_pem())
        .expect("write");
    let text = r#"
[node]
name = "n"
data_dir = "data"
[tls]
ca_cert = "ca.pem"
cert = "node.pem"
key = "node.key"
[keys]
master_key_file = "master.key"
jwt_signing_key_file = "jwt.key"
[gateway]
bind = "0.0.0.0:0"
[gateway.tls]
cert = "gateway.pem"
key = "gateway.key"
"#;
    let cfg = NodeConfig::from_toml("t", text, dir.to_path_buf()).expect("config");
    (cfg, ca.der().to_vec())
}

#[tokio::test]
async fn https_with_the_ca_works_and_plain_http_gets_no_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, ca_der) = tls_setup(dir.path());
    let acceptor = tls_acceptor(&cfg).expect("tls").expect("configured");
    let (addr, _tx, _task) = start(opts(2000, 10_000, 10_000, 16, 16), Some(acceptor)).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der)).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cc = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cc));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut s = connector.connect(name, tcp).await.expect("handshake");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));

    let mut plain = TcpStream::connect(addr).await.expect("connect");
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"));
}

#[test]
fn a_group_readable_gateway_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, _) = tls_setup(dir.path());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("gateway.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        match tls_acceptor(&cfg) {
            Err(e) => assert_eq!(e.kind(), "insecure_secret"),
            Ok(_) => panic!("a 0644 gateway key was accepted"),
        }
    }
    let _ = cfg;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_ends_the_server() {
    let (addr, tx, task) = start(opts(10_000, 60_000, 10_000, 16, 16), None).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    assert!(request(&mut s, "/health").await.starts_with("HTTP/1.1 200"));
    let _ = tx.send(true);
    let r = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("server ended in time");
    assert!(matches!(r, Ok(Ok(()))));
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
}

/// A response to a request whose body the handler left unread says `connection: close` (the
/// server closes that connection after it), so no client sends its next request on it; a body
/// read to its end keeps the connection alive.
#[tokio::test]
async fn an_unread_body_closes_the_connection_and_says_so() {
    let (addr, _tx, _task) = start(opts(5_000, 5_000, 5_000, 16, 16), None).await;
    let body = "x".repeat(20_000);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // `/health` never reads a body.
    let req = format!(
        "GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    // `/echo` reads its body: the connection stays open for the next request.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(!answer.contains("connection: close"), "{answer}");
    assert!(request(&mut s, "/health").await.starts_with("HTTP/1.1 200"));
}
