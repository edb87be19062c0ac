//! The CPU path's element-wise loops (attention over a sequence's cache, SwiGLU), written so the
//! compiler vectorizes them, and compiled twice: for AVX2 with fused multiply-add, chosen at run
//! time where the CPU has them, and for any CPU. The default build targets every x86-64, whose
//! vectors are four lanes wide and have no fused multiply-add; and `f32::exp` is a scalar call.

/// Whether this CPU runs the AVX2 + FMA versions (detected at run time).
pub(crate) fn fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `a·b + c`, fused (one rounding) where the code is compiled for FMA.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `eˣ` within 2·10⁻⁷ relative error (Cephes' polynomial after reducing by ln 2), branch-free so
/// that loops over it vectorize; inputs are clamped to [−87, 88] (below, the result is ~10⁻³⁸
/// instead of 0).
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer, which then sits in the low bits of the mantissa.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = madd::<FMA>(x, std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    // x − n·ln 2, with ln 2 in two parts so that the first product is exact.
    let r = madd::<FMA>(n, -0.693_359_4, x);
    let r = madd::<FMA>(n, 2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 0.166_666_65);
    p = madd::<FMA>(p, r, 0.5);
    let y = madd::<FMA>(p, r * r, r) + 1.0;
    // 2ⁿ: n + 127 in the exponent field (n is in −126 ..= 127 after the clamp).
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    y * two_n
}

/// `a · b`, summed in sixteen independent lanes and reduced as a tree (one running sum is a chain
/// of dependent additions, several times slower).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = madd::<FMA>(*x, *y, tail);
    }
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] = madd::<FMA>(x[i], y[i], acc[i]);
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// `x ← softmax(x)`.
#[inline(always)]
fn softmax<const FMA: bool>(x: &mut [f32]) {
    const LANES: usize = 8;
    let mut max = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut top = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for i in 0..LANES {
            max[i] = max[i].max(c[i]);
        }
    }
    top = max.iter().copied().fold(top, f32::max);
    let mut sum = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp::<FMA>(c[i] - top);
            sum[i] += c[i];
        }
    }
    let mut total: f32 = sum.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp::<FMA>(*v - top);
        total += *v;
    }
    let inv = 1.0 / total;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `y = Σₛ weights[s] · values[s]` over the rows of `values` (rows as long as `y`). For 64-wide
/// heads (SmolLM2's) the sum is held in a fixed array, which the compiler keeps in registers
/// instead of loading and storing `y` for every row.
#[inline(always)]
fn weighted_sum<const FMA: bool>(weights: &[f32], values: &[f32], y: &mut [f32]) {
    const HD: usize = 64;
    if let Ok(y) = <&mut [f32; HD]>::try_from(&mut *y) {
        let mut acc = [0f32; HD];
        for (&p, value) in weights.iter().zip(values.chunks_exact(HD)) {
            if let Ok(value) = <&[f32; HD]>::try_from(value) {
                for i in 0..HD {
                    acc[i] = madd::<FMA>(p, value[i], acc[i]);
                }
            }
        }
        *y = acc;
        return;
    }
    y.fill(0.0);
    for (&p, value) in weights.iter().zip(values.chunks_exact(y.len().max(1))) {
        for (y, &x) in y.iter_mut().zip(value) {
            *y = madd::<FMA>(p, x, *y);
        }
    }
}

/// The dimensions of one layer's attention.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    /// Positions a cache buffer holds (its keys of one KV head are `capacity · head_dim` apart).
    pub(crate) capacity: usize,
}

/// One sequence's part of a step's attention: its `n` new tokens (queries `q`, `(n, heads,
/// head_dim)`; token `t` sits at position `start + t`) and the keys and values of its cache
/// (`(kv_heads, capacity, head_dim)` each, already holding the new tokens).
pub(crate) struct Sequence<'a> {
    pub(crate) q: &'a [f32],
    pub(crate) keys: &'a [f32],
    pub(crate) values: &'a [f32],
    pub(crate) dims: Heads,
    pub(crate) n: usize,
    pub(crate) start: usize,
}

/// A sequence's attention, causally, into `out` (`(n, heads · head_dim)`). The query heads
/// sharing a KV head are taken together, so each key and value is read once for all of them.
/// Slices too short for the dimensions leave `out` unwritten there.
pub(crate) fn attend(out: &mut [f32], s: &Sequence<'_>) {
    #[cfg(target_arch = "x86_64")]
    if fast() {
        #[allow(unsafe_code)]
        // SAFETY: `fast()` found AVX2 and FMA on this CPU.
        unsafe {
            attend_avx2(out, s)
        };
        return;
    }
    attend_in::<false>(out, s, dot::<false>);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(out: &mut [f32], s: &Sequence<'_>) {
    // (The closure has this function's target features, so it may call `dot_avx2`.)
    attend_in::<true>(out, s, |a, b| dot_avx2(a, b));
}

/// [`dot`] in AVX2 registers: two sums of eight lanes, reduced at the end. (The compiler's own
/// vectorization of `dot` works in pairs of lanes here.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        #[allow(unsafe_code)]
        // SAFETY: `i + 16 <= n`, within both slices; the loads are unaligned.
        unsafe {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), s1);
        }
        i += 16;
    }
    let s = _mm256_add_ps(s0, s1);
    let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
    let mut sum = _mm_cvtss_f32(q);
    for (x, y) in a[i..n].iter().zip(&b[i..n]) {
        sum = x.mul_add(*y, sum);
    }
    sum
}

