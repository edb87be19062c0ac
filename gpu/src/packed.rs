//! Weights packed once at load for our own CPU matrix product: half precision, in panels of 16
//! output features laid out input by input, so the product streams each panel once per call for
//! every activation row (six rows at a time in registers) and never re-packs a weight.
//!
//! Why not candle's products: its f32 product (the `gemm` crate) packs the weight matrix on every
//! call, which at the handful of rows of a decode step costs as much as the arithmetic, and its
//! quantized CPU product walks every weight once per activation row. Half precision halves the
//! memory read per step against f32; the values of 4- and 8-bit GGUF blocks (`d·q + m`) keep
//! about three decimal digits, far finer than the quantization that produced them.
//!
//! The SIMD kernel (AVX2, FMA, F16C) is chosen at run time; a portable kernel computes the same
//! sums elsewhere (slower than candle's f32 product, so `WeightMode::Auto` packs only where the
//! SIMD kernel runs).

use candle_core::{CpuStorage, Layout, Shape};
use half::f16;
use rayon::prelude::*;

/// Output features per panel.
pub const PANEL: usize = 16;

/// Activation rows per kernel call (twelve accumulators of eight lanes, plus two weight vectors
/// and a broadcast: fifteen of the sixteen AVX2 registers).
const TILE: usize = 6;

/// Activation rows per pass over a task's panels: a block of rows stays in L2 while every panel
/// of the task multiplies it.
const ROW_BLOCK: usize = 96;

/// Multiply-adds a task of the product should at least hold.
const MIN_TASK_WORK: usize = 1 << 16;

/// Activation values from which the interleaving copy is spread over the rayon pool.
const PARALLEL_COPY: usize = 1 << 16;

/// A `(rows, cols)` weight matrix (`rows` output features of `cols` inputs each), packed.
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    /// `rows.div_ceil(16)` panels of `cols × 16` values: panel `p`, input `k`, lane `j` is the
    /// weight of output `16p + j` for input `k` (zero past `rows`).
    panels: Vec<[f16; PANEL]>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// Whether this CPU runs the SIMD kernel (AVX2, FMA and F16C, detected at run time).
pub fn fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::vector::fast() && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PackedMatrix {
    /// Packs a row-major `(rows, cols)` f32 matrix.
    pub fn new(w: &[f32], rows: usize, cols: usize) -> Self {
        let count = rows.div_ceil(PANEL);
        let mut panels = vec![[f16::ZERO; PANEL]; count * cols];
        for (r, row) in w.chunks_exact(cols).take(rows).enumerate() {
            let (p, j) = (r / PANEL, r % PANEL);
            for (k, &v) in row.iter().enumerate() {
                panels[p * cols + k][j] = f16::from_f32(v);
            }
        }
        Self { rows, cols, panels }
    }

    /// Matrices of the same width stacked into one, whose product is theirs side by side (one
    /// pass over the input, one set of tasks): `None` for no matrices or differing widths. Each
    /// part starts at a panel boundary; with its first column and width.
    pub fn stack(parts: &[PackedMatrix]) -> Option<(PackedMatrix, Vec<(usize, usize)>)> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let mut panels = Vec::with_capacity(parts.iter().map(|p| p.panels.len()).sum());
        let mut places = Vec::with_capacity(parts.len());
        for p in parts {
            places.push((panels.len() / cols.max(1) * PANEL, p.rows));
            panels.extend_from_slice(&p.panels);
        }
        let rows = places.last().map_or(0, |&(first, rows)| first + rows);
        Some((Self { rows, cols, panels }, places))
    }

    /// `x · selfᵀ` for `x` of `m` rows of `cols` values: `m` rows of `rows` values.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        let count = n.div_ceil(PANEL);
        if m == 0 || k == 0 || x.len() < m * k {
            return vec![0.0; m * n];
        }
        // The activations in tiles of six rows, interleaved input by input (`[tile][k][6]`), so
        // the kernel's six broadcasts per input read one cache line. Copied across the rayon
        // pool when large (a prefill's); a decode step's few rows are quicker copied here than
        // handed out.
        let tiles = m.div_ceil(TILE);
        let mut a = vec![0f32; tiles * k * TILE];
        let interleave = |(tile, rows): (&mut [f32], &[f32])| {
            for (r, row) in rows.chunks_exact(k).enumerate() {
                for (dst, &v) in tile.iter_mut().skip(r).step_by(TILE).zip(row) {
                    *dst = v;
                }
            }
        };
        if tiles * k * TILE >= PARALLEL_COPY {
            a.par_chunks_mut(k * TILE)
                .zip(x[..m * k].par_chunks(k * TILE))
                .for_each(interleave);
        } else {
            a.chunks_mut(k * TILE)
                .zip(x[..m * k].chunks(k * TILE))
                .for_each(interleave);
        }
        let simd = fast();
        // Many small tasks, so that the threads finish together (with a few large ones, a
        // thread that drew a slow one keeps the rest waiting), yet each worth at least
        // `MIN_TASK_WORK` multiply-adds, so that handing tasks out stays cheap next to them.
        let per_task = (count / (rayon::current_num_threads() * 16))
            .max(MIN_TASK_WORK / (m * k * PANEL).max(1))
            .clamp(1, 64);
        // Each task writes the columns of its own panels, every row, straight into the result.
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        let out = Columns {
            ptr: y.as_mut_ptr(),
            rows: m,
            cols: n,
        };
        (0..count.div_ceil(per_task))
            .into_par_iter()
            .for_each(|task| {
                let first = task * per_task;
                let mut buf = [[0f32; PANEL]; ROW_BLOCK];
                for r0 in (0..m).step_by(ROW_BLOCK) {
                    let r1 = (r0 + ROW_BLOCK).min(m);
                    for p in first..(first + per_task).min(count) {
                        let panel = &self.panels[p * k..(p + 1) * k];
                        for t0 in (r0..r1).step_by(TILE) {
                            let t1 = (t0 + TILE).min(r1);
                            let a = &a[(t0 / TILE) * k * TILE..][..k * TILE];
                            tile(a, k, panel, &mut buf[t0 - r0..t1 - r0], simd);
                        }
                        for (r, values) in (r0..r1).zip(&buf) {
                            // SAFETY: this task alone writes the columns of panels
                            // `first .. first + per_task`, and each (row, panel) once.
                            #[allow(unsafe_code)]
                            unsafe {
                                out.write(r, p * PANEL, values)
                            };
                        }
                    }
                }
            });
        // SAFETY: the tasks wrote every element: rows `0..m` of panels `0..count`, whose
        // columns cover `0..n`.
        #[allow(unsafe_code)]
        unsafe {
            y.set_len(m * n)
        };
        y
    }
}

