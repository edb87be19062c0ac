//! The engine thread end to end on the tiny model: batching does not change greedy output,
//! cancelled streams free their KV, limits are clear errors, and a crash is a supervised restart.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use swarm_gpu::testmodel::{TinySpec, write_gguf};
use swarm_gpu::{
    BatchItem, EngineConfig, EngineHandle, Event, FinishReason, LanguageModel, Llama,
    SamplingParams, SchedulerConfig, TextTokenizer,
};
use swarm_gpu::{InferenceSupervisor, Served};

fn tiny() -> (tempfile::TempDir, Arc<Llama>, Arc<TextTokenizer>) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), &TinySpec::default()).unwrap();
    let (m, t) = swarm_gpu::load(&path).unwrap();
    (dir, Arc::new(m), Arc::new(t))
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Reads a generation to its end: (text, finish reason, completion tokens), or None if the stream
/// closed without an end.
async fn collect(mut g: swarm_gpu::Generation) -> Option<(String, FinishReason, usize)> {
    let mut text = String::new();
    while let Some(e) = g.events.recv().await {
        match e {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                reason,
                completion_tokens,
                ..
            } => return Some((text, reason, completion_tokens)),
            Event::Failed(e) => panic!("failed: {e}"),
        }
    }
    None
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn prompts_sharing_a_prefix_reuse_its_kv_and_get_the_same_tokens() {
    let (_d, m, t) = tiny();
    let system = "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\n";
    let prompts: Vec<Vec<u32>> = ["first question", "second one", "first question"]
        .iter()
        .map(|q| t.encode(&format!("{system}{q}")).unwrap())
        .collect();
    let shared = t.encode(system).unwrap().len();
    let run = |prefix_cache_tokens: usize| {
        let (m, t, prompts) = (m.clone(), t.clone(), prompts.clone());
        async move {
            let config = EngineConfig {
                prefix_cache_tokens,
                ..EngineConfig::default()
            };
            let engine = EngineHandle::start(m, t, config).unwrap();
            let mut out = Vec::new();
            for p in prompts {
                out.push(
                    collect(engine.submit(p, greedy(12)).unwrap())
                        .await
                        .unwrap(),
                );
            }
            let cached = engine.stats().prompt_tokens_cached.load(Relaxed) as usize;
            (
                out,
                cached,
                engine.stats().prefix_cache_tokens.load(Relaxed),
            )
        }
    };
    let (plain, none, held_none) = run(0).await;
    let (reused, cached, held) = run(4096).await;
    assert_eq!(reused, plain, "prefix reuse changed the greedy output");
    assert_eq!((none, held_none), (0, 0));
    // The second prompt reuses the shared system part; the third, all but its last token.
    assert!(
        cached >= shared - 1 + prompts[2].len() - 1,
        "{cached} tokens reused"
    );
    assert!(held as usize >= prompts[0].len() + prompts[1].len() - 1);
}

#[tokio::test]
async fn a_finished_answer_keeps_its_kv_for_the_next_turn() {
    let (_d, m, t) = tiny();
    let config = EngineConfig {
        prefix_cache_tokens: 4096,
        ..EngineConfig::default()
    };
    let engine = EngineHandle::start(m, t.clone(), config).unwrap();
    let first = t
        .encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let (_, _, generated) = collect(engine.submit(first.clone(), greedy(12)).unwrap())
        .await
        .unwrap();
    assert_eq!(generated, 12);
    // The prompt's entry gave way to the whole sequence: the prompt and every answer token but
    // the last one sampled (its KV is never computed), so a next turn that replays the answer
    // computes only what follows it.
    // (The engine keeps it right after sending the end.)
    let want = (first.len() + generated - 1) as u64;
    wait_for("the answer kept", || {
        engine.stats().prefix_cache_tokens.load(Relaxed) == want
    })
    .await;
}

