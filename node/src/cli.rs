//! The `swarm` command line: the node's own commands here, the client commands of tasks and
//! agents in `tasks` (which prints through `print` and follows a task with `follow`).

mod follow;
mod print;
mod tasks;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use swarm_config::{HumanDuration, NodeConfig};

use crate::init::{InitOptions, first_node_config, init_cluster, mint};
use crate::node::{Node, load_signing_key, verify_audit};
use crate::policy::Policy;
use tasks::{ClientArgs, TaskCommand};

#[derive(Debug, Parser)]
#[command(
    name = "swarm",
    version,
    about = "A secure cluster for LLM agents, in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Quick start: create DIR if needed, start one node, print its URL and an admin token.
    Up {
        #[arg(long, default_value = "swarm-data")]
        dir: PathBuf,
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        #[arg(long, default_value_t = 7946)]
        gossip_port: u16,
    },
    /// Write a cluster: CA, one folder per node, JWT signing key, admin token.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        nodes: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        #[arg(long, default_value_t = 7946)]
        gossip_port: u16,
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// A model every node serves (repeatable; catalog names: `swarm model list`).
        #[arg(long = "model")]
        models: Vec<String>,
        /// Another name (DNS name or IP address) clients use to reach the gateways; the HTTPS
        /// certificates cover it besides --host, localhost and 127.0.0.1 (repeatable).
        #[arg(long = "gateway-name")]
        gateway_names: Vec<String>,
    },
    /// Run one node from its config (SIGTERM or Ctrl-C: leave the cluster gracefully and stop;
    /// SIGHUP: reread the config and announce to new seeds).
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show every cluster member with its state and metadata, as one node's gateway sees them.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tasks: submit (and follow), status, review, list, kill.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// The agents: where each runs, what it does now and how it has done.
    Agents {
        #[command(flatten)]
        client: ClientArgs,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mint a JWT with the cluster's signing key.
    Token {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        subject: String,
        #[arg(long, default_value = "user")]
        role: String,
        #[arg(long, default_value = "24h")]
        ttl: HumanDuration,
    },
    /// Models: `pull NAME` fetches one from the built-in catalog (SHA-256 checked), `list`.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Download a catalog model into DIR/models (checks its SHA-256; shows progress).
    Pull {
        name: String,
        #[arg(long, default_value = "swarm-data")]
        dir: PathBuf,
    },
    /// The catalog, and which models are in DIR/models.
    List {
        #[arg(long, default_value = "swarm-data")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Walk the hash chain of a (stopped) node's audit log; exit 1 if it is broken.
    Verify {
        #[arg(long)]
        config: PathBuf,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SWARM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Init {
            dir,
            nodes,
            host,
            gossip_port,
            http_port,
            models,
            gateway_names,
        } => {
            let configs = init_cluster(&InitOptions {
                dir: dir.clone(),
                nodes,
                host,
                gossip_port,
                http_port,
                models,
                gateway_names,
            })?;
            println!("cluster written to {}", dir.display());
            for c in configs {
                println!("  swarm node --config {}", c.display());
            }
            println!("admin token: {}", dir.join("admin.token").display());
            println!(
                "gateways speak HTTPS; clients trust {} (curl --cacert, SWARM_CA, SSL_CERT_FILE)",
                dir.join("ca.pem").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Up {
            dir,
            http_port,
            gossip_port,
        } => {
            let config = match first_node_config(&dir) {
                Some(c) => c,
                None => {
                    init_cluster(&InitOptions {
                        dir: dir.clone(),
                        nodes: 1,
                        host: IpAddr::from([127, 0, 0, 1]),
                        gossip_port,
                        http_port,
                        models: vec![swarm_gpu::catalog::DEFAULT_MODEL.to_string()],
                        gateway_names: Vec::new(),
                    })?;
                    println!("created {}", dir.display());
                    dir.join("node-1").join("node.toml")
                }
            };
            let cfg = NodeConfig::load(&config)?;
            // First run: fetch the catalog models the node serves (it starts without them, and
            // says so in /health, if the download fails).
            let models_dir = cfg.resolve(&cfg.inference.model_dir);
            for m in cfg.inference.models.iter().filter(|m| m.path.is_none()) {
                if let Some(entry) = swarm_gpu::catalog::find(&m.name)
                    && swarm_gpu::catalog::installed(&entry, &models_dir).is_none()
                    && let Err(e) = pull_model(&entry, &models_dir)
                {
                    eprintln!("warning: {e:#}; the node starts without {}", entry.name);
                }
            }
            let key = load_signing_key(&cfg)?;
            let token = mint(
                &key,
                "admin",
                "admin",
                86_400,
                &cfg.auth.issuer,
                &cfg.auth.audience,
            )?;
            serve(&config, cfg, Some(token))
        }
        Command::Node { config } => serve(&config, NodeConfig::load(&config)?, None),
        Command::Status { client, json } => status(tasks::Client::new(client)?, json),
        Command::Task { command } => tasks::run_task(command),
        Command::Agents { client, json } => tasks::run_agents(client, json),
        Command::Token {
            dir,
            subject,
            role,
            ttl,
        } => {
            let cfg = load_cluster_config(&dir)?;
            if !Policy::new(&cfg.roles).has_role(&role) {
                bail!("unknown role `{role}` (admin, user, viewer, auditor, or one from [roles])");
            }
            if subject.is_empty() || subject.len() > 128 {
                bail!("--subject must be 1 to 128 characters");
            }
            let ttl_s = ttl.0.as_secs();
            if ttl_s == 0 || ttl_s > cfg.auth.max_token_ttl.0.as_secs() {
                bail!("--ttl must be between 1s and {}", cfg.auth.max_token_ttl);
            }
            let key = load_signing_key(&cfg)?;
            println!(
                "{}",
                mint(
                    &key,
                    &subject,
                    &role,
                    ttl_s,
                    &cfg.auth.issuer,
                    &cfg.auth.audience
                )?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Model {
            command: ModelCommand::Pull { name, dir },
        } => {
            let Some(entry) = swarm_gpu::catalog::find(&name) else {
                bail!("{}", swarm_gpu::InferError::UnknownModel(name));
            };
            pull_model(&entry, &dir.join("models"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Model {
            command: ModelCommand::List { dir },
        } => {
            let models = dir.join("models");
            for e in swarm_gpu::catalog::catalog() {
                let state = match swarm_gpu::catalog::installed(&e, &models) {
                    Some(p) => format!("installed at {}", p.display()),
                    None => "not pulled".into(),
                };
                println!(
                    "{:<24} {:>4} MiB  {state}\n    {}",
                    e.name,
                    e.file_size >> 20,
                    e.description
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Verify { config },
        } => {
            let cfg = NodeConfig::load(&config)?;
            let report = verify_audit(&cfg).context(
                "cannot open the store (if the node is running, use GET /v1/audit/verify)",
            )?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if report.ok {
                eprintln!("audit log intact: {} entries", report.entries);
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "audit log BROKEN at entry {}: {}",
                    report.first_broken.unwrap_or(0),
                    report.reason.as_deref().unwrap_or("unknown")
                );
                Ok(ExitCode::from(1))
            }
        }
    }
}

/// The config `swarm token` reads: the first node's (issuer, audience, roles, key file).
fn load_cluster_config(dir: &Path) -> Result<NodeConfig> {
    let path = first_node_config(dir).with_context(|| {
        format!(
            "{} holds no cluster (run `swarm init --dir ...`)",
            dir.display()
        )
    })?;
    Ok(NodeConfig::load(&path)?)
}

/// Download a catalog model with progress on stderr.
fn pull_model(entry: &swarm_gpu::catalog::CatalogEntry, models: &Path) -> Result<PathBuf> {
    let mut last = u64::MAX;
    let path = swarm_gpu::catalog::pull(entry, models, &mut |_, done, total| {
        if let Some(t) = total.filter(|t| *t > 0) {
            let pct = done * 100 / t;
            if pct / 5 != last {
                last = pct / 5;
                eprint!("\r{}: {pct:>3}% of {} MiB", entry.name, t >> 20);
            }
        }
    })
    .with_context(|| format!("pull {}", entry.name))?;
    eprintln!();
    println!(
        "{} ready: {} (SHA-256 {})",
        entry.name,
        path.display(),
        entry.file_sha256
    );
    Ok(path)
}

fn serve(path: &Path, cfg: NodeConfig, admin_token: Option<String>) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async move {
        let https = cfg.gateway.tls.is_some();
        let ca = cfg.resolve(&cfg.tls.ca_cert);
        let handle = Node::start(cfg).await?;
        let url = format!(
            "{}://{}",
            if https { "https" } else { "http" },
            handle.http_addr
        );
        let cacert = if https {
            format!("--cacert {} ", ca.display())
        } else {
            String::new()
        };
        println!("swarm node {} is up", handle.name);
        println!("  gateway: {url}");
        if https {
            println!("  HTTPS certificate from the cluster CA: {}", ca.display());
        }
        println!("  cluster (QUIC): {}", handle.gossip_addr);
        if let Some(t) = admin_token {
            println!("  admin token (24h): {t}");
            println!("  try: curl {cacert}-H \"Authorization: Bearer $TOKEN\" {url}/v1/me");
        }
        let mut signals = Signals::new();
        loop {
            tokio::select! {
                sig = signals.next() => match sig {
                    Sig::Reload => match NodeConfig::load(path) {
                        Ok(cfg) => {
                            if let Err(e) = handle.reload(&cfg).await {
                                tracing::warn!(error = %e, "reload failed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "config not reloaded"),
                    },
                    Sig::Stop => {
                        tracing::info!("leaving the cluster and stopping");
                        handle.leave_and_shutdown().await?;
                        break;
                    }
                },
                _ = handle.stop_requested() => {
                    tracing::info!("left the cluster; stopping");
                    handle.shutdown().await?;
                    break;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

enum Sig {
    Stop,
    Reload,
}

/// SIGTERM / Ctrl-C (stop) and SIGHUP (reload).
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let open = |k: SignalKind, name: &str| match signal(k) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for {name}");
                    None
                }
            };
            Self {
                term: open(SignalKind::terminate(), "SIGTERM"),
                hup: open(SignalKind::hangup(), "SIGHUP"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn next(&mut self) -> Sig {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                _ = recv(&mut self.term) => Sig::Stop,
                _ = recv(&mut self.hup) => Sig::Reload,
                _ = tokio::signal::ctrl_c() => Sig::Stop,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Sig::Stop
        }
    }
}

/// A client for the gateways: trusts `ca` (PEM, the cluster CA) when given, else the
/// system's roots.
pub fn gateway_agent(ca: Option<&Path>) -> Result<ureq::Agent> {
    agent_with(
        ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(10)),
        ca,
    )
}

/// An agent from `builder` (its timeouts) that trusts `ca` when given.
fn agent_with(builder: ureq::AgentBuilder, ca: Option<&Path>) -> Result<ureq::Agent> {
    let Some(ca) = ca else {
        return Ok(builder.build());
    };
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("read the CA {}", ca.display()))?
    {
        roots
            .add(cert.with_context(|| format!("parse the CA {}", ca.display()))?)
            .with_context(|| format!("use the CA {}", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate", ca.display());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(builder.tls_config(std::sync::Arc::new(tls)).build())
}

/// `swarm status`: the member table from a gateway.
fn status(client: tasks::Client, json: bool) -> Result<ExitCode> {
    let body = client.get("/v1/cluster/members")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} sees {} alive member(s){}",
        body["node"].as_str().unwrap_or("?"),
        body["alive"],
        if body["joined"].as_bool() == Some(true) {
            ""
        } else {
            " (not joined to any peer)"
        }
    );
    println!(
        "{:<20} {:<8} {:<22} {:<22} {:<6} {:<8} DEVICES",
        "NAME", "STATE", "CLUSTER ADDR", "GATEWAY", "LOAD", "VERSION"
    );
    for m in body["members"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let meta = &m["meta"];
        let devices: Vec<String> = meta["devices"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|d| {
                        format!(
                            "{} {}",
                            d["kind"].as_str().unwrap_or("?"),
                            d["name"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<20} {:<8} {:<22} {:<22} {:<6} {:<8} {}",
            m["name"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            m["addr"].as_str().unwrap_or("?"),
            meta["gateway"].as_str().unwrap_or("-"),
            meta["load"]
                .as_u64()
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            meta["version"].as_str().unwrap_or("-"),
            devices.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
