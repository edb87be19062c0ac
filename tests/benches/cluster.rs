//! Membership with real processes on loopback (issue #3): how long until a joining node is seen
//! alive by every member, a SIGKILLed node is seen `down`, and a node stopped with SIGTERM is seen
//! `left`.
//!
//! `cargo build --release -p swarm-node && cargo bench -p swarm-tests --bench cluster [-- ROUNDS]`

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use swarm_tests::{NodeProc, admin_token, init_cluster, wait_member_state};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 3)?;
    let token = admin_token(dir.path())?;
    let n1 = NodeProc::start(&configs[0])?;
    let n2 = NodeProc::start(&configs[1])?;
    let (c1, c2) = (n1.client(&token), n2.client(&token));
    wait_member_state(&[&c1, &c2], "node-2", "alive", Duration::from_secs(10))?;
    let (mut join, mut kill, mut leave) = (vec![], vec![], vec![]);
    for r in 0..rounds {
        // Join: from spawning the process until both members and itself see it alive.
        let t0 = Instant::now();
        let mut n3 = NodeProc::start(&configs[2])?;
        let c3 = n3.client(&token);
        wait_member_state(&[&c1, &c2, &c3], "node-3", "alive", Duration::from_secs(10))?;
        join.push(t0.elapsed().as_secs_f64());
        for m in ["node-1", "node-2"] {
            wait_member_state(&[&c3], m, "alive", Duration::from_secs(10))?;
        }
        // SIGKILL: until both others say `down`.
        let t1 = Instant::now();
        n3.kill()?;
        wait_member_state(&[&c1, &c2], "node-3", "down", Duration::from_secs(30))?;
        kill.push(t1.elapsed().as_secs_f64());
        // Back, then SIGTERM: until both others say `left`.
        let mut n3 = NodeProc::start(&configs[2])?;
        wait_member_state(&[&c1, &c2], "node-3", "alive", Duration::from_secs(10))?;
        let t2 = Instant::now();
        let pid = n3.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()?;
        wait_member_state(&[&c1, &c2], "node-3", "left", Duration::from_secs(10))?;
        leave.push(t2.elapsed().as_secs_f64());
        if n3.terminate().is_err() {
            bail!("node-3 did not stop after SIGTERM");
        }
        println!(
            "round {r}: join {:.3} s, SIGKILL detected {:.2} s, leave seen {:.3} s",
            join[r], kill[r], leave[r]
        );
    }
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!("| 3 processes, {rounds} rounds | median | max | target |");
    println!("|---|---|---|---|");
    println!(
        "| join seen everywhere (from process start) | {:.2} s | {:.2} s | 3 s |",
        median(&mut join.clone()),
        max(&join)
    );
    println!(
        "| SIGKILL seen `down` everywhere | {:.2} s | {:.2} s | 10 s |",
        median(&mut kill.clone()),
        max(&kill)
    );
    println!(
        "| SIGTERM seen `left` everywhere | {:.3} s | {:.3} s | 2 s |",
        median(&mut leave.clone()),
        max(&leave)
    );
    Ok(())
}