#[tokio::test]
async fn concurrent_requests_get_what_they_get_alone() {
    let (_d, m, t) = tiny();
    let engine = EngineHandle::start(m, t.clone(), EngineConfig::default()).unwrap();
    let prompts = [
        "hello there",
        "a much longer prompt with many more bytes in it",
        "x",
        "<|im_start|>user\nhi",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        let g = engine.submit(t.encode(p).unwrap(), greedy(20)).unwrap();
        alone.push(collect(g).await.unwrap());
    }
    let gens: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(t.encode(p).unwrap(), greedy(20)).unwrap())
        .collect();
    let mut together = Vec::new();
    for g in gens {
        together.push(collect(g).await.unwrap());
    }
    assert_eq!(together, alone);
    assert!(
        alone
            .iter()
            .all(|(_, r, n)| *r == FinishReason::Length && *n == 20)
    );
    let (buckets, _, steps) = engine.stats().batch_size.snapshot();
    assert!(buckets[0].1 < steps, "some step ran more than one sequence");
}

#[tokio::test]
async fn a_dropped_stream_frees_its_kv() {
    let (_d, m, t) = tiny();
    let engine = EngineHandle::start(m, t.clone(), EngineConfig::default()).unwrap();
    let mut g = engine
        .submit(t.encode("tell me everything").unwrap(), greedy(400))
        .unwrap();
    let first = g.events.recv().await;
    assert!(matches!(first, Some(Event::Text(_))));
    let stats = engine.stats().clone();
    assert!(stats.kv_used_blocks.load(Relaxed) > 0);
    drop(g);
    wait_for("the KV to be free", || {
        stats.kv_used_blocks.load(Relaxed) == 0 && stats.running.load(Relaxed) == 0
    })
    .await;
    assert_eq!(stats.cancelled.load(Relaxed), 1);
}

#[tokio::test]
async fn limits_are_clear_errors() {
    let (_d, m, t) = tiny();
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_waiting: 2,
            max_running: 1,
            prefill_tokens: 64,
        },
        kv_tokens: 256,
        ..EngineConfig::default()
    };
    let engine = EngineHandle::start(m, t.clone(), config).unwrap();
    let e = engine.submit(vec![5; 300], greedy(1)).unwrap_err();
    assert_eq!(
        (e.kind(), e.field()),
        ("context_length_exceeded", Some("prompt"))
    );
    assert!(e.to_string().contains("256"), "{e}");
    let e = engine.submit(vec![5; 10], greedy(1_000_000)).unwrap_err();
    assert_eq!(
        (e.kind(), e.field()),
        ("context_length_exceeded", Some("max_tokens"))
    );
    let e = engine.submit(Vec::new(), greedy(1)).unwrap_err();
    assert_eq!(e.field(), Some("prompt"));
    let e = engine
        .submit(
            vec![5],
            SamplingParams {
                temperature: 3.0,
                ..greedy(1)
            },
        )
        .unwrap_err();
    assert_eq!(e.field(), Some("temperature"));
    // One long request holds the only running slot; the queue takes two more, then refuses.
    let mut held = vec![engine.submit(vec![5; 10], greedy(200)).unwrap()];
    let mut overloaded = 0;
    for _ in 0..20 {
        match engine.submit(vec![5; 10], greedy(200)) {
            Ok(g) => held.push(g),
            Err(e) => {
                assert_eq!(e.kind(), "overloaded");
                overloaded += 1;
            }
        }
    }
    let mut failed_overloaded = 0;
    for g in &mut held {
        if let Ok(Event::Failed(e)) = g.events.try_recv() {
            assert_eq!(e.kind(), "overloaded");
            failed_overloaded += 1;
        }
    }
    assert!(
        overloaded + failed_overloaded >= 17,
        "{overloaded} + {failed_overloaded}"
    );
}

/// The tiny model, except that a batch holding token 7 panics.
struct Poisoned(Llama);

const POISON: u32 = 7;

