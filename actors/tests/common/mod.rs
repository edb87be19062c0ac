//! Shared by the two-node tests and the RPC benchmark: a throwaway cluster CA, and a peer node in a
//! second process (ractor's registry and process groups are process-global, so two ractor nodes
//! need two processes). The parent re-executes its own binary with `PEER_ENV` set; the child runs
//! [`peer_main`], prints its addresses and serves until it is killed or its stdin closes.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use swarm_actors::{ActorCluster, StreamKind};
use swarm_membership::{Endpoint, TlsIdentity};
use tokio::io::{AsyncBufReadExt, BufReader};

pub const PEER_ENV: &str = "SWARM_ACTORS_TEST_PEER";
const PKI_ENV: &str = "SWARM_ACTORS_TEST_PKI";
const CERT_ENV: &str = "SWARM_ACTORS_TEST_CERT";
const RACTOR_ENV: &str = "SWARM_ACTORS_TEST_RACTOR_NAME";
const TCP_ENV: &str = "SWARM_ACTORS_TEST_TCP";
/// `name@addr`: the peer also dials that node and prints `PEER_DIAL=ok` or `PEER_DIAL=<error code>`.
pub const DIAL_ENV: &str = "SWARM_ACTORS_TEST_DIAL";
pub const COOKIE: &str = "test-cookie-from-cluster-secret";

/// A cluster CA in a temp dir, and node certificates as `swarm init` writes them.
pub struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name
            .push(DnType::CommonName, "test cluster");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("ca");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write ca");
        Self {
            dir,
            issuer: Issuer::new(p, key),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Write `name.pem` / `name.key`, the name as DNS SAN, for server and client auth.
    pub fn node(&self, name: &str) -> TlsIdentity {
        let mut p = CertificateParams::new(vec![name.to_string()]).expect("params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign");
        std::fs::write(self.dir().join(format!("{name}.pem")), cert.pem()).expect("write");
        swarm_config::secret::write_secret_file(
            &self.dir().join(format!("{name}.key")),
            &key.serialize_pem(),
        )
        .expect("write");
        identity(self.dir(), name)
    }
}

fn identity(dir: &Path, name: &str) -> TlsIdentity {
    TlsIdentity::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key")),
    )
    .expect("load identity")
}

pub fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub fn is_peer() -> bool {
    std::env::var_os(PEER_ENV).is_some()
}

/// A peer node in a child process; killed when dropped.
pub struct Peer {
    child: tokio::process::Child,
    /// Its QUIC endpoint.
    pub addr: SocketAddr,
    /// Its ractor_cluster TCP listener (named `<cert>-tcp`), when asked for.
    pub tcp: Option<SocketAddr>,
    /// Its later stdout lines.
    pub rest: tokio::sync::mpsc::Receiver<String>,
}

impl Peer {
    /// Run this binary again with `args` as the peer with certificate `cert` that calls itself
    /// `ractor_name` in ractor.
    pub async fn spawn(
        args: &[&str],
        pki: &Path,
        cert: &str,
        ractor_name: &str,
        tcp: bool,
    ) -> Self {
        Self::spawn_with(args, pki, cert, ractor_name, tcp, &[]).await
    }

    /// [`Peer::spawn`] with extra environment variables.
    pub async fn spawn_with(
        args: &[&str],
        pki: &Path,
        cert: &str,
        ractor_name: &str,
        tcp: bool,
        env: &[(&str, String)],
    ) -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(args)
            .env(PEER_ENV, "1")
            .env(PKI_ENV, pki)
            .env(CERT_ENV, cert)
            .env(RACTOR_ENV, ractor_name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if tcp {
            cmd.env(TCP_ENV, "1");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn peer");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut addr, mut tcp_addr) = (None, None);
        tokio::time::timeout(Duration::from_secs(30), async {
            while addr.is_none() || (tcp && tcp_addr.is_none()) {
                let line = lines
                    .next_line()
                    .await
                    .expect("read peer")
                    .expect("peer exited");
                // libtest may have printed "test peer_node ... " on the same line.
                let value = |key: &str| line.split_once(key).map(|(_, v)| v.trim().to_string());
                if let Some(a) = value("PEER_ADDR=") {
                    addr = Some(a.parse().expect("peer addr"));
                } else if let Some(a) = value("PEER_TCP=") {
                    tcp_addr = Some(a.parse().expect("peer tcp addr"));
                }
            }
        })
        .await
        .expect("peer started in time");
        let (tx, rest) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.try_send(line);
            }
        });
        Self {
            child,
            addr: addr.expect("addr"),
            tcp: tcp_addr,
            rest,
        }
    }

    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill peer");
    }
}

/// Dial `peer` at `addr` over QUIC, open the ractor stream and make the session.
pub async fn connect_quic(
    cluster: &ActorCluster,
    ep: &Endpoint,
    addr: SocketAddr,
    peer: &str,
) -> Result<quinn::Connection, swarm_actors::Error> {
    let pc = ep.connect(addr, peer).await.expect("quic connect");
    let (mut send, recv) = pc.conn.open_bi().await.expect("open stream");
    send.write_all(&[StreamKind::Ractor.byte()])
        .await
        .expect("kind byte");
    cluster.connect(pc.peer.clone(), send, recv).await?;
    Ok(pc.conn)
}

/// The peer role: a node that accepts ractor streams on QUIC (and, if asked, also runs a plain
/// ractor_cluster TCP NodeServer for the benchmark's comparison).
pub fn peer_main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let var = |k: &str| std::env::var(k).expect(k);
        let dir = PathBuf::from(var(PKI_ENV));
        let cert = var(CERT_ENV);
        let id = identity(&dir, &cert);
        let ep = Endpoint::bind(&id, local()).expect("bind");
        let cluster = ActorCluster::start(&var(RACTOR_ENV), COOKIE)
            .await
            .expect("start cluster");
        println!("PEER_ADDR={}", ep.local_addr().expect("addr"));
        if std::env::var_os(TCP_ENV).is_some() {
            let port = std::net::TcpListener::bind(local())
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let server = ractor_cluster::NodeServer::new(
                port,
                COOKIE.to_string(),
                format!("{cert}-tcp"),
                "swarm".to_string(),
                None,
                Some(ractor_cluster::node::NodeConnectionMode::Isolated),
            )
            .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into());
            ractor::Actor::spawn(None, server, ())
                .await
                .expect("tcp node server");
            println!("PEER_TCP=127.0.0.1:{port}");
        }
        if let Ok(target) = std::env::var(DIAL_ENV) {
            let (name, addr) = target.split_once('@').expect("name@addr");
            let addr: SocketAddr = addr.parse().expect("dial addr");
            let outcome = match connect_quic(&cluster, &ep, addr, name).await {
                Ok(_) => "ok".to_string(),
                Err(e) => e.kind().to_string(),
            };
            println!("PEER_DIAL={outcome}");
        }
        // The parent holds our stdin: when it goes, so do we.
        std::thread::spawn(|| {
            let mut sink = String::new();
            while std::io::stdin()
                .read_line(&mut sink)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                sink.clear();
            }
            std::process::exit(0);
        });
        while let Some(pc) = ep.accept_peer().await {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                while let Ok((send, mut recv)) = pc.conn.accept_bi().await {
                    let mut kind = [0u8];
                    if recv.read_exact(&mut kind).await.is_ok()
                        && kind[0] == StreamKind::Ractor.byte()
                        && let Err(e) = cluster.accept(pc.peer.clone(), send, recv)
                    {
                        eprintln!("peer: accept failed: {e}");
                    }
                }
            });
        }
    });
}
