//! Llama-family weights (GGUF or a Hugging Face folder) and our batched forward pass.
//!
//! candle-transformers' models take one position for the whole batch, so they cannot serve
//! sequences of mixed lengths. Here the linear layers run once over the new tokens of every
//! sequence stacked into one `(tokens, hidden)` matrix, rotary embeddings take each token's own
//! position, and attention runs per sequence over that sequence's own KV cache. Quantized GGUF
//! weights stay quantized (`QMatMul`); only the small norm vectors and the input embedding table
//! are dequantized.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{InferError, Result};
use crate::packed::PackedMatrix;
use crate::vector;

/// The hyperparameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
    pub context: usize,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    fn validate(&self) -> Result<()> {
        let ok = self.heads > 0
            && self.kv_heads > 0
            && self.hidden.is_multiple_of(self.heads)
            && self.heads.is_multiple_of(self.kv_heads)
            && self.head_dim().is_multiple_of(2)
            && self.layers > 0
            && self.vocab > 0
            && self.context > 0;
        if ok {
            Ok(())
        } else {
            Err(InferError::ModelUnavailable(format!(
                "inconsistent model hyperparameters {self:?}"
            )))
        }
    }
}

/// What the engine needs of a model: a batched forward over per-sequence caches.
pub trait LanguageModel: Send + Sync + 'static {
    /// One sequence's KV cache.
    type Cache: Send;
    /// A cache for a sequence that will hold at most `capacity` tokens.
    fn new_cache(&self, capacity: usize) -> Self::Cache;
    /// The logits of the last new token of every item, in order (`vocab` floats each).
    fn forward(&self, items: &mut [BatchItem<'_, Self::Cache>]) -> Result<Vec<Vec<f32>>>;
    /// The longest sequence the model can attend over.
    fn context_length(&self) -> usize;
    /// A new cache of `capacity` tokens holding a copy of the first `len` tokens of `cache`
    /// (prefix reuse); `None` when the model cannot (the prompt is then computed whole).
    fn fork(&self, cache: &Self::Cache, len: usize, capacity: usize) -> Option<Self::Cache> {
        let _ = (cache, len, capacity);
        None
    }
}

/// One sequence in a batch: the tokens it adds this step and its cache.
#[derive(Debug)]
pub struct BatchItem<'a, C> {
    pub tokens: &'a [u32],
    pub cache: &'a mut C,
}

/// A weight matrix: candle's (f32 or quantized, any device) or packed for our kernel (CPU).
enum Linear {
    Candle(QMatMul),
    Packed(PackedMatrix),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Candle(w) => w.forward(x),
            Self::Packed(w) => x.contiguous()?.apply_op1_no_bwd(w),
        }
    }
}

/// Weight matrices that multiply the same input (Q, K and V; gate and up). Packed, they are
/// stacked into one matrix: one pass over the input and one set of tasks instead of several
/// (measured: a prefill 6% quicker, a decode step 1-3%).
enum Stack {
    Apart(Vec<Linear>),
    /// The stacked matrix, and each part's first column and width in its product.
    Packed(PackedMatrix, Vec<(usize, usize)>),
}

impl Stack {
    fn new(parts: Vec<Linear>) -> Self {
        if !parts.iter().all(|l| matches!(l, Linear::Packed(_))) {
            return Self::Apart(parts);
        }
        let packed: Vec<PackedMatrix> = parts
            .into_iter()
            .filter_map(|l| match l {
                Linear::Packed(p) => Some(p),
                Linear::Candle(_) => None,
            })
            .collect();
        match PackedMatrix::stack(&packed) {
            Some((matrix, places)) => Self::Packed(matrix, places),
            None => Self::Apart(packed.into_iter().map(Linear::Packed).collect()),
        }
    }

    /// `x` times each matrix, in order (the stacked product's parts are views of it).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Self::Apart(parts) => parts.iter().map(|l| l.forward(x)).collect(),
            Self::Packed(matrix, places) => {
                let y = x.contiguous()?.apply_op1_no_bwd(matrix)?;
                places
                    .iter()
                    .map(|&(first, width)| y.narrow(candle_core::D::Minus1, first, width))
                    .collect()
            }
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    /// Q, K, V.
    qkv: Stack,
    wo: Linear,
    ffn_norm: Tensor,
    /// Gate, up.
    gate_up: Stack,
    down: Linear,
}

/// A loaded Llama-family model.
pub struct Llama {
    config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    /// GGUF files from llama.cpp store Q and K permuted for interleaved rotary embeddings.
    interleaved_rope: bool,
    device: Device,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .field("interleaved_rope", &self.interleaved_rope)
            .finish_non_exhaustive()
    }
}

/// A sequence's KV cache: per layer one buffer `(2, kv_heads, capacity, head_dim)` (keys, then
/// values), allocated at its first write. Positions past `len` are stale (a failed step's
/// writes) and never read.
#[derive(Debug)]
pub struct LlamaCache {
    layers: Vec<Option<Tensor>>,
    len: usize,
    capacity: usize,
}

