//! Replicated memory with three real `swarm node` processes: writes on every node converge; a
//! node cut off by a partition (iptables on its QUIC port) keeps taking writes, and after the
//! heal every acknowledged write is on all three; an erased subject stays unreadable on a node
//! that was down during the erase; `w=2` waits for a peer or fails clearly.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use swarm_tests::{
    Client, NodeProc, Partition, admin_token, init_cluster, start_joined, wait_member_state,
};

fn put(c: &Client, path: &str, value: serde_json::Value) -> Result<u16> {
    Ok(c.put_json(path, &json!({ "value": value }))?.0)
}

/// Wait until `c` returns 200 for every path.
fn wait_all(c: &Client, paths: &[String], within: Duration) -> Result<Duration> {
    let start = Instant::now();
    let mut missing: Vec<&String> = paths.iter().collect();
    loop {
        missing.retain(|p| !matches!(c.get(p), Ok((200, _))));
        if missing.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!(
                "{} of {} still missing at {}, e.g. {:?}",
                missing.len(),
                paths.len(),
                c.base(),
                missing.first()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn writes_converge_and_survive_a_partition() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 3)?;
    let token = admin_token(dir.path())?;
    let (nodes, cs) = start_joined(&configs, &token)?;
    // Writes on all three converge.
    let mut acked = Vec::new();
    for (i, c) in cs.iter().enumerate() {
        for k in 0..20 {
            let path = format!("/v1/memory/conv/n{i}-k{k}");
            assert_eq!(put(c, &path, json!({"from": i, "k": k}))?, 200);
            acked.push(path);
        }
    }
    for c in &cs {
        let t = wait_all(c, &acked, Duration::from_secs(10))?;
        println!("60 writes visible on {} after {t:?}", c.base());
    }
    // w=2: a peer confirms.
    let (status, v) = cs[0].put_json("/v1/memory/conv/w2?w=2", &json!({"value": 1}))?;
    assert_eq!(status, 200, "{v}");
    acked.push("/v1/memory/conv/w2".into());
    let (status, v) = cs[0].put_json("/v1/memory/conv/w3?w=3", &json!({"value": 1}))?;
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (400, Some("w")),
        "{v}"
    );

    // Cut node-3 off; both sides keep taking writes (and a delete).
    let port3 = swarm_config::NodeConfig::load(&configs[2])?
        .gossip
        .bind
        .port();
    let cut = Partition::cut(port3)?;
    wait_member_state(&[&cs[0], &cs[1]], "node-3", "down", Duration::from_secs(20))?;
    wait_member_state(&[&cs[2]], "node-1", "down", Duration::from_secs(20))?;
    for k in 0..20 {
        let a = format!("/v1/memory/part/a{k}");
        assert_eq!(put(&cs[0], &a, json!(k))?, 200);
        acked.push(a);
        let b = format!("/v1/memory/part/b{k}");
        assert_eq!(put(&cs[2], &b, json!(k))?, 200);
        acked.push(b);
    }
    let (status, _) = cs[0].request("DELETE", "/v1/memory/conv/n2-k0", None)?;
    assert_eq!(status, 200);
    acked.retain(|p| p != "/v1/memory/conv/n2-k0");
    // w=2 on the isolated node fails clearly rather than silently downgrading.
    let (status, v) = cs[2].put_json("/v1/memory/part/lonely?w=2", &json!({"value": 1}))?;
    assert_eq!(status, 503, "{v}");
    assert!(
        ["no_replica", "replication_timeout"].contains(&v["error"]["code"].as_str().unwrap_or("")),
        "{v}"
    );
    drop(cut);

    // Healed: every acknowledged write on all three, the deleted key nowhere.
    let start = Instant::now();
    for c in &cs {
        wait_all(c, &acked, Duration::from_secs(30))?;
    }
    println!("identical after heal in {:?}", start.elapsed());
    for c in &cs {
        let (status, _) = c.get("/v1/memory/conv/n2-k0")?;
        assert_eq!(status, 404, "deleted key came back on {}", c.base());
    }

    // node-2 loses its disk: restarted empty, it refills from its peers.
    let mut nodes = nodes;
    nodes[1].kill()?;
    let data = swarm_config::NodeConfig::load(&configs[1])?.data_dir();
    std::fs::remove_dir_all(&data)?;
    nodes[1] = NodeProc::start(&configs[1])?;
    let c2 = nodes[1].client(&token);
    let t = wait_all(&c2, &acked, Duration::from_secs(30))?;
    println!("node-2 refilled from an empty disk in {t:?}");
    assert_eq!(c2.get("/v1/memory/conv/n2-k0")?.0, 404);
    Ok(())
}

