//! Our batched forward against candle-transformers on the same tiny random weights, and batch
//! invariance: each sequence of a mixed batch gets exactly the tokens it gets alone.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use swarm_gpu::testmodel::{TinySpec, write_gguf, write_hf};
use swarm_gpu::{BatchItem, LanguageModel, Llama, TextTokenizer, WeightMode, argmax};

/// Largest difference between two logit vectors.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits must agree within this on the same arithmetic (f32 accumulation order may differ).
const TOLERANCE: f32 = 1e-4;

/// Feeds the prompt, then 8 greedy tokens, to our model and to `theirs` (tokens, position →
/// logits of the last); returns the largest logit difference seen.
fn worst_diff(
    ours: &Llama,
    prompt: Vec<u32>,
    mut theirs: impl FnMut(&[u32], usize) -> Vec<f32>,
) -> f32 {
    let mut cache = ours.new_cache(prompt.len() + 16);
    let (mut tokens, mut pos, mut worst) = (prompt, 0, 0f32);
    for _ in 0..9 {
        let t = theirs(&tokens, pos);
        let o = ours
            .forward(&mut [BatchItem {
                tokens: &tokens,
                cache: &mut cache,
            }])
            .unwrap()
            .remove(0);
        worst = worst.max(max_diff(&o, &t));
        pos += tokens.len();
        tokens = vec![argmax(&o)];
    }
    worst
}

fn prompt() -> Vec<u32> {
    vec![1, 40, 77, 120, 5, 9, 200, 33, 2, 14, 88]
}

#[test]
fn gguf_forward_matches_candle_quantized_llama() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), &TinySpec::default()).unwrap();
    // Quantized weights, multiplied by candle's quantized kernels in both.
    compare_with_quantized_llama(&path, &path, WeightMode::Quantized, TOLERANCE);
    // Our f32 mode dequantizes at load; candle gets the same dequantized values as an F32 GGUF.
    let f32_path = dir.path().join("tiny-f32.gguf");
    dequantized_copy(&path, &f32_path, false);
    compare_with_quantized_llama(&path, &f32_path, WeightMode::F32, TOLERANCE);
    // Our packed mode holds the dequantized values in half precision: candle gets the same
    // half-precision values (as F32) and only the summation order differs.
    let f16_path = dir.path().join("tiny-f16.gguf");
    dequantized_copy(&path, &f16_path, true);
    compare_with_quantized_llama(&path, &f16_path, WeightMode::Packed, TOLERANCE);
}

