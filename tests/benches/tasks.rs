//! Task dispatch with real processes on loopback (the task service's issue), in one run, on the
//! `bench-noop` workflow (one stage that runs no model, so no model is needed):
//!
//! 1. **Dispatch** on one node and across three: `TASKS_LIGHT_N` tasks from one client (latency
//!    with no queue), then `TASKS_N` tasks from `TASKS_CLIENTS` client threads (throughput, and
//!    latency with the queue that builds), unique objectives, round-robin over the gateways. Per
//!    task the accept latency (the POST's round trip) and the dispatch latency (submit → the
//!    `task.completed` event, read from `/v1/events` on every node: polling would add its own
//!    interval). The dispatcher publishes `task.completed` when it decides it, before the
//!    record saying so is durable.
//! 2. **Deduplication**: `TASKS_DEDUP_N` submissions over three nodes, `TASKS_DUP_PCT` % of them
//!    repeating a recent objective. Counts tasks executed, duplicates executed (two tasks of one
//!    objective active at once: the second should have been answered `deduplicated`) and lost
//!    tasks (accepted, never completed).
//! 3. **Failover**: three nodes with `[tasks] concurrency = 1` and a `slow-noop` workflow of
//!    `TASKS_FAILOVER_STAGES` no-model stages, so submitted tasks queue on their owners;
//!    `TASKS_FAILOVER_N` tasks, then SIGKILL of the node that owns most of the unfinished ones.
//!    Times, per orphaned task, from the kill to its `task.adopted` event and to its completion.
//!
//! The gateways' per-source rate limits are raised (one client address sends everything) and the
//! orchestration bulkhead is `TASKS_BULKHEAD` permits (the preset's 10 would answer 429 to most
//! of 16 clients on one node); the task concurrency stays the preset's 10 unless
//! `TASKS_CONCURRENCY` says otherwise. A 429 is retried and counted.
//!
//! Other knobs: `TASKS_TOML` (lines added to every node's `[tasks]`, e.g.
//! `retry_delay = "10ms"`), `TASKS_SEED` (the duplicate pattern and the objectives), `TASKS_PHASES`
//! (`dispatch,dedup,failover`), `TASKS_KEEP=1` (keep the clusters' folders: node.toml and
//! node.log of each node), `SWARM_BIN` (the binary; else `target/release/swarm`). Defaults take
//! about a minute on 2 cores.
//!
//! `cargo build --release -p swarm-node && cargo bench -p swarm-tests --bench tasks`

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use swarm_tests::{Client, NodeProc, admin_token, init_cluster, start_joined, trust_ca};

/// Longest wait for submitted tasks to finish once every submission is answered.
const DRAIN: Duration = Duration::from_secs(60);
/// Longest a client retries one submission refused with 429.
const RETRY_FOR: Duration = Duration::from_secs(30);
/// How long agent placement must hold still before a phase starts.
const SETTLE: Duration = Duration::from_secs(1);
/// Event kinds after which nothing more happens to a task.
const TERMINAL: [&str; 4] = [
    "task.completed",
    "task.failed",
    "task.cancelled",
    "task.dead_letter",
];

/// Sizes and knobs, each overridable by its environment variable.
#[derive(Debug, Clone)]
struct Sizes {
    tasks: usize,
    clients: usize,
    dedup_tasks: usize,
    dup_pct: u64,
    failover_tasks: usize,
    failover_stages: usize,
    light_tasks: usize,
    bulkhead: u32,
    concurrency: u32,
    seed: u64,
    /// `TASKS_PHASES`: which of `dispatch`, `dedup`, `failover` run (all by default).
    phases: String,
    /// `TASKS_TOML`: more lines for every node's `[tasks]` (`\n` between them).
    tasks_toml: String,
    /// `TASKS_KEEP=1`: leave the clusters' folders (configs, node logs) behind.
    keep: bool,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Sizes {
    fn from_env() -> Self {
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self {
            tasks: env_or("TASKS_N", 2000),
            light_tasks: env_or("TASKS_LIGHT_N", 300),
            clients: env_or("TASKS_CLIENTS", 16usize).max(1),
            dedup_tasks: env_or("TASKS_DEDUP_N", 10_000),
            dup_pct: env_or("TASKS_DUP_PCT", 20u64).min(100),
            failover_tasks: env_or("TASKS_FAILOVER_N", 300),
            failover_stages: env_or("TASKS_FAILOVER_STAGES", 20usize).max(1),
            bulkhead: env_or("TASKS_BULKHEAD", 64),
            concurrency: env_or("TASKS_CONCURRENCY", 10),
            seed: env_or("TASKS_SEED", clock | 1),
            phases: env_or("TASKS_PHASES", "dispatch,dedup,failover".to_string()),
            keep: env_or("TASKS_KEEP", 0u8) == 1,
            tasks_toml: env_or("TASKS_TOML", String::new()),
        }
    }

    fn runs(&self, phase: &str) -> bool {
        self.phases.split(',').any(|p| p.trim() == phase)
    }
}

// ---- statistics ----

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// CPU seconds (user + system) process `pid` has used, from `/proc` (Linux; 0 elsewhere).
/// On a small machine the client's share tells how much of the figures is the nodes'.
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // After the command name in parentheses: state is field 3, utime 14 and stime 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 are at 11 and 12 counting from the state; clock ticks are 1/100 s.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of the nodes of `c` and of this process.
fn cpu_split(c: &Cluster) -> (f64, f64) {
    let nodes = c
        .nodes
        .iter()
        .map(|n| cpu_secs(&n.child.id().to_string()))
        .sum();
    (nodes, cpu_secs("self"))
}

/// xorshift64*: the duplicate pattern is reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---- the cluster ----

/// Nodes started from `swarm init` configs with the bench's settings appended.
struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<NodeProc>,
    clients: Vec<Client>,
    token: String,
}

