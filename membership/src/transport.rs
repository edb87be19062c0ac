//! QUIC with mutual TLS from the cluster CA.
//!
//! Every node presents its `node.pem` (signed by the cluster CA, its node name as the DNS subject
//! alternative name) both as a server and as a client, and accepts only peers whose certificate
//! chains to the same CA. The dialer names the node it expects, and rustls checks the server's
//! certificate against that name; the accepting side reads the dialer's name from its certificate.
//! That name is the peer's identity: every later claim (gossip identity, ractor node name) must
//! equal it. The rustls crypto provider (ring) is passed explicitly, never taken from a
//! process-wide default.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::MembershipError;

/// ALPN protocol of swarm's node-to-node QUIC.
pub const ALPN: &[u8] = b"swarm/1";

/// A node's TLS identity: the cluster CA, its certificate and key, and the name they carry.
pub struct TlsIdentity {
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    name: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Load PEM files (as `swarm init` writes them).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, MembershipError> {
        let pem_err = |p: &Path, e: rustls::pki_types::pem::Error| MembershipError::Pem {
            path: p.display().to_string(),
            message: e.to_string(),
        };
        let ca_der = CertificateDer::from_pem_file(ca).map_err(|e| pem_err(ca, e))?;
        let cert_der = CertificateDer::from_pem_file(cert).map_err(|e| pem_err(cert, e))?;
        // The private key through the same mode-checked reader as the master key: a key file
        // that group or others can read is refused.
        let key_pem =
            swarm_config::secret::read_secret_file(key).map_err(|e| MembershipError::Pem {
                path: key.display().to_string(),
                message: e.to_string(),
            })?;
        let key_der =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| pem_err(key, e))?;
        let name = cert_name(&cert_der)?;
        Ok(Self {
            ca: ca_der,
            cert: cert_der,
            key: key_der,
            name,
        })
    }

    /// The node name in this node's certificate.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The node name a certificate carries: its one DNS subject alternative name. A certificate with
/// several DNS names is refused ([`MembershipError::SeveralNames`]): it would let one node answer
/// to several identities; so is one whose extended key usage excludes TLS clients
/// ([`MembershipError::NotNodeCertificate`]), such as a gateway's HTTPS certificate.
pub fn cert_name(cert: &CertificateDer<'_>) -> Result<String, MembershipError> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| MembershipError::Tls(format!("bad certificate: {e}")))?;
    // Every node is a TLS client too (it dials its peers); a certificate restricted to serving
    // (the gateway's HTTPS certificate, from the same CA) is no node's identity.
    let eku = x
        .extended_key_usage()
        .map_err(|e| MembershipError::Tls(format!("bad extended key usage: {e}")))?;
    if eku.is_some_and(|e| !(e.value.client_auth || e.value.any)) {
        return Err(MembershipError::NotNodeCertificate);
    }
    let san = x
        .subject_alternative_name()
        .map_err(|e| MembershipError::Tls(format!("bad subject alternative name: {e}")))?
        .ok_or(MembershipError::NoName)?;
    let mut names = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some(*d),
        _ => None,
    });
    let name = names.next().ok_or(MembershipError::NoName)?;
    let more = names.count();
    if more > 0 {
        return Err(MembershipError::SeveralNames { count: more + 1 });
    }
    Ok(name.to_string())
}

/// One QUIC endpoint per node: accepts peers and dials them, both with mutual TLS.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    name: String,
    max_connections: usize,
}

/// An incoming connection attempt.
#[derive(Debug)]
pub enum Accepted {
    /// Mutually authenticated; `peer` is the name in its certificate.
    Peer(PeerConnection),
    /// Another CA, no certificate, a failed or stalled handshake, or over the connection limit.
    Refused { remote: SocketAddr, reason: String },
}

/// An incoming connection whose handshake has not finished yet.
#[derive(Debug)]
pub struct PendingPeer {
    incoming: quinn::Incoming,
    /// Set when the connection limit was reached.
    limit: Option<usize>,
}