/// The GGUF at `from` with every tensor dequantized (rounded through half precision when
/// `half` is set, as the packed weights are) and stored as F32.
fn dequantized_copy(from: &Path, to: &Path, half: bool) {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    let mut file = std::fs::File::open(from).unwrap();
    let ct = gguf_file::Content::read(&mut file).unwrap();
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .iter()
        .map(|n| {
            let t = ct
                .tensor(&mut file, n, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            // Matrices only: the packed mode keeps the norms in f32.
            let t = if half && t.rank() == 2 {
                t.to_dtype(DType::F16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            } else {
                t
            };
            (
                n.to_string(),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    let meta: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(to).unwrap(), &meta, &refs).unwrap();
}

/// candle-transformers' quantized llama on the GGUF at `path`: the reference.
fn candle_quantized_llama(
    path: &Path,
) -> candle_transformers::models::quantized_llama::ModelWeights {
    let mut file = std::fs::File::open(path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        ct,
        &mut file,
        &Device::Cpu,
    )
    .unwrap()
}

fn compare_with_quantized_llama(
    ours_from: &Path,
    theirs_from: &Path,
    mode: WeightMode,
    tolerance: f32,
) {
    let ours = Llama::from_gguf_with(ours_from, &Device::Cpu, mode).unwrap();
    let mut theirs = candle_quantized_llama(theirs_from);

    // A short prompt (on CPU: our attention kernel throughout) and a long one (its prefill
    // through candle's batched products).
    for prompt in [prompt(), (10..90).collect()] {
        let worst = worst_diff(&ours, prompt, |tokens, pos| {
            let x = Tensor::new(tokens, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            theirs
                .forward(&x, pos)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        });
        assert!(worst <= tolerance, "{mode:?}: max |Δlogit| {worst}");
        eprintln!("{mode:?}: max |Δlogit| {worst}");
    }
}

#[test]
fn hf_forward_matches_candle_llama() {
    use candle_transformers::models::llama as cl;
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &TinySpec::default()).unwrap();
    let ours = Llama::from_hf_dir(dir.path(), &Device::Cpu).unwrap();
    let cfg: cl::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    let cfg = cfg.into_config(false);
    let files = [dir.path().join("model.safetensors")];
    // SAFETY: the file was just written by this test and is not changed while mapped.
    #[allow(unsafe_code)]
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu).unwrap()
    };
    let theirs = cl::Llama::load(vb, &cfg).unwrap();
    let mut their_cache = cl::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    let worst = worst_diff(&ours, prompt(), |tokens, pos| {
        let x = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        theirs
            .forward(&x, pos, &mut their_cache)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    });
    assert!(worst <= TOLERANCE, "max |Δlogit| {worst}");
}

/// Greedy tokens of `prompt` decoded alone.
fn alone(model: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache(prompt.len() + n);
    let mut out = Vec::new();
    let mut next = argmax(
        &model
            .forward(&mut [BatchItem {
                tokens: prompt,
                cache: &mut cache,
            }])
            .unwrap()[0],
    );
    out.push(next);
    while out.len() < n {
        next = argmax(
            &model
                .forward(&mut [BatchItem {
                    tokens: &[next],
                    cache: &mut cache,
                }])
                .unwrap()[0],
        );
        out.push(next);
    }
    out
}

fn batch_equals_alone(model: &Llama) {
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 50, 60],
        (3..40).collect(),
        vec![7],
        (100..117).rev().collect(),
        // Longer than the CPU attention kernel takes: its prefill goes through candle.
        (20..100).collect(),
    ];
    let n = 12;
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| alone(model, p, n)).collect();
    // Staggered: sequence i joins at step 2·i, so prefills mix with decodes of the others.
    let mut caches: Vec<_> = prompts
        .iter()
        .map(|p| model.new_cache(p.len() + n))
        .collect();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for step in 0.. {
        let active: Vec<usize> = (0..prompts.len())
            .filter(|&i| step >= 2 * i && got[i].len() < n)
            .collect();
        if active.is_empty() {
            break;
        }
        let news: Vec<Vec<u32>> = active
            .iter()
            .map(|&i| got[i].last().map_or(prompts[i].clone(), |t| vec![*t]))
            .collect();
        let mut refs: Vec<_> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .collect();
        let mut items: Vec<BatchItem<'_, _>> = refs
            .iter_mut()
            .zip(&news)
            .map(|((_, c), t)| BatchItem {
                tokens: t.as_slice(),
                cache: &mut **c,
            })
            .collect();
        let logits = model.forward(&mut items).unwrap();
        for (&i, l) in active.iter().zip(&logits) {
            got[i].push(argmax(l));
        }
    }
    assert_eq!(got, expected);
}

#[test]
fn mixed_batch_greedy_equals_each_alone_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), &TinySpec::default()).unwrap();
    for mode in [WeightMode::Quantized, WeightMode::F32, WeightMode::Packed] {
        batch_equals_alone(&Llama::from_gguf_with(&path, &Device::Cpu, mode).unwrap());
    }
}

#[test]
fn mixed_batch_greedy_equals_each_alone_hf() {
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &TinySpec::default()).unwrap();
    batch_equals_alone(&Llama::from_hf_dir(dir.path(), &Device::Cpu).unwrap());
}

