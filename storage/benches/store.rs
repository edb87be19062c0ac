//! Store benchmark: encrypted vs plaintext memory operations on sled, and durable-write latency
//! with 20 concurrent writers (group commit). Run: `cargo bench -p swarm-storage --bench store`.
//! Both variants run side by side, alternating, in one process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use swarm_storage::{Protection, PutRequest, SecretKey, Storage, StorageOptions};

const OPS: usize = 20_000;
const ROUNDS: usize = 3;
const HOT: usize = 5_000;

fn open(dir: &std::path::Path, protection: Protection) -> Storage {
    let mut opts = StorageOptions::new("bench");
    opts.protection = protection;
    Storage::open(dir, SecretKey::generate(), opts).unwrap_or_else(|e| panic!("open store: {e}"))
}

fn value(i: usize) -> String {
    format!(
        "{{\"agent\":\"memory-systems\",\"step\":{i},\"note\":\"{}\"}}",
        "observation text ".repeat(10)
    )
}

/// (puts/s, first gets/s, hot gets/s) for one fresh store. The first read of each key decrypts
/// it; reads of a hot set that fits the decrypted-value cache are served from it.
fn ops_per_sec(protection: Protection) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let s = open(dir.path(), protection);
    let now = 1_700_000_000_000u64;
    let t = Instant::now();
    for i in 0..OPS {
        let req = PutRequest {
            value_json: value(i),
            subject: Some(format!("user-{}", i % 64)),
            ..Default::default()
        };
        s.memory
            .put("bench", &format!("k{i}"), req, now)
            .unwrap_or_else(|e| panic!("put: {e}"));
    }
    let puts = OPS as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..OPS {
        let got = s
            .memory
            .get("bench", &format!("k{i}"), now)
            .unwrap_or_else(|e| panic!("get: {e}"));
        assert!(got.is_some());
    }
    let gets = OPS as f64 / t.elapsed().as_secs_f64();
    // A hot set of 5 000 keys (within the default 10 000-entry read cache), read 4 times over.
    let t = Instant::now();
    for i in 0..OPS {
        let got = s
            .memory
            .get("bench", &format!("k{}", i % HOT), now)
            .unwrap_or_else(|e| panic!("get: {e}"));
        assert!(got.is_some());
    }
    let warm = OPS as f64 / t.elapsed().as_secs_f64();
    (puts, gets, warm)
}

fn audit_appends_per_sec() -> f64 {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let s = open(dir.path(), Protection::Encrypted);
    let t = Instant::now();
    for i in 0..OPS {
        let event = swarm_storage::AuditEvent {
            ts_ms: 1_700_000_000_000,
            node: "node-1".into(),
            request_id: format!("{i:016x}"),
            actor: "alice".into(),
            action: "memory.read".into(),
            resource: format!("memory/bench/k{i}"),
            outcome: "ok".into(),
            status: 200,
            code: None,
        };
        s.audit
            .append(&event)
            .unwrap_or_else(|e| panic!("audit: {e}"));
    }
    OPS as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn durable_writes(
    protection: Protection,
    writers: usize,
    per_writer: usize,
) -> (f64, Duration, Duration) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let s = Arc::new(open(dir.path(), protection));
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(per_writer);
                for i in 0..per_writer {
                    let t = Instant::now();
                    let req = PutRequest {
                        value_json: value(i),
                        ..Default::default()
                    };
                    s.memory
                        .put("durable", &format!("w{w}-{i}"), req, 1_700_000_000_000)
                        .unwrap_or_else(|e| panic!("put: {e}"));
                    s.sync().unwrap_or_else(|e| panic!("sync: {e}"));
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_else(|_| panic!("writer panicked")))
        .collect();
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    let p = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    ((writers * per_writer) as f64 / secs, p(0.50), p(0.99))
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: keep it short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rounds = if quick { 1 } else { ROUNDS };
    let mut enc = (Vec::new(), Vec::new(), Vec::new());
    let mut plain = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (p, g, w) = ops_per_sec(Protection::Encrypted);
        enc.0.push(p);
        enc.1.push(g);
        enc.2.push(w);
        let (p, g, w) = ops_per_sec(Protection::PlaintextForBenchmarks);
        plain.0.push(p);
        plain.1.push(g);
        plain.2.push(w);
    }
    let (ep, eg, ew) = (median(enc.0), median(enc.1), median(enc.2));
    let (pp, pg, pw) = (median(plain.0), median(plain.1), median(plain.2));
    println!("store ops/s (sled, {OPS} ops, median of {rounds} alternating rounds)");
    println!("| variant | put ops/s | first get ops/s | hot get ops/s |");
    println!("|---|---|---|---|");
    println!("| plaintext | {pp:.0} | {pg:.0} | {pw:.0} |");
    println!("| encrypted (XChaCha20-Poly1305) | {ep:.0} | {eg:.0} | {ew:.0} |");
    println!(
        "| encryption cost | {:.1}% | {:.1}% | {:.1}% |",
        100.0 * (1.0 - ep / pp),
        100.0 * (1.0 - eg / pg),
        100.0 * (1.0 - ew / pw)
    );
    println!();
    println!(
        "audit appends/s (seal + keyed hash chain + sled): {:.0}",
        audit_appends_per_sec()
    );
    let per = if quick { 20 } else { 250 };
    println!();
    println!("durable writes (put + group-commit fsync), 20 concurrent writers x {per}");
    println!("| variant | writes/s | p50 | p99 |");
    println!("|---|---|---|---|");
    for (name, prot) in [
        ("plaintext", Protection::PlaintextForBenchmarks),
        ("encrypted", Protection::Encrypted),
    ] {
        let (tput, p50, p99) = durable_writes(prot, 20, per);
        println!(
            "| {name} | {tput:.0} | {:.2} ms | {:.2} ms |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
}
