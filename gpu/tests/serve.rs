//! This node's models ([`LocalServer`]) on the real engine with the tiny random model, driven
//! through `ClusterInference` on the in-memory network: a request from a node without the model
//! runs on the node with it and gives the same greedy text as there; dropping it mid-stream
//! cancels the sequence and frees its KV on the serving node; engine errors keep their code and
//! field across the hop.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use swarm_actors::Inference;
use swarm_actors::inference::{
    Chunk, ClusterModel, FailureCode, FinishReason, Generation, Input, LocalModels,
    MemInferenceNet, Message, ModelStatus, Request, Sampling,
};
use swarm_gpu::testmodel::{TinySpec, write_gguf};
use swarm_gpu::{EngineConfig, EngineHandle, InferenceSupervisor, LocalServer, SchedulerConfig};

async fn tiny_server(dir: &tempfile::TempDir) -> Arc<LocalServer> {
    let path = write_gguf(dir.path(), &TinySpec::default()).unwrap();
    let engine = EngineConfig {
        scheduler: SchedulerConfig {
            max_waiting: 16,
            max_running: 4,
            prefill_tokens: 512,
        },
        kv_tokens: 4096,
        ..EngineConfig::default()
    };
    let sup = InferenceSupervisor::start(3).await.unwrap();
    let server = LocalServer::new(
        "gpu",
        vec![("tiny".into(), Ok(path))],
        engine,
        16,
        Some(sup),
    );
    wait_for("the tiny model to be ready", || {
        server.models()[0].status == ModelStatus::Ready
    })
    .await;
    server
}

fn engine(server: &LocalServer) -> EngineHandle {
    server.served().next().unwrap().engine().unwrap()
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    for _ in 0..3000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn chat(max_tokens: u32) -> Request {
    Request {
        model: "tiny".into(),
        input: Input::Chat(vec![Message {
            role: "user".into(),
            content: "hello".into(),
        }]),
        sampling: Sampling {
            max_tokens: Some(max_tokens),
            temperature: 0.0,
            ignore_eos: true,
            ..Sampling::default()
        },
    }
}

async fn text_of(mut g: Generation) -> (String, Chunk) {
    let mut text = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), g.next())
            .await
            .unwrap()
        {
            Some(Chunk::Text(t)) => text.push_str(&t),
            Some(end) => return (text, end),
            None => panic!("no end"),
        }
    }
}

#[tokio::test]
async fn a_request_runs_on_the_node_with_the_model_and_matches_a_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = tiny_server(&dir).await;
    let net = MemInferenceNet::new();
    let nothing = LocalServer::new("gw", Vec::new(), EngineConfig::default(), 16, None);
    let gw = net.join("gw", nothing);
    let gpu = net.join("gpu", server.clone());
    assert_eq!(
        gw.models(),
        vec![ClusterModel {
            name: "tiny".into(),
            nodes: vec!["gpu".into()]
        }]
    );

    let remote = gw.generate(chat(8)).await.unwrap();
    assert_eq!(remote.node(), "gpu");
    let prompt_tokens = remote.prompt_tokens();
    assert!(prompt_tokens > 0);
    let (remote_text, end) = text_of(remote).await;
    let Chunk::Done(usage) = end else {
        panic!("{end:?}")
    };
    assert_eq!(
        (
            usage.finish_reason,
            usage.completion_tokens,
            usage.prompt_tokens
        ),
        (FinishReason::Length, 8, prompt_tokens)
    );
    let local = gpu.generate(chat(8)).await.unwrap();
    assert_eq!(local.node(), "gpu");
    let (local_text, _) = text_of(local).await;
    assert_eq!(remote_text, local_text);
    assert!(!local_text.is_empty());

    // A prompt without max_tokens gets the serving node's default (16 here).
    let mut prompt = chat(1);
    prompt.input = Input::Prompt("once upon".into());
    prompt.sampling.max_tokens = None;
    let (_, end) = text_of(gw.generate(prompt).await.unwrap()).await;
    assert!(
        matches!(end, Chunk::Done(u) if u.completion_tokens == 16),
        "{end:?}"
    );
}

#[tokio::test]
async fn dropping_a_remote_generation_frees_its_kv_on_the_serving_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = tiny_server(&dir).await;
    let net = MemInferenceNet::new();
    let gw = net.join(
        "gw",
        LocalServer::new("gw", Vec::new(), EngineConfig::default(), 16, None),
    );
    let _gpu = net.join("gpu", server.clone());
    let stats = engine(&server).stats().clone();

    let mut g = gw.generate(chat(400)).await.unwrap();
    assert!(matches!(g.next().await, Some(Chunk::Text(_))));
    assert!(stats.kv_used_blocks.load(Relaxed) > 0);
    drop(g);
    wait_for("the cancelled sequence's KV to be freed", || {
        stats.kv_used_blocks.load(Relaxed) == 0 && stats.cancelled.load(Relaxed) >= 1
    })
    .await;
    wait_for("the request to be off the count", || {
        gw.in_flight("gpu") == 0
    })
    .await;
}

#[tokio::test]
async fn engine_errors_cross_the_hop_with_their_code_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = tiny_server(&dir).await;
    let net = MemInferenceNet::new();
    let gw = net.join(
        "gw",
        LocalServer::new("gw", Vec::new(), EngineConfig::default(), 16, None),
    );
    let _gpu = net.join("gpu", server);
    let fail = |r: Request| {
        let gw = gw.clone();
        async move {
            let f = gw.generate(r).await.err().unwrap();
            (f.code, f.field.unwrap_or_default())
        }
    };
    let mut hot = chat(4);
    hot.sampling.temperature = 9.0;
    assert_eq!(
        fail(hot).await,
        (FailureCode::InvalidField, "temperature".into())
    );
    let mut long = chat(4);
    long.input = Input::Prompt("x".repeat(600)); // 600 byte tokens > the 512-token context
    assert_eq!(
        fail(long).await,
        (FailureCode::ContextLengthExceeded, "prompt".into())
    );
    assert_eq!(
        fail(chat(1_000_000_000)).await,
        (FailureCode::ContextLengthExceeded, "max_tokens".into())
    );
}
