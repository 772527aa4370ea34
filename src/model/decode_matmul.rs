//! CPU kernels of a decoding step, which multiplies a few rows (one token per sequence) by every weight matrix and
//! is therefore bound by reading the weights: [`step_linear`] / [`matmul_rows`] stream each weight row once, in
//! place, over the persistent thread pool of `decode_pool`.

use candle_core::{CpuStorage, DType, Storage, StorageRef, Tensor};

use super::decode_pool as pool;
use super::error::Result;

/// `Σ a[i]·b[i]` over 16 independent lanes (so the loop vectorises).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

/// A contiguous f32 CPU tensor's data, borrowed in place.
pub struct HostF32<'a> {
    guard: StorageRef<'a>,
    range: (usize, usize),
}

impl<'a> HostF32<'a> {
    /// `None` unless `t` is a contiguous f32 tensor on the CPU.
    pub fn new(t: &'a Tensor) -> Option<Self> {
        let (guard, layout) = t.storage_and_layout();
        let range = layout.contiguous_offsets()?;
        matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))).then_some(Self { guard, range })
    }

    /// The values.
    pub fn get(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.0..self.range.1],
            _ => unreachable!("checked in new"),
        }
    }
}

/// Decoding steps multiply a few rows (one token per sequence) by every weight matrix, so the step is bound by
/// reading the weights. `x @ Wᵀ` for `x` of at most this many rows reads each weight row once, in place, through
/// [`step_linear`]; larger inputs (prefill) take the general matmul.
pub const STEP_ROWS_MAX: usize = 32;

/// `x @ Wᵀ (+ b)` over the last dimension for `W` in `nn.Linear` layout `[out, in]`: on the CPU in f32 with few
/// rows, [`matmul_rows`]; otherwise the general matmul.
pub fn step_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    let (n, kw) = w.dims2()?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = n;
    if x.device().is_cpu() && x.dtype() == DType::F32 && kw == k && m <= STEP_ROWS_MAX {
        if let Some(wh) = HostF32::new(w) {
            let xh = x.flatten_all()?.to_vec1::<f32>()?;
            let y = matmul_rows(&xh, m, k, wh.get());
            let y = Tensor::from_vec(y, out_dims, x.device())?;
            return Ok(match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
    }
    let y = super::layers::matmul_2d(&x.reshape((m, k))?, &w.t()?)?.reshape(out_dims)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// The weight matrix of a decoding matmul (`[n, k]`, `nn.Linear` layout): the f32 weights in place, or a bf16 copy
/// (half the bytes to read; `--decode-dtype bf16`). Products and sums are f32 either way, in the same order, so a bf16
/// copy gives exactly what f32 weights rounded to bf16 would.
#[derive(Debug, Clone, Copy)]
pub enum WeightRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl WeightRows<'_> {
    fn len(&self) -> usize {
        match self {
            WeightRows::F32(w) => w.len(),
            WeightRows::Bf16(w) => w.len(),
        }
    }

    fn slice(&self, r: std::ops::Range<usize>) -> Self {
        match self {
            WeightRows::F32(w) => WeightRows::F32(&w[r]),
            WeightRows::Bf16(w) => WeightRows::Bf16(&w[r]),
        }
    }
}

/// `x @ Wᵀ` for host rows `x` (`[m, k]`) and weights `w` (`[n, k]`, `nn.Linear` layout): `[m, n]`. Each weight
/// row is read once (AVX-512 4×4 register tiles where available), spread over the thread pool.
pub fn matmul_rows(x: &[f32], m: usize, k: usize, w: &[f32]) -> Vec<f32> {
    matmul_rows_w(x, m, k, WeightRows::F32(w))
}

/// [`matmul_rows`] for f32 or bf16 weights.
pub fn matmul_rows_w(x: &[f32], m: usize, k: usize, w: WeightRows<'_>) -> Vec<f32> {
    let n = w.len() / k.max(1);
    assert!(x.len() == m * k && w.len() == n * k, "matmul_rows: shapes");
    // Output transposed ([n, m]: each task owns a contiguous run of weight rows), then turned around.
    let mut yt = vec![0f32; n * m];
    let chunks = pool::threads().clamp(1, n.div_ceil(64).max(1));
    let per = n.div_ceil(chunks).next_multiple_of(4);
    let parts: Vec<std::sync::Mutex<&mut [f32]>> =
        yt.chunks_mut(per * m).map(std::sync::Mutex::new).collect();
    pool::run(parts.len(), &|c| {
        let mut yc = parts[c].lock().unwrap_or_else(|e| e.into_inner());
        let rows = yc.len() / m;
        let wc = w.slice(c * per * k..(c * per + rows) * k);
        match wc {
            WeightRows::F32(wc) => rows_times_weights(x, m, k, wc, &mut yc),
            WeightRows::Bf16(wc) => rows_times_weights(x, m, k, wc, &mut yc),
        }
    });
    drop(parts);
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (o, col) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * n + o] = v;
        }
    }
    y
}

