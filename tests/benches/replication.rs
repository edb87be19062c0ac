//! Replicated memory with three processes on loopback (issue #4), in one run: write throughput
//! per node; time until a write on node-1 is readable on node-2 and node-3 (p50/p99); after a
//! partition with writes on both sides, time to identical replicas after the heal and
//! anti-entropy bytes against the size of the difference and of the store.
//!
//! Needs root and iptables (the partition). `cargo build --release -p swarm-node && cargo bench
//! -p swarm-tests --bench replication [-- PARTITION_SECS]`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use swarm_tests::{Client, Partition, admin_token, init_cluster, start_joined};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Sum of a counter over the nodes' `/metrics`.
fn metric(cs: &[Client], name: &str) -> f64 {
    cs.iter()
        .filter_map(|c| c.get_text("/metrics").ok())
        .flat_map(|t| {
            t.lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// key → version of every entry in `ns`, as one node lists them.
fn listing(c: &Client, ns: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut after = String::new();
    loop {
        let path = format!("/v1/memory/{ns}?limit=1000&after={after}");
        let Ok((200, v)) = c.get(&path) else {
            return out;
        };
        let items = v["items"].as_array().cloned().unwrap_or_default();
        for i in &items {
            out.insert(
                i["key"].as_str().unwrap_or("").to_string(),
                i["version"].as_str().unwrap_or("").to_string(),
            );
        }
        match v["next"].as_str() {
            Some(n) => after = n.to_string(),
            None => return out,
        }
    }
}

fn main() -> Result<()> {
    let part_secs: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 3)?;
    let token = admin_token(dir.path())?;
    let (_nodes, cs) = start_joined(&configs, &token)?;
    let value = json!({"text": "x".repeat(200)});

    // 1. Write throughput per node: 8 writers on each node at once, 5 s.
    let run = Duration::from_secs(5);
    let counts: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .flat_map(|n| (0..8).map(move |w| (n, w)))
            .map(|(n, w)| {
                let c = cs[n].clone();
                let value = value.clone();
                s.spawn(move || {
                    let start = Instant::now();
                    let mut done = 0u64;
                    while start.elapsed() < run {
                        let path = format!("/v1/memory/tput/n{n}-w{w}-{done}");
                        if let Ok((200, _)) = c.put_json(&path, &json!({"value": value})) {
                            done += 1;
                        }
                    }
                    (n, done)
                })
            })
            .collect();
        let mut per = vec![0u64; 3];
        for h in hs {
            if let Ok((n, d)) = h.join() {
                per[n] += d;
            }
        }
        per
    });
    println!(
        "write throughput, 8 writers per node, all three nodes at once: {:.0} / {:.0} / {:.0} writes/s (total {:.0})",
        counts[0] as f64 / run.as_secs_f64(),
        counts[1] as f64 / run.as_secs_f64(),
        counts[2] as f64 / run.as_secs_f64(),
        counts.iter().sum::<u64>() as f64 / run.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));

    // 2. Replication latency: write on node-1, poll node-2 and node-3 until both read it.
    let mut lat = Vec::new();
    for i in 0..300 {
        let path = format!("/v1/memory/lat/k{i}");
        let t0 = Instant::now();
        if put(&cs[0], &path, &value)? != 200 {
            bail!("write failed");
        }
        let mut seen = [false, false];
        while !(seen[0] && seen[1]) {
            for (j, c) in cs[1..].iter().enumerate() {
                if !seen[j] && matches!(c.get(&path), Ok((200, _))) {
                    seen[j] = true;
                }
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("{path} not replicated in 10 s");
            }
        }
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "write on node-1 readable on node-2 and node-3 (incl. the write): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} writes)",
        pct(&mut lat.clone(), 0.5),
        pct(&mut lat.clone(), 0.99),
        pct(&mut lat.clone(), 1.0),
        lat.len()
    );

    // 3. Partition node-3 with writes on both sides, heal, wait for identical replicas.
    let store_before: usize = ["tput", "lat"]
        .iter()
        .map(|ns| listing(&cs[0], ns).len())
        .sum();
    let port3 = swarm_config::NodeConfig::load(&configs[2])?
        .gossip
        .bind
        .port();
    let cut = Partition::cut(port3)?;
    let t_cut = Instant::now();
    let mut written = 0usize;
    let mut i = 0u64;
    while t_cut.elapsed() < Duration::from_secs(part_secs) {
        // ~40 writes/s on each side.
        put(&cs[0], &format!("/v1/memory/part/a{i}"), &value)?;
        put(&cs[2], &format!("/v1/memory/part/b{i}"), &value)?;
        written += 2;
        i += 1;
        std::thread::sleep(Duration::from_millis(25));
    }
    let bytes0 = metric(&cs, "swarm_anti_entropy_bytes_sent_total");
    drop(cut);
    let t_heal = Instant::now();
    let identical = loop {
        let l: Vec<_> = cs.iter().map(|c| listing(c, "part")).collect();
        if l[0].len() == written && l[0] == l[1] && l[1] == l[2] {
            break t_heal.elapsed();
        }
        if t_heal.elapsed() > Duration::from_secs(60) {
            bail!(
                "replicas differ 60 s after the heal: {} {} {}",
                l[0].len(),
                l[1].len(),
                l[2].len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(1));
    let ae_bytes = metric(&cs, "swarm_anti_entropy_bytes_sent_total") - bytes0;
    // The difference: what each replica lacked. node-3 lacked node-1's half of the writes;
    // node-1 and node-2 each lacked node-3's half: 1.5 x the writes, as stored JSON values.
    let entry = serde_json::to_vec(&json!({"value": value}))?.len() + 40;
    let diff_bytes = written / 2 * 3 * entry;
    let store_bytes = (store_before + written) * entry;
    println!(
        "partition of {part_secs} s with {written} writes on both sides: identical on all three {:.2} s after the heal",
        identical.as_secs_f64()
    );
    println!(
        "anti-entropy bytes sent after the heal (all nodes): {:.0} KiB; difference (entries each replica lacked) ~{:.0} KiB ({:.2}x); store ~{:.0} KiB ({:.2}x)",
        ae_bytes / 1024.0,
        diff_bytes as f64 / 1024.0,
        ae_bytes / diff_bytes as f64,
        store_bytes as f64 / 1024.0,
        ae_bytes / store_bytes as f64
    );
    Ok(())
}

fn put(c: &Client, path: &str, value: &Value) -> Result<u16> {
    Ok(c.put_json(path, &json!({ "value": value }))?.0)
}
