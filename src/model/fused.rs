//! Fused CPU kernels with their own backward, for the two row-wise softmaxes that dominate after the matmuls:
//! the log-probability of the label token under the output layer, and the masked attention softmax.
//!
//! Composed from candle ops each takes five or more passes over a `[rows, vocab]` or `[B, H, T, T]` buffer, forward
//! and again backward; fused, each is one or two passes. Other devices and dtypes use the composed ops in
//! `layers.rs`; tests check that both give the same values and gradients.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::error::Result;

/// `(rows, last)`: the last dimension of `l`'s shape and how many rows of it the tensor holds (0 rows when empty).
pub(super) fn rows_by_last(l: &Layout) -> (usize, usize) {
    let last = l.shape().dims().last().copied().unwrap_or(0);
    (l.shape().elem_count().checked_div(last).unwrap_or(0), last)
}

/// `dims` with its last dimension replaced by `n` (a linear map's output shape).
pub(super) fn with_last_dim(dims: &[usize], n: usize) -> Shape {
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    Shape::from(shape)
}

/// Splits `n_rows` rows of `out` (each `out_row` long) over the available threads and calls `f(row, out_row)`.
pub(crate) fn par_rows<F>(out: &mut [f32], out_row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let n_rows = out.len().checked_div(out_row).unwrap_or(0);
    let threads = candle_core::utils::get_num_threads().clamp(1, n_rows.max(1));
    if threads == 1 || n_rows < 2 {
        for (r, o) in out.chunks_mut(out_row.max(1)).enumerate() {
            f(r, o);
        }
        return;
    }
    let rows_per = n_rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (ci, chunk) in out.chunks_mut(rows_per * out_row).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, o) in chunk.chunks_mut(out_row).enumerate() {
                    f(ci * rows_per + i, o);
                }
            });
        }
    });
}

/// Rows `r` of `src` (each `row` long) with one output slot in each of `a` and `b`, over the available threads:
/// `f(r, src_row, &mut a[r], &mut b[r])`.
pub(crate) fn par_rows_pair<F>(src: &[f32], row: usize, a: &mut [f32], b: &mut [f32], f: F)
where
    F: Fn(usize, &[f32], &mut f32, &mut f32) + Sync,
{
    let n = a.len().min(b.len());
    let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
    let per = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (ci, (ca, cb)) in a.chunks_mut(per).zip(b.chunks_mut(per)).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, (x, y)) in ca.iter_mut().zip(cb.iter_mut()).enumerate() {
                    let r = ci * per + i;
                    f(r, &src[r * row..(r + 1) * row], x, y);
                }
            });
        }
    });
}

/// Rows of `buf` (each `row` long) over the available threads: `f(r, &mut row_r)`.
pub(crate) fn par_rows_mut<F>(buf: &mut [f32], row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    par_rows(buf, row, f)
}

/// `ln Σ e^row` (max-shifted).
pub(crate) fn log_sum_exp(row: &[f32]) -> f32 {
    let m = fast::max(row);
    m + fast::sum_exp_shift(row, m).ln()
}

/// `row[k] ← −g · e^(row[k] − lse)`: the softmax part of the gradient of `g · log softmax(row)[label]`.
pub(crate) fn softmax_label_grad(row: &mut [f32], lse: f32, g: f32) {
    fast::scaled_exp_in_place(row, lse, -g)
}