#[test]
fn tokenizer_from_gguf_and_from_tokenizer_json_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), &TinySpec::default()).unwrap();
    write_hf(&dir.path().join("hf"), &TinySpec::default()).unwrap();
    let a = TextTokenizer::from_gguf(&path).unwrap();
    let b = TextTokenizer::from_hf_dir(&dir.path().join("hf")).unwrap();
    let text = "<|im_start|>user\nhéllo 42 🐝<|im_end|>";
    let ids = a.encode(text).unwrap();
    assert_eq!(ids, b.encode(text).unwrap());
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 2);
    assert_eq!(a.decode(&ids).unwrap(), "user\nhéllo 42 🐝");
    assert!(a.stop_ids().contains(&2) && a.stop_ids().contains(&0));
    let chat = a
        .apply_chat_template(&[swarm_gpu::ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }])
        .unwrap();
    assert_eq!(
        chat,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn detokenizer_waits_for_whole_characters() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(dir.path(), &TinySpec::default()).unwrap();
    let t = TextTokenizer::from_gguf(&path).unwrap();
    let ids = t.encode("a🐝b").unwrap(); // the bee is four byte tokens
    let mut d = swarm_gpu::Detokenizer::default();
    let pieces: Vec<String> = ids.iter().map(|&i| d.push(&t, i).unwrap()).collect();
    assert_eq!(pieces.concat(), "a🐝b");
    assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')), "{pieces:?}");
}

#[test]
fn missing_or_corrupt_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let e = swarm_gpu::load(&missing).unwrap_err();
    assert_eq!(e.kind(), "model_unavailable");
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    assert_eq!(
        swarm_gpu::load(&bad).unwrap_err().kind(),
        "model_unavailable"
    );
    let path = write_gguf(dir.path(), &TinySpec::default()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(
        swarm_gpu::load(&cut).unwrap_err().kind(),
        "model_unavailable"
    );
    assert!(swarm_gpu::load(Path::new(dir.path())).is_err());
}

/// The real SmolLM2 GGUF (`SWARM_TEST_GGUF=path cargo test -p swarm-gpu --test model -- --ignored`):
/// our quantized path against quantized_llama, and how far our f32 path lands from it.
#[test]
#[ignore = "needs the SmolLM2 GGUF: set SWARM_TEST_GGUF"]
fn real_model_matches_quantized_llama() {
    let Ok(path) = std::env::var("SWARM_TEST_GGUF") else {
        return;
    };
    let path = Path::new(&path);
    let tok = TextTokenizer::from_gguf(path).unwrap();
    let prompt = tok
        .apply_chat_template(&[swarm_gpu::ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }])
        .unwrap();
    let ids = tok.encode(&prompt).unwrap();
    let mut theirs = candle_quantized_llama(path);
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let t = theirs
        .forward(&x, 0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for mode in [WeightMode::Quantized, WeightMode::F32, WeightMode::Packed] {
        let ours = Llama::from_gguf_with(path, &Device::Cpu, mode).unwrap();
        let mut cache = ours.new_cache(ids.len() + 1);
        let o = ours
            .forward(&mut [BatchItem {
                tokens: &ids,
                cache: &mut cache,
            }])
            .unwrap()
            .remove(0);
        let span = t.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!(
            "{mode:?}: max |Δlogit| {} (max |logit| {span}); argmax ours {} theirs {}",
            max_diff(&o, &t),
            argmax(&o),
            argmax(&t)
        );
        // Quantized: the same products; our CPU attention sums in another order (~1e-7
        // relative), which candle's 8-bit rounding of every product's input amplifies where a
        // value sits on a rounding edge (measured: max |Δlogit| 0.67 of 24.8, same greedy token;
        // 0 with candle's attention; 3e-5 between the two attentions in the f32 path, which has
        // no such rounding). The f32 and packed paths skip that rounding (measured: 1.2, and a
        // different greedy first token); both are checked against quantized_llama on the same
        // weights within TOLERANCE above.
        if mode == WeightMode::Quantized {
            assert!(max_diff(&o, &t) <= 1.0, "max |Δlogit| {}", max_diff(&o, &t));
            assert_eq!(argmax(&o), argmax(&t));
        }
    }
}
