//! The inference engine: GGUF and safetensors Llama-family models on candle, our own batched
//! forward, KV-cache accounting, the continuous-batching scheduler and sampling, and one
//! supervised actor per served model. Models run on the CPU; device discovery with cudarc
//! (feature `cuda`) reports the GPUs a node has (published in its member metadata), without
//! running models on them.
//!
//! - `catalog`: the built-in model catalog and `swarm model pull` (download, SHA-256, unpack).
//! - `model`: Llama-family weights from GGUF or a Hugging Face folder and our batched forward.
//! - `tokenizer`: tokenizer (tokenizer.json or rebuilt from GGUF), chat template, detokenizer.
//! - `sampling`: sampling parameters and their validation, the sampler, stop strings.
//! - `scheduler`: continuous batching as a state machine, KV accounting in blocks.
//! - `engine`: the engine thread that runs the scheduler's plans, with supervised restarts.
//! - `stats`: counters and histograms for `/metrics`.
//! - `actor`: one supervised ractor actor per served model, owning its engine.
//! - `serve`: this node's models behind `swarm_actors::inference::LocalModels` ([`LocalServer`]).
//! - `testmodel` (feature `test-util`): a tiny random model written by tests and benchmarks.

mod actor;
pub mod catalog;
#[cfg(feature = "cuda")]
mod cuda;
mod engine;
mod error;
mod gguf_check;
mod model;
pub mod packed;
mod prefix;
mod sampling;
mod scheduler;
mod serve;
mod stats;
#[cfg(feature = "test-util")]
pub mod testmodel;
mod tokenizer;
mod vector;

pub use actor::{EngineStarter, InferenceMsg, InferenceSupervisor, Served, starter, submit};
pub use engine::{EngineConfig, EngineHandle, Event, FinishReason, Generation};
pub use error::InferError;
pub use gguf_check::check_bytes as check_gguf_bytes;
pub use model::{BatchItem, LanguageModel, Llama, LlamaCache, LlamaConfig, WeightMode, argmax};
pub use sampling::{MAX_STOP_STRINGS, Sampler, SamplingParams, StopCheck, StopStrings};
pub use scheduler::{BlockBudget, KvAccounting, Plan, Refused, Scheduler, SchedulerConfig, SeqId};
pub use serve::{LocalServer, ServedModel, resolve_model};
pub use stats::{EngineStats, Histogram};
pub use tokenizer::{CHATML, ChatMessage, Detokenizer, TextTokenizer};

/// Loads a model and its tokenizer: a `.gguf` file, or a Hugging Face folder (`config.json`,
/// `*.safetensors`, `tokenizer.json`).
///
/// The weights always go to the CPU: candle is built without its CUDA backend, so a GPU that
/// [`discover`] reports is not used for inference. The device is logged (`device`, at info) so
/// that an operator sees where a model runs.
pub fn load(path: &std::path::Path) -> Result<(Llama, TextTokenizer), InferError> {
    let device = candle_core::Device::Cpu;
    tracing::info!(path = %path.display(), device = %device_label(&device), "loading model");
    if path.is_dir() {
        Ok((
            Llama::from_hf_dir(path, &device)?,
            TextTokenizer::from_hf_dir(path)?,
        ))
    } else {
        let (mut file, ct) = gguf_check::open(path)?;
        Ok((
            Llama::from_gguf_content(&ct, &mut file, &device, WeightMode::Auto)?,
            TextTokenizer::from_gguf_content(&ct)?,
        ))
    }
}

/// `cpu`, `cuda:<ordinal>` or `metal:<ordinal>`: the device a model is loaded on, for logs.
fn device_label(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

use serde::{Deserialize, Serialize};

/// A compute device a node can serve models on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Device {
    Cpu {
        cores: usize,
    },
    Cuda {
        ordinal: usize,
        name: String,
        total_mib: u64,
    },
}

/// The devices of this machine: the CPU first, then (with the `cuda` feature) one entry per CUDA
/// GPU. Without the feature, without a CUDA driver, or on any driver error only the CPU is reported.
pub fn discover() -> Vec<Device> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    #[cfg(feature = "cuda")]
    let gpus = cuda::discover();
    #[cfg(not(feature = "cuda"))]
    let gpus = Vec::new();
    std::iter::once(Device::Cpu { cores }).chain(gpus).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cpu_is_logged_as_cpu() {
        assert_eq!(super::device_label(&candle_core::Device::Cpu), "cpu");
    }

    #[test]
    fn cpu_is_always_there() {
        assert!(matches!(super::discover()[0], super::Device::Cpu { cores } if cores >= 1));
    }
}