/// The buffer of one layer, allocated (zeros) when missing.
fn layer_buffer<'a>(
    slot: &'a mut Option<Tensor>,
    kv_heads: usize,
    capacity: usize,
    hd: usize,
    device: &Device,
) -> candle_core::Result<&'a Tensor> {
    if slot.is_none() {
        *slot = Some(Tensor::zeros(
            (2, kv_heads, capacity, hd),
            DType::F32,
            device,
        )?);
    }
    match slot {
        Some(t) => Ok(t),
        None => candle_core::bail!("a layer cache could not be allocated"),
    }
}

/// Writes `k` and `v` (`(1, kv_heads, n, hd)` each) at positions `start ..` of a layer's buffer
/// and returns views of the keys and values `0 .. start + n` (`(1, kv_heads, start + n, hd)`,
/// strided: the buffer holds its whole capacity).
fn write_layer(
    slot: &mut Option<Tensor>,
    capacity: usize,
    start: usize,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (_, kv_heads, n, hd) = k.dims4()?;
    if start + n > capacity {
        candle_core::bail!("{n} tokens at {start} overflow a cache of {capacity}");
    }
    let buffer = layer_buffer(slot, kv_heads, capacity, hd, k.device())?;
    buffer.slice_set(&Tensor::cat(&[k, v], 0)?, 2, start)?;
    Ok((
        buffer.narrow(0, 0, 1)?.narrow(2, 0, start + n)?,
        buffer.narrow(0, 1, 1)?.narrow(2, 0, start + n)?,
    ))
}

/// `silu(gate) · up`, element by element, in one pass spread over the rayon pool (candle's
/// `silu` and product are two single-threaded passes, which at a batch's width leave the
/// other cores waiting). The inputs may be column slices of one wider matrix (the two halves
/// of a stacked product), read in place.
struct SiluMul;

impl candle_core::CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "silu-mul: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let (g, rows, width, gs) = row_view(s1, l1)?;
        let (u, _, _, us) = row_view(s2, l2)?;
        let mut out = vec![0f32; rows * width];
        // Rows in tasks of at least 4096 values (a zero width is no rows to chunk).
        let chunk = width.max(1);
        let per_task = (4096 / chunk).max(1);
        out.par_chunks_mut(per_task * chunk)
            .enumerate()
            .for_each(|(task, out)| {
                for (i, out) in out.chunks_mut(chunk).enumerate() {
                    let r = task * per_task + i;
                    if let (Some(g), Some(u)) =
                        (g.get(r * gs..r * gs + width), u.get(r * us..r * us + width))
                    {
                        vector::silu_mul(out, g, u);
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// A CPU tensor as rows of contiguous values however far apart the rows lie (a column slice of
/// a wider matrix, as a stacked product's parts are): its values from the first row on, the
/// number of rows, their width and the distance between row starts.
fn row_view<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<(&'a [f32], usize, usize, usize)> {
    let (dims, stride) = (layout.dims(), layout.stride());
    let Some((&width, lead)) = dims.split_last() else {
        let all = storage.as_slice::<f32>()?;
        return Ok((&all[layout.start_offset().min(all.len())..], 1, 1, 1));
    };
    let rank = dims.len();
    let row_stride = match rank {
        1 => width,
        _ => stride[rank - 2],
    };
    // Unit steps along a row, and rows evenly spaced across every leading dimension.
    let even = (0..rank.saturating_sub(2))
        .all(|i| dims[i] <= 1 || stride[i] == stride[i + 1] * dims[i + 1]);
    if (width > 1 && stride[rank - 1] != 1) || !even {
        candle_core::bail!(
            "silu-mul: rows of shape {:?} and strides {:?} are not contiguous",
            dims,
            stride
        );
    }
    let rows: usize = lead.iter().product();
    let all = storage.as_slice::<f32>()?;
    let values = &all[layout.start_offset().min(all.len())..];
    if rows > 0 && values.len() < (rows - 1) * row_stride + width {
        candle_core::bail!("silu-mul: short buffer");
    }
    Ok((values, rows, width, row_stride))
}

/// Copies rows of the group's new keys and values (`(2, rows, kv_heads, hd)`, keys then values)
/// into a sequence's layer buffer `(2, kv_heads, capacity, hd)`: rows `row .. row + n` to
/// positions `start .. start + n`. One operation per sequence and layer, in place.
struct WriteRows {
    row: usize,
    n: usize,
    start: usize,
}

impl candle_core::InplaceOp2 for WriteRows {
    fn name(&self) -> &'static str {
        "kv-write-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (_, kv_heads, capacity, hd) = l1.shape().dims4()?;
        let (_, rows, src_heads, src_hd) = l2.shape().dims4()?;
        let (Some((d0, d1)), Some((s0, s1_))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("kv write: buffers are not contiguous")
        };
        if (src_heads, src_hd) != (kv_heads, hd)
            || self.row + self.n > rows
            || self.start + self.n > capacity
        {
            candle_core::bail!("kv write: rows do not fit the cache");
        }
        let src = &s2.as_slice::<f32>()?[s0..s1_];
        let dst = match s1 {
            candle_core::CpuStorage::F32(d) => &mut d[d0..d1],
            _ => candle_core::bail!("kv write: the cache is not f32"),
        };
        for part in 0..2 {
            for t in 0..self.n {
                for h in 0..kv_heads {
                    let from = ((part * rows + self.row + t) * kv_heads + h) * hd;
                    let to = ((part * kv_heads + h) * capacity + self.start + t) * hd;
                    dst[to..to + hd].copy_from_slice(&src[from..from + hd]);
                }
            }
        }
        Ok(())
    }
}

impl LlamaCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| InferError::ModelUnavailable(format!("GGUF metadata has no {key}")))
}

fn md_u32(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    Ok(md(ct, key)?.to_u32()? as usize)
}

fn unavailable(what: &str) -> impl FnOnce(candle_core::Error) -> InferError + '_ {
    move |e| InferError::ModelUnavailable(format!("{what}: {e}"))
}