/// A weight element: f32, or bf16 widened to f32 exactly.
pub(crate) trait WeightElem: Copy + Send + Sync {
    fn f32(self) -> f32;
    /// 16 consecutive elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// The CPU must support avx512f; `p..p+16` must be readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl WeightElem for half::bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32: widen each u16 to u32 and shift it into place.
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// `Σ a[i]·b[i]` as [`dot`], for any weight element (same lanes, same order).
#[inline(always)]
fn dot_w<W: WeightElem>(w: &[W], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut cw = w.chunks_exact(16);
    let mut cx = x.chunks_exact(16);
    for (a, b) in (&mut cw).zip(&mut cx) {
        for i in 0..16 {
            acc[i] += a[i].f32() * b[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in cw.remainder().iter().zip(cx.remainder()) {
        s += a.f32() * b;
    }
    s
}

/// `yt[o][i] = Σ_k x[i][k] · w[o][k]` for the weight rows of `w`: AVX-512 register tiles where the CPU has
/// them, else plain loops.
fn rows_times_weights<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], yt: &mut [f32]) {
    let n = w.len() / k.max(1);
    debug_assert!(x.len() >= m * k && yt.len() >= n * m);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let mut o = 0;
        while o < n {
            let ob = (n - o).min(4);
            let mut i = 0;
            while i < m {
                let ib = (m - i).min(4);
                // SAFETY: avx512f was detected; the tile reads rows i..i+ib of x and o..o+ob of w, in bounds.
                unsafe {
                    match (ob, ib) {
                        (4, 4) => avx512::tile::<W, 4, 4>(x, k, w, i, o, m, yt),
                        (4, 3) => avx512::tile::<W, 4, 3>(x, k, w, i, o, m, yt),
                        (4, 2) => avx512::tile::<W, 4, 2>(x, k, w, i, o, m, yt),
                        (4, 1) => avx512::tile::<W, 4, 1>(x, k, w, i, o, m, yt),
                        _ => {
                            for b in 0..ob {
                                for a in 0..ib {
                                    avx512::tile::<W, 1, 1>(x, k, w, i + a, o + b, m, yt);
                                }
                            }
                        }
                    }
                }
                i += 4;
            }
            o += 4;
        }
        return;
    }
    for o in 0..n {
        let wr = &w[o * k..(o + 1) * k];
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            yt[o * m + i] = dot_w(wr, xr);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `yt[(o+b)·m + i+a] = w[o+b] · x[i+a]` for b < R, a < C.
    ///
    /// # Safety
    /// The CPU must support avx512f; rows `i..i+C` of `x` and `o..o+R` of `w` (each `k` long) and the written
    /// entries of `yt` must be in bounds.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<W: super::WeightElem, const R: usize, const C: usize>(
        x: &[f32],
        k: usize,
        w: &[W],
        i: usize,
        o: usize,
        m: usize,
        yt: &mut [f32],
    ) {
        assert!(
            (i + C) * k <= x.len() && (o + R) * k <= w.len() && (o + R - 1) * m + i + C <= yt.len()
        );
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let kv = k / 16 * 16;
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut kk = 0;
        while kk < kv {
            let mut xv = [_mm512_setzero_ps(); C];
            for (a, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xp.add((i + a) * k + kk));
            }
            for (b, row) in acc.iter_mut().enumerate() {
                let wv = W::load16(wp.add((o + b) * k + kk));
                for (a, acc) in row.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(wv, xv[a], *acc);
                }
            }
            kk += 16;
        }
        for (b, row) in acc.iter().enumerate() {
            for (a, &v) in row.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(v);
                for kr in kv..k {
                    s += (*wp.add((o + b) * k + kr)).f32() * *xp.add((i + a) * k + kr);
                }
                yt[(o + b) * m + i + a] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn bf16_weights_give_exactly_the_f32_result_of_the_rounded_weights() {
        for (m, k, n) in [
            (1, 16, 5),
            (3, 37, 70),
            (5, 576, 9),
            (4, 64, 130),
            (1, 7, 3),
        ] {
            let x = values(m * k, 1);
            let w32 = values(n * k, 2);
            let w16: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let rounded: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let got = matmul_rows_w(&x, m, k, WeightRows::Bf16(&w16));
            let want = matmul_rows(&x, m, k, &rounded);
            assert_eq!(got, want, "m {m} k {k} n {n}");
            // And both are x @ Wᵀ (to f32 rounding).
            for i in 0..m {
                for o in 0..n {
                    let r: f64 = (0..k)
                        .map(|j| x[i * k + j] as f64 * rounded[o * k + j] as f64)
                        .sum();
                    assert!(
                        (got[i * n + o] as f64 - r).abs() < 1e-4,
                        "{} vs {r}",
                        got[i * n + o]
                    );
                }
            }
        }
    }
}
