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

/// `x @ Wᵀ` for host rows `x` (`[m, k]`) and weights `w` (`[n, k]`, `nn.Linear` layout): `[m, n]`. Each weight
/// row is read once (AVX-512 4×4 register tiles where available), spread over the thread pool.
pub fn matmul_rows(x: &[f32], m: usize, k: usize, w: &[f32]) -> Vec<f32> {
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
        rows_times_weights(x, m, k, &w[c * per * k..(c * per + rows) * k], &mut yc);
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

/// `yt[o][i] = Σ_k x[i][k] · w[o][k]` for the weight rows of `w`: AVX-512 register tiles where the CPU has
/// them, else plain loops.
fn rows_times_weights(x: &[f32], m: usize, k: usize, w: &[f32], yt: &mut [f32]) {
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
                        (4, 4) => avx512::tile::<4, 4>(x, k, w, i, o, m, yt),
                        (4, 3) => avx512::tile::<4, 3>(x, k, w, i, o, m, yt),
                        (4, 2) => avx512::tile::<4, 2>(x, k, w, i, o, m, yt),
                        (4, 1) => avx512::tile::<4, 1>(x, k, w, i, o, m, yt),
                        _ => {
                            for b in 0..ob {
                                for a in 0..ib {
                                    avx512::tile::<1, 1>(x, k, w, i + a, o + b, m, yt);
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
            yt[o * m + i] = dot(wr, xr);
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
    pub unsafe fn tile<const R: usize, const C: usize>(
        x: &[f32],
        k: usize,
        w: &[f32],
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
                let wv = _mm512_loadu_ps(wp.add((o + b) * k + kk));
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
                    s += *wp.add((o + b) * k + kr) * *xp.add((i + a) * k + kr);
                }
                yt[(o + b) * m + i + a] = s;
            }
        }
    }
}