/// How GGUF block weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMode {
    /// On CPU: [`WeightMode::Packed`] where the CPU has AVX2, FMA and F16C, else f32 (candle's
    /// portable quantized kernels are scalar; a product over dequantized f32 weights is several
    /// times faster). On other devices: quantized.
    Auto,
    /// candle's quantized tensors, every one kept as it is in the file (candle's kernels; the
    /// numbers of candle-transformers' `quantized_llama`).
    Quantized,
    /// Dequantize everything to f32 (candle's matrix product).
    F32,
    /// CPU only: dequantized to half precision and packed once for our own matrix product
    /// (`crate::packed`), which reads each weight once per step for the whole batch.
    Packed,
}

impl WeightMode {
    /// `Auto` made concrete for `device`.
    fn resolve(self, device: &Device) -> Result<Self> {
        Ok(match self {
            Self::Auto if !device.is_cpu() => Self::Quantized,
            Self::Auto if crate::packed::fast() => Self::Packed,
            Self::Auto => Self::F32,
            Self::Packed if !device.is_cpu() => {
                return Err(InferError::ModelUnavailable(
                    "packed weights (WeightMode::Packed) run on CPU only".into(),
                ));
            }
            mode => mode,
        })
    }

    fn linear(self, q: QTensor, device: &Device) -> Result<Linear> {
        Ok(match self {
            Self::Packed => {
                let (rows, cols) = q.shape().dims2()?;
                let w = q.dequantize(device)?.flatten_all()?.to_vec1::<f32>()?;
                Linear::Packed(PackedMatrix::new(&w, rows, cols))
            }
            Self::F32 => Linear::Candle(QMatMul::Tensor(q.dequantize(device)?)),
            _ => Linear::Candle(QMatMul::from_qtensor(q)?),
        })
    }
}

impl Llama {
    /// Loads a llama.cpp GGUF file (architecture `llama`), weights held as [`WeightMode::Auto`].
    pub fn from_gguf(path: &Path, device: &Device) -> Result<Self> {
        Self::from_gguf_with(path, device, WeightMode::Auto)
    }

    /// Loads a llama.cpp GGUF file with the given weight mode.
    pub fn from_gguf_with(path: &Path, device: &Device, mode: WeightMode) -> Result<Self> {
        let (mut file, ct) = crate::gguf_check::open(path)?;
        Self::from_gguf_content(&ct, &mut file, device, mode)
    }

