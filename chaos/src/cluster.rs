//! The cluster under test: `swarm init` configs moved onto one 127.0.0.x address per node, real
//! `swarm node` processes, and the HTTP client the workload and the checks use.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Error;
use crate::scenario::{FIRST_HOST, Scenario};

/// The address of node `k` (1-based).
pub fn node_ip(k: u32) -> String {
    format!("127.0.0.{}", FIRST_HOST + k)
}

/// The `swarm` binary: `--swarm`, else `SWARM_BIN`, else the one next to this executable (both
/// are built into the same `target/<profile>/`).
pub fn find_swarm(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let candidate = match (explicit, std::env::var_os("SWARM_BIN")) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => {
            let exe = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
            let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            // `target/<profile>/swarm-chaos`, or `target/<profile>/deps/<test>` in tests.
            [dir.join("swarm"), dir.join("..").join("swarm")]
                .into_iter()
                .find(|p| p.exists())
                .unwrap_or_else(|| dir.join("swarm"))
        }
    };
    if !candidate.exists() {
        return Err(Error::Cluster(format!(
            "no swarm binary at {} (build it with `cargo build --release -p swarm-node`, or pass --swarm)",
            candidate.display()
        )));
    }
    Ok(candidate)
}

/// One node of the cluster: its config, its address, its process when running.
#[derive(Debug)]
pub struct Node {
    pub k: u32,
    pub name: String,
    pub config: PathBuf,
    pub url: String,
    /// The file the node's transport fault wrapper rereads (`SWARM_NET_FAULTS`).
    pub faults_file: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

impl Node {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// The whole cluster: configs written by `swarm init`, the processes, and an admin client.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub token: String,
    swarm: PathBuf,
    tls: Arc<rustls::ClientConfig>,
}

impl Cluster {
    /// `swarm init` for `scenario.nodes` nodes in `dir`, each moved to its own address, serving
    /// the tiny test model (written into `dir`) for chat completions.
    pub fn init(swarm: &Path, dir: &Path, scenario: &Scenario) -> Result<Self, Error> {
        // Absolute: a node resolves relative paths of its config (the model's) from its folder.
        let dir = &std::path::absolute(dir)
            .map_err(|e| Error::io(format!("resolve {}", dir.display()), e))?;
        let n = scenario.nodes;
        let mut args: Vec<String> = [
            "init",
            "--dir",
            &dir.display().to_string(),
            "--nodes",
            &n.to_string(),
            "--http-port",
            &scenario.http_port.to_string(),
            "--gossip-port",
            &scenario.gossip_port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for k in 1..=n {
            args.push("--gateway-name".into());
            args.push(node_ip(k));
        }
        let out = Command::new(swarm)
            .args(&args)
            .env("SWARM_LOG", "warn")
            .output()
            .map_err(|e| Error::io(format!("run {} init", swarm.display()), e))?;
        if !out.status.success() {
            return Err(Error::Cluster(format!(
                "swarm init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let tiny =
            swarm_gpu::testmodel::write_gguf(dir, &swarm_gpu::testmodel::TinySpec::default())
                .map_err(|e| Error::Cluster(format!("write the tiny model: {e}")))?;
        let mut nodes = Vec::new();
        for k in 1..=n {
            let folder = dir.join(format!("node-{k}"));
            let config = folder.join("node.toml");
            let text = std::fs::read_to_string(&config)
                .map_err(|e| Error::io(format!("read {}", config.display()), e))?;
            let text = rewrite_config(&text, k, n, scenario, &tiny);
            std::fs::write(&config, text)
                .map_err(|e| Error::io(format!("write {}", config.display()), e))?;
            let faults_file = folder.join("net-faults");
            std::fs::write(&faults_file, "")
                .map_err(|e| Error::io(format!("write {}", faults_file.display()), e))?;
            nodes.push(Node {
                k,
                name: format!("node-{k}"),
                url: format!("https://{}:{}", node_ip(k), scenario.http_port),
                config,
                faults_file,
                child: None,
                log: folder.join("node.log"),
                starts: 0,
            });
        }
        let token = std::fs::read_to_string(dir.join("admin.token"))
            .map_err(|e| Error::io("read admin.token", e))?
            .trim()
            .to_string();
        let tls = trust_ca(&dir.join("ca.pem"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            nodes,
            token,
            swarm: swarm.to_path_buf(),
            tls,
        })
    }

    /// A client of node `k` with the admin token.
    pub fn client(&self, k: u32) -> Client {
        Client::new(&self.node(k).url, &self.token, self.tls.clone())
    }

    pub fn node(&self, k: u32) -> &Node {
        &self.nodes[(k - 1) as usize]
    }

    fn node_mut(&mut self, k: u32) -> &mut Node {
        &mut self.nodes[(k - 1) as usize]
    }

    /// Start node `k`'s process (its log appends across restarts); returns once it answers
    /// `/health`.
    pub fn start(&mut self, k: u32) -> Result<(), Error> {
        let swarm = self.swarm.clone();
        let node = self.node_mut(k);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| Error::io(format!("open {}", node.log.display()), e))?;
        let child = Command::new(&swarm)
            .args(["node", "--config"])
            .arg(&node.config)
            .env("SWARM_LOG", "info")
            .env("SWARM_NET_FAULTS", &node.faults_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| Error::io(format!("spawn {}", swarm.display()), e))?;
        crate::nemesis::track_pid(child.id());
        node.child = Some(child);
        node.starts += 1;
        self.wait_healthy(k, Duration::from_secs(60))
    }

    fn wait_healthy(&mut self, k: u32, within: Duration) -> Result<(), Error> {
        let client = self.client(k).with_timeout(Duration::from_secs(2));
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, _)) = client.get("/health") {
                return Ok(());
            }
            let node = self.node_mut(k);
            if let Some(child) = node.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                node.child = None;
                return Err(Error::Cluster(format!(
                    "{} exited while starting ({status}); see {}",
                    node.name,
                    node.log.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Cluster(format!(
                    "{} did not answer /health within {within:?}",
                    node.name
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL node `k` and reap it.
    pub fn kill(&mut self, k: u32) -> Result<(), Error> {
        let node = self.node_mut(k);
        if let Some(mut child) = node.child.take() {
            crate::nemesis::untrack_pid(child.id());
            child
                .kill()
                .map_err(|e| Error::io(format!("kill {}", node.name), e))?;
            let _ = child.wait();
        }
        Ok(())
    }

    /// SIGTERM (a graceful leave) and wait for the exit.
    pub fn leave(&mut self, k: u32) -> Result<(), Error> {
        let node = self.node_mut(k);
        let Some(mut child) = node.child.take() else {
            return Ok(());
        };
        signal(child.id(), "TERM")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        crate::nemesis::untrack_pid(child.id());
        Ok(())
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`).
    pub fn pause(&mut self, k: u32, stop: bool) -> Result<(), Error> {
        if let Some(pid) = self.node(k).pid() {
            signal(pid, if stop { "STOP" } else { "CONT" })?;
        }
        Ok(())
    }

    pub fn is_running(&self, k: u32) -> bool {
        self.node(k).child.is_some()
    }

    /// How many times node `k` has been started.
    pub fn starts(&self, k: u32) -> u32 {
        self.node(k).starts
    }

    /// Stop every node (SIGKILL; the run is over).
    pub fn stop_all(&mut self) {
        for k in 1..=self.nodes.len() as u32 {
            let _ = self.pause(k, false);
            let _ = self.kill(k);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn signal(pid: u32, sig: &str) -> Result<(), Error> {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .map_err(|e| Error::io("run kill", e))?
        .success();
    if ok {
        Ok(())
    } else {
        Err(Error::Cluster(format!("kill -{sig} {pid} failed")))
    }
}

/// Node `k`'s config: its own address for gossip and the gateway, every other node as a seed,
/// the tiny model served, tasks fast enough for a short run.
fn rewrite_config(text: &str, k: u32, n: u32, s: &Scenario, tiny: &Path) -> String {
    let mut out = String::new();
    let seeds: Vec<String> = (1..=n)
        .filter(|&j| j != k)
        .map(|j| format!("\"{}:{}\"", node_ip(j), s.gossip_port))
        .collect();
    let mut section = String::new();
    for line in text.lines() {
        if line.starts_with('[') {
            section = line.to_string();
        }
        let line = if section == "[gossip]" && line.starts_with("bind = ") {
            format!("bind = \"{}:{}\"", node_ip(k), s.gossip_port)
        } else if section == "[gossip]" && line.starts_with("seeds = ") {
            format!("seeds = [{}]", seeds.join(", "))
        } else if section == "[gateway]" && line.starts_with("bind = ") {
            format!("bind = \"{}:{}\"", node_ip(k), s.http_port)
        } else if section == "[inference]" && line.starts_with("models = ") {
            format!(
                "models = [{{ name = \"tiny\", path = \"{}\" }}]",
                tiny.display()
            )
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    // Each client of a run is one subject; a short run's tasks must not wait minutes.
    out.push_str("\n[tasks]\nretry_delay = \"200ms\"\ndefault_deadline = \"5m\"\n");
    out
}

/// A rustls client config trusting only the cluster CA.
fn trust_ca(ca_pem: &Path) -> Result<Arc<rustls::ClientConfig>, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |e: String| Error::Cluster(format!("the cluster CA {}: {e}", ca_pem.display()));
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_pem).map_err(|e| bad(e.to_string()))?;
    for cert in certs {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// What one HTTP call came to: a status and a JSON body, or no answer at all.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16, Value),
    /// No HTTP answer: refused, reset, timed out.
    NoAnswer(String),
}

impl Reply {
    pub fn status(&self) -> Option<u16> {
        match self {
            Reply::Status(s, _) => Some(*s),
            Reply::NoAnswer(_) => None,
        }
    }

    pub fn ok(&self) -> bool {
        matches!(self, Reply::Status(200..=299, _))
    }

    pub fn body(&self) -> &Value {
        match self {
            Reply::Status(_, v) => v,
            Reply::NoAnswer(_) => &Value::Null,
        }
    }

    /// The error code of a refusal, `no_answer` without an answer, `""` on success.
    pub fn code(&self) -> String {
        match self {
            Reply::Status(200..=299, _) => String::new(),
            Reply::Status(s, v) => v["error"]["code"]
                .as_str()
                .or_else(|| v["code"].as_str())
                .map_or_else(|| format!("http_{s}"), str::to_string),
            Reply::NoAnswer(_) => "no_answer".to_string(),
        }
    }
}

/// A blocking HTTPS client with a bearer token.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: String,
    tls: Arc<rustls::ClientConfig>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: &str, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            base: base.to_string(),
            token: token.to_string(),
            agent: agent(&tls, Duration::from_secs(10)),
            tls,
        }
    }

    /// The same client with another overall timeout per request.
    pub fn with_timeout(&self, t: Duration) -> Self {
        Self {
            agent: agent(&self.tls, t),
            ..self.clone()
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token));
        let res = match body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        };
        match res {
            Ok(r) | Err(ureq::Error::Status(_, r)) => {
                let status = r.status();
                let text = r.into_string().unwrap_or_default();
                Reply::Status(status, serde_json::from_str(&text).unwrap_or(Value::Null))
            }
            Err(e) => Reply::NoAnswer(e.to_string()),
        }
    }

    /// GET with the status and body, or the transport error as text.
    pub fn get(&self, path: &str) -> Result<(u16, Value), String> {
        match self.call("GET", path, None) {
            Reply::Status(s, v) => Ok((s, v)),
            Reply::NoAnswer(e) => Err(e),
        }
    }
}

fn agent(tls: &Arc<rustls::ClientConfig>, timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .tls_config(tls.clone())
        .timeout(timeout)
        .timeout_connect(Duration::from_secs(2))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_move_to_their_own_address() {
        let s = Scenario::parse("name = \"t\"\nnodes = 3\nduration = \"10s\"\n").expect("parse");
        let text = "[gossip]\nbind = \"127.0.0.1:7947\"\nseeds = [\"127.0.0.1:7946\"]\n\n\
                    [gateway]\nbind = \"127.0.0.1:8081\"\n\n[inference]\nmodels = []\n";
        let out = rewrite_config(text, 2, 3, &s, Path::new("/m/tiny.gguf"));
        assert!(out.contains("bind = \"127.0.0.12:18481\""), "{out}");
        assert!(out.contains("seeds = [\"127.0.0.11:18481\", \"127.0.0.13:18481\"]"));
        assert!(out.contains("bind = \"127.0.0.12:18480\""));
        assert!(out.contains("path = \"/m/tiny.gguf\""));
    }
}