#[test]
fn an_erased_subject_stays_erased_on_a_node_that_was_down() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 3)?;
    let token = admin_token(dir.path())?;
    let n1 = NodeProc::start(&configs[0])?;
    let n2 = NodeProc::start(&configs[1])?;
    let mut n3 = NodeProc::start(&configs[2])?;
    let (c1, c2) = (n1.client(&token), n2.client(&token));
    let c3 = n3.client(&token);
    for m in ["node-1", "node-2", "node-3"] {
        wait_member_state(&[&c1, &c2, &c3], m, "alive", Duration::from_secs(10))?;
    }
    let body = json!({"value": {"ssn": "123"}, "subject": "alice"});
    assert_eq!(c1.put_json("/v1/memory/people/alice", &body)?.0, 200);
    wait_all(
        &c3,
        &["/v1/memory/people/alice".to_string()],
        Duration::from_secs(10),
    )?;

    // node-3 is down while alice is erased.
    n3.kill()?;
    let (status, v) = c1.request("POST", "/v1/subjects/alice/erase", None)?;
    assert_eq!(status, 200, "{v}");
    let start = Instant::now();
    while c2.get("/v1/memory/people/alice")?.0 == 200 {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("node-2 still serves alice");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // node-3 comes back with alice's data on disk: anti-entropy brings the erasure, and it
    // neither serves nor spreads the data.
    n3 = NodeProc::start(&configs[2])?;
    let c3 = n3.client(&token);
    wait_member_state(&[&c1, &c2], "node-3", "alive", Duration::from_secs(15))?;
    let start = Instant::now();
    loop {
        let (status, _) = c3.get("/v1/memory/people/alice")?;
        if status != 200 {
            break;
        }
        if start.elapsed() > Duration::from_secs(15) {
            bail!("node-3 still serves alice's data after rejoining");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // No write can bring the subject back, on any node.
    let (status, v) = c3.put_json("/v1/memory/people/alice2", &body)?;
    let log3 = std::fs::read_to_string(configs[2].with_extension("log")).unwrap_or_default();
    assert_eq!(status, 410, "{v}\n{log3}");
    std::thread::sleep(Duration::from_secs(2));
    for c in [&c1, &c2, &c3] {
        assert_ne!(c.get("/v1/memory/people/alice")?.0, 200);
    }
    Ok(())
}

#[test]
fn a_restarted_highest_named_node_serves_what_it_missed_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 3)?;
    let token = admin_token(dir.path())?;
    let (mut nodes, cs) = start_joined(&configs, &token)?;
    assert_eq!(put(&cs[0], "/v1/memory/outage/old", json!(1))?, 200);
    wait_all(
        &cs[2],
        &["/v1/memory/outage/old".to_string()],
        Duration::from_secs(10),
    )?;
    // node-3, the highest name, is down while the others take writes and a delete.
    nodes[2].kill()?;
    wait_member_state(&[&cs[0], &cs[1]], "node-3", "down", Duration::from_secs(20))?;
    let mut acked = Vec::new();
    for k in 0..20 {
        let path = format!("/v1/memory/outage/k{k}");
        let (status, v) = cs[k % 2].put_json(&format!("{path}?w=2"), &json!({"value": k}))?;
        assert_eq!(status, 200, "{v}");
        acked.push(path);
    }
    assert_eq!(
        cs[1].request("DELETE", "/v1/memory/outage/old", None)?.0,
        200
    );
    // Restarted, it serves only after a round with a peer: its very first reads see it all.
    let started = Instant::now();
    nodes[2] = NodeProc::start(&configs[2])?;
    println!("node-3 serving {:?} after its restart", started.elapsed());
    let c3 = nodes[2].client(&token);
    for p in &acked {
        let (status, v) = c3.get(p)?;
        assert_eq!(status, 200, "{p} on the restarted node-3: {v}");
    }
    assert_eq!(
        c3.get("/v1/memory/outage/old")?.0,
        404,
        "deleted during the outage"
    );
    let log = std::fs::read_to_string(configs[2].with_extension("log"))?;
    assert!(
        log.contains("caught up with the peers before serving"),
        "node-3 did not catch up before serving"
    );
    Ok(())
}