    /// Loads the weights of a GGUF whose header `ct` was read (and checked) from `file`.
    pub(crate) fn from_gguf_content(
        ct: &gguf_file::Content,
        file: &mut std::fs::File,
        device: &Device,
        mode: WeightMode,
    ) -> Result<Self> {
        let arch = md(ct, "general.architecture")?.to_string()?.clone();
        if arch != "llama" {
            return Err(InferError::ModelUnavailable(format!(
                "GGUF architecture {arch:?} is not llama"
            )));
        }
        let heads = md_u32(ct, "llama.attention.head_count")?;
        let hidden = md_u32(ct, "llama.embedding_length")?;
        let config = LlamaConfig {
            hidden,
            intermediate: md_u32(ct, "llama.feed_forward_length")?,
            layers: md_u32(ct, "llama.block_count")?,
            heads,
            kv_heads: md_u32(ct, "llama.attention.head_count_kv").unwrap_or(heads),
            vocab: 0,
            rms_eps: md(ct, "llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_theta: md(ct, "llama.rope.freq_base")
                .and_then(|v| Ok(v.to_f32()?))
                .unwrap_or(10_000.0),
            context: md_u32(ct, "llama.context_length").unwrap_or(4096),
        };
        let mut tensor = |name: &str| -> Result<QTensor> {
            ct.tensor(file, name, device).map_err(unavailable(name))
        };
        let mode = mode.resolve(device)?;
        let linear = |q: QTensor| mode.linear(q, device);
        let embed_q = tensor("token_embd.weight")?;
        let mut embed = embed_q.dequantize(device)?;
        if mode == WeightMode::Packed {
            // The same half-precision values as the (often tied) packed output matrix.
            embed = embed.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
        }
        let config = LlamaConfig {
            vocab: embed.dim(0)?,
            ..config
        };
        config.validate()?;
        let norm = tensor("output_norm.weight")?.dequantize(device)?;
        let output = match tensor("output.weight") {
            Ok(q) => linear(q)?,
            Err(_) => linear(embed_q)?,
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut q =
                |n: &str| -> Result<Linear> { linear(tensor(&format!("blk.{i}.{n}.weight"))?) };
            layers.push(Layer {
                qkv: Stack::new(vec![q("attn_q")?, q("attn_k")?, q("attn_v")?]),
                wo: q("attn_output")?,
                gate_up: Stack::new(vec![q("ffn_gate")?, q("ffn_up")?]),
                down: q("ffn_down")?,
                attn_norm: tensor(&format!("blk.{i}.attn_norm.weight"))?.dequantize(device)?,
                ffn_norm: tensor(&format!("blk.{i}.ffn_norm.weight"))?.dequantize(device)?,
            });
        }
        Self::assemble(config, embed, layers, norm, output, true, device)
    }

    /// Loads a Hugging Face folder: `config.json` and `*.safetensors` (weights become f32).
    pub fn from_hf_dir(dir: &Path, device: &Device) -> Result<Self> {
        let config = hf_config(dir)?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| InferError::ModelUnavailable(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(InferError::ModelUnavailable(format!(
                "no *.safetensors in {}",
                dir.display()
            )));
        }
        for f in &files {
            let part = candle_core::safetensors::load(f, device)
                .map_err(unavailable(&f.display().to_string()))?;
            tensors.extend(part);
        }
        let mut take = |name: &str| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| InferError::ModelUnavailable(format!("missing tensor {name}")))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let embed = take("model.embed_tokens.weight")?;
        if embed.dims2()? != (config.vocab, config.hidden) {
            return Err(InferError::ModelUnavailable(
                "embed_tokens does not match config.json".into(),
            ));
        }
        let norm = take("model.norm.weight")?;
        let output = match take("lm_head.weight") {
            Ok(w) => Linear::Candle(QMatMul::Tensor(w)),
            Err(_) => Linear::Candle(QMatMul::Tensor(embed.clone())),
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("model.layers.{i}");
            let mut lin = |n: &str| -> Result<Linear> {
                Ok(Linear::Candle(QMatMul::Tensor(take(&format!(
                    "{p}.{n}.weight"
                ))?)))
            };
            layers.push(Layer {
                qkv: Stack::new(vec![
                    lin("self_attn.q_proj")?,
                    lin("self_attn.k_proj")?,
                    lin("self_attn.v_proj")?,
                ]),
                wo: lin("self_attn.o_proj")?,
                gate_up: Stack::new(vec![lin("mlp.gate_proj")?, lin("mlp.up_proj")?]),
                down: lin("mlp.down_proj")?,
                attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
                ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            });
        }
        Self::assemble(config, embed, layers, norm, output, false, device)
    }

    fn assemble(
        config: LlamaConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        output: Linear,
        interleaved_rope: bool,
        device: &Device,
    ) -> Result<Self> {
        let (cos, sin) = rope_tables(config.head_dim(), config.rope_theta, config.context, device)?;
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
            interleaved_rope,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        if self.interleaved_rope {
            candle_nn::rotary_emb::rope_i(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)
        }
    }

