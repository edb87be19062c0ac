//! Two nodes in two processes over real QUIC with mutual TLS: a router RPC crosses the ractor
//! session carried on a QUIC stream, and once the peer is killed a call fails with a typed error
//! inside its timeout instead of hanging.

mod common;

use std::time::{Duration, Instant};

use common::{COOKIE, Peer, Pki, connect_quic, local};
use swarm_actors::{ActorCluster, Error};
use swarm_membership::Endpoint;

/// The child process's entry point; a no-op in the parent's own test run.
#[test]
fn peer_node() {
    if common::is_peer() {
        common::peer_main();
    }
}

const PEER_ARGS: &[&str] = &["--exact", "peer_node", "--nocapture", "--test-threads=1"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_rpc_crosses_quic_and_a_dead_peer_is_a_typed_error() {
    if common::is_peer() {
        return;
    }
    let pki = Pki::new();
    let me = pki.node("node-a");
    pki.node("node-b");
    let mut peer = Peer::spawn(PEER_ARGS, pki.dir(), "node-b", "node-b", false).await;

    let cluster = ActorCluster::start("node-a", COOKIE).await.expect("start");
    let ep = Endpoint::bind(&me, local()).expect("bind");
    let conn = connect_quic(&cluster, &ep, peer.addr, "node-b")
        .await
        .expect("session over quic");
    assert_eq!(cluster.sessions(), ["node-b"]);

    // Sequential and concurrent calls to the peer's router.
    for _ in 0..20 {
        let rtt = cluster
            .ping("node-b", Duration::from_secs(2))
            .await
            .expect("ping");
        assert!(rtt < Duration::from_secs(2));
    }
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let c = cluster.clone();
            tokio::spawn(async move { c.ping("node-b", Duration::from_secs(2)).await })
        })
        .collect();
    for call in calls {
        call.await.expect("join").expect("concurrent ping");
    }
    // Nobody else is reachable through this session.
    let r = cluster.ping("node-c", Duration::from_secs(1)).await;
    assert!(
        matches!(&r, Err(Error::NoSession(p)) if p == "node-c"),
        "{r:?}"
    );

    // Kill the peer: the next call fails inside its timeout, with a typed error.
    peer.kill().await;
    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    let e = cluster
        .ping("node-b", timeout)
        .await
        .expect_err("the peer is dead");
    let took = started.elapsed();
    assert!(
        matches!(
            e,
            Error::RpcTimeout(_) | Error::PeerGone(_) | Error::NoSession(_)
        ),
        "{e:?}"
    );
    assert!(took < timeout + Duration::from_millis(300), "took {took:?}");

    // Membership then reports the member down: the session goes, calls fail at once.
    cluster.disconnect("node-b");
    assert!(cluster.sessions().is_empty());
    let started = Instant::now();
    let r = cluster.ping("node-b", Duration::from_secs(5)).await;
    assert!(
        matches!(&r, Err(Error::NoSession(p)) if p == "node-b"),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(100));

    conn.close(0u32.into(), b"done");
    cluster.shutdown().await;
}
