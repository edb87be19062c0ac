//! Our packed half-precision matrix product alone against candle's f32 product (the `gemm`
//! crate), on SmolLM2-135M's shapes, at the row counts of decode steps and of a prefill.
//! Usage: cargo bench -p swarm-gpu --bench packed

use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use swarm_gpu::packed::PackedMatrix;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    for (rows, cols) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?;
        let packed = PackedMatrix::new(&w.flatten_all()?.to_vec1::<f32>()?, rows, cols);
        let lin = candle_nn::Linear::new(w, None);
        for m in [1usize, 4, 16, 32, 256] {
            let x = Tensor::randn(0f32, 1.0, (m, cols), &dev)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let reps = (200_000_000 / (rows * cols * m)).max(3);
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(packed.matmul(&xv, m));
            }
            let tp = t.elapsed().as_secs_f64() / reps as f64;
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(lin.forward(&x)?);
            }
            let tf = t.elapsed().as_secs_f64() / reps as f64;
            let gmac = (rows * cols * m) as f64 / 1e9;
            println!(
                "{rows:5}x{cols:4} m={m:3}: packed {:8.3} ms ({:5.1} GMAC/s)  candle f32 {:8.3} ms ({:5.1} GMAC/s)",
                tp * 1e3,
                gmac / tp,
                tf * 1e3,
                gmac / tf
            );
        }
    }
    Ok(())
}