    fn forward_tensor(&self, items: &mut [BatchItem<'_, LlamaCache>]) -> Result<Tensor> {
        let c = &self.config;
        let (hd, heads, kv_heads) = (c.head_dim(), c.heads, c.kv_heads);
        let mut ids: Vec<u32> = Vec::new();
        let mut positions: Vec<u32> = Vec::new();
        // (offset in the stacked tokens, new tokens, position of the first new token)
        let mut spans = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let start = item.cache.len;
            let n = item.tokens.len();
            if n == 0 || start + n > item.cache.capacity || start + n > c.context {
                return Err(InferError::invalid(
                    "tokens",
                    format!(
                        "batch item {i}: {n} new tokens at position {start} do not fit (cache {}, context {})",
                        item.cache.capacity, c.context
                    ),
                ));
            }
            if let Some(&bad) = item.tokens.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(InferError::invalid(
                    "tokens",
                    format!("token {bad} is outside the vocabulary"),
                ));
            }
            spans.push((ids.len(), n, start));
            ids.extend_from_slice(item.tokens);
            positions.extend((start..start + n).map(|p| p as u32));
        }
        let n_tokens = ids.len();
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        // On CPU every sequence adding at most `CPU_ATTENTION_MAX_NEW` tokens (every decode, short
        // prompts) takes our attention kernel, which reads the caches in place; elsewhere
        // decoding sequences attend in one padded batched product.
        let small = match self.device.is_cpu() {
            true => SmallGroup::new(&spans, &self.device)?,
            false => None,
        };
        let decode = match small {
            None => DecodeGroup::new(&spans, &self.device)?,
            Some(_) => None,
        };
        let scale = (hd as f64).sqrt();
        let rep = heads / kv_heads;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps as f32)?;
            let split = |y: &Tensor, nh: usize| -> candle_core::Result<Tensor> {
                y.reshape((1, n_tokens, nh, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let [q, k, v] = <[Tensor; 3]>::try_from(layer.qkv.forward(&h)?)
                .map_err(|_| candle_core::Error::Msg("Q, K, V: not three products".into()))?;
            let q = self.rope(&split(&q, heads)?, &cos, &sin)?;
            let k = self.rope(&split(&k, kv_heads)?, &cos, &sin)?;
            let v = split(&v, kv_heads)?;
            let mut outs: Vec<Option<Tensor>> = vec![None; items.len()];
            for (idx, (item, &(off, n, start))) in items.iter_mut().zip(&spans).enumerate() {
                if (decode.is_some() && n == 1) || (small.is_some() && n <= CPU_ATTENTION_MAX_NEW) {
                    continue;
                }
                let qi = q.narrow(2, off, n)?.contiguous()?;
                let ki = k.narrow(2, off, n)?.contiguous()?;
                let vi = v.narrow(2, off, n)?.contiguous()?;
                // The cache views are strided (the cache holds its full capacity); matmul takes
                // them as they are. Grouped-query attention without copying K/V per head: the
                // `rep` query heads that share a KV head form one (rep·n, hd) matrix.
                let capacity = item.cache.capacity;
                let (kc, vc) = write_layer(&mut item.cache.layers[l], capacity, start, &ki, &vi)?;
                let total = start + n;
                let qg = qi.reshape((kv_heads, rep * n, hd))?;
                let att = (qg.matmul(&kc.squeeze(0)?.t()?)? / scale)?;
                let att = if n > 1 {
                    att.reshape((kv_heads, rep, n, total))?
                        .broadcast_add(&causal_mask(n, start, &self.device)?)?
                        .reshape((kv_heads, rep * n, total))?
                } else {
                    att
                };
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let y = att.matmul(&vc.squeeze(0)?)?;
                outs[idx] = Some(
                    y.reshape((1, heads, n, hd))?
                        .transpose(1, 2)?
                        .reshape((n, heads * hd))?,
                );
            }
            if let Some(g) = &small {
                let y = self.attention_cpu(items, &spans, g, l, &q, &k, &v)?;
                let mut row = 0;
                for &i in &g.items {
                    let n = spans[i].1;
                    outs[i] = Some(y.narrow(0, row, n)?);
                    row += n;
                }
            }
            if let Some(d) = &decode {
                let y = self.decode_attention(items, &spans, d, l, &q, &k, &v)?;
                for (j, &i) in d.items.iter().enumerate() {
                    outs[i] = Some(y.narrow(0, j, 1)?);
                }
            }
            let outs: Vec<Tensor> = outs.into_iter().flatten().collect();
            let y = Tensor::cat(&outs, 0)?;
            x = (layer.wo.forward(&y)? + x)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps as f32)?;
            let [gate, up] = <[Tensor; 2]>::try_from(layer.gate_up.forward(&h)?)
                .map_err(|_| candle_core::Error::Msg("gate, up: not two products".into()))?;
            let mlp = match self.device.is_cpu() {
                true => gate.apply_op2_no_bwd(&up, &SiluMul)?,
                false => (candle_nn::ops::silu(&gate)? * up)?,
            };
            x = (layer.down.forward(&mlp)? + x)?;
        }
        for (item, &(_, n, _)) in items.iter_mut().zip(&spans) {
            item.cache.len += n;
        }
        let last: Vec<u32> = spans
            .iter()
            .map(|&(off, n, _)| (off + n - 1) as u32)
            .collect();
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let x = x.index_select(&last, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, c.rms_eps as f32)?;
        Ok(self.output.forward(&x)?)
    }
}

/// The sequences of a step that add one token each: their attention runs as one batched
/// product over their caches, padded to the longest (padding masked out), instead of a dozen
/// small tensor operations per sequence per layer.
struct DecodeGroup {
    /// Indices of the items, in batch order.
    items: Vec<usize>,
    /// Their rows in the stacked tokens.
    rows: Tensor,
    /// The longest of their attention spans.
    longest: usize,
    /// `(sequences, 1, longest)`: 0 where a sequence has a token, −∞ in its padding.
    mask: Tensor,
}

