//! Three real `swarm node` processes from `swarm init --nodes 3`, on 127.0.0.1: they find each
//! other over QUIC with mutual TLS, see crashes as `down`, graceful leaves as `left`, take a
//! restarted node back, carry remote actor calls, and never admit a node from another CA.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use swarm_tests::{
    Client, NodeProc, admin_token as admin, init_cluster, member_states as states, swarm,
    wait_member_state as wait_state,
};

fn ping(c: &Client, peer: &str) -> Result<(u16, Value)> {
    c.request(
        "POST",
        "/v1/cluster/ping",
        Some(
            json!({"node": peer, "timeout_ms": 1000})
                .to_string()
                .as_bytes(),
        ),
    )
}

/// Actor sessions open shortly after membership: retry the remote call for a while.
fn ping_until_ok(c: &Client, peer: &str) -> Result<Value> {
    let start = Instant::now();
    loop {
        let (status, v) = ping(c, peer)?;
        if status == 200 {
            return Ok(v);
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("remote call to {peer}: {status} {v}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn three_processes_form_a_cluster() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 3)?;
    let token = admin(dir.path())?;
    let mut n1 = NodeProc::start(&configs[0])?;
    let mut n2 = NodeProc::start(&configs[1])?;
    let mut n3 = NodeProc::start(&configs[2])?;
    let (c1, c2, c3) = (n1.client(&token), n2.client(&token), n3.client(&token));

    // Everyone sees everyone alive.
    let all = [&c1, &c2, &c3];
    for m in ["node-1", "node-2", "node-3"] {
        let t = wait_state(&all, m, "alive", Duration::from_secs(10))?;
        println!("{m} alive everywhere after {t:?}");
    }
    // Metadata travels: node-1 knows node-3's gateway.
    let (_, v) = c1.get("/v1/cluster/members")?;
    let m3 = v["members"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == "node-3"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        m3["meta"]["gateway"].as_str(),
        n3.url.split_once("://").map(|(_, addr)| addr)
    );
    assert_eq!(m3["meta"]["version"], env!("CARGO_PKG_VERSION"));

    // A remote actor call over the QUIC actor session, both directions.
    let v = ping_until_ok(&c1, "node-3")?;
    assert_eq!(v["peer"], "node-3");
    ping_until_ok(&c3, "node-1")?;
    ping_until_ok(&c2, "node-3")?;

    // SIGKILL: seen as down (not left) by the others; calls to it fail fast with a typed error.
    n2.kill()?;
    let t = wait_state(&[&c1, &c3], "node-2", "down", Duration::from_secs(15))?;
    println!("SIGKILL of node-2 detected everywhere after {t:?}");
    let start = Instant::now();
    let (status, v) = ping(&c1, "node-2")?;
    assert_eq!(status, 503, "{v}");
    assert!(start.elapsed() < Duration::from_secs(3));
    let h = c1.get("/health")?.1;
    assert_eq!(h["members_alive"], 2, "{h}");

    // The killed node restarts (a new incarnation) and is alive everywhere again.
    n2 = NodeProc::start(&configs[1])?;
    let c2 = n2.client(&token);
    let t = wait_state(&[&c1, &c2, &c3], "node-2", "alive", Duration::from_secs(15))?;
    println!("restarted node-2 alive everywhere after {t:?}");
    ping_until_ok(&c1, "node-2")?;

    // Graceful leave (SIGTERM): `left`, quickly.
    let status = n3.terminate()?;
    assert!(status.success(), "{status}");
    let t = wait_state(&[&c1, &c2], "node-3", "left", Duration::from_secs(3))?;
    println!("graceful leave of node-3 seen everywhere after {t:?}");

    // `swarm status` prints the table.
    let ca = n1
        .ca
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let out = swarm(&[
        "status",
        "--gateway",
        &n1.url,
        "--ca",
        &ca,
        "--token",
        &token,
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("node-3") && text.contains("left"), "{text}");

    // POST /v1/cluster/leave: the node leaves, answers, and stops.
    let (status, v) = c2.request("POST", "/v1/cluster/leave", None)?;
    assert_eq!(status, 200, "{v}");
    wait_state(&[&c1], "node-2", "left", Duration::from_secs(3))?;
    let start = Instant::now();
    while n2.child.try_wait()?.is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("node-2 did not stop after leaving");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    n1.terminate()?;
    Ok(())
}

#[test]
fn a_node_from_another_ca_never_joins() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 2)?;
    let token = admin(dir.path())?;
    let n1 = NodeProc::start(&configs[0])?;
    let n2 = NodeProc::start(&configs[1])?;
    let c1 = n1.client(&token);
    wait_state(&[&c1], "node-2", "alive", Duration::from_secs(10))?;

    // A second cluster (its own CA) whose node names node-1 as a seed, and even calls itself
    // node-3: it has no certificate from our CA, so it never appears.
    let rogue_dir = tempfile::tempdir()?;
    let rogue_cfgs = init_cluster(rogue_dir.path(), 1)?;
    let seed = swarm_config::NodeConfig::load(&configs[0])?.gossip.bind;
    let text = std::fs::read_to_string(&rogue_cfgs[0])?
        .replace("seeds = []", &format!("seeds = [\"{seed}\"]"))
        .replace("name = \"node-1\"", "name = \"node-3\"");
    std::fs::write(&rogue_cfgs[0], text)?;
    let rogue = NodeProc::start(&rogue_cfgs[0])?;
    std::thread::sleep(Duration::from_secs(4));
    for c in [&c1, &n2.client(&token)] {
        let s = states(c);
        assert_eq!(s.len(), 2, "only our two nodes: {s:?}");
    }
    let rc = rogue.client(&admin(rogue_dir.path())?);
    assert_eq!(states(&rc).len(), 1, "the rogue sees nobody");
    // The refusal is in node-1's audit log.
    let (_, v) = c1.get("/v1/audit?limit=1000")?;
    let denied = v["entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["action"] == "cluster.connect" && e["outcome"] == "denied")
                .count()
        })
        .unwrap_or(0);
    assert!(denied > 0, "refused connections are audited: {v}");
    Ok(())
}

#[test]
fn an_unreachable_seed_is_logged_and_the_node_serves() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 1)?;
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let text = std::fs::read_to_string(&configs[0])?
        .replace("seeds = []", &format!("seeds = [\"{dead}\"]"));
    std::fs::write(&configs[0], text)?;
    let n = NodeProc::start(&configs[0])?;
    let c = n.client(&admin(dir.path())?);
    let (status, h) = c.get("/health")?;
    assert_eq!(status, 200);
    assert_eq!(h["services"]["membership"], "alone", "{h}");
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(configs[0].with_extension("log"))?;
        if log.contains("cannot reach peer") && log.contains(&dead.to_string()) {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("no clear log line about the seed: {log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Still serving.
    assert_eq!(c.get("/v1/me")?.0, 200);
    Ok(())
}

#[test]
fn a_gossip_port_in_use_is_a_clear_startup_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 1)?;
    let cfg = swarm_config::NodeConfig::load(&configs[0])?;
    let _taken = std::net::UdpSocket::bind(cfg.gossip.bind)?;
    let out = swarm(&["node", "--config", &configs[0].display().to_string()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot bind QUIC") && err.contains(&cfg.gossip.bind.to_string()),
        "{err}"
    );
    Ok(())
}