impl LanguageModel for Poisoned {
    type Cache = <Llama as LanguageModel>::Cache;
    fn new_cache(&self, capacity: usize) -> Self::Cache {
        self.0.new_cache(capacity)
    }
    fn forward(
        &self,
        items: &mut [BatchItem<'_, Self::Cache>],
    ) -> Result<Vec<Vec<f32>>, swarm_gpu::InferError> {
        assert!(
            !items.iter().any(|i| i.tokens.contains(&POISON)),
            "poisoned batch"
        );
        self.0.forward(items)
    }
    fn context_length(&self) -> usize {
        self.0.context_length()
    }
}

#[tokio::test]
async fn a_crash_restarts_the_engine_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), &TinySpec::default()).unwrap();
    let (m, t) = swarm_gpu::load(&path).unwrap();
    let t = Arc::new(t);
    let config = EngineConfig {
        restart_budget: 1,
        ..EngineConfig::default()
    };
    let engine = EngineHandle::start(Arc::new(Poisoned(m)), t.clone(), config).unwrap();
    let healthy = engine.submit(vec![1, 5, 6], greedy(300)).unwrap();
    let poisoned = engine.submit(vec![1, POISON], greedy(5)).unwrap();
    assert_eq!(
        collect(poisoned).await,
        None,
        "a crashed run closes its streams"
    );
    assert_eq!(
        collect(healthy).await,
        None,
        "every sequence of the crashed run ends"
    );
    // The streams close while the run unwinds; the restart is counted right after.
    wait_for("the restart", || engine.stats().restarts.load(Relaxed) == 1).await;
    let after = collect(engine.submit(vec![1, 5, 6], greedy(5)).unwrap())
        .await
        .unwrap();
    assert_eq!(after.2, 5, "the restarted engine serves");
    assert_eq!(
        collect(engine.submit(vec![POISON], greedy(5)).unwrap()).await,
        None
    );
    wait_for("the engine to stop", || engine.stopped_reason().is_some()).await;
    let e = engine.submit(vec![1, 5, 6], greedy(5)).unwrap_err();
    assert_eq!(e.kind(), "engine_stopped");
}

#[tokio::test]
async fn the_supervisor_restarts_a_failed_actor_with_a_fresh_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), &TinySpec::default()).unwrap();
    let (m, t) = swarm_gpu::load(&path).unwrap();
    // The engine gives up at its first crash; the supervisor restarts the actor once a minute.
    let config = EngineConfig {
        restart_budget: 0,
        ..EngineConfig::default()
    };
    let sup = InferenceSupervisor::start(1).await.unwrap();
    let rx = sup
        .serve(
            "tiny",
            swarm_gpu::starter(Arc::new(Poisoned(m)), Arc::new(t), config),
        )
        .unwrap();
    wait_for("the actor to run", || {
        matches!(*rx.borrow(), Served::Running { .. })
    })
    .await;
    let Served::Running { actor, engine } = rx.borrow().clone() else {
        panic!("not running")
    };
    let ok = collect(
        swarm_gpu::submit(&actor, vec![1, 5], greedy(3))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(ok.2, 3);
    // Crash the engine: the actor notices, fails, and the supervisor starts a fresh one.
    assert_eq!(
        collect(
            swarm_gpu::submit(&actor, vec![POISON], greedy(3))
                .await
                .unwrap()
        )
        .await,
        None
    );
    wait_for("the first engine to stop", || {
        engine.stopped_reason().is_some()
    })
    .await;
    let fresh = |s: &Served| matches!(s, Served::Running { engine, .. } if engine.stopped_reason().is_none());
    wait_for("a fresh actor and engine", || fresh(&rx.borrow())).await;
    let Served::Running {
        actor: actor2,
        engine: engine2,
    } = rx.borrow().clone()
    else {
        panic!("not running")
    };
    assert_ne!(actor2.get_id(), actor.get_id());
    let ok = collect(
        swarm_gpu::submit(&actor2, vec![1, 5], greedy(3))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(ok.2, 3, "the restarted actor serves");
    // Past the supervisor's budget the model stays down, with the reason.
    assert_eq!(
        collect(
            swarm_gpu::submit(&actor2, vec![POISON], greedy(3))
                .await
                .unwrap()
        )
        .await,
        None
    );
    wait_for("the second engine to stop", || {
        engine2.stopped_reason().is_some()
    })
    .await;
    wait_for("the model to be down", || {
        matches!(*rx.borrow(), Served::Down(_))
    })
    .await;
    let Served::Down(why) = rx.borrow().clone() else {
        panic!("not down")
    };
    assert!(why.contains("engine stopped"), "{why}");
    sup.stop();
}
