//! The replicator over the in-memory network: no QUIC, real stores (in-memory engine), seeded
//! loss and partitions. Each test prints its seed when it fails.

use std::time::Duration;

use swarm_config::{HumanDuration, ReplicationConfig};
use swarm_storage::{MemEngine, PutRequest, SecretKey, Storage, StorageOptions};

use super::*;

struct Node {
    name: String,
    storage: Storage,
    repl: Replicator,
}

fn storage(name: &str) -> Storage {
    Storage::with_engine(
        Arc::new(MemEngine::default()),
        SecretKey::generate(),
        StorageOptions::new(name),
    )
    .expect("storage")
}

fn cfg() -> ReplicationConfig {
    ReplicationConfig {
        anti_entropy_every: HumanDuration(Duration::from_millis(200)),
        w2_timeout: HumanDuration(Duration::from_millis(500)),
        ..ReplicationConfig::default()
    }
}

/// Start `name` on `net` with `store`, serving the streams peers open to it.
fn start(net: &MemNet, name: &str, store: Storage, limits: Limits) -> Node {
    start_with(net, name, store, limits, cfg())
}

fn start_with(
    net: &MemNet,
    name: &str,
    store: Storage,
    limits: Limits,
    cfg: ReplicationConfig,
) -> Node {
    let (peers, mut incoming) = net.join(name);
    let hook: RefusalHook = Arc::new(|_: &str, _: &str, _: &str| {});
    let repl = Replicator::with_limits(store.clone(), Arc::new(peers), cfg, hook, None, limits);
    let serve = repl.clone();
    tokio::spawn(async move {
        while let Some(s) = incoming.recv().await {
            serve.serve(s.peer, s.kind, s.duplex);
        }
    });
    Node {
        name: name.to_string(),
        storage: store,
        repl,
    }
}

fn put(n: &Node, ns: &str, key: &str, value: &str) -> Delta {
    let req = PutRequest {
        value_json: value.to_string(),
        ..PutRequest::default()
    };
    let (_, d) = n
        .storage
        .memory
        .put_with_delta(ns, key, req, now_ms())
        .expect("put");
    d
}

fn root(n: &Node, ns: &str) -> (u64, u64) {
    let d = n.storage.memory.digest(ns).expect("digest");
    (d.root, d.count)
}

