//! The inference engine (filled by the inference issue): GGUF and safetensors Llama-family models
//! on candle, our own batched forward, KV-cache accounting, the continuous-batching scheduler and
//! sampling; device discovery with cudarc behind feature `cuda`.
//!
//! - `catalog`: the built-in model catalog and `swarm model pull` (download, SHA-256, unpack).

pub mod catalog;

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

/// The devices of this machine. Without the `cuda` feature only the CPU is reported.
pub fn discover() -> Vec<Device> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    vec![Device::Cpu { cores }]
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_is_always_there() {
        assert!(matches!(super::discover()[0], super::Device::Cpu { cores } if cores >= 1));
    }
}
