//! Helpers for cross-crate integration tests: run the real `swarm` binary, talk HTTP to it.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The `swarm` binary built by `cargo test` (the node crate's integration tests make cargo build
/// it). `SWARM_BIN` overrides.
pub fn swarm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SWARM_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/swarm
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    profile_dir.join("swarm")
}

/// Run `swarm ARGS` to completion.
pub fn swarm(args: &[&str]) -> Result<Output> {
    let bin = swarm_bin();
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build -p swarm-node` or `cargo test --workspace`",
            bin.display()
        );
    }
    Command::new(&bin)
        .args(args)
        .env("SWARM_LOG", "warn")
        .output()
        .with_context(|| format!("run {}", bin.display()))
}

/// A free TCP port on 127.0.0.1 (best effort: another process may take it before we do).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// `swarm init` into `dir` with free ports; returns the node config paths.
pub fn init_cluster(dir: &Path, nodes: u16) -> Result<Vec<PathBuf>> {
    let http = free_port().to_string();
    let gossip = free_port().to_string();
    let d = dir.display().to_string();
    let n = nodes.to_string();
    let out = swarm(&[
        "init",
        "--dir",
        &d,
        "--nodes",
        &n,
        "--http-port",
        &http,
        "--gossip-port",
        &gossip,
    ])?;
    if !out.status.success() {
        bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((1..=nodes)
        .map(|k| dir.join(format!("node-{k}")).join("node.toml"))
        .collect())
}

/// The admin token `swarm init` wrote into `dir`.
pub fn admin_token(dir: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(dir.join("admin.token"))?
        .trim()
        .to_string())
}

/// Start a node for each config and wait until every node sees every other alive.
pub fn start_joined(configs: &[PathBuf], token: &str) -> Result<(Vec<NodeProc>, Vec<Client>)> {
    let nodes: Vec<NodeProc> = configs
        .iter()
        .map(|c| NodeProc::start(c))
        .collect::<Result<_>>()?;
    let clients: Vec<Client> = nodes.iter().map(|n| n.client(token)).collect();
    let all: Vec<&Client> = clients.iter().collect();
    for k in 1..=configs.len() {
        wait_member_state(&all, &format!("node-{k}"), "alive", Duration::from_secs(10))?;
    }
    Ok((nodes, clients))
}

/// Mint a token with `swarm token`.
pub fn token(dir: &Path, subject: &str, role: &str) -> Result<String> {
    let d = dir.display().to_string();
    let out = swarm(&[
        "token",
        "--dir",
        &d,
        "--subject",
        subject,
        "--role",
        role,
        "--ttl",
        "1h",
    ])?;
    if !out.status.success() {
        bail!("token failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A rustls client config trusting only the CA certificate(s) in `ca_pem`.
pub fn trust_ca(ca_pem: &Path) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// A running `swarm node` process. Killed (SIGKILL) on drop if still running.
#[derive(Debug)]
pub struct NodeProc {
    pub child: Child,
    pub config: PathBuf,
    /// `https://ADDR` when the node serves HTTPS (as `swarm init` configures it), else `http://`.
    pub url: String,
    /// The CA file clients must trust for HTTPS (the cluster's `ca.pem`); `None` for HTTP.
    pub ca: Option<PathBuf>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl NodeProc {
    /// Start `swarm node --config PATH` and wait until `/health` answers.
    pub fn start(config: &Path) -> Result<Self> {
        let cfg = swarm_config::NodeConfig::load(config)?;
        let (url, ca) = match &cfg.gateway.tls {
            Some(_) => (
                format!("https://{}", cfg.gateway.bind),
                Some(cfg.resolve(&cfg.tls.ca_cert)),
            ),
            None => (format!("http://{}", cfg.gateway.bind), None),
        };
        let tls = ca.as_deref().map(trust_ca).transpose()?;
        let log = std::fs::File::create(config.with_extension("log"))?;
        let child = Command::new(swarm_bin())
            .args(["node", "--config"])
            .arg(config)
            .env("SWARM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn swarm node")?;
        let mut node = NodeProc {
            child,
            config: config.to_path_buf(),
            url,
            ca,
            tls,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = node.anonymous().get("/health") {
                return Ok(node);
            }
            if let Some(status) = node.child.try_wait()? {
                let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
                bail!("node exited early ({status}): {log}");
            }
            if Instant::now() > deadline {
                bail!("node did not become healthy in 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("node did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn client(&self, token: &str) -> Client {
        Client::with_tls(&self.url, Some(token), self.tls.clone())
    }

    /// A client without a token (public routes, refusals).
    pub fn anonymous(&self) -> Client {
        Client::with_tls(&self.url, None, self.tls.clone())
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A tiny blocking HTTP client returning `(status, json)` for every status.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// The gateway URL this client talks to.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn new(base: &str, token: Option<&str>) -> Self {
        Self::with_tls(base, token, None)
    }

    /// A client that trusts `tls`'s roots for HTTPS (see [`trust_ca`]).
    pub fn with_tls(
        base: &str,
        token: Option<&str>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        // A connection kept per thread that shares this client, as an HTTP client's pool does
        // (ureq keeps one per host by default: the other threads paid a TLS handshake on every
        // request, which a benchmark then counted as the node's cost).
        let mut agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .max_idle_connections(256)
            .max_idle_connections_per_host(64);
        if let Some(tls) = tls {
            agent = agent.tls_config(tls);
        }
        Self {
            base: base.to_string(),
            token: token.map(String::from),
            agent: agent.build(),
        }
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, Value)> {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_bytes(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e.into()),
        };
        let status = resp.status();
        let text = resp.into_string()?;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }

    pub fn get(&self, path: &str) -> Result<(u16, Value)> {
        self.request("GET", path, None)
    }

    /// A non-JSON body (e.g. `/metrics`) as text.
    pub fn get_text(&self, path: &str) -> Result<String> {
        Ok(match self.get(path)?.1 {
            Value::String(s) => s,
            v => v.to_string(),
        })
    }

    pub fn put_json(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.request("PUT", path, Some(body.to_string().as_bytes()))
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    /// POST `body` and return the raw response (status, headers, a reader over the body).
    pub fn post_raw(&self, path: &str, body: &Value) -> Result<ureq::Response> {
        let mut req = self.agent.post(&format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
        {
            Ok(r) | Err(ureq::Error::Status(_, r)) => Ok(r),
            Err(e) => Err(e.into()),
        }
    }
}

/// Write the tiny test model into `dir` and make the node config at `config` serve `models`
/// (`(name, path)`; the tiny model's path when `None`). Returns the tiny model's path.
pub fn serve_models(
    config: &Path,
    models: &[(&str, Option<&Path>)],
    extra: &str,
) -> Result<PathBuf> {
    let dir = config.parent().context("config folder")?;
    let tiny = swarm_gpu::testmodel::write_gguf(dir, &swarm_gpu::testmodel::TinySpec::default())?;
    let list: Vec<String> = models
        .iter()
        .map(|(name, path)| {
            let p = path.map_or(tiny.clone(), Path::to_path_buf);
            format!("{{ name = \"{name}\", path = \"{}\" }}", p.display())
        })
        .collect();
    let text = std::fs::read_to_string(config)?;
    let text = text.replace(
        "models = []",
        &format!("models = [{}]\n{extra}", list.join(", ")),
    );
    std::fs::write(config, text)?;
    Ok(tiny)
}

/// Poll `/health` until `services.inference` is `want`.
pub fn wait_inference(c: &Client, want: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, h) = c.get("/health")?;
        if h["services"]["inference"] == want {
            return Ok(h);
        }
        if Instant::now() > deadline {
            bail!("inference never became {want}: {h}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every file under `dir`.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Member name → state (`alive`, `suspect`, `down`, `left`) as the node behind `c` sees them;
/// empty when the node does not answer.
pub fn member_states(c: &Client) -> BTreeMap<String, String> {
    match c.get("/v1/cluster/members") {
        Ok((200, v)) => v["members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        (
                            m["name"].as_str().unwrap_or("").to_string(),
                            m["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        _ => BTreeMap::new(),
    }
}

/// Wait until every client sees `member` in `state` (polling every 20 ms); returns how long it
/// took.
pub fn wait_member_state(
    clients: &[&Client],
    member: &str,
    state: &str,
    within: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let seen: Vec<_> = clients
            .iter()
            .map(|c| member_states(c).get(member).cloned().unwrap_or_default())
            .collect();
        if seen.iter().all(|s| s == state) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("{member} is {seen:?}, not `{state}` everywhere after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Drops every UDP packet to or from `port` on this machine while alive: a node whose QUIC port
/// it is is cut off from its peers. Needs root and iptables (`.ci/run` installs iptables).
#[derive(Debug)]
pub struct Partition {
    port: u16,
}

impl Partition {
    pub fn cut(port: u16) -> Result<Self> {
        let p = Self { port };
        p.rules("-I")?;
        Ok(p)
    }

    fn rules(&self, op: &str) -> Result<()> {
        for dir in ["--dport", "--sport"] {
            let ok = Command::new("iptables")
                .args([
                    op,
                    "INPUT",
                    "-p",
                    "udp",
                    dir,
                    &self.port.to_string(),
                    "-j",
                    "DROP",
                ])
                .status()
                .context("run iptables (install it; root needed)")?
                .success();
            if !ok {
                bail!("iptables {op} refused the rule (root needed)");
            }
        }
        Ok(())
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = self.rules("-D");
    }
}
