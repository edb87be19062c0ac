//! Remote actor RPC: a ractor_cluster session on a QUIC stream (mutual TLS) against
//! ractor_cluster's own TCP transport (plain, loopback), between the same two processes.
//!
//! `cargo bench -p swarm-actors --bench rpc` (env `RPC_BENCH_ROUNDS`, default 6). The benchmark
//! re-executes itself as the peer node, which serves both a QUIC session (as `node-b`) and a plain
//! ractor_cluster TCP NodeServer (as `node-b-tcp`); the same router answers on both. Rounds
//! alternate QUIC and TCP so drift on a noisy machine hits both; medians are reported.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{COOKIE, Peer, Pki, connect_quic, local};
use swarm_actors::ActorCluster;
use swarm_membership::Endpoint;

const SEQUENTIAL: usize = 2000;
const IN_FLIGHT: usize = 32;
const THROUGHPUT_FOR: Duration = Duration::from_millis(1500);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    if common::is_peer() {
        common::peer_main();
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

#[derive(Default)]
struct Samples {
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    per_s: Vec<f64>,
    errors: usize,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn latency(cluster: &ActorCluster, peer: &str) -> (f64, f64, usize) {
    let mut rtts = Vec::with_capacity(SEQUENTIAL);
    let mut errors = 0;
    for _ in 0..SEQUENTIAL {
        match cluster.ping(peer, CALL_TIMEOUT).await {
            Ok(rtt) => rtts.push(rtt.as_secs_f64() * 1e6),
            Err(_) => errors += 1,
        }
    }
    rtts.sort_by(f64::total_cmp);
    let at = |q: f64| rtts[((rtts.len() as f64 * q) as usize).min(rtts.len() - 1)];
    (at(0.50), at(0.99), errors)
}

async fn throughput(cluster: &ActorCluster, peer: &str) -> (f64, usize) {
    let started = Instant::now();
    let deadline = started + THROUGHPUT_FOR;
    let callers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let cluster = cluster.clone();
            let peer = peer.to_string();
            tokio::spawn(async move {
                let (mut ok, mut err) = (0usize, 0usize);
                while Instant::now() < deadline {
                    match cluster.ping(&peer, CALL_TIMEOUT).await {
                        Ok(_) => ok += 1,
                        Err(_) => err += 1,
                    }
                }
                (ok, err)
            })
        })
        .collect();
    let (mut ok, mut err) = (0, 0);
    for c in callers {
        let (o, e) = c.await.expect("caller");
        ok += o;
        err += e;
    }
    (ok as f64 / started.elapsed().as_secs_f64(), err)
}

async fn run() {
    let rounds: usize = std::env::var("RPC_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let pki = Pki::new();
    let me = pki.node("node-a");
    pki.node("node-b");
    let peer = Peer::spawn(&[], pki.dir(), "node-b", "node-b", true).await;
    let tcp = peer.tcp.expect("peer tcp address");

    let cluster = ActorCluster::start("node-a", COOKIE).await.expect("start");
    let ep = Endpoint::bind(&me, local()).expect("bind");
    let conn = connect_quic(&cluster, &ep, peer.addr, "node-b")
        .await
        .expect("quic session");
    let mut attempt = 0;
    while let Err(e) = cluster.connect_loopback_tcp("node-b-tcp".into(), tcp).await {
        attempt += 1;
        assert!(attempt < 50, "tcp session: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cluster.sessions(), ["node-b", "node-b-tcp"]);

    let transports = [("quic", "node-b"), ("tcp", "node-b-tcp")];
    for (_, peer) in transports {
        latency(&cluster, peer).await; // warm up
    }
    let mut samples: [Samples; 2] = Default::default();
    println!(
        "{rounds} rounds, each: {SEQUENTIAL} sequential pings, then {IN_FLIGHT} callers for {THROUGHPUT_FOR:?}"
    );
    for round in 0..rounds {
        for (i, (name, peer)) in transports.iter().enumerate() {
            let (p50, p99, e1) = latency(&cluster, peer).await;
            let (per_s, e2) = throughput(&cluster, peer).await;
            println!(
                "round {round} {name:>4}: p50 {p50:7.1} us  p99 {p99:7.1} us  {per_s:8.0} msg/s  errors {}",
                e1 + e2
            );
            let s = &mut samples[i];
            s.p50_us.push(p50);
            s.p99_us.push(p99);
            s.per_s.push(per_s);
            s.errors += e1 + e2;
        }
    }
    println!("\nmedians over {rounds} rounds");
    println!("| transport | p50 (us) | p99 (us) | msg/s with {IN_FLIGHT} in flight | errors |");
    println!("|---|---|---|---|---|");
    for (i, (name, _)) in transports.iter().enumerate() {
        let s = &samples[i];
        println!(
            "| {name} | {:.1} | {:.1} | {:.0} | {} |",
            median(&s.p50_us),
            median(&s.p99_us),
            median(&s.per_s),
            s.errors
        );
    }
    let ratio = median(&samples[0].per_s) / median(&samples[1].per_s);
    println!(
        "\nQUIC throughput = {:.0}% of TCP (target: >= 80%)",
        ratio * 100.0
    );
    conn.close(0u32.into(), b"done");
    cluster.shutdown().await;
}
