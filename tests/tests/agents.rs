//! The agent swarm through real `swarm node` processes serving the tiny random model: a SPARC
//! workflow across three nodes whose owner is SIGKILLed mid-workflow, agents moving off a dead
//! node, cancellation freeing the sequence's KV, and bad submissions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use swarm_tests::{Client, NodeProc, admin_token, init_cluster, serve_models, start_joined};

/// Append TOML to a node config.
fn append(config: &Path, text: &str) -> Result<()> {
    let mut t = std::fs::read_to_string(config)?;
    t.push('\n');
    t.push_str(text);
    std::fs::write(config, t)?;
    Ok(())
}

/// Make the node at `config` serve `tiny`, a tiny random model with a 2048-token context (the
/// agents' prompts carry earlier stages).
fn serve_tiny(config: &Path, extra: &str) -> Result<()> {
    let dir = config.parent().context("config folder")?.join("tiny-2k");
    std::fs::create_dir_all(&dir)?;
    let spec = swarm_gpu::testmodel::TinySpec {
        context: 2048,
        ..Default::default()
    };
    let path = swarm_gpu::testmodel::write_gguf(&dir, &spec)?;
    serve_models(config, &[("tiny", Some(&path))], extra)?;
    Ok(())
}

/// Poll `GET /v1/tasks/{id}` on `c` until `done` says so.
fn wait_task(
    c: &Client,
    id: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok((200, t)) = c.get(&format!("/v1/tasks/{id}")) {
            if done(&t) {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!("task {id} never got there: {t}");
            }
        } else if Instant::now() > deadline {
            bail!("task {id} not readable");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(c: &Client, name: &str) -> Result<f64> {
    let text = c.get_text("/metrics")?;
    text.lines()
        .find(|l| l.starts_with(name) && l.contains("model=\"tiny\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

/// The default kind table (config/src/tasks.rs): which agents may run each SPARC stage.
fn allowed_agents(stage: &str) -> &'static [&'static str] {
    match stage {
        "specification" | "pseudocode" | "architecture" => &[
            "orchestration-coordinator",
            "security-architect",
            "api-architect",
        ],
        "implementation" => &["vllm-specialist", "container-devops", "memory-systems"],
        "refinement" => &["security-architect", "performance-engineer"],
        "testing" => &["testing-qa", "performance-engineer"],
        "completion" => &["orchestration-coordinator"],
        _ => &[],
    }
}

const SLOW_SPARC: &str = r#"
[tasks.workflows.sparc]
description = "SPARC with longer stages, so a node can die mid-workflow"
stages = [
  { name = "specification", kind = "planner", prompt = "Specify {objective}", max_tokens = 96 },
  { name = "pseudocode", kind = "planner", prompt = "Pseudocode for {objective}", max_tokens = 96 },
  { name = "architecture", kind = "planner", prompt = "Architecture of {objective}", max_tokens = 96 },
  { name = "implementation", kind = "coder", prompt = "Implement {objective}", max_tokens = 96 },
  { name = "refinement", kind = "critic", prompt = "Refine {objective}", max_tokens = 96 },
  { name = "testing", kind = "qa", prompt = "Test {objective}", max_tokens = 96 },
  { name = "completion", kind = "judge", prompt = "Judge {objective}", max_tokens = 96 },
]
"#;

#[test]
fn a_sparc_workflow_survives_its_owner_being_killed_and_agents_move() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 3)?;
    for c in &configs {
        serve_tiny(c, "max_running = 16\nkv_tokens = 16384")?;
        append(c, SLOW_SPARC)?;
    }
    let admin = admin_token(dir.path())?;
    let (mut nodes, clients) = start_joined(&configs, &admin)?;
    for c in &clients {
        swarm_tests::wait_inference(c, "ready")?;
    }

    // Every agent has a live home, and the eight are spread by rendezvous hashing.
    let deadline = Instant::now() + Duration::from_secs(20);
    let agents = loop {
        let (s, a) = clients[0].get("/v1/agents")?;
        assert_eq!(s, 200, "{a}");
        let list = a["agents"].as_array().context("agents")?.clone();
        if list.len() == 8 && list.iter().all(|x| x["state"] == "idle") {
            break list;
        }
        if Instant::now() > deadline {
            bail!("agents never all idle: {a}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(agents[0]["id"], "orchestration-coordinator");

    let (s, sub) = clients[0].post_json(
        "/v1/tasks",
        &json!({"objective": "Design a rate limiter for the gateway", "workflow": "sparc",
                "priority": "high", "context": {"service_names": ["gateway"]}}),
    )?;
    assert!(s == 202 || s == 201, "{s} {sub}");
    let id = sub["task_id"].as_str().context("task_id")?.to_string();
    let owner = sub["owner"].as_str().context("owner")?.to_string();

    // The same objective again is not started twice.
    let (s, dup) = clients[1].post_json(
        "/v1/tasks",
        &json!({"objective": "design a rate limiter  for the gateway", "workflow": "sparc",
                "context": {"service_names": ["gateway"]}}),
    )?;
    assert!(s == 202 || s == 201 || s == 200, "{s} {dup}");
    assert_eq!(dup["deduplicated"], true, "{dup}");
    assert_eq!(dup["task_id"], id.as_str());

    // Kill the owner once two stages are recorded.
    let k: usize = owner.trim_start_matches("node-").parse()?;
    let survivor = &clients[if k == 1 { 1 } else { 0 }];
    let mid = wait_task(survivor, &id, Duration::from_secs(120), |t| {
        t["stages_completed"].as_u64().unwrap_or(0) >= 2
    })?;
    assert_ne!(
        mid["status"], "completed",
        "too fast to kill mid-workflow: {mid}"
    );
    nodes[k - 1].kill()?;
    let killed_at = Instant::now();

    let done = wait_task(survivor, &id, Duration::from_secs(180), |t| {
        t["status"] == "completed" || t["status"] == "failed" || t["status"] == "dead_letter"
    })?;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(
        done["epoch"].as_u64().unwrap_or(0) >= 2,
        "not adopted: {done}"
    );
    assert_ne!(done["owner"], owner.as_str());
    eprintln!(
        "completed {:.1} s after the owner was killed",
        killed_at.elapsed().as_secs_f64()
    );

    // Seven results, each on an agent mapped to its kind, each stage once.
    let (s, res) = survivor.get(&format!("/v1/tasks/{id}/results"))?;
    assert_eq!(s, 200, "{res}");
    let results = res["results"].as_array().context("results")?;
    assert_eq!(results.len(), 7, "{res}");
    let mut stages = BTreeSet::new();
    for r in results {
        let stage = r["stage"].as_str().context("stage")?;
        assert!(stages.insert(stage.to_string()), "{stage} twice");
        let agent = r["agent"].as_str().context("agent")?;
        assert!(
            allowed_agents(stage).contains(&agent),
            "{stage} ran on {agent}"
        );
    }
    assert_eq!(done["progress"].as_f64(), Some(1.0));

    // No stage result was written twice on the nodes still up (the audit entry of each write).
    for (i, c) in clients.iter().enumerate() {
        if i == k - 1 {
            continue;
        }
        let mut writes: BTreeMap<String, u32> = BTreeMap::new();
        let mut after = 0u64;
        loop {
            let (s, audit) = c.get(&format!("/v1/audit?after={after}&limit=500"))?;
            assert_eq!(s, 200, "{audit}");
            let entries = audit["entries"].as_array().context("entries")?;
            for e in entries {
                let resource = e["resource"].as_str().unwrap_or_default();
                if e["action"] == "tasks.record"
                    && e["outcome"] == "ok"
                    && resource.starts_with(&format!("tasks/{id}/stage/"))
                {
                    *writes.entry(resource.to_string()).or_default() += 1;
                }
            }
            match entries.last().and_then(|e| e["seq"].as_u64()) {
                Some(seq) if entries.len() == 500 => after = seq,
                _ => break,
            }
        }
        assert!(writes.values().all(|n| *n == 1), "{writes:?}");
    }

    // The killed node's agents are homed elsewhere now.
    let dead = format!("node-{k}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, a) = survivor.get("/v1/agents")?;
        let list = a["agents"].as_array().context("agents")?;
        let ok = list
            .iter()
            .all(|x| x["node"] != dead.as_str() && x["state"] != "offline");
        if ok {
            break;
        }
        if Instant::now() > deadline {
            bail!("agents still on {dead}: {a}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn cancelling_mid_stage_frees_the_kv_and_bad_submissions_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 1)?;
    serve_tiny(&configs[0], "max_running = 8\nkv_tokens = 8192")?;
    append(
        &configs[0],
        r#"
[tasks.workflows.long]
stages = [{ name = "write", kind = "answer", prompt = "Write at length about {objective}", max_tokens = 1500 }]
"#,
    )?;
    let admin = admin_token(dir.path())?;
    let node = NodeProc::start(&configs[0])?;
    let c = node.client(&admin);
    swarm_tests::wait_inference(&c, "ready")?;

    for (body, status, field) in [
        (
            json!({"objective": "x", "priority": "urgent"}),
            400,
            "priority",
        ),
        (
            json!({"objective": "x", "workflow": "nope"}),
            400,
            "workflow",
        ),
        (json!({"objective": "  "}), 400, "objective"),
        (
            json!({"objective": "x", "context": {"file_paths": "a.rs"}}),
            400,
            "context.file_paths",
        ),
        (
            json!({"objective": "x", "capabilities": ["telepathy"]}),
            422,
            "capabilities[0]",
        ),
    ] {
        let (s, e) = c.post_json("/v1/tasks", &body)?;
        assert_eq!(s, status, "{body} → {e}");
        assert_eq!(e["error"]["field"], field, "{e}");
    }

    let (s, sub) = c.post_json(
        "/v1/tasks",
        &json!({"objective": "the history of queues", "workflow": "long"}),
    )?;
    assert!(s == 202 || s == 201, "{sub}");
    let id = sub["task_id"].as_str().context("task_id")?.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&c, "swarm_inference_kv_blocks_used")? == 0.0 {
        if Instant::now() > deadline {
            bail!("the stage never started");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (s, cancelled) = c.request("DELETE", &format!("/v1/tasks/{id}"), None)?;
    assert_eq!(s, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    let freed = Instant::now();
    while metric(&c, "swarm_inference_kv_blocks_used")? > 0.0 {
        if freed.elapsed() > Duration::from_secs(1) {
            bail!("the cancelled stage's KV was not freed within a second");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (s, again) = c.request("DELETE", &format!("/v1/tasks/{id}"), None)?;
    assert_eq!(s, 409, "{again}");
    assert_eq!(again["error"]["code"], "task_finished");
    Ok(())
}
