//! The clients: threads that send a seeded mix of requests to every gateway at a bounded rate
//! and record each one in the [`History`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

use crate::cluster::{Client, Reply};
use crate::history::{History, Op, OpKind, Version};
use crate::scenario::Workload;

/// The namespace every memory op of a run uses.
pub const NAMESPACE: &str = "chaos";
/// How long the clients avoid a node that did not answer (ms).
const AVOID_MS: u64 = 2_000;
/// Subject writes per subject before the client erases it.
const WRITES_PER_SUBJECT: u32 = 4;

/// What the clients and the runner share while the run lasts.
#[derive(Debug)]
pub struct Shared {
    pub started: Instant,
    pub history: History,
    /// Node k-1: running and not paused.
    pub up: Vec<AtomicBool>,
    /// A partition or a loss fault is on.
    pub partitioned: AtomicBool,
    pub stop: AtomicBool,
    next_id: AtomicU64,
    /// Node k-1: when (ms) it last failed to answer a request.
    unanswered: Vec<AtomicU64>,
}

impl Shared {
    pub fn new(nodes: u32) -> Self {
        Self {
            started: Instant::now(),
            history: History::default(),
            up: (0..nodes).map(|_| AtomicBool::new(false)).collect(),
            partitioned: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            unanswered: (0..nodes).map(|_| AtomicU64::new(u64::MAX)).collect(),
        }
    }

    /// Milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn set_up(&self, k: u32, up: bool) {
        if let Some(a) = self.up.get((k - 1) as usize) {
            a.store(up, Ordering::SeqCst);
        }
    }

    /// Whether node `k` failed to answer within the last [`AVOID_MS`].
    fn avoided(&self, k: u32) -> bool {
        self.unanswered.get((k - 1) as usize).is_some_and(|a| {
            let t = a.load(Ordering::SeqCst);
            t != u64::MAX && self.now_ms() < t + AVOID_MS
        })
    }

    fn is_up(&self, k: u32) -> bool {
        self.up
            .get((k - 1) as usize)
            .is_some_and(|a| a.load(Ordering::SeqCst))
    }
}

/// One client thread's loop: until `shared.stop`, one request every `1 / rate` seconds to a
/// node drawn from the seed.
pub fn client_loop(shared: Arc<Shared>, clients: Vec<Client>, w: Workload, seed: u64, me: u32) {
    let mut rng =
        StdRng::seed_from_u64(seed ^ (0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(me as u64 + 1)));
    let period = Duration::from_secs_f64(1.0 / w.rate);
    let weights = [
        (OpKind::Write, w.write),
        (OpKind::Read, w.read),
        (OpKind::Delete, w.delete),
        (OpKind::SubjectWrite, w.subject_write),
        (OpKind::Task, w.task),
        (OpKind::Chat, w.chat),
    ];
    let total: u32 = weights.iter().map(|(_, x)| x).sum();
    let mut c = ClientState {
        seq: 0,
        subject: 0,
        subject_writes: 0,
        objectives: Vec::new(),
    };
    let mut next = Instant::now();
    // A node that did not answer is avoided for a while, as a client behind a load balancer
    // would: the load stays on the live nodes instead of waiting out timeouts.
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        // A client that fell behind (a slow answer) does not burst to catch up.
        next = (next + period).max(Instant::now());
        let mut pick = rng.random_range(0..total);
        let kind = weights
            .iter()
            .find(|(_, x)| {
                if pick < *x {
                    true
                } else {
                    pick -= x;
                    false
                }
            })
            .map_or(OpKind::Read, |(k, _)| *k);
        let mut node = rng.random_range(1..=clients.len() as u32);
        for _ in 0..clients.len() {
            if !shared.avoided(node) {
                break;
            }
            node = node % clients.len() as u32 + 1;
        }
        let client = &clients[(node - 1) as usize];
        c.seq += 1;
        match kind {
            OpKind::Write => {
                let key = format!("k{}", rng.random_range(0..w.keys));
                let value = format!("c{me}-{}", c.seq);
                put(&shared, client, node, me, OpKind::Write, &key, &value, None);
            }
            OpKind::Read => {
                let key = format!("k{}", rng.random_range(0..w.keys));
                record(&shared, node, me, OpKind::Read, &key, |op| {
                    let r = client.call("GET", &format!("/v1/memory/{NAMESPACE}/{key}"), None);
                    op.value = r.body()["value"].as_str().map(str::to_string);
                    op.version = Version::of(r.body());
                    r
                });
            }
            OpKind::Delete => {
                // Its own key, written once and then deleted: after the heal it must be gone.
                let key = format!("d{me}-{}", c.seq);
                let value = format!("c{me}-{}", c.seq);
                if put(&shared, client, node, me, OpKind::Write, &key, &value, None) {
                    record(&shared, node, me, OpKind::Delete, &key, |_| {
                        client.call("DELETE", &format!("/v1/memory/{NAMESPACE}/{key}"), None)
                    });
                }
            }
            OpKind::SubjectWrite | OpKind::Erase => {
                let subject = format!("subject-{me}-{}", c.subject);
                let key = format!("s{me}-{}-{}", c.subject, c.subject_writes);
                let value = format!("c{me}-{}", c.seq);
                put(
                    &shared,
                    client,
                    node,
                    me,
                    OpKind::SubjectWrite,
                    &key,
                    &value,
                    Some(&subject),
                );
                c.subject_writes += 1;
                if c.subject_writes == WRITES_PER_SUBJECT {
                    let acked = record(&shared, node, me, OpKind::Erase, &subject, |_| {
                        client.call("POST", &format!("/v1/subjects/{subject}/erase"), None)
                    });
                    // Retry an erase that was not acknowledged, on the next op of this kind.
                    if acked {
                        c.subject += 1;
                        c.subject_writes = 0;
                    } else {
                        c.subject_writes -= 1;
                    }
                }
            }
            OpKind::Task => {
                let repeat = !c.objectives.is_empty() && rng.random_bool(w.duplicate);
                let objective = if repeat {
                    let i = rng.random_range(0..c.objectives.len());
                    c.objectives[i].clone()
                } else {
                    let o = format!("chaos task {me}-{}", c.seq);
                    if c.objectives.len() == 16 {
                        c.objectives.remove(0);
                    }
                    c.objectives.push(o.clone());
                    o
                };
                record(&shared, node, me, OpKind::Task, &objective, |op| {
                    let body = json!({"objective": objective, "workflow": "bench-noop"});
                    let r = client.call("POST", "/v1/tasks", Some(&body));
                    op.task = r.body()["task_id"].as_str().map(str::to_string);
                    op.deduplicated = r.body()["deduplicated"].as_bool().unwrap_or(false);
                    r
                });
            }
            OpKind::Chat => {
                record(&shared, node, me, OpKind::Chat, "tiny", |_| {
                    let body = json!({
                        "model": "tiny",
                        "messages": [{"role": "user", "content": format!("hello {}", c.seq)}],
                        "max_tokens": 4,
                    });
                    client.call("POST", "/v1/chat/completions", Some(&body))
                });
            }
        }
    }
}