impl DecodeGroup {
    /// `None` unless at least two items decode (one alone takes the plain path).
    fn new(spans: &[(usize, usize, usize)], device: &Device) -> candle_core::Result<Option<Self>> {
        let items: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].1 == 1).collect();
        if items.len() < 2 {
            return Ok(None);
        }
        let longest = items.iter().map(|&i| spans[i].2 + 1).max().unwrap_or(1);
        let rows: Vec<u32> = items.iter().map(|&i| spans[i].0 as u32).collect();
        let mask: Vec<f32> = items
            .iter()
            .flat_map(|&i| {
                let len = spans[i].2 + 1;
                (0..longest).map(move |j| if j < len { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        Ok(Some(Self {
            rows: Tensor::new(rows.as_slice(), device)?,
            mask: Tensor::from_vec(mask, (items.len(), 1, longest), device)?,
            items,
            longest,
        }))
    }
}

impl Llama {
    /// Attention of layer `l` for a decode group; rows in the group's order, `(n, heads·hd)`.
    #[allow(clippy::too_many_arguments)]
    fn decode_attention(
        &self,
        items: &mut [BatchItem<'_, LlamaCache>],
        spans: &[(usize, usize, usize)],
        d: &DecodeGroup,
        l: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (hd, heads, kv_heads) = (c.head_dim(), c.heads, c.kv_heads);
        let rep = heads / kv_heads;
        let n = d.items.len();
        let mut ks = Vec::with_capacity(n);
        let mut vs = Vec::with_capacity(n);
        // The group's new keys and values as (n, kv_heads, 1, hd): each sequence's slice is then
        // a contiguous view, appended without a copy of its own.
        let per_seq = |t: &Tensor| -> candle_core::Result<Tensor> {
            select_rows(t, &d.rows)?.reshape((n, kv_heads, 1, hd))
        };
        let (kd, vd) = (per_seq(k)?, per_seq(v)?);
        for (j, &i) in d.items.iter().enumerate() {
            let start = spans[i].2;
            let ki = kd.narrow(0, j, 1)?;
            let vi = vd.narrow(0, j, 1)?;
            let capacity = items[i].cache.capacity;
            let slot = &mut items[i].cache.layers[l];
            let (kc, vc) = write_layer(slot, capacity, start, &ki, &vi)?;
            // The cache buffer past the sequence's length is zeros (or stale finite values after
            // a failed step): a free view when it reaches `longest`; padded otherwise.
            let slot = &*slot;
            let pad = |part: usize, cur: Tensor| -> candle_core::Result<Tensor> {
                match slot {
                    Some(a) if capacity >= d.longest => {
                        a.narrow(0, part, 1)?.narrow(2, 0, d.longest)
                    }
                    _ => cur.pad_with_zeros(2, 0, d.longest - (start + 1)),
                }
            };
            ks.push(pad(0, kc)?);
            vs.push(pad(1, vc)?);
        }
        let kb = Tensor::cat(&ks, 0)?.reshape((n * kv_heads, d.longest, hd))?;
        let vb = Tensor::cat(&vs, 0)?.reshape((n * kv_heads, d.longest, hd))?;
        let qd = select_rows(q, &d.rows)?.reshape((n * kv_heads, rep, hd))?;
        let att = (qd.matmul(&kb.t()?)? / (hd as f64).sqrt())?
            .reshape((n, heads, d.longest))?
            .broadcast_add(&d.mask)?;
        let att =
            candle_nn::ops::softmax_last_dim(&att)?.reshape((n * kv_heads, rep, d.longest))?;
        att.matmul(&vb)?.reshape((n, heads * hd))
    }
}

/// Longer runs of new tokens (long prompts) attend through candle's batched products.
const CPU_ATTENTION_MAX_NEW: usize = 64;

/// On CPU: the items of a step adding at most [`CPU_ATTENTION_MAX_NEW`] tokens each.
struct SmallGroup {
    /// Indices of the items, in batch order.
    items: Vec<usize>,
    /// Their token rows in the stacked tokens, item after item.
    rows: Tensor,
}

impl SmallGroup {
    fn new(spans: &[(usize, usize, usize)], device: &Device) -> candle_core::Result<Option<Self>> {
        let items: Vec<usize> = (0..spans.len())
            .filter(|&i| spans[i].1 <= CPU_ATTENTION_MAX_NEW)
            .collect();
        if items.is_empty() {
            return Ok(None);
        }
        let rows: Vec<u32> = items
            .iter()
            .flat_map(|&i| (spans[i].0..spans[i].0 + spans[i].1).map(|r| r as u32))
            .collect();
        Ok(Some(Self {
            rows: Tensor::new(rows.as_slice(), device)?,
            items,
        }))
    }
}

/// The given token rows of a `(1, heads, tokens, hd)` step tensor, as `(rows, heads, hd)`.
fn select_rows(t: &Tensor, rows: &Tensor) -> candle_core::Result<Tensor> {
    t.index_select(rows, 2)?
        .squeeze(0)?
        .transpose(0, 1)?
        .contiguous()
}

impl Llama {
    /// Attention of layer `l` on CPU for a [`SmallGroup`]: each item's new keys and values are
    /// appended to its cache, then every new token of every (sequence, head) attends over the
    /// cache where it lies, causally (no padding, no copies), the sequences spread over the
    /// rayon pool. Rows in the group's order, `(rows, heads·hd)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_cpu(
        &self,
        items: &mut [BatchItem<'_, LlamaCache>],
        spans: &[(usize, usize, usize)],
        g: &SmallGroup,
        l: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        let c = &self.config;
        let (hd, heads, kv_heads) = (c.head_dim(), c.heads, c.kv_heads);
        let total = g.rows.dim(0)?;
        // The group's new keys and values as (2, rows, kv_heads, hd), written into each
        // sequence's buffer by one in-place copy.
        let kvr = Tensor::stack(&[select_rows(k, &g.rows)?, select_rows(v, &g.rows)?], 0)?;
        // Per item: where its rows start in the group, how many, its buffer and where its new
        // tokens start.
        let mut work = Vec::with_capacity(g.items.len());
        let mut row = 0;
        for &i in &g.items {
            let (_, n, start) = spans[i];
            let capacity = items[i].cache.capacity;
            let buffer = layer_buffer(
                &mut items[i].cache.layers[l],
                kv_heads,
                capacity,
                hd,
                &self.device,
            )?;
            buffer.inplace_op2(&kvr, &WriteRows { row, n, start })?;
            work.push((row, n, buffer.clone(), start));
            row += n;
        }
        let q = select_rows(q, &g.rows)?;
        let guards: Vec<_> = work
            .iter()
            .map(|(_, _, b, _)| b.storage_and_layout())
            .collect();
        let qg = q.storage_and_layout();
        let qs = cpu_f32(&qg)?;
        if qs.len() < total * heads * hd {
            candle_core::bail!("CPU attention: short query buffer");
        }
        let mut views = Vec::with_capacity(work.len());
        for (guard, (row, n, buffer, start)) in guards.iter().zip(&work) {
            let all = cpu_f32(guard)?;
            let capacity = buffer.dim(2)?;
            let half = kv_heads * capacity * hd;
            if all.len() < 2 * half {
                candle_core::bail!("CPU attention: short cache buffer");
            }
            let (ks, vs) = all.split_at(half);
            views.push((ks, vs, capacity, *row, *n, *start));
        }
        let mut out = vec![0f32; total * heads * hd];
        // Each item's output rows, split off in order so every task owns its own.
        let mut parts = Vec::with_capacity(views.len());
        let mut rest = out.as_mut_slice();
        for &(_, _, _, _, n, _) in &views {
            let (part, tail) = rest.split_at_mut(n * heads * hd);
            parts.push(part);
            rest = tail;
        }
        parts.into_par_iter().zip(views.par_iter()).for_each(
            |(out, &(ks, vs, capacity, row, n, start))| {
                let seq = vector::Sequence {
                    q: qs
                        .get(row * heads * hd..(row + n) * heads * hd)
                        .unwrap_or(&[]),
                    keys: ks,
                    values: vs,
                    dims: vector::Heads {
                        heads,
                        kv_heads,
                        head_dim: hd,
                        capacity,
                    },
                    n,
                    start,
                };
                vector::attend(out, &seq);
            },
        );
        drop(qg);
        drop(guards);
        Tensor::from_vec(out, (total, heads * hd), &self.device)
    }
}

impl LanguageModel for Llama {
    type Cache = LlamaCache;

    fn new_cache(&self, capacity: usize) -> LlamaCache {
        let capacity = capacity.min(self.config.context);
        LlamaCache {
            layers: vec![None; self.config.layers],
            len: 0,
            capacity,
        }
    }

    fn forward(&self, items: &mut [BatchItem<'_, LlamaCache>]) -> Result<Vec<Vec<f32>>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        // A failed step must not leave a cache longer: remember and restore lengths (what it
        // wrote past them is stale and never read).
        let lens: Vec<usize> = items.iter().map(|i| i.cache.len).collect();
        // The step runs on a worker of rayon's pool, not on the calling (engine) thread: the
        // pool's workers then never spin for work beside a third busy thread; on two cores that
        // spinning took a quarter of the time.
        match rayon::scope(|_| self.forward_tensor(items)) {
            Ok(logits) => Ok(logits_rows(&logits.to_dtype(DType::F32)?.contiguous()?)?),
            Err(e) => {
                for (item, len) in items.iter_mut().zip(lens) {
                    item.cache.len = len;
                }
                Err(e)
            }
        }
    }

    fn context_length(&self) -> usize {
        self.config.context
    }

    fn fork(&self, cache: &LlamaCache, len: usize, capacity: usize) -> Option<LlamaCache> {
        if len > cache.len || len > capacity {
            return None;
        }
        let mut copy = self.new_cache(capacity);
        if len == 0 {
            return Some(copy);
        }
        let copied: candle_core::Result<()> = cache
            .layers
            .iter()
            .zip(copy.layers.iter_mut())
            .try_for_each(|(from, to)| {
                let Some(from) = from else {
                    candle_core::bail!("an empty layer cache")
                };
                let (_, kv_heads, _, hd) = from.dims4()?;
                let buffer = layer_buffer(to, kv_heads, capacity, hd, from.device())?;
                buffer.slice_set(&from.narrow(2, 0, len)?.contiguous()?, 2, 0)
            });
        match copied {
            Ok(()) => {
                copy.len = len;
                Some(copy)
            }
            Err(e) => {
                tracing::debug!(error = %e, "prefix copy failed; the prompt is computed whole");
                None
            }
        }
    }
}

type StorageGuard<'a> = (
    std::sync::RwLockReadGuard<'a, candle_core::Storage>,
    &'a candle_core::Layout,
);

/// The rows of a `(n, vocab)` logits matrix; on CPU copied out a row per task (a batch's
/// logits are megabytes, which one thread copies while the others wait).
fn logits_rows(logits: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    use rayon::prelude::*;
    let (n, vocab) = logits.dims2()?;
    if !logits.device().is_cpu() || vocab == 0 {
        return logits.to_vec2::<f32>();
    }
    let guard = logits.storage_and_layout();
    let all = cpu_f32(&guard)?;
    if all.len() < n * vocab {
        candle_core::bail!("logits: short buffer");
    }
    Ok(all[..n * vocab]
        .par_chunks(vocab)
        .map(<[f32]>::to_vec)
        .collect())
}

/// The f32 values of a CPU tensor from its first element on (its layout says where they lie).
fn cpu_f32<'a>((storage, layout): &'a StorageGuard<'_>) -> candle_core::Result<&'a [f32]> {
    match &**storage {
        candle_core::Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[layout.start_offset()..]),
        _ => candle_core::bail!("a CPU kernel on a tensor that is not on the CPU"),
    }
}

/// `(n, start + n)`: 0 where new token i may see position j (j ≤ start + i), −∞ elsewhere.
fn causal_mask(n: usize, start: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = start + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, total), device)
}