/// `e^x` to about 2 ulp for x in [−87, 88] (0 below), branch-free so loops over it vectorise: x = n·ln2 + r,
/// `e^r` by a degree-6 polynomial on |r| ≤ ln2/2, `2^n` through the exponent bits.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5·2²³ trick: plain adds, so it vectorises even without SSE4.1's round
    // instruction (a `floor` there is a libm call per element).
    const ROUND: f32 = 12_582_912.0;
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_452 + r * 0.001_388_89)))));
    // SAFETY: x is clamped, so n is a finite integer in [−126, 127].
    let n_int: i32 = unsafe { n.to_int_unchecked() };
    let bits = ((n_int + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// Row kernels, compiled once generically and once per SIMD level (see `multiversion!`). Reductions run over
/// 16 independent lanes: the compiler may not reorder a float sum, and one running total would not vectorise.
mod kernels {
    use super::exp_approx;

    const L: usize = 16;

    #[inline(always)]
    fn reduce(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
        let mut acc = [init; L];
        let mut chunks = xs.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                acc[i] = f(acc[i], c[i]);
            }
        }
        let mut r = acc.iter().copied().fold(init, &f);
        for &x in chunks.remainder() {
            r = f(r, x);
        }
        r
    }

    #[inline(always)]
    fn sum(xs: &[f32]) -> f32 {
        reduce(xs, 0.0, |a, b| a + b)
    }

    /// Max over `row`.
    #[inline(always)]
    pub fn max(row: &[f32]) -> f32 {
        reduce(row, f32::NEG_INFINITY, f32::max)
    }

    /// `out[k] = e^(row[k] − m)`, returns Σ out.
    #[inline(always)]
    pub fn exp_shift(row: &[f32], m: f32, out: &mut [f32]) -> f32 {
        for (o, &z) in out.iter_mut().zip(row) {
            *o = exp_approx(z - m);
        }
        sum(out)
    }

    /// Σ e^(row[k] − m) without storing.
    #[inline(always)]
    pub fn sum_exp_shift(row: &[f32], m: f32) -> f32 {
        let mut acc = [0f32; L];
        let mut chunks = row.chunks_exact(L);
        for c in &mut chunks {
            for i in 0..L {
                acc[i] += exp_approx(c[i] - m);
            }
        }
        let mut total = sum(&acc);
        for &z in chunks.remainder() {
            total += exp_approx(z - m);
        }
        total
    }

    /// `row[k] ← s · e^(row[k] − m)`.
    #[inline(always)]
    pub fn scaled_exp_in_place(row: &mut [f32], m: f32, s: f32) {
        for x in row.iter_mut() {
            *x = s * exp_approx(*x - m);
        }
    }

    /// Masked softmax of one row: `out[k] = mask[k] · e^(s·row[k] − max)` normalised.
    #[inline(always)]
    pub fn masked_softmax_row(row: &[f32], mask: &[u8], scale: f32, out: &mut [f32]) {
        for ((o, &z), &m) in out.iter_mut().zip(row).zip(mask) {
            *o = if m != 0 { z * scale } else { f32::NEG_INFINITY };
        }
        let mx = max(out);
        for ((o, &z), &m) in out.iter_mut().zip(row).zip(mask) {
            *o = exp_approx(z * scale - mx) * f32::from(m);
        }
        let total = sum(out);
        let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
        for o in out.iter_mut() {
            *o *= inv;
        }
    }

    /// `out[k] = s · p[k] · (g[k] − Σ g·p)`.
    #[inline(always)]
    pub fn softmax_grad_row(p: &[f32], g: &[f32], scale: f32, out: &mut [f32]) {
        for ((o, &pk), &gk) in out.iter_mut().zip(p).zip(g) {
            *o = pk * gk;
        }
        let dot = sum(out);
        for ((o, &pk), &gk) in out.iter_mut().zip(p).zip(g) {
            *o = scale * pk * (gk - dot);
        }
    }
}

/// Defines `fast::$name(args)`: `kernels::$name` compiled for AVX-512 or AVX2+FMA, chosen at run time.
macro_rules! multiversion {
    ($($name:ident($($a:ident: $t:ty),*) -> $ret:ty;)*) => {
        // The generated wrappers take the kernels' argument lists as they are (the attention rows take up to 13).
        #[allow(clippy::too_many_arguments)]
        mod fast {
            use super::kernels;
            $(
                pub fn $name($($a: $t),*) -> $ret {
                    #[cfg(target_arch = "x86_64")]
                    {
                        #[target_feature(enable = "avx512f")]
                        unsafe fn v4($($a: $t),*) -> $ret { kernels::$name($($a),*) }
                        #[target_feature(enable = "avx2,fma")]
                        unsafe fn v3($($a: $t),*) -> $ret { kernels::$name($($a),*) }
                        if std::arch::is_x86_feature_detected!("avx512f") {
                            // SAFETY: the feature was detected at run time.
                            return unsafe { v4($($a),*) };
                        }
                        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                            // SAFETY: the features were detected at run time.
                            return unsafe { v3($($a),*) };
                        }
                    }
                    kernels::$name($($a),*)
                }
            )*
        }
    };
}