/// Per-client counters.
#[derive(Debug)]
struct ClientState {
    seq: u64,
    subject: u32,
    subject_writes: u32,
    /// Recent objectives, for duplicate submissions.
    objectives: Vec<String>,
}

/// A `w=2` write; whether it was acknowledged.
#[allow(clippy::too_many_arguments)]
fn put(
    shared: &Shared,
    client: &Client,
    node: u32,
    me: u32,
    kind: OpKind,
    key: &str,
    value: &str,
    subject: Option<&str>,
) -> bool {
    record(shared, node, me, kind, key, |op| {
        op.value = Some(value.to_string());
        let mut body = json!({ "value": value });
        if let Some(s) = subject {
            body["subject"] = json!(s);
        }
        let r = client.call(
            "PUT",
            &format!("/v1/memory/{NAMESPACE}/{key}?w=2"),
            Some(&body),
        );
        op.version = Version::of(r.body());
        r
    })
}

/// Run one request and record it; whether it was acknowledged. `call` may fill in the op's
/// value, version and task from the reply.
fn record(
    shared: &Shared,
    node: u32,
    client: u32,
    kind: OpKind,
    key: &str,
    call: impl FnOnce(&mut Op) -> Reply,
) -> bool {
    let live_before = shared.is_up(node);
    let part_before = shared.partitioned.load(Ordering::SeqCst);
    let mut op = Op {
        id: shared.next_id.fetch_add(1, Ordering::SeqCst),
        client,
        node,
        kind,
        key: key.to_string(),
        value: None,
        version: None,
        task: None,
        deduplicated: false,
        start_ms: shared.now_ms(),
        end_ms: 0,
        status: None,
        code: String::new(),
        node_live: false,
        in_partition: false,
    };
    let reply = call(&mut op);
    op.end_ms = shared.now_ms();
    op.status = reply.status();
    op.code = reply.code();
    op.node_live = live_before && shared.is_up(node);
    op.in_partition = part_before || shared.partitioned.load(Ordering::SeqCst);
    let acked = op.acked();
    if op.status.is_none()
        && let Some(a) = shared.unanswered.get((node - 1) as usize)
    {
        a.store(op.end_ms, Ordering::SeqCst);
    }
    shared.history.push(op);
    acked
}