/// The bench's additions to every node.toml: no per-source rate limit worth the name (every
/// client shares 127.0.0.1) and the task section.
fn node_extra(tasks_section: &str) -> String {
    format!(
        "\n[limits]\nrequests_per_second_per_source = 1000000\nburst_per_source = 1000000\n\n{tasks_section}"
    )
}

/// `[tasks]` with `concurrency`, the lines of `TASKS_TOML` (`retry_delay = "10ms"`, ...), and
/// `extra` (workflows) after it.
fn tasks_section(z: &Sizes, concurrency: u32, extra: &str) -> String {
    let more = z.tasks_toml.replace("\\n", "\n");
    format!("[tasks]\nconcurrency = {concurrency}\n{more}\n{extra}")
}

/// A workflow of `stages` no-model stages: a task that takes as long as that many durable
/// stage writes, so a queue builds behind `concurrency = 1`.
fn slow_workflow(stages: usize) -> String {
    let list: Vec<String> = (0..stages)
        .map(|i| {
            format!("{{ name = \"s{i}\", kind = \"bench_noop\", prompt = \"\", max_tokens = 0 }}")
        })
        .collect();
    format!(
        "\n[tasks.workflows.slow-noop]\ndescription = \"bench: no-model stages in a row\"\nstages = [\n  {}\n]\n",
        list.join(",\n  ")
    )
}

/// Agent → home node as the node behind `c` sees it; empty when an agent has none or the node
/// does not answer.
fn placement(c: &Client) -> BTreeMap<String, String> {
    let Ok((200, v)) = c.get("/v1/agents") else {
        return BTreeMap::new();
    };
    let agents = v["agents"].as_array().cloned().unwrap_or_default();
    let placed: BTreeMap<String, String> = agents
        .iter()
        .filter_map(|a| Some((a["id"].as_str()?.into(), a["node"].as_str()?.into())))
        .collect();
    if placed.len() == agents.len() {
        placed
    } else {
        BTreeMap::new()
    }
}

fn append_config(config: &Path, extra: &str) -> Result<()> {
    let text = std::fs::read_to_string(config)?;
    if text.contains("\n[limits]") || text.contains("\n[tasks]") {
        bail!(
            "{} already has [limits] or [tasks]: update the bench",
            config.display()
        );
    }
    std::fs::write(config, format!("{text}{extra}"))?;
    Ok(())
}