#[test]
fn sighup_announces_to_new_seeds() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 2)?;
    let token = admin(dir.path())?;
    let n1_gossip = swarm_config::NodeConfig::load(&configs[0])?.gossip.bind;
    // Start both with no seeds: two clusters of one.
    let with_seeds = std::fs::read_to_string(&configs[1])?;
    for c in &configs {
        let text = std::fs::read_to_string(c)?;
        let start = text.find("seeds = [").unwrap_or(0);
        let end = start + text[start..].find(']').unwrap_or(0) + 1;
        std::fs::write(c, format!("{}seeds = []{}", &text[..start], &text[end..]))?;
    }
    let n1 = NodeProc::start(&configs[0])?;
    let n2 = NodeProc::start(&configs[1])?;
    let (c1, c2) = (n1.client(&token), n2.client(&token));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(states(&c1).len(), 1);
    // Give node-2 its seed back and send SIGHUP.
    assert!(with_seeds.contains(&n1_gossip.to_string()));
    std::fs::write(&configs[1], with_seeds)?;
    let pid = n2.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()?;
    wait_state(&[&c1, &c2], "node-1", "alive", Duration::from_secs(10))?;
    wait_state(&[&c1, &c2], "node-2", "alive", Duration::from_secs(10))?;
    Ok(())
}
