//! `ClusterInference` driven by a fake engine on an in-memory network: routing by gossip load and
//! by what a node has in flight, a peer dying mid-stream, cancellation reaching the serving
//! node, and failures travelling back as themselves.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use swarm_actors::inference::{
    BoxFuture, Chunk, ClusterModel, Failure, FailureCode, FinishReason, Generation, Input,
    LocalModel, LocalModels, MemInferenceNet, ModelStatus, Request, Sampling, Usage,
};
use swarm_actors::{ClusterInference, Inference};
use swarm_membership::ModelMeta;

/// A fake engine. A prompt of `hang` sends one chunk, then waits until its reader goes away
/// (counted in `cancelled`); any other input sends `max_tokens` chunks (4 by default) and
/// `Done`. A temperature over 2 is refused, naming the field, as the real engine does.
struct Fake {
    node: String,
    models: Vec<LocalModel>,
    cancelled: Arc<AtomicU64>,
    served: AtomicU64,
}

impl Fake {
    fn new(node: &str, models: &[(&str, ModelStatus)]) -> Arc<Self> {
        Arc::new(Self {
            node: node.into(),
            models: models
                .iter()
                .map(|(name, status)| LocalModel {
                    name: name.to_string(),
                    status: status.clone(),
                    load: 0,
                    slots: 8,
                })
                .collect(),
            cancelled: Arc::default(),
            served: AtomicU64::new(0),
        })
    }

    fn serving(node: &str) -> Arc<Self> {
        Self::new(node, &[("m", ModelStatus::Ready)])
    }
}

impl LocalModels for Fake {
    fn models(&self) -> Vec<LocalModel> {
        self.models.clone()
    }

    fn generate(&self, req: Request) -> BoxFuture<'_, Result<Generation, Failure>> {
        Box::pin(async move {
            let Some(m) = self.models.iter().find(|m| m.name == req.model) else {
                return Err(Failure::new(FailureCode::ModelNotFound, "not here"));
            };
            if m.status != ModelStatus::Ready {
                return Err(Failure::unavailable(format!("{} is {}", m.name, m.status)));
            }
            if req.sampling.temperature > 2.0 {
                return Err(Failure::invalid("temperature", "must be between 0 and 2"));
            }
            self.served.fetch_add(1, Relaxed);
            let cancelled = self.cancelled.clone();
            let hang = req.input == Input::Prompt("hang".into());
            let n = req.sampling.max_tokens.unwrap_or(4);
            let (tx, generation) = Generation::channel(self.node.clone(), 5);
            tokio::spawn(async move {
                if hang {
                    let _ = tx.send(Chunk::Text("t0".into())).await;
                    tx.closed().await;
                    cancelled.fetch_add(1, Relaxed);
                    return;
                }
                for i in 0..n {
                    if tx.send(Chunk::Text(format!("t{i}"))).await.is_err() {
                        return;
                    }
                }
                let _ = tx
                    .send(Chunk::Done(Usage {
                        finish_reason: FinishReason::Length,
                        prompt_tokens: 5,
                        completion_tokens: n,
                    }))
                    .await;
            });
            Ok(generation)
        })
    }
}

fn req(model: &str, prompt: &str) -> Request {
    Request {
        model: model.into(),
        input: Input::Prompt(prompt.into()),
        sampling: Sampling::default(),
    }
}

fn meta(load: u32) -> Vec<ModelMeta> {
    vec![ModelMeta {
        name: "m".into(),
        load,
        slots: 8,
    }]
}

/// Reads a generation to its end: the text, then how it ended.
async fn drain(mut g: Generation) -> (String, Chunk) {
    let mut text = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), g.next()).await {
            Ok(Some(Chunk::Text(t))) => text.push_str(&t),
            Ok(Some(end)) => {
                assert_eq!(g.next().await, None, "nothing after the end");
                return (text, end);
            }
            Ok(None) => panic!("a generation ends with Done or Failed"),
            Err(_) => panic!("the generation stalled"),
        }
    }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

async fn start(inf: &ClusterInference, r: Request) -> Generation {
    inf.generate(r).await.unwrap()
}

