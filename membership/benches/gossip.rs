//! Gossip simulator benchmark (issue #3): cold-start convergence, failure detection and false
//! positives at 100, 1000 and 2000 members, with 0% and 10% packet loss.
//!
//! `cargo bench -p swarm-membership --features sim --bench gossip [-- SIZES LOSSES]`
//! e.g. `-- 100,1000 0,0.1`. Times are virtual (simulated) seconds.

use std::time::{Duration, Instant};

use swarm_membership::GossipSettings;
use swarm_membership::sim::{Sim, SimConfig};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let sizes: Vec<u32> = args
        .first()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1000, 2000]);
    let losses: Vec<f64> = args
        .get(1)
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![0.0, 0.1]);
    let quiet_minutes: u64 = std::env::var("QUIET_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    println!(
        "| members | loss | full view after cold start | killed member down everywhere | false downs in {quiet_minutes} min | packets/member/s | wall |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in &sizes {
        for &loss in &losses {
            let wall = Instant::now();
            let cfg = SimConfig {
                settings: GossipSettings {
                    cluster_size: n,
                    ..GossipSettings::default()
                },
                loss,
                join_spread: Duration::from_secs(1),
                seed: 7 + u64::from(n),
                ..SimConfig::default()
            };
            let mut sim = Sim::new(cfg);
            sim.add_nodes(n);
            let join = sim.run_until(Duration::from_secs(300), |s| s.full_view());
            // Quiet period: nobody is killed; every "down" is false.
            sim.run_for(Duration::from_secs(60 * quiet_minutes));
            let false_downs = sim.stats().false_downs;
            let packets_before = sim.stats().packets;
            let t0 = sim.now();
            let victim = n / 2;
            sim.kill(victim);
            let detect = sim.run_until(Duration::from_secs(300), |s| s.gone_everywhere(victim));
            let rate = (sim.stats().packets - packets_before) as f64
                / f64::from(n)
                / (sim.now() - t0).as_secs_f64().max(1e-9);
            let fmt = |d: Option<Duration>| {
                d.map(|d| format!("{:.1} s", d.as_secs_f64()))
                    .unwrap_or_else(|| "never (300 s)".into())
            };
            println!(
                "| {n} | {:.0}% | {} | {} | {false_downs} | {rate:.1} | {:.0} s |",
                loss * 100.0,
                fmt(join),
                fmt(detect),
                wall.elapsed().as_secs_f64()
            );
        }
    }
}