#[inline(always)]
fn attend_in<const FMA: bool>(
    out: &mut [f32],
    seq: &Sequence<'_>,
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let &Sequence {
        q,
        keys,
        values,
        dims,
        n,
        start,
    } = seq;
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
        capacity,
    } = dims;
    if kv_heads == 0 || hd == 0 || heads % kv_heads != 0 {
        return;
    }
    let rep = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // Scores of the `rep` query heads that share a KV head, head after head.
    let mut scores = vec![0f32; rep * (start + n)];
    for t in 0..n {
        // Token t sees positions 0 ..= start + t.
        let len = start + t + 1;
        let scores = &mut scores[..rep * len];
        for g in 0..kv_heads {
            let base = g * capacity * hd;
            // The token's query heads g·rep .. (g+1)·rep lie side by side, as do its outputs.
            let at = (t * heads + g * rep) * hd..(t * heads + (g + 1) * rep) * hd;
            let (Some(qg), Some(kh), Some(vh), Some(y)) = (
                q.get(at.clone()),
                keys.get(base..base + len * hd),
                values.get(base..base + len * hd),
                out.get_mut(at),
            ) else {
                continue;
            };
            for (s, key) in kh.chunks_exact(hd).enumerate() {
                for (j, qh) in qg.chunks_exact(hd).enumerate() {
                    scores[j * len + s] = dot(qh, key) * scale;
                }
            }
            for (weights, y) in scores.chunks_exact_mut(len).zip(y.chunks_exact_mut(hd)) {
                softmax::<FMA>(weights);
                weighted_sum::<FMA>(weights, vh, y);
            }
        }
    }
}

/// `out = silu(gate) · up`, element by element (`silu(x) = x / (1 + e⁻ˣ)`).
pub(crate) fn silu_mul(out: &mut [f32], gate: &[f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if fast() {
        #[allow(unsafe_code)]
        // SAFETY: `fast()` found AVX2 and FMA on this CPU.
        unsafe {
            silu_mul_avx2(out, gate, up)
        };
        return;
    }
    silu_mul_in::<false>(out, gate, up);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_avx2(out: &mut [f32], gate: &[f32], up: &[f32]) {
    silu_mul_in::<true>(out, gate, up);
}

#[inline(always)]
fn silu_mul_in<const FMA: bool>(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp::<FMA>(-g)) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_its_stated_error() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            for got in [exp::<false>(x), exp::<true>(x)] {
                let rel = ((got as f64 - want) / want).abs();
                assert!(rel < 2e-7, "exp({x}) = {got}, want {want} (rel {rel})");
            }
            x += 0.0137;
        }
        // Far below the range: tiny, not NaN or negative.
        assert!(exp::<false>(-1000.0) >= 0.0 && exp::<false>(-1000.0) < 1e-37);
        assert!(exp::<false>(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn dot_softmax_and_weighted_sum_match_plain_loops() {
        for len in [1usize, 7, 16, 64, 100] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot::<false>(&a, &b) - want).abs() < 1e-5);
            assert!((dot::<true>(&a, &b) - want).abs() < 1e-5);
            #[cfg(target_arch = "x86_64")]
            if fast() {
                #[allow(unsafe_code)]
                // SAFETY: `fast()` found AVX2 and FMA on this CPU.
                let got = unsafe { dot_avx2(&a, &b) };
                assert!((got - want).abs() < 1e-5, "{len}: {got} vs {want}");
            }

            let mut s = a.clone();
            softmax::<true>(&mut s);
            let m = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = a.iter().map(|v| (v - m).exp()).sum();
            for (got, v) in s.iter().zip(&a) {
                assert!((got - (v - m).exp() / z).abs() < 1e-6);
            }

            for hd in [64usize, 5] {
                let values: Vec<f32> = (0..len * hd).map(|i| (i as f32 * 0.05).sin()).collect();
                let mut y = vec![9f32; hd];
                weighted_sum::<true>(&s, &values, &mut y);
                for (d, got) in y.iter().enumerate() {
                    let want: f32 = (0..len).map(|r| s[r] * values[r * hd + d]).sum();
                    assert!(
                        (got - want).abs() < 1e-5,
                        "hd {hd} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_its_definition() {
        let g: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.05).collect();
        let u: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.3).cos()).collect();
        let mut out = vec![0f32; g.len()];
        silu_mul(&mut out, &g, &u);
        for ((o, g), u) in out.iter().zip(&g).zip(&u) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (o - want).abs() < 1e-5 * (1.0 + want.abs()),
                "{o} vs {want}"
            );
        }
    }
}