multiversion! {
    max(row: &[f32]) -> f32;
    exp_shift(row: &[f32], m: f32, out: &mut [f32]) -> f32;
    sum_exp_shift(row: &[f32], m: f32) -> f32;
    scaled_exp_in_place(row: &mut [f32], m: f32, s: f32) -> ();
    masked_softmax_row(row: &[f32], mask: &[u8], scale: f32, out: &mut [f32]) -> ();
    softmax_grad_row(p: &[f32], g: &[f32], scale: f32, out: &mut [f32]) -> ();
}

pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("{what}: expected f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// `log softmax(logits)[label]` per row; logits `[N, V]`.
struct LabelLogProb {
    labels: Arc<Vec<u32>>,
}

impl CustomOp1 for LabelLogProb {
    fn name(&self) -> &'static str {
        "label-logprob"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let x = contiguous_f32(s, l, "label-logprob")?;
        let mut out = vec![0f32; n];
        par_rows(&mut out, 1, |r, o| {
            let row = &x[r * v..(r + 1) * v];
            let m = fast::max(row);
            let sum = fast::sum_exp_shift(row, m);
            o[0] = row[self.labels[r] as usize] - m - sum.ln();
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        let grad = arg.apply_op2_no_bwd(
            &g,
            &LabelLogProbGrad {
                labels: self.labels.clone(),
            },
        )?;
        Ok(Some(grad))
    }
}

/// d/dlogits of `g · log softmax(logits)[label]` = `g · (onehot(label) − softmax(logits))`.
struct LabelLogProbGrad {
    labels: Arc<Vec<u32>>,
}

impl CustomOp2 for LabelLogProbGrad {
    fn name(&self) -> &'static str {
        "label-logprob-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let x = contiguous_f32(s1, l1, "label-logprob-grad logits")?;
        let g = contiguous_f32(s2, l2, "label-logprob-grad grad")?;
        let mut out = vec![0f32; n * v];
        par_rows(&mut out, v, |r, o| {
            let row = &x[r * v..(r + 1) * v];
            let m = fast::max(row);
            let sum = fast::exp_shift(row, m, o);
            let scale = -g[r] / sum;
            for oi in o.iter_mut() {
                *oi *= scale;
            }
            o[self.labels[r] as usize] += g[r];
        });
        Ok((CpuStorage::F32(out), Shape::from((n, v))))
    }
}

/// Log-probabilities `[N]` of `labels` under `logits` `[N, V]`: fused on CPU f32, composed elsewhere.
pub fn label_logprobs(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    if super::ops::fused_ok(&[logits]) {
        let logits = logits.contiguous()?;
        return Ok(logits.apply_op1(LabelLogProb {
            labels: Arc::new(labels.to_vec()),
        })?);
    }
    let ids = Tensor::new(labels, logits.device())?.unsqueeze(1)?;
    Ok(super::ops::log_softmax(logits)?
        .gather(&ids, 1)?
        .squeeze(1)?)
}

/// `softmax(scale · scores + mask)` over the last dim, masked entries exactly 0; scores `[B, H, Tq, Tk]` f32,
/// mask `[B, Tq, Tk]` (1 = attend) shared by the heads (Tq < Tk when decoding with a KV cache).
struct MaskedSoftmax {
    mask: Arc<Vec<u8>>,
    heads: usize,
    scale: f32,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, tq, tk) = l.shape().dims4()?;
        if h != self.heads || self.mask.len() != b * tq * tk {
            candle_core::bail!("masked-softmax: scores {:?} do not fit the mask", l.shape());
        }
        let x = contiguous_f32(s, l, "masked-softmax")?;
        let mut out = vec![0f32; b * h * tq * tk];
        par_rows(&mut out, tk, |r, o| {
            let (bi, q) = (r / (h * tq), r % tq);
            let m = &self.mask[(bi * tq + q) * tk..(bi * tq + q + 1) * tk];
            fast::masked_softmax_row(&x[r * tk..(r + 1) * tk], m, self.scale, o);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(
            &g,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// d/dscores of softmax(scale · scores): `scale · p ⊙ (g − Σ_k g_k p_k)` per row.
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        let t = dims[dims.len() - 1];
        let p = contiguous_f32(s1, l1, "softmax-grad probs")?;
        let g = contiguous_f32(s2, l2, "softmax-grad grad")?;
        let mut out = vec![0f32; p.len()];
        par_rows(&mut out, t, |r, o| {
            fast::softmax_grad_row(
                &p[r * t..(r + 1) * t],
                &g[r * t..(r + 1) * t],
                self.scale,
                o,
            );
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// A boolean attention mask prepared once per forward for the fused softmax (CPU only).
#[derive(Debug, Clone)]
pub struct HostMask(Arc<Vec<u8>>);

impl HostMask {
    /// Copies a `[B, Tq, Tk]` u8 mask to the host when the fused path applies to `device`.
    pub fn new(mask: &Tensor) -> Result<Option<Self>> {
        if !mask.device().is_cpu() {
            return Ok(None);
        }
        Ok(Some(Self(Arc::new(mask.flatten_all()?.to_vec1::<u8>()?))))
    }

    /// The mask's entries, `[B, Tq, Tk]` flattened.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Fused masked softmax of f32 CPU scores `[B, H, Tq, Tk]`.
pub fn masked_softmax(scores: &Tensor, mask: &HostMask, scale: f64) -> Result<Tensor> {
    let heads = scores.dim(1)?;
    Ok(scores.contiguous()?.apply_op1(MaskedSoftmax {
        mask: mask.0.clone(),
        heads,
        scale: scale as f32,
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused_elementwise::tests::{check, rand};
    use candle_core::{DType, Device};

    #[test]
    fn exp_approx_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp_approx(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
            x += 0.013;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(exp_approx(-200.0), exp_approx(-87.0));
    }

    #[test]
    fn fused_label_logprobs_match_composed_with_gradients() {
        let labels: Vec<u32> = (0..37).map(|i| (i * 7 % 301) as u32).collect();
        let ids = Tensor::new(labels.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        check(
            &[(rand(&[37, 301], 1) * 3.0).unwrap()],
            |t| label_logprobs(&t[0], &labels).unwrap(),
            |t| {
                crate::model::layers::log_softmax(&t[0])
                    .unwrap()
                    .gather(&ids, 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap()
            },
            1e-5,
        );
    }

    #[test]
    fn fused_masked_softmax_matches_composed_with_gradients() {
        let (b, h, t) = (2, 3, 9);
        let mut mask = vec![0u8; b * t * t];
        for bi in 0..b {
            for q in 0..t {
                for k in 0..=q {
                    // A block pattern like a packed row: keys 5..7 invisible to queries 7.. in batch 1.
                    mask[(bi * t + q) * t + k] =
                        u8::from(!(bi == 1 && q >= 7 && (5..7).contains(&k)));
                }
            }
        }
        let mask_t = Tensor::from_vec(mask, (b, t, t), &Device::Cpu).unwrap();
        let host = HostMask::new(&mask_t).unwrap().unwrap();
        let bias = mask_t
            .where_cond(
                &Tensor::zeros((b, t, t), DType::F32, &Device::Cpu).unwrap(),
                &Tensor::full(crate::model::layers::MASK_NEG, (b, t, t), &Device::Cpu).unwrap(),
            )
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        check(
            &[(rand(&[b, h, t, t], 3) * 3.0).unwrap()],
            |x| masked_softmax(&x[0], &host, 0.3).unwrap(),
            |x| {
                candle_nn::ops::softmax(&(&x[0] * 0.3).unwrap().broadcast_add(&bias).unwrap(), 3)
                    .unwrap()
            },
            1e-5,
        );
    }
}