/// Wait (in test time) until every node holds the same `ns` with `count` records.
async fn converged(nodes: &[&Node], ns: &str, count: u64, seed: u64) {
    for _ in 0..600 {
        let roots: Vec<_> = nodes.iter().map(|n| root(n, ns)).collect();
        if roots.iter().all(|r| *r == roots[0] && r.1 == count) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let roots: Vec<_> = nodes.iter().map(|n| (&n.name, root(n, ns))).collect();
    panic!("seed {seed}: {ns} did not converge to {count} records: {roots:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_and_rounds_converge_with_loss_and_a_partition() {
    for seed in [1u64, 2, 3] {
        let net = MemNet::new(seed);
        let limits = Limits::default();
        let a = start(&net, "a", storage("a"), limits);
        let b = start(&net, "b", storage("b"), limits);
        let c = start(&net, "c", storage("c"), limits);
        net.set_loss(0.05);
        net.set_delay(Duration::from_micros(100), Duration::from_millis(2));
        // c is cut off while a and b take writes; pushes to it fail, some frames are lost.
        net.partition(&["c"], &["a", "b"]);
        for i in 0..40 {
            let n = if i % 2 == 0 { &a } else { &b };
            let d = put(n, "ns", &format!("k{i}"), &format!("{i}"));
            n.repl.push(&d, false).await.expect("queued");
        }
        for i in 0..10 {
            put(&c, "ns", &format!("c{i}"), "1");
        }
        net.heal();
        converged(&[&a, &b, &c], "ns", 50, seed).await;
        assert!(net.bytes("a", "c") + net.bytes("b", "c") > 0, "seed {seed}");
        for n in [&a, &b, &c] {
            n.repl.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_diverged_by_many_frames_converges_in_bounded_chunks() {
    let seed = 7;
    let net = MemNet::new(seed);
    // 8 KiB chunks against ~1.2 MB of divergence: well over a hundred chunks' worth.
    let limits = Limits {
        chunk_bytes: 8 * 1024,
        group_buckets: 16,
    };
    let a = start(&net, "a", storage("a"), limits);
    let value = format!("\"{}\"", "x".repeat(3000));
    for i in 0..400 {
        put(&a, "big", &format!("k{i:04}"), &value);
    }
    let b = start(&net, "b", storage("b"), limits);
    // b's own rounds (at start, and every 200 ms) and a's round towards the new member race;
    // whichever runs, the namespace must converge.
    let _ = b.repl.sync_with("a").await;
    converged(&[&a, &b], "big", 400, seed).await;
    assert!(net.bytes("a", "b") > 1_200_000, "seed {seed}");
    assert!(
        net.max_frame() < 64 * 1024,
        "seed {seed}: a frame of {} bytes",
        net.max_frame()
    );
    a.repl.shutdown().await;
    b.repl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w2_is_acknowledged_by_a_peer_and_refused_without_one() {
    let net = MemNet::new(11);
    let a = start(&net, "a", storage("a"), Limits::default());
    let d = put(&a, "ns", "k", "1");
    assert!(matches!(a.repl.push(&d, true).await, Err(Error::NoReplica)));
    let b = start(&net, "b", storage("b"), Limits::default());
    a.repl.push(&d, true).await.expect("acknowledged");
    assert!(
        b.storage
            .memory
            .get("ns", "k", now_ms())
            .expect("get")
            .is_some()
    );
    // A peer that never answers: the write times out instead of hanging.
    net.set_loss(1.0);
    let d = put(&a, "ns", "k2", "2");
    assert!(matches!(
        a.repl.push(&d, true).await,
        Err(Error::Timeout(_))
    ));
    a.repl.shutdown().await;
    b.repl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_task_and_later_pushes_fail() {
    let net = MemNet::new(5);
    let a = start(&net, "a", storage("a"), Limits::default());
    let _b = start(&net, "b", storage("b"), Limits::default());
    let d = put(&a, "ns", "k", "1");
    a.repl.push(&d, false).await.expect("queued");
    a.repl.shutdown().await;
    a.repl.shutdown().await; // idempotent
    assert!(matches!(a.repl.push(&d, false).await, Err(Error::Stopped)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_before_gossip_says_so_gets_the_writes_after_its_round_by_push() {
    let seed = 11;
    let net = MemNet::new(seed);
    let a = start(&net, "node-1", storage("node-1"), Limits::default());
    let b = start(&net, "node-2", storage("node-2"), Limits::default());
    // node-2 has just come back: node-1's gossip does not call it alive yet.
    net.set_seen("node-1", "node-2", false);
    let d = put(&a, "ns", "before", "1");
    assert!(
        matches!(a.repl.push(&d, true).await, Err(Error::NoReplica)),
        "seed {seed}: node-1 pushes to no one before node-2's round"
    );
    // node-2 catches up with a round of its own: the digest brings what was written before...
    b.repl.sync_with("node-1").await.expect("round");
    let get = |k: &str| b.storage.memory.get("ns", k, now_ms()).expect("get");
    assert!(get("before").is_some(), "seed {seed}");
    // ...and what node-1 writes from then on is pushed to it, which confirms it, although gossip
    // still does not call it alive.
    let d = put(&a, "ns", "after", "2");
    a.repl
        .push(&d, true)
        .await
        .expect("node-2 confirms a write made after its round");
    assert_eq!(
        get("after").map(|i| i.value_json),
        Some("2".into()),
        "seed {seed}"
    );
    // Gone again before gossip ever called it alive: with no live peer, a write that only it
    // could confirm has no replica, as it would have had without it.
    b.repl.shutdown().await;
    net.kill("node-2");
    let d = put(&a, "ns", "later", "3");
    assert!(
        matches!(a.repl.push(&d, true).await, Err(Error::NoReplica)),
        "seed {seed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_highest_named_node_catches_up_before_it_serves() {
    let seed = 9;
    let net = MemNet::new(seed);
    let a = start(&net, "node-1", storage("node-1"), Limits::default());
    let b = start(&net, "node-2", storage("node-2"), Limits::default());
    let c_store = storage("node-3");
    let c = start(&net, "node-3", c_store.clone(), Limits::default());
    put(&a, "ns", "gone", "1");
    c.repl.sync_with("node-1").await.expect("round");
    assert!(
        c.storage
            .memory
            .get("ns", "gone", now_ms())
            .expect("get")
            .is_some()
    );
    c.repl.shutdown().await;
    net.kill("node-3");
    // Writes acknowledged elsewhere while node-3 is down, and a delete of what it had.
    let tomb = a
        .storage
        .memory
        .delete_with_delta("ns", "gone", now_ms())
        .expect("delete")
        .expect("a tombstone");
    a.repl.push(&tomb, true).await.expect("w=2");
    for i in 0..20 {
        let d = put(&a, "ns", &format!("k{i}"), "1");
        a.repl.push(&d, true).await.expect("w=2");
    }
    // node-3 restarts with its old store and catches up by rounds of its own: the first brings
    // what it missed, a second one what was acknowledged meanwhile (here, nothing).
    let c = start(&net, "node-3", c_store, Limits::default());
    assert!(
        c.repl
            .catch_up(Duration::from_secs(1), Duration::from_secs(5))
            .await,
        "seed {seed}"
    );
    assert!(
        c.repl.stats().ae_rounds.load(Ordering::Relaxed) >= 2,
        "seed {seed}: one round"
    );
    for i in 0..20 {
        assert!(
            c.storage
                .memory
                .get("ns", &format!("k{i}"), now_ms())
                .expect("get")
                .is_some(),
            "seed {seed}: k{i} missing right after catch-up"
        );
    }
    assert!(
        c.storage
            .memory
            .get("ns", "gone", now_ms())
            .expect("get")
            .is_none(),
        "seed {seed}: a value deleted during the outage is served"
    );
    for n in [&a, &b, &c] {
        n.repl.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_node_serves_after_the_alone_limit() {
    let net = MemNet::new(3);
    let a = start(&net, "a", storage("a"), Limits::default());
    assert!(
        !a.repl
            .catch_up(Duration::from_millis(200), Duration::from_secs(5))
            .await
    );
    a.repl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_hands_what_only_it_holds_to_a_peer() {
    let net = MemNet::new(11);
    // No periodic round would carry the write in the test's time: only the hand-off does.
    let slow = ReplicationConfig {
        anti_entropy_every: HumanDuration(Duration::from_secs(3600)),
        ..cfg()
    };
    let a = start_with(&net, "a", storage("a"), Limits::default(), slow.clone());
    let b = start_with(&net, "b", storage("b"), Limits::default(), slow);
    // Written on a, never pushed (as if every push had been lost).
    put(&a, "ns", "only-on-a", "1");
    let held_by_b = |b: &Node| {
        b.storage
            .memory
            .get("ns", "only-on-a", now_ms())
            .expect("get")
            .is_some()
    };
    assert!(!held_by_b(&b));
    // Cut off, the hand-off gives up at its limit.
    net.partition(&["a"], &["b"]);
    assert!(!a.repl.hand_off(Duration::from_millis(300)).await);
    net.heal();
    assert!(a.repl.hand_off(Duration::from_secs(5)).await);
    assert!(held_by_b(&b), "the hand-off did not carry the write");
    for n in [&a, &b] {
        n.repl.shutdown().await;
    }
    // Alone, there is no one to hand off to.
    let c = start(&MemNet::new(12), "c", storage("c"), Limits::default());
    assert!(!c.repl.hand_off(Duration::from_secs(5)).await);
    c.repl.shutdown().await;
}
