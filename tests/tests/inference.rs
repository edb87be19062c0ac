//! Inference through real `swarm node` processes serving the tiny random model: the OpenAI API
//! (plain and streamed), its errors, cancellation freeing KV, a missing or corrupt model,
//! routing to the node that has the model, and the official `openai` Python client.

use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use swarm_tests::{
    Client, NodeProc, admin_token, init_cluster, serve_models, start_joined, token, wait_inference,
};

fn chat(max_tokens: u64, stream: bool) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
           "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": stream})
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(resp: ureq::Response) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line?;
        if let Some(d) = line.strip_prefix("data: ") {
            out.push(d.to_string());
        }
    }
    Ok(out)
}

fn metric(c: &Client, name: &str) -> Result<f64> {
    let text = c.get_text("/metrics")?;
    text.lines()
        .find(|l| l.starts_with(name) && l.contains("model=\"tiny\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

fn error_of(r: (u16, Value)) -> (u16, String, String) {
    let e = &r.1["error"];
    (
        r.0,
        e["code"].as_str().unwrap_or_default().to_string(),
        e["param"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn openai_api_on_a_node_serving_the_tiny_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 1)?;
    serve_models(
        &configs[0],
        &[("tiny", None)],
        "max_running = 8\nkv_tokens = 4096",
    )?;
    let admin = admin_token(dir.path())?;
    let node = NodeProc::start(&configs[0])?;
    let c = node.client(&admin);
    wait_inference(&c, "ready")?;

    let (status, models) = c.get("/v1/models")?;
    assert_eq!(status, 200, "{models}");
    assert_eq!(models["data"][0]["id"], "tiny");

    // Plain and streamed chat give the same greedy text; usage and finish_reason are right.
    let (status, plain) = c.post_json("/v1/chat/completions", &chat(8, false))?;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(plain["choices"][0]["finish_reason"], "length");
    assert_eq!(plain["usage"]["completion_tokens"], 8);
    let text = plain["choices"][0]["message"]["content"]
        .as_str()
        .context("content")?
        .to_string();
    let resp = c.post_raw("/v1/chat/completions", &chat(8, true))?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let data = sse_data(resp)?;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d))
        .collect::<Result<_, _>>()?;
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(
        chunks.last().context("chunks")?["choices"][0]["finish_reason"],
        "length"
    );

    let (status, comp) = c.post_json(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "once upon", "max_tokens": 5, "temperature": 0.7, "seed": 3, "ignore_eos": true}),
    )?;
    assert_eq!(status, 200, "{comp}");
    assert_eq!(comp["object"], "text_completion");
    assert_eq!(comp["usage"]["completion_tokens"], 5);

    // Bad input: clear errors naming the field, in OpenAI's shape.
    let bad = |body: Value| c.post_json("/v1/chat/completions", &body).map(error_of);
    assert_eq!(
        bad(json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}))?.1,
        "model_not_found"
    );
    let long = "x".repeat(600); // 600 byte tokens > the 512-token context
    assert_eq!(
        bad(json!({"model": "tiny", "messages": [{"role": "user", "content": long}]}))?,
        (400, "context_length_exceeded".into(), "prompt".into())
    );
    assert_eq!(
        bad(
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0})
        )?,
        (400, "invalid_field".into(), "max_tokens".into())
    );
    assert_eq!(
        bad(
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1_000_000_000u64})
        )?,
        (400, "context_length_exceeded".into(), "max_tokens".into())
    );
    assert_eq!(
        bad(
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 5})
        )?,
        (400, "invalid_field".into(), "temperature".into())
    );
    assert_eq!(
        bad(json!({"model": "tiny", "messages": "hello"}))?.2,
        "messages"
    );
    assert_eq!(bad(json!({"model": "tiny", "messages": []}))?.2, "messages");
    assert_eq!(
        bad(json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}))?.2,
        "messages[0].role"
    );
    let (status, e) = c.request("POST", "/v1/chat/completions", Some(b"{not json"))?;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let (status, _) = node
        .anonymous()
        .post_json("/v1/chat/completions", &chat(1, false))?;
    assert_eq!(status, 401);
    let viewer = token(dir.path(), "eve", "viewer")?;
    assert_eq!(
        node.client(&viewer)
            .post_json("/v1/chat/completions", &chat(1, false))?
            .0,
        403
    );

    // A client that goes away mid-stream cancels its sequence and frees its KV.
    let resp = c.post_raw("/v1/chat/completions", &chat(400, true))?;
    let mut reader = std::io::BufReader::new(resp.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line)?;
    assert!(line.starts_with("data: "), "{line}");
    assert!(metric(&c, "swarm_inference_kv_blocks_used")? > 0.0);
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&c, "swarm_inference_kv_blocks_used")? > 0.0
        || metric(&c, "swarm_inference_cancelled_total")? < 1.0
    {
        if Instant::now() > deadline {
            bail!(
                "the cancelled stream's KV was not freed: {}",
                c.get_text("/metrics")?
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let h = c.get("/health")?.1;
    assert_eq!(h["models"]["tiny"], "ready");
    Ok(())
}

#[test]
fn requests_route_to_the_node_with_the_model_and_broken_models_are_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 2)?;
    serve_models(&configs[0], &[("tiny", None)], "")?;
    let garbage = dir.path().join("broken.gguf");
    std::fs::write(&garbage, b"GGUF\x03\x00\x00\x00 not a model")?;
    let missing = dir.path().join("missing.gguf");
    serve_models(
        &configs[1],
        &[("broken", Some(&garbage)), ("ghost", Some(&missing))],
        "",
    )?;
    let admin = admin_token(dir.path())?;
    let (_nodes, clients) = start_joined(&configs, &admin)?;
    wait_inference(&clients[0], "ready")?;
    let h = wait_inference(&clients[1], "unavailable")?;
    assert_eq!(h["status"], "degraded");
    assert!(
        h["models"]["ghost"]
            .as_str()
            .is_some_and(|s| s.starts_with("unavailable")),
        "{h}"
    );
    assert!(
        h["models"]["broken"]
            .as_str()
            .is_some_and(|s| s.starts_with("unavailable")),
        "{h}"
    );

    let (status, e) = clients[1].post_json(
        "/v1/chat/completions",
        &json!({"model": "ghost", "messages": [{"role": "user", "content": "x"}]}),
    )?;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (503, Some("model_unavailable")),
        "{e}"
    );

    // node-2 has no working tiny: its gateway sends the request to node-1 once gossip says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, models) = clients[1].get("/v1/models")?;
        if models["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == "tiny"))
        {
            assert_eq!(models["data"][0]["nodes"], json!(["node-1"]));
            break;
        }
        if Instant::now() > deadline {
            bail!("node-2 never learnt that node-1 serves tiny: {models}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let resp = clients[1].post_raw("/v1/chat/completions", &chat(6, false))?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.header("x-swarm-node"), Some("node-1"));
    let remote: Value = serde_json::from_str(&resp.into_string()?)?;
    let (_, local) = clients[0].post_json("/v1/chat/completions", &chat(6, false))?;
    assert_eq!(
        remote["choices"][0]["message"]["content"],
        local["choices"][0]["message"]["content"]
    );
    assert_eq!(remote["usage"], local["usage"]);
    // Streamed across nodes too, and an error from the far node comes back as itself.
    let data = sse_data(clients[1].post_raw("/v1/chat/completions", &chat(6, true))?)?;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let (status, e) = clients[1].post_json(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9}),
    )?;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("temperature")),
        "{e}"
    );

    // A client of node-2 that goes away mid-stream cancels the sequence on node-1 (the QUIC
    // stream's end reaches it) and frees its KV there.
    let resp = clients[1].post_raw("/v1/chat/completions", &chat(400, true))?;
    assert_eq!(resp.header("x-swarm-node"), Some("node-1"));
    let mut reader = std::io::BufReader::new(resp.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line)?;
    assert!(line.starts_with("data: "), "{line}");
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&clients[0], "swarm_inference_kv_blocks_used")? > 0.0
        || metric(&clients[0], "swarm_inference_cancelled_total")? < 1.0
    {
        if Instant::now() > deadline {
            bail!(
                "the remote stream's sequence was not cancelled: {}",
                clients[0].get_text("/metrics")?
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A venv with the `openai` package from PyPI, kept in the target folder between runs.
fn openai_venv() -> Result<std::path::PathBuf> {
    let target = swarm_tests::swarm_bin()
        .parent()
        .and_then(Path::parent)
        .context("target dir")?
        .to_path_buf();
    let venv = target.join("openai-venv");
    let python = venv.join("bin").join("python");
    let ready = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let st = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("python3 -m venv (install python3-venv)")?;
        if !st.success() {
            bail!("python3 -m venv failed");
        }
        let st = std::process::Command::new(venv.join("bin").join("pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai==1.109.1",
            ])
            .status()
            .context("pip install openai")?;
        if !st.success() {
            bail!("pip install openai failed");
        }
    }
    Ok(python)
}

#[test]
fn the_official_openai_python_client_works() -> Result<()> {
    let python = openai_venv()?;
    let dir = tempfile::tempdir()?;
    let configs = init_cluster(dir.path(), 1)?;
    serve_models(&configs[0], &[("tiny", None)], "")?;
    let admin = admin_token(dir.path())?;
    let node = NodeProc::start(&configs[0])?;
    wait_inference(&node.client(&admin), "ready")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join("openai_client.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&node.url)
        .arg(&admin)
        // The client (httpx) trusts the cluster CA through SSL_CERT_FILE.
        .env("SSL_CERT_FILE", node.ca.as_deref().unwrap_or(Path::new("")))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("openai client ok"), "{stdout}");
    Ok(())
}