impl PendingPeer {
    pub fn remote(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Run the handshake (at most 10 s) and check the peer's certificate.
    pub async fn finish(self) -> Accepted {
        let remote = self.incoming.remote_address();
        if let Some(n) = self.limit {
            self.incoming.refuse();
            return Accepted::Refused {
                remote,
                reason: format!("connection limit {n} reached"),
            };
        }
        match tokio::time::timeout(Duration::from_secs(10), self.incoming).await {
            Ok(Ok(conn)) => match peer_name(&conn) {
                Ok(peer) => Accepted::Peer(PeerConnection { conn, peer }),
                Err(e) => {
                    conn.close(1u32.into(), b"no identity");
                    Accepted::Refused {
                        remote,
                        reason: e.to_string(),
                    }
                }
            },
            Ok(Err(e)) => Accepted::Refused {
                remote,
                reason: e.to_string(),
            },
            Err(_) => Accepted::Refused {
                remote,
                reason: "handshake timed out".into(),
            },
        }
    }
}

/// Server name used to dial a peer whose node name is not known yet (a seed).
const ANY_PEER: &str = "any-peer.swarm.invalid";

/// Checks a server certificate against the cluster CA and the expected node name; when dialing
/// a seed ([`ANY_PEER`]) the name is the one the certificate carries.
#[derive(Debug)]
struct PeerVerifier(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let any = matches!(server_name, rustls::pki_types::ServerName::DnsName(d) if d.as_ref() == ANY_PEER);
        // One certificate, one identity: several DNS names are refused in the handshake.
        let name = cert_name(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if !any {
            return self.0.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
        }
        let own = rustls::pki_types::ServerName::try_from(name)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        self.0
            .verify_server_cert(end_entity, intermediates, &own, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// An authenticated connection to a named peer.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    pub conn: quinn::Connection,
    /// The node name from the peer's certificate.
    pub peer: String,
}

impl Endpoint {
    /// Bind `addr` (UDP) with this identity.
    pub fn bind(id: &TlsIdentity, addr: SocketAddr) -> Result<Self, MembershipError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(id.ca.clone())
            .map_err(|e| MembershipError::Tls(format!("cluster CA: {e}")))?;
        let roots = Arc::new(roots);
        let tls = |e: rustls::Error| MembershipError::Tls(e.to_string());

        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| MembershipError::Tls(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
            .map_err(tls)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let server =
            QuicServerConfig::try_from(server).map_err(|e| MembershipError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
        server.transport_config(transport_config());

        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| MembershipError::Tls(e.to_string()))?;
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier(webpki)))
            .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
            .map_err(tls)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        let client =
            QuicClientConfig::try_from(client).map_err(|e| MembershipError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client));
        client.transport_config(transport_config());

        // `quinn::Endpoint::server`, with a fault-injecting socket under SWARM_NET_FAULTS (chaos
        // suite only).
        let mut inner = crate::faults::server_endpoint(server, addr)
            .map_err(|source| MembershipError::Bind { addr, source })?;
        inner.set_default_client_config(client);
        Ok(Self {
            inner,
            name: id.name.clone(),
            max_connections: 1024,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, MembershipError> {
        self.inner
            .local_addr()
            .map_err(|source| MembershipError::Bind {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Dial `addr`, expecting the node named `peer` there.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer: &str,
    ) -> Result<PeerConnection, MembershipError> {
        let err = |message: String| MembershipError::Connect { addr, message };
        let conn = self
            .inner
            .connect(addr, peer)
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(e.to_string()))?;
        let name = peer_name(&conn)?;
        Ok(PeerConnection { conn, peer: name })
    }

    /// Dial a seed whose node name is not known yet: any certificate from the cluster CA is
    /// accepted, and the name it carries becomes the peer's identity.
    pub async fn connect_any(&self, addr: SocketAddr) -> Result<PeerConnection, MembershipError> {
        self.connect(addr, ANY_PEER).await
    }

    /// The next incoming connection attempt; `None` once the endpoint is closed. Finish its
    /// handshake with [`PendingPeer::finish`] (in its own task: a peer may stall).
    pub async fn incoming(&self) -> Option<PendingPeer> {
        let incoming = self.inner.accept().await?;
        let over = self.inner.open_connections() > self.max_connections;
        Some(PendingPeer {
            incoming,
            limit: over.then_some(self.max_connections),
        })
    }

    /// The next authenticated incoming connection, skipping (and logging) refused ones.
    pub async fn accept_peer(&self) -> Option<PeerConnection> {
        loop {
            match self.incoming().await?.finish().await {
                Accepted::Peer(pc) => return Some(pc),
                Accepted::Refused { remote, reason } => {
                    tracing::warn!(%remote, %reason, "connection refused")
                }
            }
        }
    }

    /// Connections open now (both directions).
    pub fn open_connections(&self) -> usize {
        self.inner.open_connections()
    }

    /// Refuse incoming connections beyond `n` open ones.
    pub fn set_max_connections(&mut self, n: usize) {
        self.max_connections = n;
    }

    /// Close every connection and stop accepting.
    pub fn close(&self) {
        self.inner.close(0u32.into(), b"shutdown");
    }
}

fn peer_name(conn: &quinn::Connection) -> Result<String, MembershipError> {
    let remote = conn.remote_address();
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(MembershipError::NoPeerCertificate(remote))?;
    let first = certs
        .first()
        .ok_or(MembershipError::NoPeerCertificate(remote))?;
    cert_name(first)
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    if let Ok(idle) = Duration::from_secs(10).try_into() {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testpki::Pki;

    fn local() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// A TLS private key that group or others can read is refused, like the master key.
    #[cfg(unix)]
    #[test]
    fn world_readable_private_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let pki = Pki::new("cluster");
        let (cert, key) = pki.files(&["node-1"]);
        assert!(TlsIdentity::load(pki.ca(), &cert, &key).is_ok());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = TlsIdentity::load(pki.ca(), &cert, &key).expect_err("0644 key");
        let msg = e.to_string();
        assert!(
            msg.contains("node-1.key") && msg.contains("chmod 600"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn mutual_tls_names_both_sides_and_carries_streams() {
        let pki = Pki::new("cluster");
        let a = Endpoint::bind(&pki.node("node-1"), local()).expect("bind a");
        let b = Endpoint::bind(&pki.node("node-2"), local()).expect("bind b");
        let b_addr = b.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let pc = b.accept_peer().await.expect("incoming");
            let (mut send, mut recv) = pc.conn.accept_bi().await.expect("bi");
            let msg = recv.read_to_end(1024).await.expect("read");
            send.write_all(&msg).await.expect("echo");
            send.finish().expect("finish");
            let _ = pc.conn.closed().await;
            pc.peer
        });
        let pc = a.connect(b_addr, "node-2").await.expect("connect");
        assert_eq!(pc.peer, "node-2");
        let (mut send, mut recv) = pc.conn.open_bi().await.expect("open");
        send.write_all(b"hello").await.expect("write");
        send.finish().expect("finish");
        assert_eq!(recv.read_to_end(1024).await.expect("read"), b"hello");
        pc.conn.close(0u32.into(), b"done");
        assert_eq!(
            server.await.expect("server"),
            "node-1",
            "server sees the dialer's name"
        );
    }

    #[tokio::test]
    async fn another_ca_is_refused_both_ways() {
        let pki = Pki::new("cluster");
        let rogue = Pki::new("rogue");
        let good = Endpoint::bind(&pki.node("node-1"), local()).expect("bind");
        let bad = Endpoint::bind(&rogue.node("node-2"), local()).expect("bind");
        let good_addr = good.local_addr().expect("addr");
        let bad_addr = bad.local_addr().expect("addr");
        // Both accept (quinn drives a handshake only once it is accepted).
        let (tx, mut accepted) = tokio::sync::mpsc::channel(4);
        let g = good.clone();
        tokio::spawn(async move {
            while let Some(pc) = g.accept_peer().await {
                let _ = tx.send(pc.peer).await;
            }
        });
        let b = bad.clone();
        tokio::spawn(async move { while b.accept_peer().await.is_some() {} });
        // The good node refuses the rogue's certificate when dialing it...
        let e = good
            .connect(bad_addr, "node-2")
            .await
            .expect_err("rogue server");
        assert_eq!(e.kind(), "connect");
        // ...and the rogue cannot get in: whatever its dial returns (TLS 1.3 clients may finish
        // before the server has checked them), the good node never accepts the connection.
        let _ = bad.connect(good_addr, "node-1").await;
        let got = tokio::time::timeout(Duration::from_millis(300), accepted.recv()).await;
        assert!(
            got.is_err(),
            "no connection from another CA is accepted: {got:?}"
        );
    }

    #[tokio::test]
    async fn a_peer_claiming_another_name_is_refused() {
        let pki = Pki::new("cluster");
        let a = Endpoint::bind(&pki.node("node-1"), local()).expect("bind");
        let b = Endpoint::bind(&pki.node("node-2"), local()).expect("bind");
        let b_addr = b.local_addr().expect("addr");
        tokio::spawn(async move { while b.accept_peer().await.is_some() {} });
        let e = a
            .connect(b_addr, "node-3")
            .await
            .expect_err("name mismatch");
        assert_eq!(e.kind(), "connect");
    }

    #[test]
    fn a_serving_only_certificate_is_no_node_identity() {
        let pki = Pki::new("cluster");
        // What `swarm init` issues for a gateway: same CA, one name, server authentication only.
        let (cert, key) = pki.files_for(
            &["localhost"],
            &[rcgen::ExtendedKeyUsagePurpose::ServerAuth],
        );
        let e = TlsIdentity::load(pki.ca(), &cert, &key).expect_err("gateway certificate");
        assert_eq!(e.kind(), "not_node_certificate");
        let der = CertificateDer::from_pem_file(&cert).expect("pem");
        assert_eq!(
            cert_name(&der).expect_err("gateway certificate").kind(),
            "not_node_certificate"
        );
        let (node, _) = pki.files(&["node-1"]);
        let der = CertificateDer::from_pem_file(&node).expect("pem");
        assert_eq!(cert_name(&der).expect("node certificate"), "node-1");
    }

    #[test]
    fn a_certificate_with_several_dns_names_is_refused() {
        let pki = Pki::new("cluster");
        let (cert, key) = pki.files(&["node-2", "node-3"]);
        // As this node's own identity: a clear error at load.
        let e = TlsIdentity::load(pki.ca(), &cert, &key).expect_err("two names");
        assert_eq!(e.kind(), "several_names");
        assert!(e.to_string().contains("2 DNS"), "{e}");
        // As a peer's certificate: refused in the handshake, under either name.
        let der = CertificateDer::from_pem_file(&cert).expect("pem");
        assert_eq!(
            cert_name(&der).expect_err("two names").kind(),
            "several_names"
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(pki.ca()).expect("ca"))
            .expect("root");
        let webpki =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        let v = PeerVerifier(webpki);
        let now = rustls::pki_types::UnixTime::now();
        for expected in ["node-2", "node-3", ANY_PEER] {
            let sn = rustls::pki_types::ServerName::try_from(expected).expect("name");
            let r = rustls::client::danger::ServerCertVerifier::verify_server_cert(
                &v,
                &der,
                &[],
                &sn,
                &[],
                now,
            );
            assert!(r.is_err(), "{expected}: a two-name certificate is refused");
        }
        // A one-name certificate still passes.
        let (one, _) = pki.files(&["node-4"]);
        let one = CertificateDer::from_pem_file(&one).expect("pem");
        let sn = rustls::pki_types::ServerName::try_from("node-4").expect("name");
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &v,
            &one,
            &[],
            &sn,
            &[],
            now,
        )
        .expect("one name");
    }

    #[test]
    fn port_in_use_is_a_clear_error() {
        let pki = Pki::new("cluster");
        let id = pki.node("node-1");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let a = Endpoint::bind(&id, local()).expect("bind");
            let taken = a.local_addr().expect("addr");
            let e = Endpoint::bind(&id, taken).expect_err("in use");
            assert_eq!(e.kind(), "bind");
        });
    }
}
