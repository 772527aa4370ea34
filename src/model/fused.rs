//! Fused CPU kernels with their own backward, for the two row-wise softmaxes that dominate after the matmuls:
//! the log-probability of the label token under the output layer, and the masked attention softmax.
//!
//! Composed from candle ops each takes five or more passes over a `[rows, vocab]` or `[B, H, T, T]` buffer, forward
//! and again backward; fused, each is one or two passes. Other devices and dtypes use the composed ops in
//! `layers.rs`; tests check that both give the same values and gradients.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use super::error::Result;

/// Splits `n_rows` rows of `out` (each `out_row` long) over the available threads and calls `f(row, out_row)`.
fn par_rows<F>(out: &mut [f32], out_row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let n_rows = if out_row == 0 { 0 } else { out.len() / out_row };
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

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
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
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|&z| (z - m).exp()).sum();
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
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (oi, &z) in o.iter_mut().zip(row) {
                let e = (z - m).exp();
                *oi = e;
                sum += e;
            }
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
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        let logits = logits.contiguous()?;
        return Ok(logits.apply_op1(LabelLogProb {
            labels: Arc::new(labels.to_vec()),
        })?);
    }
    let ids = Tensor::new(labels, logits.device())?.unsqueeze(1)?;
    Ok(super::layers::log_softmax(logits)?
        .gather(&ids, 1)?
        .squeeze(1)?)
}

/// `softmax(scale · scores + mask)` over the last dim, masked entries exactly 0; scores `[B, H, T, T]` f32,
/// mask `[B, T, T]` (1 = attend) shared by the heads.
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
        let (b, h, t, t2) = l.shape().dims4()?;
        if t != t2 || h != self.heads || self.mask.len() != b * t * t {
            candle_core::bail!("masked-softmax: scores {:?} do not fit the mask", l.shape());
        }
        let x = contiguous_f32(s, l, "masked-softmax")?;
        let mut out = vec![0f32; b * h * t * t];
        par_rows(&mut out, t, |r, o| {
            let (bi, q) = (r / (h * t), r % t);
            let m = &self.mask[(bi * t + q) * t..(bi * t + q + 1) * t];
            let row = &x[r * t..(r + 1) * t];
            let mut mx = f32::NEG_INFINITY;
            for (k, &z) in row.iter().enumerate() {
                if m[k] != 0 {
                    mx = mx.max(z * self.scale);
                }
            }
            let mut sum = 0f32;
            for k in 0..t {
                o[k] = if m[k] != 0 {
                    let e = (row[k] * self.scale - mx).exp();
                    sum += e;
                    e
                } else {
                    0.0
                };
            }
            let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            for ok in o.iter_mut() {
                *ok *= inv;
            }
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
            let (pr, gr) = (&p[r * t..(r + 1) * t], &g[r * t..(r + 1) * t]);
            let dot: f32 = pr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for k in 0..t {
                o[k] = self.scale * pr[k] * (gr[k] - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// A boolean attention mask prepared once per forward for the fused softmax (CPU only).
#[derive(Debug, Clone)]
pub struct HostMask(Arc<Vec<u8>>);

impl HostMask {
    /// Copies a `[B, T, T]` u8 mask to the host when the fused path applies to `device`.
    pub fn new(mask: &Tensor) -> Result<Option<Self>> {
        if !mask.device().is_cpu() {
            return Ok(None);
        }
        Ok(Some(Self(Arc::new(mask.flatten_all()?.to_vec1::<u8>()?))))
    }
}

/// Fused masked softmax of f32 CPU scores `[B, H, T, T]`.
pub fn masked_softmax(scores: &Tensor, mask: &HostMask, scale: f64) -> Result<Tensor> {
    let heads = scores.dim(1)?;
    Ok(scores.contiguous()?.apply_op1(MaskedSoftmax {
        mask: mask.0.clone(),
        heads,
        scale: scale as f32,
    })?)
}
