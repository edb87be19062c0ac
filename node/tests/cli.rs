//! The `swarm` command line as an operator meets it. (Also makes `cargo test` build the binary
//! that the `swarm-tests` crate spawns.)

use std::process::Command;

fn swarm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_swarm"))
        .args(args)
        .env("SWARM_LOG", "warn")
        .output()
        .expect("run swarm")
}

#[test]
fn help_lists_the_commands() {
    let out = swarm(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["up", "init", "node", "status", "token", "model", "audit"] {
        assert!(text.contains(cmd), "{cmd} in help");
    }
}

#[test]
fn init_token_and_their_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("c");
    let d = dir.to_str().expect("utf8 path");
    let out = swarm(&[
        "init",
        "--dir",
        d,
        "--nodes",
        "2",
        "--http-port",
        "28080",
        "--gossip-port",
        "27946",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("node-2/node.toml").exists());
    let again = swarm(&["init", "--dir", d]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a cluster"));

    let out = swarm(&[
        "token",
        "--dir",
        d,
        "--subject",
        "alice",
        "--role",
        "viewer",
    ]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split('.')
            .count(),
        3
    );
    let bad = swarm(&[
        "token",
        "--dir",
        d,
        "--subject",
        "alice",
        "--role",
        "emperor",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown role `emperor`"));
    let bad = swarm(&[
        "token",
        "--dir",
        d,
        "--subject",
        "alice",
        "--ttl",
        "forever",
    ]);
    assert!(!bad.status.success());
}

#[test]
fn node_refuses_insecure_key_file_and_busy_port() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("c");
    let d = dir.to_str().expect("utf8 path");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port().to_string();
    let out = swarm(&[
        "init",
        "--dir",
        d,
        "--http-port",
        &port,
        "--gossip-port",
        "27999",
    ]);
    assert!(out.status.success());
    let config = dir.join("node-1/node.toml");
    let c = config.to_str().expect("utf8 path");

    let out = swarm(&["node", "--config", c]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot bind the gateway"), "{err}");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.join("node-1/master.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let out = swarm(&["node", "--config", c]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("must not be readable by group or others"),
            "{err}"
        );
    }

    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[node]\nname = \"n\"\ndata_dir = \"d\"\ncolour = 1\n").expect("write");
    let out = swarm(&["node", "--config", bad.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("node.colour"));
}

#[test]
fn model_list_and_an_unknown_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path().to_str().expect("utf8 path");
    let out = swarm(&["model", "list", "--dir", d]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SmolLM2-135M-Instruct") && text.contains("not pulled"),
        "{text}"
    );
    let out = swarm(&["model", "pull", "no-such-model", "--dir", d]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown model `no-such-model`"), "{err}");
}

/// A `swarm node` process, killed on drop.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `swarm init` one node on free ports; returns (dir, config, gateway port).
fn init_one(tmp: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, u16) {
    let dir = tmp.join("c");
    let http = free_port();
    let out = swarm(&[
        "init",
        "--dir",
        dir.to_str().expect("utf8"),
        "--http-port",
        &http.to_string(),
        "--gossip-port",
        &free_port().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = dir.join("node-1/node.toml");
    (dir, config, http)
}

fn start_node(config: &std::path::Path) -> Running {
    Running(
        Command::new(env!("CARGO_BIN_EXE_swarm"))
            .args(["node", "--config"])
            .arg(config)
            .env("SWARM_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn swarm node"),
    )
}

/// Poll `url` with `agent` until it answers 200 (30 s at most).
fn wait_healthy(agent: &ureq::Agent, url: &str) {
    for _ in 0..300 {
        if let Ok(r) = agent.get(url).call()
            && r.status() == 200
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{url} never answered 200");
}

#[test]
fn an_init_node_serves_https_with_the_cluster_ca_and_refuses_plain_http() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir, config, port) = init_one(tmp.path());
    let _node = start_node(&config);
    let trusting =
        swarm_node::cli::gateway_agent(Some(&dir.join("ca.pem"))).expect("agent with the CA");
    let https = format!("https://127.0.0.1:{port}/health");
    wait_healthy(&trusting, &https);
    let h: serde_json::Value = trusting
        .get(&https)
        .call()
        .expect("health")
        .into_json()
        .expect("json");
    assert_eq!(h["node"], "node-1");
    // Plain HTTP gets no answer; a client that does not trust the cluster CA gets none either.
    let plain = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(5))
        .build();
    assert!(
        plain
            .get(&format!("http://127.0.0.1:{port}/health"))
            .call()
            .is_err()
    );
    let untrusting = swarm_node::cli::gateway_agent(None).expect("agent");
    assert!(untrusting.get(&https).call().is_err());
    // `swarm status` finds the CA in --dir.
    let token = std::fs::read_to_string(dir.join("admin.token")).expect("token");
    let out = swarm(&[
        "status",
        "--gateway",
        &format!("https://127.0.0.1:{port}"),
        "--dir",
        dir.to_str().expect("utf8"),
        "--token",
        token.trim(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("node-1"));
}

#[test]
fn a_gateway_off_loopback_without_tls_refuses_to_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_dir, config, port) = init_one(tmp.path());
    let text = std::fs::read_to_string(&config).expect("read");
    let text = text
        .replace(&format!("127.0.0.1:{port}"), &format!("0.0.0.0:{port}"))
        .replace(
            "[gateway.tls]\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n",
            "",
        );
    assert!(!text.contains("gateway.pem"), "{text}");
    std::fs::write(&config, text).expect("write");
    let out = swarm(&["node", "--config", config.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gateway.tls") && err.contains("allow_plain_http"),
        "{err}"
    );
}

#[test]
fn slow_clients_are_cut_off_and_connections_are_limited_per_source() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir, config, port) = init_one(tmp.path());
    let text = std::fs::read_to_string(&config).expect("read");
    let text = text
        .replace(
            "header_read_timeout = \"10s\"",
            "header_read_timeout = \"4s\"",
        )
        .replace(
            "max_connections_per_source = 64",
            "max_connections_per_source = 12",
        );
    std::fs::write(&config, text).expect("write");
    let _node = start_node(&config);
    let ca = dir.join("ca.pem");
    let agent = swarm_node::cli::gateway_agent(Some(&ca)).expect("agent");
    let health = format!("https://127.0.0.1:{port}/health");
    wait_healthy(&agent, &health);
    // ureq keeps its connection alive: a fresh agent per check leaves no pooled socket behind.
    drop(agent);
    std::thread::sleep(Duration::from_millis(200));

    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let tls = {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&ca).expect("ca") {
            roots.add(c.expect("cert")).expect("root");
        }
        std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    };
    // 10 clients finish the handshake and send half a request head; 2 send nothing at all.
    let mut half = Vec::new();
    for _ in 0..10 {
        let tcp = std::net::TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let conn = rustls::ClientConnection::new(tls.clone(), name).expect("client");
        let mut s = rustls::StreamOwned::new(conn, tcp);
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .expect("write");
        s.flush().expect("flush");
        half.push(s);
    }
    let mut silent: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let s = std::net::TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            s
        })
        .collect();
    // The source's 13th connection is closed at once, long before any header deadline.
    let mut over = std::net::TcpStream::connect(addr).expect("connect");
    over.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    assert!(
        matches!(over.read(&mut buf), Ok(0) | Err(_)),
        "a 13th connection from one source was served"
    );
    // Every slow client is cut off within the bound (4 s header deadline; 20 s read timeout).
    let start = Instant::now();
    for s in &mut half {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("a half-sent head got an answer: {:?}", &buf[..n]),
        }
    }
    for s in &mut silent {
        assert!(matches!(s.read(&mut buf), Ok(0)), "silent client kept");
    }
    assert!(
        start.elapsed() < Duration::from_secs(19),
        "slow clients held past the bound"
    );
    drop((half, silent));
    // The node still answers.
    let agent = swarm_node::cli::gateway_agent(Some(&ca)).expect("agent");
    wait_healthy(&agent, &health);
}