/// The product's result while tasks fill it in: each task writes the columns of its own
/// panels, which no other task touches.
struct Columns {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
}

// SAFETY: tasks share the pointer but write disjoint elements (see `write`); the buffer
// outlives the parallel loop that uses it.
#[allow(unsafe_code)]
unsafe impl Sync for Columns {}

impl Columns {
    /// Writes row `r`, columns `c .. c + 16` from `values` (cut at the last column).
    ///
    /// # Safety
    /// No other thread may write or read those elements meanwhile.
    #[allow(unsafe_code)]
    unsafe fn write(&self, r: usize, c: usize, values: &[f32; PANEL]) {
        if r >= self.rows || c >= self.cols {
            return;
        }
        let len = PANEL.min(self.cols - c);
        // SAFETY: `r·cols + c + len <= rows·cols`, the capacity the pointer was made with. A
        // whole panel's sixteen values are one fixed-size store (two vector stores, where a
        // copy of run-time length is a call to `memmove`).
        unsafe {
            let dst = self.ptr.add(r * self.cols + c);
            if len == PANEL {
                dst.cast::<[f32; PANEL]>().write_unaligned(*values);
            } else {
                std::ptr::copy_nonoverlapping(values.as_ptr(), dst, len);
            }
        };
    }
}

/// `out[r] = a[r] · panel` for the (at most six) rows of a tile `a` (`[k][6]`).
fn tile(a: &[f32], k: usize, panel: &[[f16; PANEL]], out: &mut [[f32; PANEL]], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        macro_rules! rows {
            ($($r:literal)*) => {
                match out.len() {
                    $($r => {
                        #[allow(unsafe_code)]
                        // SAFETY: `simd` is `fast()`: this CPU has AVX2, FMA and F16C.
                        unsafe { avx2::tile::<$r>(a, k, panel, out) }
                    })*
                    _ => portable(a, k, panel, out),
                }
            };
        }
        rows!(1 2 3 4 5 6);
        return;
    }
    let _ = simd;
    portable(a, k, panel, out);
}

