//! A peer whose certificate says `node-c` but whose ractor node calls itself `mallory` gets no
//! session: the dial fails with a name mismatch and nothing can be called through it.

mod common;

use std::time::Duration;

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

/// ractor's registry and groups are process-global: one cluster node per test at a time.
static ONE_NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PEER_ARGS: &[&str] = &["--exact", "peer_node", "--nocapture", "--test-threads=1"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ractor_name_other_than_the_certificate_name_gets_no_session() {
    if common::is_peer() {
        return;
    }
    let _one = ONE_NODE.lock().await;
    let pki = Pki::new();
    let me = pki.node("node-a");
    pki.node("node-c");
    let _peer = Peer::spawn(PEER_ARGS, pki.dir(), "node-c", "mallory", false).await;

    let cluster = ActorCluster::start("node-a", COOKIE).await.expect("start");
    let ep = Endpoint::bind(&me, local()).expect("bind");
    let e = connect_quic(&cluster, &ep, peer_addr(&_peer), "node-c")
        .await
        .expect_err("name mismatch");
    match &e {
        Error::NameMismatch { peer, claimed } => {
            assert_eq!(peer, "node-c");
            assert_eq!(claimed, "mallory@swarm");
        }
        other => panic!("expected a name mismatch, got {other:?}"),
    }
    assert_eq!(e.kind(), "name_mismatch");

    // Give a late session every chance to show up; none does.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(cluster.sessions().is_empty());
    for name in ["node-c", "mallory"] {
        let r = cluster.ping(name, Duration::from_secs(1)).await;
        assert!(matches!(&r, Err(Error::NoSession(p)) if p == name), "{r:?}");
    }
    // No router of the impostor reached our process group either.
    let remote = ractor::pg::get_members(&swarm_actors::ROUTER_GROUP.to_string())
        .into_iter()
        .filter(|c| !c.get_id().is_local())
        .count();
    assert_eq!(remote, 0);
    cluster.shutdown().await;
}

/// The same impostor dialing us: the accepting side refuses it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_dialing_in_gets_no_session() {
    if common::is_peer() {
        return;
    }
    let _one = ONE_NODE.lock().await;
    let pki = Pki::new();
    let me = pki.node("node-a");
    pki.node("node-d");
    let cluster = ActorCluster::start("node-a", COOKIE).await.expect("start");
    let ep = Endpoint::bind(&me, local()).expect("bind");
    let dial = format!("node-a@{}", ep.local_addr().expect("addr"));
    let accepting = {
        let (ep, cluster) = (ep.clone(), cluster.clone());
        tokio::spawn(async move {
            while let Some(pc) = ep.accept_peer().await {
                let cluster = cluster.clone();
                tokio::spawn(async move {
                    while let Ok((send, mut recv)) = pc.conn.accept_bi().await {
                        let mut kind = [0u8];
                        if recv.read_exact(&mut kind).await.is_ok()
                            && kind[0] == swarm_actors::StreamKind::Ractor.byte()
                        {
                            cluster.accept(pc.peer.clone(), send, recv).expect("accept");
                        }
                    }
                });
            }
        })
    };
    let mut peer = Peer::spawn_with(
        PEER_ARGS,
        pki.dir(),
        "node-d",
        "mallory",
        false,
        &[(common::DIAL_ENV, dial)],
    )
    .await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = peer.rest.recv().await.expect("peer output");
            if let Some((_, v)) = line.split_once("PEER_DIAL=") {
                return v.trim().to_string();
            }
        }
    })
    .await
    .expect("the impostor's dial ends");
    assert_ne!(outcome, "ok", "the impostor got a session");
    assert!(cluster.sessions().is_empty());
    for name in ["node-d", "mallory"] {
        let r = cluster.ping(name, Duration::from_secs(1)).await;
        assert!(matches!(&r, Err(Error::NoSession(p)) if p == name), "{r:?}");
    }
    accepting.abort();
    cluster.shutdown().await;
}

fn peer_addr(p: &Peer) -> std::net::SocketAddr {
    p.addr
}
