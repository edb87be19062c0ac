//! A tiny random Llama and byte-level tokenizer, written by tests themselves (no model hub): as a
//! GGUF file (Q8_0 weights, tokenizer in `tokenizer.ggml.*`, ChatML template) and as a Hugging
//! Face folder (`config.json`, `model.safetensors`, `tokenizer.json`). Same seed, same weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{InferError, Result};
use crate::tokenizer::CHATML;

/// The special tokens, ids 0, 1, 2.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Shape of the tiny model.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            context: 512,
            seed: 42,
        }
    }
}

/// Vocabulary: the three specials, then the 256 byte-level symbols.
pub fn vocab() -> Vec<String> {
    let mut alpha: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alpha.sort_unstable();
    SPECIALS
        .iter()
        .map(|s| s.to_string())
        .chain(alpha.into_iter().map(|c| c.to_string()))
        .collect()
}

fn weights(spec: &TinySpec) -> Result<Vec<(String, Tensor)>> {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let v = vocab().len();
    let hd = spec.hidden / spec.heads;
    let mut rand = |rows: usize, cols: usize, scale: f32| -> Result<Tensor> {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Ok(Tensor::from_vec(data, (rows, cols), &dev)?)
    };
    let ones = |n: usize| -> Result<Tensor> { Ok(Tensor::ones(n, candle_core::DType::F32, &dev)?) };
    let (h, f) = (spec.hidden, spec.intermediate);
    let mut w = vec![
        ("embed".to_string(), rand(v, h, 1.0)?),
        ("norm".into(), ones(h)?),
    ];
    for l in 0..spec.layers {
        w.push((format!("{l}.attn_norm"), ones(h)?));
        w.push((format!("{l}.ffn_norm"), ones(h)?));
        w.push((format!("{l}.q"), rand(spec.heads * hd, h, 0.3)?));
        w.push((format!("{l}.k"), rand(spec.kv_heads * hd, h, 0.3)?));
        w.push((format!("{l}.v"), rand(spec.kv_heads * hd, h, 0.3)?));
        w.push((format!("{l}.o"), rand(h, spec.heads * hd, 0.3)?));
        w.push((format!("{l}.gate"), rand(f, h, 0.3)?));
        w.push((format!("{l}.up"), rand(f, h, 0.3)?));
        w.push((format!("{l}.down"), rand(h, f, 0.3)?));
    }
    Ok(w)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InferError + '_ {
    move |e| InferError::ModelUnavailable(format!("{}: {e}", path.display()))
}

/// Writes `dir/tiny.gguf`; returns its path.
pub fn write_gguf(dir: &Path, spec: &TinySpec) -> Result<PathBuf> {
    use gguf_file::Value;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let gguf_name = |n: &str| -> String {
        match n.split_once('.') {
            None if n == "embed" => "token_embd.weight".into(),
            None => "output_norm.weight".into(),
            Some((l, part)) => {
                let t = match part {
                    "q" => "attn_q",
                    "k" => "attn_k",
                    "v" => "attn_v",
                    "o" => "attn_output",
                    "gate" => "ffn_gate",
                    "up" => "ffn_up",
                    "down" => "ffn_down",
                    other => other,
                };
                format!("blk.{l}.{t}.weight")
            }
        }
    };
    let mut tensors = Vec::new();
    for (name, t) in weights(spec)? {
        let q = if t.rank() == 1 {
            QTensor::quantize(&t, GgmlDType::F32)?
        } else {
            QTensor::quantize(&t, GgmlDType::Q8_0)?
        };
        tensors.push((gguf_name(&name), q));
    }
    let tokens: Vec<Value> = vocab().into_iter().map(Value::String).collect();
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 }))
        .collect();
    let u = |n: usize| Value::U32(n as u32);
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", u(spec.hidden)),
        ("llama.feed_forward_length", u(spec.intermediate)),
        ("llama.block_count", u(spec.layers)),
        ("llama.attention.head_count", u(spec.heads)),
        ("llama.attention.head_count_kv", u(spec.kv_heads)),
        ("llama.rope.dimension_count", u(spec.hidden / spec.heads)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.context_length", u(spec.context)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(Vec::new())),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
        ("tokenizer.chat_template", Value::String(CHATML.into())),
    ];
    let path = dir.join("tiny.gguf");
    let mut file = std::fs::File::create(&path).map_err(io(&path))?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)?;
    Ok(path)
}

/// Writes a Hugging Face folder `dir` (config.json, model.safetensors, tokenizer.json).
pub fn write_hf(dir: &Path, spec: &TinySpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in weights(spec)? {
        let hf = match name.split_once('.') {
            None if name == "embed" => "model.embed_tokens.weight".to_string(),
            None => "model.norm.weight".to_string(),
            Some((l, part)) => {
                let t = match part {
                    "attn_norm" => "input_layernorm",
                    "ffn_norm" => "post_attention_layernorm",
                    "q" => "self_attn.q_proj",
                    "k" => "self_attn.k_proj",
                    "v" => "self_attn.v_proj",
                    "o" => "self_attn.o_proj",
                    "gate" => "mlp.gate_proj",
                    "up" => "mlp.up_proj",
                    _ => "mlp.down_proj",
                };
                format!("model.layers.{l}.{t}.weight")
            }
        };
        map.insert(hf, t);
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "vocab_size": vocab().len(),
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": spec.context,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2,
    });
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).map_err(io(&path))?;
    let mut v = Vocab::new();
    for (i, t) in vocab().into_iter().enumerate() {
        v.insert(t, i as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(v, Vec::new())
        .build()
        .map_err(|e| InferError::Tokenizer(e.to_string()))?;
    let mut tk = Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tk.add_special_tokens(&specials);
    tk.save(dir.join("tokenizer.json"), false)
        .map_err(|e| InferError::Tokenizer(e.to_string()))?;
    Ok(())
}
