//! One forward step of the real model, by weight mode and batch size: a prefill of 8 prompts of
//! 32 tokens, then decode steps of B sequences (one new token each over a 48-token cache);
//! each figure is the fastest of several runs.
//! Usage: cargo bench -p swarm-gpu --bench forward [-- GGUF]; the default GGUF is the one
//! `bench/inference.sh` pulls (target/bench/models/SmolLM2-135M-Instruct.Q4_1.gguf).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use swarm_gpu::{BatchItem, LanguageModel, Llama, LlamaCache, WeightMode};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .skip(1)
        .find(|a| a.ends_with(".gguf"))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bench/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !path.exists() {
        eprintln!(
            "{} is missing: run bench/inference.sh once, or pass a GGUF",
            path.display()
        );
        return Ok(());
    }
    let modes = match std::env::var("MODES") {
        Ok(m) => m,
        Err(_) => "packed,f32".into(),
    };
    for mode in modes.split(',') {
        let wm = match mode {
            "packed" => WeightMode::Packed,
            "f32" => WeightMode::F32,
            "quantized" => WeightMode::Quantized,
            other => return Err(format!("unknown mode {other}").into()),
        };
        let model = Llama::from_gguf_with(&path, &Device::Cpu, wm)?;
        let prompt: Vec<u32> = (0..32).map(|i| 100 + i * 7).collect();
        // Prefill: 8 prompts of 32 tokens in one step, into fresh caches each time.
        let mut prefill = f64::MAX;
        for _ in 0..4 {
            let mut caches: Vec<_> = (0..8).map(|_| model.new_cache(128)).collect();
            prefill = prefill.min(step(&model, &mut caches, &prompt)?);
        }
        println!(
            "{mode:>9} prefill 8x32 tokens (fastest of 4): {:7.1} ms",
            prefill * 1e3
        );
        let batches: Vec<usize> = match std::env::var("BATCHES") {
            Ok(b) => b.split(',').filter_map(|v| v.parse().ok()).collect(),
            Err(_) => vec![1, 4, 16, 32],
        };
        for batch in batches {
            let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache(128)).collect();
            // Each sequence holds the prompt and 16 tokens.
            step(&model, &mut caches, &prompt)?;
            for _ in 0..16 {
                step(&model, &mut caches, &prompt[..1])?;
            }
            // The fastest of 12 steps: the least disturbed by other work on a shared machine.
            let mut fastest = f64::MAX;
            for _ in 0..12 {
                fastest = fastest.min(step(&model, &mut caches, &prompt[..1])?);
            }
            println!(
                "{mode:>9} decode batch {batch:2}: {:7.1} ms/step {:7.1} tok/s",
                fastest * 1e3,
                batch as f64 / fastest
            );
        }
    }
    Ok(())
}

/// One forward step adding `tokens` to every cache; its duration in seconds.
fn step(
    model: &Llama,
    caches: &mut [LlamaCache],
    tokens: &[u32],
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut items: Vec<_> = caches
        .iter_mut()
        .map(|cache| BatchItem { tokens, cache })
        .collect();
    let t = Instant::now();
    model.forward(&mut items)?;
    Ok(t.elapsed().as_secs_f64())
}