fn rope_tables(
    head_dim: usize,
    theta: f32,
    context: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32))
        .collect();
    let inv = Tensor::new(inv.as_slice(), device)?;
    let pos = Tensor::arange(0, context as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((context, 1))?;
    let angles = pos.matmul(&inv.reshape((1, inv.elem_count()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// `config.json` of a Hugging Face Llama folder.
fn hf_config(dir: &Path) -> Result<LlamaConfig> {
    #[derive(serde::Deserialize)]
    struct Hf {
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: Option<usize>,
        vocab_size: usize,
        rms_norm_eps: f64,
        rope_theta: Option<f32>,
        max_position_embeddings: Option<usize>,
    }
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| InferError::ModelUnavailable(format!("{}: {e}", path.display())))?;
    let hf: Hf = serde_json::from_str(&text)
        .map_err(|e| InferError::ModelUnavailable(format!("{}: {e}", path.display())))?;
    let config = LlamaConfig {
        hidden: hf.hidden_size,
        intermediate: hf.intermediate_size,
        layers: hf.num_hidden_layers,
        heads: hf.num_attention_heads,
        kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        vocab: hf.vocab_size,
        rms_eps: hf.rms_norm_eps,
        rope_theta: hf.rope_theta.unwrap_or(10_000.0),
        context: hf.max_position_embeddings.unwrap_or(2048),
    };
    config.validate()?;
    Ok(config)
}

/// Greedy pick: the highest logit, the lowest id on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn silu_mul_matches_candle() {
        let dev = Device::Cpu;
        // Longer than one parallel chunk, and not a multiple of it.
        for len in [1usize, 7, 4096, 9000] {
            let g = (Tensor::randn(0f32, 3.0, (len,), &dev).unwrap())
                .reshape((1, len))
                .unwrap();
            let u = Tensor::randn(0f32, 1.0, (1, len), &dev).unwrap();
            let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
            let got = g.apply_op2_no_bwd(&u, &SiluMul).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        }
        // The two halves of a stacked product: column slices, rows 2·width apart; many rows
        // (several tasks) and one.
        for rows in [1usize, 40] {
            let both = Tensor::randn(0f32, 3.0, (rows, 2 * 300), &dev).unwrap();
            let (g, u) = (
                both.narrow(1, 0, 300).unwrap(),
                both.narrow(1, 300, 300).unwrap(),
            );
            let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
            let got = g.apply_op2_no_bwd(&u, &SiluMul).unwrap();
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        }
        let short = Tensor::zeros((1, 3), DType::F32, &dev).unwrap();
        let long = Tensor::zeros((1, 4), DType::F32, &dev).unwrap();
        assert!(short.apply_op2_no_bwd(&long, &SiluMul).is_err());
        // Columns of a transposed matrix are not rows of contiguous values.
        let t = Tensor::zeros((4, 3), DType::F32, &dev)
            .unwrap()
            .t()
            .unwrap();
        assert!(t.apply_op2_no_bwd(&t, &SiluMul).is_err());
    }
}