fn portable(a: &[f32], k: usize, panel: &[[f16; PANEL]], out: &mut [[f32; PANEL]]) {
    for (r, out) in out.iter_mut().enumerate().take(TILE) {
        let mut acc = [0f32; PANEL];
        for (&av, w) in a.iter().skip(r).step_by(TILE).take(k).zip(panel) {
            for (acc, w) in acc.iter_mut().zip(w) {
                *acc += av * w.to_f32();
            }
        }
        *out = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{PANEL, TILE};

    /// Sixteen half-precision weights as two vectors of eight f32.
    #[target_feature(enable = "avx2,f16c")]
    fn load(w: &[f16; PANEL]) -> (__m256, __m256) {
        #[allow(unsafe_code)]
        // SAFETY: `w` is 16 readable values of 2 bytes; both loads are unaligned, 16 bytes each.
        let (lo, hi) = unsafe {
            let p = w.as_ptr().cast::<__m128i>();
            (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)))
        };
        (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
    }

    /// The first `R` rows of tile `a` (`[k][6]`) times a panel: per input, the panel's sixteen
    /// weights are loaded once and multiplied with every row's value (broadcast) into `R × 2`
    /// vectors.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn tile<const R: usize>(
        a: &[f32],
        k: usize,
        panel: &[[f16; PANEL]],
        out: &mut [[f32; PANEL]],
    ) {
        if a.len() < k * TILE || panel.len() < k || out.len() < R || R > TILE {
            return;
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (w, a) in panel[..k].iter().zip(a.chunks_exact(TILE)) {
            let (w0, w1) = load(w);
            for r in 0..R {
                let av = _mm256_set1_ps(a[r]);
                acc[r][0] = _mm256_fmadd_ps(av, w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(av, w1, acc[r][1]);
            }
        }
        for (out, acc) in out.iter_mut().zip(acc) {
            let (lo, hi) = out.split_at_mut(PANEL / 2);
            #[allow(unsafe_code)]
            // SAFETY: `lo` and `hi` are 8 writable f32 each; the stores are unaligned.
            unsafe {
                _mm256_storeu_ps(lo.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(hi.as_mut_ptr(), acc[1]);
            }
        }
    }
}

impl candle_core::CustomOp1 for PackedMatrix {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed matmul: the input is not contiguous")
        };
        let x = &storage.as_slice::<f32>()?[start..end];
        let mut dims = layout.dims().to_vec();
        match dims.last_mut() {
            Some(k) if *k == self.cols => *k = self.rows,
            _ => candle_core::bail!(
                "packed matmul: input {:?} does not end in {} features",
                layout.dims(),
                self.cols
            ),
        }
        let m = x.len() / self.cols;
        Ok((CpuStorage::F32(self.matmul(x, m)), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use rand::{RngExt, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Against f64 sums over the same (half-precision) weights: only the f32 summation differs.
    fn check(rows: usize, cols: usize) {
        let w = random(rows * cols, 1);
        let wh: Vec<f32> = w.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let mat = PackedMatrix::new(&w, rows, cols);
        for m in [1, 2, 5, 6, 7, 13, 200] {
            let x = random(m * cols, 2 + m as u64);
            let got = mat.matmul(&x, m);
            for i in 0..m {
                for n in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|k| x[i * cols + k] as f64 * wh[n * cols + k] as f64)
                        .sum();
                    let g = got[i * rows + n];
                    assert!(
                        (g as f64 - want).abs() < 1e-4 * (cols as f64).sqrt(),
                        "{rows}x{cols} m={m} [{i},{n}]: {g} vs {want}"
                    );
                }
            }
            // The portable kernel: the same sums.
            let mut simd = vec![[0f32; PANEL]; m.min(TILE)];
            let mut port = simd.clone();
            let mut a = vec![0f32; cols * TILE];
            for r in 0..m.min(TILE) {
                for k in 0..cols {
                    a[k * TILE + r] = x[r * cols + k];
                }
            }
            tile(&a, cols, &mat.panels[..cols], &mut simd, fast());
            tile(&a, cols, &mat.panels[..cols], &mut port, false);
            for (s, p) in simd.iter().flatten().zip(port.iter().flatten()) {
                assert!((s - p).abs() < 1e-4 * (cols as f32).sqrt(), "{s} vs {p}");
            }
        }
    }

    #[test]
    fn products_match_f64_sums() {
        check(48, 64);
        // Rows not a multiple of the panel, odd widths.
        check(37, 19);
        check(5, 1);
        // Enough panels for the product to split into tasks, the last one short.
        check(300, 40);
    }

    #[test]
    fn stacked_matrices_multiply_as_their_parts_side_by_side() {
        // Heights off the panel size, so parts start on padded boundaries.
        let parts: Vec<PackedMatrix> = [(37usize, 1u64), (16, 2), (5, 3)]
            .iter()
            .map(|&(rows, seed)| PackedMatrix::new(&random(rows * 24, seed), rows, 24))
            .collect();
        let (stack, places) = PackedMatrix::stack(&parts).unwrap();
        assert_eq!(places, vec![(0, 37), (48, 16), (64, 5)]);
        for m in [1, 7] {
            let x = random(m * 24, 9);
            let all = stack.matmul(&x, m);
            for (part, &(first, width)) in parts.iter().zip(&places) {
                let alone = part.matmul(&x, m);
                for r in 0..m {
                    assert_eq!(
                        &all[r * stack.rows + first..][..width],
                        &alone[r * width..][..width]
                    );
                }
            }
        }
        let wide = PackedMatrix::new(&random(16 * 24, 4), 16, 24);
        let narrow = PackedMatrix::new(&random(16 * 8, 5), 16, 8);
        assert!(PackedMatrix::stack(&[wide, narrow]).is_none());
        assert!(PackedMatrix::stack(&[]).is_none());
    }

    #[test]
    fn a_wrong_input_width_is_an_error_not_a_panic() {
        let mat = PackedMatrix::new(&random(8 * 32, 1), 8, 32);
        let x = Tensor::zeros((2, 31), DType::F32, &Device::Cpu).unwrap();
        assert!(x.apply_op1_no_bwd(&mat).is_err());
        let x = Tensor::ones((2, 32), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(x.apply_op1_no_bwd(&mat).unwrap().dims(), &[2, 8]);
    }
}