/// Sets `performance.concurrency_limits.orchestration` (the bulkhead of the task routes) in
/// the cluster's swarm file.
fn set_bulkhead(dir: &Path, permits: u32) -> Result<()> {
    let path = dir.join("swarm-config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let slot = v
        .pointer_mut("/performance/concurrency_limits/orchestration")
        .context("swarm-config.json without performance.concurrency_limits.orchestration")?;
    *slot = json!(permits);
    std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

impl Cluster {
    fn start(nodes: u16, z: &Sizes, tasks_section: &str) -> Result<Self> {
        let mut dir = tempfile::tempdir()?;
        dir.disable_cleanup(z.keep);
        if z.keep {
            println!("  cluster of {nodes} in {}", dir.path().display());
        }
        let configs = init_cluster(dir.path(), nodes)?;
        set_bulkhead(dir.path(), z.bulkhead)?;
        let extra = node_extra(tasks_section);
        for c in &configs {
            append_config(c, &extra)?;
        }
        let token = admin_token(dir.path())?;
        let (nodes, clients) = start_joined(&configs, &token)?;
        let c = Self {
            _dir: dir,
            nodes,
            clients,
            token,
        };
        c.wait_placed()?;
        Ok(c)
    }

    /// Waits until every node places every agent on the same live node, and that has held for
    /// [`SETTLE`]: stages sent while agents move fail (`agent_busy`) and wait out the retry
    /// delay, which would measure the cluster's start instead of the dispatcher.
    fn wait_placed(&self) -> Result<()> {
        let start = Instant::now();
        let mut stable_since: Option<(Instant, Vec<BTreeMap<String, String>>)> = None;
        loop {
            let views: Vec<BTreeMap<String, String>> = self.clients.iter().map(placement).collect();
            let agreed = !views[0].is_empty() && views.iter().all(|v| *v == views[0]);
            stable_since = match stable_since {
                Some((t, prev)) if agreed && prev == views => Some((t, prev)),
                _ if agreed => Some((Instant::now(), views)),
                _ => None,
            };
            if let Some((t, _)) = &stable_since
                && t.elapsed() >= SETTLE
            {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("agents not placed alike on every node in 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| node_name(n) == name)
    }

    fn log(&self, i: usize) -> PathBuf {
        self.nodes[i].config.with_extension("log")
    }
}

// ---- the event streams ----

/// What the event streams saw of one task: the first arrival of each kind that matters.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// The first terminal event: its kind, when it arrived, and the node's clock then.
    end: Option<(String, Instant, u64)>,
    adopted: Option<Instant>,
    /// Where (node, that node's event number) `task.accepted` and the terminal event were
    /// published, as the node's own stream numbers them: a dispatcher publishes its decisions
    /// in order, so these order a task's acceptance against another's end on that node.
    accepted_at: Option<(String, u64)>,
    ended_at: Option<(String, u64)>,
}

/// Every node's `/v1/events`, read by one thread per node into one map.
struct Watch {
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    stop: Arc<AtomicBool>,
    /// Streams ended by the node (a `dropped` event: the reader fell behind) and resumed.
    dropped: Arc<AtomicU64>,
    /// Events of each kind, over every stream (relayed ones count on each node).
    kinds: Arc<Mutex<BTreeMap<String, (u64, String)>>>,
}

impl Watch {
    /// Subscribes on every node; returns once every stream is open.
    fn start(c: &Cluster) -> Result<Self> {
        let w = Self {
            seen: Arc::default(),
            stop: Arc::default(),
            dropped: Arc::default(),
            kinds: Arc::default(),
        };
        let (ready_tx, ready_rx) = mpsc::sync_channel(c.nodes.len());
        for n in &c.nodes {
            let stream = Stream {
                url: format!("{}/v1/events", n.url),
                token: c.token.clone(),
                agent: sse_agent(n.ca.as_deref())?,
                node: node_name(n),
                seen: w.seen.clone(),
                stop: w.stop.clone(),
                dropped: w.dropped.clone(),
                kinds: w.kinds.clone(),
            };
            let ready = ready_tx.clone();
            std::thread::spawn(move || stream.run(ready));
        }
        for _ in &c.nodes {
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .context("an event stream did not open in 10 s")?;
        }
        Ok(w)
    }

    /// Event kinds other than the ordinary life of a task, with their counts (and, where
    /// `samples`, the first such event).
    fn unusual(&self, samples: bool) -> BTreeMap<String, (u64, String)> {
        let usual = [
            "task.accepted",
            "task.started",
            "stage.started",
            "stage.completed",
            "task.completed",
        ];
        self.kinds
            .lock()
            .map(|k| {
                k.iter()
                    .filter(|(kind, _)| !usual.contains(&kind.as_str()))
                    .map(|(kind, (n, e))| {
                        let sample = if samples { e.clone() } else { String::new() };
                        (kind.clone(), (*n, sample))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn snapshot(&self) -> HashMap<String, Seen> {
        self.seen.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn end_of(&self, id: &str) -> Option<(String, Instant, u64)> {
        self.seen
            .lock()
            .ok()
            .and_then(|m| m.get(id).and_then(|s| s.end.clone()))
    }

    /// Waits until every id in `ids` has ended (or `within` passes); returns those that did not.
    fn wait_ended(&self, ids: &HashSet<String>, within: Duration) -> Vec<String> {
        let start = Instant::now();
        loop {
            let open: Vec<String> = {
                let Ok(m) = self.seen.lock() else {
                    return ids.iter().cloned().collect();
                };
                ids.iter()
                    .filter(|id| m.get(*id).is_none_or(|s| s.end.is_none()))
                    .cloned()
                    .collect()
            };
            if open.is_empty() || start.elapsed() > within {
                return open;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The readers notice at their next event, or when their node goes away.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `node-k`, from the folder `swarm init` wrote its config into.
fn node_name(n: &NodeProc) -> String {
    n.config
        .parent()
        .and_then(Path::file_name)
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// An agent without an overall timeout (a stream lasts as long as the phase) that trusts `ca`.
fn sse_agent(ca: Option<&Path>) -> Result<ureq::Agent> {
    let mut b = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(2))
        .timeout_read(Duration::from_secs(60));
    if let Some(ca) = ca {
        b = b.tls_config(trust_ca(ca)?);
    }
    Ok(b.build())
}

/// One node's event stream.
struct Stream {
    url: String,
    token: String,
    agent: ureq::Agent,
    /// The node's name: events it publishes itself carry it (relayed ones another).
    node: String,
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    kinds: Arc<Mutex<BTreeMap<String, (u64, String)>>>,
}

impl Stream {
    /// Reads until stopped, resuming after its last id when the node drops it; says `ready`
    /// once subscribed the first time.
    fn run(self, ready: mpsc::SyncSender<()>) {
        let mut last: Option<u64> = None;
        let mut ready = Some(ready);
        while !self.stop.load(Ordering::Relaxed) {
            let mut req = self
                .agent
                .get(&self.url)
                .set("Authorization", &format!("Bearer {}", self.token))
                .set("Accept", "text/event-stream");
            if let Some(id) = last {
                req = req.set("Last-Event-ID", &id.to_string());
            }
            let Ok(resp) = req.call() else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
            if self.read(resp, &mut last) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reads one response to its end; true when it ended with `dropped`.
    fn read(&self, resp: ureq::Response, last: &mut Option<u64>) -> bool {
        let mut kind = String::new();
        for line in BufReader::new(resp.into_reader()).lines() {
            let Ok(line) = line else { return false };
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            if line.is_empty() {
                kind.clear();
            } else if let Some(k) = line.strip_prefix("event:") {
                kind = k.trim().to_string();
            } else if let Some(id) = line.strip_prefix("id:") {
                *last = id.trim().parse().ok().or(*last);
            } else if let Some(data) = line.strip_prefix("data:") {
                if kind == "dropped" {
                    return true;
                }
                self.count(&kind, data.trim());
                self.record(&kind, data.trim());
            }
        }
        false
    }

    /// Counts the event under its kind; a failed stage under its code and agent too, and only
    /// on the stream of the node that published it (relayed copies would count it thrice).
    fn count(&self, kind: &str, data: &str) {
        let key = if kind == "stage.failed" {
            let Ok(e) = serde_json::from_str::<Value>(data) else {
                return;
            };
            if e["node"].as_str() != Some(self.node.as_str()) {
                return;
            }
            format!(
                "stage.failed {} {}",
                e["data"]["code"].as_str().unwrap_or("?"),
                e["agent"].as_str().unwrap_or("?")
            )
        } else {
            kind.to_string()
        };
        if let Ok(mut k) = self.kinds.lock() {
            k.entry(key).or_insert_with(|| (0, data.to_string())).0 += 1;
        }
    }

    fn record(&self, kind: &str, data: &str) {
        let terminal = TERMINAL.contains(&kind);
        if !terminal && kind != "task.adopted" && kind != "task.accepted" {
            return;
        }
        let at = Instant::now();
        let Ok(e) = serde_json::from_str::<Value>(data) else {
            return;
        };
        let Some(task) = e["task"].as_str() else {
            return;
        };
        let own = (e["node"].as_str() == Some(self.node.as_str()))
            .then(|| e["id"].as_u64().map(|id| (self.node.clone(), id)))
            .flatten();
        let Ok(mut m) = self.seen.lock() else { return };
        let s = m.entry(task.to_string()).or_default();
        if terminal {
            if s.end.is_none() {
                s.end = Some((kind.to_string(), at, e["ts_ms"].as_u64().unwrap_or(0)));
            }
            s.ended_at = s.ended_at.take().or(own);
        } else if kind == "task.adopted" {
            s.adopted = s.adopted.or(Some(at));
        } else {
            s.accepted_at = s.accepted_at.take().or(own);
        }
    }
}

// ---- submissions ----

/// One submission and its answer.
#[derive(Debug, Clone)]
struct Sub {
    objective: String,
    sent: Instant,
    /// The accepted POST's round trip (after any 429s).
    accept: Duration,
    /// 202 answer fields; `None` when the submission was not accepted.
    task: Option<String>,
    deduplicated: bool,
    owner: String,
    refusals: u32,
    error: Option<String>,
}

/// POSTs `objective` until it is not refused with 429 (at most [`RETRY_FOR`]).
fn submit(c: &Client, objective: &str, workflow: &str) -> Sub {
    let body = json!({"objective": objective, "workflow": workflow});
    let sent = Instant::now();
    let mut sub = Sub {
        objective: objective.to_string(),
        sent,
        accept: Duration::ZERO,
        task: None,
        deduplicated: false,
        owner: String::new(),
        refusals: 0,
        error: None,
    };
    loop {
        let t0 = Instant::now();
        let answer = c.post_json("/v1/tasks", &body);
        sub.accept = t0.elapsed();
        match answer {
            Ok((202, v)) => {
                sub.task = v["task_id"].as_str().map(String::from);
                sub.deduplicated = v["deduplicated"].as_bool().unwrap_or(false);
                sub.owner = v["owner"].as_str().unwrap_or("").to_string();
                return sub;
            }
            Ok((429, _)) if sent.elapsed() < RETRY_FOR => {
                sub.refusals += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok((status, v)) => {
                sub.error = Some(format!("{status}: {v}"));
                return sub;
            }
            Err(e) => {
                sub.error = Some(e.to_string());
                return sub;
            }
        }
    }
}

/// Submits every objective from `clients` threads, objective `i` through gateway
/// `i % gateways`; answers in objective order.
fn submit_all(c: &Cluster, objectives: &[String], workflow: &str, clients: usize) -> Vec<Sub> {
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<Sub>>> = Mutex::new(vec![None; objectives.len()]);
    std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(obj) = objectives.get(i) else { return };
                    let sub = submit(&c.clients[i % c.clients.len()], obj, workflow);
                    if let Ok(mut o) = out.lock() {
                        o[i] = Some(sub);
                    }
                }
            });
        }
    });
    out.into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect()
}

/// Tasks in `statuses` that did not complete.
fn lost(statuses: &BTreeMap<String, usize>) -> usize {
    statuses
        .iter()
        .filter(|(status, _)| *status != "completed")
        .map(|(_, n)| n)
        .sum()
}

fn accepted_ids(subs: &[Sub]) -> HashSet<String> {
    subs.iter().filter_map(|s| s.task.clone()).collect()
}

fn first_errors(subs: &[Sub]) -> Vec<String> {
    subs.iter()
        .filter_map(|s| s.error.clone())
        .take(3)
        .collect()
}

/// What GET /v1/tasks/{id} says of tasks the events never ended: status → count. A
/// `completed` one is an event the streams missed, any other a task that did not finish.
fn statuses(c: &Cluster, ids: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for id in ids {
        let status = c
            .clients
            .iter()
            .find_map(|cl| match cl.get(&format!("/v1/tasks/{id}")) {
                Ok((200, v)) => v["status"].as_str().map(String::from),
                _ => None,
            })
            .unwrap_or_else(|| "unreadable".into());
        *out.entry(status).or_default() += 1;
    }
    out
}

/// `created → started → finished` of a task's record, in ms, for a slow one's story.
fn timeline(c: &Cluster, id: &str) -> String {
    let Ok((200, v)) = c.clients[0].get(&format!("/v1/tasks/{id}")) else {
        return "record unreadable".into();
    };
    let at = |k: &str| v[k].as_u64().unwrap_or(0);
    let created = at("created_at");
    format!(
        "started +{} ms, finished +{} ms, epoch {}, owner {}",
        at("started_at").saturating_sub(created),
        at("finished_at").saturating_sub(created),
        v["epoch"],
        v["owner"]
    )
}

// ---- 1. dispatch ----

/// One dispatch pass's results.
#[derive(Debug)]
struct Dispatch {
    nodes: u16,
    clients: usize,
    submitted: usize,
    completed: usize,
    per_s: f64,
    accept: Vec<f64>,
    dispatch: Vec<f64>,
    refusals: u32,
    /// CPU seconds the nodes and this client used during the pass.
    cpu: (f64, f64),
    not_ended: BTreeMap<String, usize>,
    other_ends: usize,
}

/// Two passes on one fresh cluster: `TASKS_LIGHT_N` tasks from one client (latency without a
/// queue), then `TASKS_N` from `TASKS_CLIENTS` (throughput, and latency with the queue).
fn dispatch_run(nodes: u16, z: &Sizes) -> Result<[Dispatch; 2]> {
    let c = Cluster::start(nodes, z, &tasks_section(z, z.concurrency, ""))?;
    let watch = Watch::start(&c)?;
    let light = dispatch_pass(&c, &watch, z, 1, z.light_tasks)?;
    let loaded = dispatch_pass(&c, &watch, z, z.clients, z.tasks)?;
    println!(
        "  {nodes} node(s): unusual events {:?}; event streams resumed {}",
        watch.unusual(z.keep),
        watch.dropped.load(Ordering::Relaxed)
    );
    Ok([light, loaded])
}

fn dispatch_pass(
    c: &Cluster,
    watch: &Watch,
    z: &Sizes,
    clients: usize,
    tasks: usize,
) -> Result<Dispatch> {
    let nodes = c.nodes.len();
    let tag = format!("d{nodes}-c{clients}-{}", z.seed);
    let objectives: Vec<String> = (0..tasks)
        .map(|i| format!("bench {tag} task {i}"))
        .collect();
    let start = Instant::now();
    let cpu0 = cpu_split(c);
    let subs = submit_all(c, &objectives, "bench-noop", clients);
    let ids = accepted_ids(&subs);
    let open = watch.wait_ended(&ids, DRAIN);
    let cpu1 = cpu_split(c);
    let mut done: Vec<(f64, Instant, String)> = Vec::new();
    for s in &subs {
        if let Some(id) = &s.task
            && let Some((kind, at, _)) = watch.end_of(id)
            && kind == "task.completed"
        {
            done.push((ms(at.saturating_duration_since(s.sent)), at, id.clone()));
        }
    }
    let wall = done
        .iter()
        .map(|(_, at, _)| *at)
        .max()
        .map_or(start.elapsed(), |t| t.duration_since(start));
    report_slowest(c, clients, &mut done);
    for e in first_errors(&subs) {
        println!("  refused submission: {e}");
    }
    Ok(Dispatch {
        nodes: nodes as u16,
        clients,
        submitted: subs.len(),
        completed: done.len(),
        per_s: done.len() as f64 / wall.as_secs_f64(),
        accept: subs
            .iter()
            .filter(|s| s.task.is_some())
            .map(|s| ms(s.accept))
            .collect(),
        dispatch: done.iter().map(|(t, _, _)| *t).collect(),
        refusals: subs.iter().map(|s| s.refusals).sum(),
        cpu: (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1),
        not_ended: statuses(c, &open),
        other_ends: ids.len() - open.len() - done.len(),
    })
}

/// Prints the three slowest tasks' records, to tell queueing from a slow stage.
fn report_slowest(c: &Cluster, clients: usize, done: &mut [(f64, Instant, String)]) {
    done.sort_by(|a, b| b.0.total_cmp(&a.0));
    let slowest: Vec<String> = done
        .iter()
        .take(3)
        .map(|(t, _, id)| format!("{id} {t:.0} ms ({})", timeline(c, id)))
        .collect();
    println!(
        "  {} node(s), {clients} client(s), slowest: {}",
        c.nodes.len(),
        slowest.join("; ")
    );
}

// ---- 2. deduplication ----

/// Objectives where `dup_pct` % repeat one of the 32 before them.
fn dedup_objectives(z: &Sizes) -> Vec<String> {
    let mut rng = Rng(z.seed);
    let mut out: Vec<String> = Vec::with_capacity(z.dedup_tasks);
    for i in 0..z.dedup_tasks {
        let repeat = i > 0 && rng.below(100) < z.dup_pct;
        let obj = if repeat {
            let back = 1 + rng.below(32.min(i as u64)) as usize;
            out[i - back].clone()
        } else {
            format!("bench dedup {} task {i}", z.seed)
        };
        out.push(obj);
    }
    out
}

#[derive(Debug, Default)]
struct Dedup {
    submitted: usize,
    repeats: usize,
    answered_dedup: usize,
    dedup_to_unknown: usize,
    distinct: usize,
    executed: usize,
    /// Tasks of one objective accepted while the one before was still active (on its owner).
    twins_overlapping: usize,
    /// ... accepted by another owner than the one before (not deduplicated against it).
    twins_other_owner: usize,
    /// ... whose order the events do not tell (an event of the owner's own stream missing).
    twins_unordered: usize,
    lost: BTreeMap<String, usize>,
    refused: usize,
    per_s: f64,
    dropped: u64,
}

fn dedup_run(z: &Sizes) -> Result<Dedup> {
    let c = Cluster::start(3, z, &tasks_section(z, z.concurrency, ""))?;
    let watch = Watch::start(&c)?;
    let objectives = dedup_objectives(z);
    let start = Instant::now();
    let subs = submit_all(&c, &objectives, "bench-noop", z.clients);
    let ids = accepted_ids(&subs);
    let open = watch.wait_ended(&ids, DRAIN);
    let wall = start.elapsed();
    let seen = watch.snapshot();
    for e in first_errors(&subs) {
        println!("  refused submission: {e}");
    }
    println!("  dedup: unusual events {:?}", watch.unusual(z.keep));
    let unique: HashSet<&String> = objectives.iter().collect();
    let mut d = Dedup {
        submitted: subs.len(),
        repeats: objectives.len() - unique.len(),
        answered_dedup: subs.iter().filter(|s| s.deduplicated).count(),
        distinct: ids.len(),
        refused: subs.iter().filter(|s| s.task.is_none()).count(),
        dropped: watch.dropped.load(Ordering::Relaxed),
        lost: statuses(&c, &open),
        ..Dedup::default()
    };
    d.executed = ids
        .iter()
        .filter(|id| {
            seen.get(*id)
                .and_then(|s| s.end.as_ref())
                .is_some_and(|(k, _, _)| k == "task.completed")
        })
        .count();
    d.per_s = d.executed as f64 / wall.as_secs_f64();
    count_twins(&subs, &seen, &mut d);
    Ok(d)
}

/// Per objective: answers marked `deduplicated` must name a task created for it, and the
/// tasks created for it must not overlap: on their owner's event stream each one's
/// `task.accepted` comes after the terminal event of the one before.
fn count_twins(subs: &[Sub], seen: &HashMap<String, Seen>, d: &mut Dedup) {
    let mut created: HashMap<&str, Vec<&str>> = HashMap::new();
    for s in subs.iter().filter(|s| !s.deduplicated) {
        if let Some(id) = &s.task {
            created.entry(&s.objective).or_default().push(id);
        }
    }
    for s in subs.iter().filter(|s| s.deduplicated) {
        let known = created
            .get(s.objective.as_str())
            .is_some_and(|v| v.iter().any(|id| Some(*id) == s.task.as_deref()));
        if !known {
            d.dedup_to_unknown += 1;
        }
    }
    for ids in created.values_mut() {
        ids.sort();
        ids.dedup();
        if ids.len() > 1 {
            check_twins(ids, seen, d);
        }
    }
}

/// The tasks of one objective, ordered by their acceptance on the owner.
fn check_twins(ids: &[&str], seen: &HashMap<String, Seen>, d: &mut Dedup) {
    let accepted: Option<Vec<((String, u64), &str)>> = ids
        .iter()
        .map(|id| Some((seen.get(*id)?.accepted_at.clone()?, *id)))
        .collect();
    let Some(mut accepted) = accepted else {
        d.twins_unordered += ids.len() - 1;
        return;
    };
    if accepted.iter().any(|((n, _), _)| *n != accepted[0].0.0) {
        // Accepted by two owners: the submission went around its owner (forwarding failed).
        d.twins_other_owner += ids.len() - 1;
        return;
    }
    accepted.sort();
    for pair in accepted.windows(2) {
        let (first, (_, next_accepted)) = (pair[0].1, &pair[1].0);
        match seen.get(first).and_then(|s| s.ended_at.clone()) {
            Some((_, ended)) if ended < *next_accepted => {}
            Some(_) => d.twins_overlapping += 1,
            None => d.twins_unordered += 1,
        }
    }
}

// ---- 3. failover ----

#[derive(Debug, Default)]
struct Failover {
    submitted: usize,
    victim: String,
    orphans: usize,
    completed: usize,
    lost: BTreeMap<String, usize>,
    /// Tasks of the other owners that never ended.
    others_lost: BTreeMap<String, usize>,
    /// Kill → both survivors see the victim `down` (SWIM), seconds.
    detected: Option<f64>,
    to_adopted: Vec<f64>,
    to_completed: Vec<f64>,
    /// Orphans that completed without a `task.adopted` event seen.
    unadopted_completions: usize,
}

/// The owner with the most tasks the events have not seen end.
fn busiest_owner(subs: &[Sub], seen: &HashMap<String, Seen>) -> Option<String> {
    let mut per_owner: BTreeMap<&str, usize> = BTreeMap::new();
    for s in subs.iter().filter(|s| unfinished(s, seen)) {
        *per_owner.entry(s.owner.as_str()).or_default() += 1;
    }
    let (owner, _) = per_owner.into_iter().max_by_key(|(_, n)| *n)?;
    Some(owner.to_string())
}

fn unfinished(s: &Sub, seen: &HashMap<String, Seen>) -> bool {
    s.task
        .as_ref()
        .is_some_and(|id| seen.get(id).is_none_or(|x| x.end.is_none()))
}

fn failover_run(z: &Sizes) -> Result<Failover> {
    let section = tasks_section(z, 1, &slow_workflow(z.failover_stages));
    let mut c = Cluster::start(3, z, &section)?;
    let watch = Watch::start(&c)?;
    let objectives: Vec<String> = (0..z.failover_tasks)
        .map(|i| format!("bench failover {} task {i}", z.seed))
        .collect();
    let subs = submit_all(&c, &objectives, "slow-noop", z.clients);
    let seen = watch.snapshot();
    let victim = busiest_owner(&subs, &seen)
        .context("every task finished before the kill: raise TASKS_FAILOVER_N or _STAGES")?;
    let idx = c
        .node_index(&victim)
        .with_context(|| format!("owner {victim} is not a node of the bench"))?;
    let orphans: HashSet<String> = subs
        .iter()
        .filter(|s| s.owner == victim && unfinished(s, &seen))
        .filter_map(|s| s.task.clone())
        .collect();
    let kill_ms = now_ms();
    let killed = Instant::now();
    c.nodes[idx].kill()?;
    let survivors: Vec<&Client> = (0..c.clients.len())
        .filter(|i| *i != idx)
        .map(|i| &c.clients[i])
        .collect();
    let (open, detected) = std::thread::scope(|s| {
        let detect =
            s.spawn(|| swarm_tests::wait_member_state(&survivors, &victim, "down", DRAIN).ok());
        let open = watch.wait_ended(&orphans, DRAIN);
        (open, detect.join().ok().flatten())
    });
    let others: HashSet<String> = accepted_ids(&subs).difference(&orphans).cloned().collect();
    let others_open = watch.wait_ended(&others, DRAIN);
    println!(
        "  failover: killed {victim} ({} unfinished of its tasks); unusual events {:?}",
        orphans.len(),
        watch.unusual(z.keep)
    );
    if z.keep {
        println!(
            "  failover: the killed node's log: {}",
            c.log(idx).display()
        );
    }
    let mut f = Failover {
        submitted: subs.len(),
        orphans: orphans.len(),
        lost: statuses(&c, &open),
        others_lost: statuses(&c, &others_open),
        detected: detected.map(|d| d.as_secs_f64()),
        victim,
        ..Failover::default()
    };
    time_orphans(&mut f, &orphans, &watch.snapshot(), (killed, kill_ms));
    Ok(f)
}

/// Kill → adoption and kill → completion of each orphan.
fn time_orphans(
    f: &mut Failover,
    orphans: &HashSet<String>,
    seen: &HashMap<String, Seen>,
    (killed, kill_ms): (Instant, u64),
) {
    for id in orphans {
        let Some(s) = seen.get(id) else { continue };
        match &s.end {
            // Ended on the victim before the kill, its event still on its way.
            Some((_, _, ts)) if *ts < kill_ms => f.orphans -= 1,
            Some((k, at, _)) if k == "task.completed" => {
                f.completed += 1;
                f.to_completed.push(at.duration_since(killed).as_secs_f64());
                match s.adopted {
                    Some(a) => f.to_adopted.push(a.duration_since(killed).as_secs_f64()),
                    None => f.unadopted_completions += 1,
                }
            }
            _ => {}
        }
    }
}

// ---- the report ----

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

fn print_dispatch(d: &Dispatch) {
    println!(
        "| {} | {} | {} | {} | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {} | {:.1} / {:.1} |",
        d.nodes,
        d.clients,
        d.submitted,
        d.completed,
        d.per_s,
        pct(&d.accept, 0.5),
        pct(&d.accept, 0.99),
        pct(&d.dispatch, 0.5),
        pct(&d.dispatch, 0.99),
        pct(&d.dispatch, 1.0),
        d.refusals,
        d.cpu.0,
        d.cpu.1
    );
    if !d.not_ended.is_empty() || d.other_ends > 0 {
        println!(
            "  {} node(s), {} client(s): not ended per events {:?}; ended otherwise than completed: {}",
            d.nodes, d.clients, d.not_ended, d.other_ends
        );
    }
}

fn print_dedup(d: &Dedup) {
    println!("\n| dedup, 3 nodes | value |");
    println!("|---|---|");
    let rows: [(&str, String); 12] = [
        ("submissions", d.submitted.to_string()),
        ("repeats of an earlier objective", d.repeats.to_string()),
        ("answered `deduplicated`", d.answered_dedup.to_string()),
        (
            "`deduplicated` naming a task not of its objective",
            d.dedup_to_unknown.to_string(),
        ),
        ("refused (not 202)", d.refused.to_string()),
        ("distinct tasks accepted", d.distinct.to_string()),
        ("tasks executed (completed)", d.executed.to_string()),
        (
            "duplicates executed (twin created while the first was active)",
            d.twins_overlapping.to_string(),
        ),
        (
            "twin accepted by another owner than its first",
            d.twins_other_owner.to_string(),
        ),
        (
            "twins the events cannot order",
            d.twins_unordered.to_string(),
        ),
        ("lost (accepted, never ended)", format!("{:?}", d.lost)),
        (
            "completed/s; event streams resumed",
            format!("{:.0}; {}", d.per_s, d.dropped),
        ),
    ];
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}

fn print_failover(f: &Failover) {
    println!("\n| failover, 3 nodes, concurrency 1 | value |");
    println!("|---|---|");
    println!("| tasks submitted | {} |", f.submitted);
    println!(
        "| unfinished tasks of the killed owner ({}) | {} |",
        f.victim, f.orphans
    );
    println!("| of them completed | {} |", f.completed);
    println!("| lost (never ended) | {:?} |", f.lost);
    println!(
        "| tasks of the other owners never ended | {:?} |",
        f.others_lost
    );
    println!(
        "| kill → both survivors see it `down` | {} |",
        f.detected
            .map_or("not within the drain time".into(), |d| format!("{d:.2} s"))
    );
    println!(
        "| kill → `task.adopted` p50 / p99 / max | {:.2} / {:.2} / {:.2} s |",
        pct(&f.to_adopted, 0.5),
        pct(&f.to_adopted, 0.99),
        pct(&f.to_adopted, 1.0)
    );
    println!(
        "| kill → completed p50 / p99 / max | {:.2} / {:.2} / {:.2} s |",
        pct(&f.to_completed, 0.5),
        pct(&f.to_completed, 0.99),
        pct(&f.to_completed, 1.0)
    );
    println!(
        "| completed without a `task.adopted` seen | {} |",
        f.unadopted_completions
    );
}

/// One line per target: whether it holds, and the figures.
type Verdicts = Vec<(bool, String)>;

fn p99(v: &[f64]) -> f64 {
    pct(v, 0.99)
}

/// The latency targets for one pass of each cluster size.
fn latency_targets(one: &Dispatch, three: &Dispatch) -> Verdicts {
    let accept = p99(&one.accept).max(p99(&three.accept));
    let load = format!("{} client(s)", one.clients);
    vec![
        (
            p99(&one.dispatch) <= 5.0,
            format!(
                "{load}: dispatch p99 on one node {:.2} ms ≤ 5 ms",
                p99(&one.dispatch)
            ),
        ),
        (
            p99(&three.dispatch) <= 20.0,
            format!(
                "{load}: dispatch p99 across three nodes {:.2} ms ≤ 20 ms",
                p99(&three.dispatch)
            ),
        ),
        (
            accept <= 10.0,
            format!("{load}: accept p99 (worse of one and three nodes) {accept:.2} ms ≤ 10 ms"),
        ),
    ]
}

fn dispatch_targets(one: &[Dispatch; 2], three: &[Dispatch; 2]) -> Verdicts {
    let mut v = latency_targets(&one[0], &three[0]);
    v.extend(latency_targets(&one[1], &three[1]));
    let not_ended: Vec<_> = one
        .iter()
        .chain(three)
        .filter(|d| !d.not_ended.is_empty())
        .map(|d| &d.not_ended)
        .collect();
    let lost: usize = not_ended.iter().map(|m| lost(m)).sum();
    v.push((
        three[1].per_s >= 2000.0,
        format!(
            "durable tasks through three nodes {:.0}/s ≥ 2000/s",
            three[1].per_s
        ),
    ));
    v.push((
        lost == 0,
        format!("dispatch runs: lost tasks {lost} = 0 (not ended per events: {not_ended:?})"),
    ));
    v
}

fn dedup_targets(d: &Dedup) -> Verdicts {
    vec![
        (
            d.twins_overlapping == 0 && d.twins_other_owner == 0 && d.dedup_to_unknown == 0,
            format!(
                "duplicates executed {} = 0 (of another owner {}, dedup answers naming a foreign task {})",
                d.twins_overlapping, d.twins_other_owner, d.dedup_to_unknown
            ),
        ),
        (
            lost(&d.lost) == 0,
            format!(
                "dedup run: lost tasks {} = 0 (not ended per events: {:?})",
                lost(&d.lost),
                d.lost
            ),
        ),
    ]
}

fn failover_targets(f: &Failover) -> Verdicts {
    vec![
        (
            lost(&f.lost) + lost(&f.others_lost) == 0 && f.completed == f.orphans && f.orphans > 0,
            format!(
                "failover: {} of {} orphaned tasks completed, lost {:?} (others {:?})",
                f.completed, f.orphans, f.lost, f.others_lost
            ),
        ),
        (
            p99(&f.to_adopted) <= 12.0,
            format!(
                "failover: kill → adopted task resumed p99 {:.2} s ≤ 12 s",
                p99(&f.to_adopted)
            ),
        ),
    ]
}

fn run_dispatch(z: &Sizes) -> Result<Verdicts> {
    let one = dispatch_run(1, z)?;
    let three = dispatch_run(3, z)?;
    println!(
        "\n| nodes | clients | submitted | completed | tasks/s | accept p50 / p99 ms | dispatch p50 / p99 / max ms | 429s | CPU s nodes / client |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for d in one.iter().chain(&three) {
        print_dispatch(d);
    }
    Ok(dispatch_targets(&one, &three))
}

fn main() -> Result<()> {
    let z = Sizes::from_env();
    println!(
        "tasks bench: dispatch {} tasks from 1 client then {} from {} clients, {} dedup \
         submissions ({}% repeats), failover {} tasks of {} stages; bulkhead {}, concurrency {}, \
         seed {}",
        z.light_tasks,
        z.tasks,
        z.clients,
        z.dedup_tasks,
        z.dup_pct,
        z.failover_tasks,
        z.failover_stages,
        z.bulkhead,
        z.concurrency,
        z.seed
    );
    let mut verdicts = Verdicts::new();
    if z.runs("dispatch") {
        verdicts.extend(run_dispatch(&z)?);
    }
    if z.runs("dedup") {
        let d = dedup_run(&z)?;
        print_dedup(&d);
        verdicts.extend(dedup_targets(&d));
    }
    if z.runs("failover") {
        let f = failover_run(&z)?;
        print_failover(&f);
        verdicts.extend(failover_targets(&f));
    }
    println!();
    for (ok, line) in verdicts {
        println!("{}: {line}", pass(ok));
    }
    Ok(())
}