#[tokio::test]
async fn requests_go_to_the_least_loaded_node_counting_what_is_in_flight() {
    let net = MemInferenceNet::new();
    let gw = net.join("gw", Fake::new("gw", &[]));
    let a = Fake::serving("a");
    let b = Fake::serving("b");
    let _a = net.join("a", a.clone());
    let _b = net.join("b", b.clone());

    assert_eq!(
        gw.models(),
        vec![ClusterModel {
            name: "m".into(),
            nodes: vec!["a".into(), "b".into()]
        }]
    );

    // Gossip: a is busy, b is not.
    net.set_models("a", meta(6));
    net.set_models("b", meta(1));
    let g = start(&gw, req("m", "hi")).await;
    assert_eq!((g.node(), g.prompt_tokens()), ("b", 5));
    let (text, end) = drain(g).await;
    assert_eq!(text, "t0t1t2t3");
    assert!(
        matches!(end, Chunk::Done(u) if u.completion_tokens == 4 && u.finish_reason == FinishReason::Length)
    );

    // Equal gossip: the first goes to a, the second to b, since gw has one running on a.
    net.set_models("a", meta(0));
    net.set_models("b", meta(0));
    let g1 = start(&gw, req("m", "hang")).await;
    let g2 = start(&gw, req("m", "hang")).await;
    assert_eq!((g1.node(), g2.node()), ("a", "b"));
    assert_eq!((gw.in_flight("a"), gw.in_flight("b")), (1, 1));
    drop((g1, g2));
    eventually("in-flight counts drop", || {
        gw.in_flight("a") == 0 && gw.in_flight("b") == 0
    })
    .await;
}

#[tokio::test]
async fn this_node_serves_its_own_models_and_wins_ties() {
    let net = MemInferenceNet::new();
    let me = Fake::serving("me");
    let inf = net.join("me", me.clone());
    let peer = Fake::serving("peer");
    let _peer = net.join("peer", peer.clone());
    let g = start(&inf, req("m", "hi")).await;
    assert_eq!(g.node(), "me");
    drain(g).await;
    assert_eq!((me.served.load(Relaxed), peer.served.load(Relaxed)), (1, 0));
    assert_eq!(inf.advertised(), meta(0));
    // A standalone node (no network) runs only its own models.
    let alone = ClusterInference::new("alone", Fake::serving("alone"), None);
    assert_eq!(start(&alone, req("m", "x")).await.node(), "alone");
    let missing = alone.generate(req("other", "x")).await.err().unwrap();
    assert_eq!(missing.code, FailureCode::ModelNotFound);
}

#[tokio::test]
async fn a_peer_dying_mid_stream_ends_the_generation_with_a_failure() {
    let net = MemInferenceNet::new();
    let gw = net.join("gw", Fake::new("gw", &[]));
    let _a = net.join("a", Fake::serving("a"));
    let mut g = start(&gw, req("m", "hang")).await;
    assert_eq!(g.next().await, Some(Chunk::Text("t0".into())));
    net.kill("a");
    let (text, end) = drain(g).await;
    assert_eq!(text, "");
    match end {
        Chunk::Failed(f) => assert_eq!(f.code, FailureCode::ModelUnavailable, "{f}"),
        other => panic!("{other:?}"),
    }
    eventually("the dead peer's request is off the count", || {
        gw.in_flight("a") == 0
    })
    .await;
    // Gone from the view: nobody serves the model now.
    assert!(gw.models().is_empty());
    let f = gw.generate(req("m", "hi")).await.err().unwrap();
    assert_eq!(f.code, FailureCode::ModelNotFound);
}

#[tokio::test]
async fn dropping_a_generation_cancels_the_sequence_on_the_serving_node() {
    let net = MemInferenceNet::new();
    let gw = net.join("gw", Fake::new("gw", &[]));
    let a = Fake::serving("a");
    let _a = net.join("a", a.clone());
    let mut g = start(&gw, req("m", "hang")).await;
    assert_eq!(g.next().await, Some(Chunk::Text("t0".into())));
    assert_eq!(a.cancelled.load(Relaxed), 0);
    drop(g);
    eventually("the serving node sees the cancel", || {
        a.cancelled.load(Relaxed) == 1
    })
    .await;
    eventually("the request is off the count", || gw.in_flight("a") == 0).await;
}

#[tokio::test]
async fn failures_from_the_serving_node_come_back_as_themselves() {
    let net = MemInferenceNet::new();
    let gw = net.join(
        "gw",
        Fake::new("gw", &[("local-only", ModelStatus::Loading)]),
    );
    let _a = net.join("a", Fake::serving("a"));

    let mut hot = req("m", "hi");
    hot.sampling.temperature = 9.0;
    let f = gw.generate(hot).await.err().unwrap();
    assert_eq!(
        (f.code, f.field.as_deref()),
        (FailureCode::InvalidField, Some("temperature"))
    );

    // Configured here but still loading, and nobody else has it: the local state is the answer.
    let f = gw.generate(req("local-only", "x")).await.err().unwrap();
    assert_eq!(f.code, FailureCode::ModelUnavailable, "{f}");

    let f = gw.generate(req("nowhere", "x")).await.err().unwrap();
    assert_eq!(f.code, FailureCode::ModelNotFound);

    // Gossip that lies (a claims a model it does not serve): a refuses, and says so.
    net.set_models(
        "a",
        vec![ModelMeta {
            name: "ghost".into(),
            load: 0,
            slots: 1,
        }],
    );
    let f = gw.generate(req("ghost", "x")).await.err().unwrap();
    assert_eq!(f.code, FailureCode::ModelNotFound);
    assert!(f.message.contains("a does not serve"), "{f}");
}
