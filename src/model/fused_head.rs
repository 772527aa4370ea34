//! The output layer and the label log-probability as one CPU op: `log softmax(h_r · Wᵀ)[label_r]` for the
//! labelled rows of the hidden states, a chunk of rows at a time, keeping only one log-sum-exp per row.
//!
//! Composed (a linear op, then the label log-prob op, per chunk), the graph keeps every chunk's `[rows, vocab]`
//! logits until backward, and backward makes a vocabulary-sized weight gradient per chunk before summing them:
//! with 49k tokens and a few thousand labels that is gigabytes. Here backward recomputes each chunk's logits from
//! the saved log-sum-exp (one more output-layer matmul) and accumulates `dW` into one buffer.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::fused::contiguous_f32;

/// Rows of logits formed at once.
const CHUNK_BYTES: usize = 24 << 20;

struct HeadLogProb {
    /// Row of the hidden states (`[M, H]`) of each label.
    rows: Arc<Vec<u32>>,
    labels: Arc<Vec<u32>>,
    /// Log-sum-exp of each label's logits, from the forward.
    lse: Mutex<Vec<f32>>,
}

fn cpu(s: &candle_core::Storage) -> candle_core::Result<&CpuStorage> {
    match s {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("head-logprob: not on the CPU"),
    }
}

/// `dst[r, :] = src[rows[r], :]` for a chunk of labels.
fn gather(src: &[f32], h: usize, rows: &[u32], dst: &mut Vec<f32>) {
    dst.clear();
    for &r in rows {
        dst.extend_from_slice(&src[r as usize * h..(r as usize + 1) * h]);
    }
}

fn threads() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(candle_core::utils::get_num_threads())
}

/// `logits[c, V] = x[c, H] · w[V, H]ᵀ`.
fn logits(x: &[f32], w: &[f32], c: usize, v: usize, h: usize, out: &mut [f32]) {
    // SAFETY: x is c·h, w is v·h, out is c·v elements; out[i, j] at i·v + j, x[i, l] at i·h + l, and
    // (wᵀ)[l, j] = w[j, l] at j·h + l.
    unsafe {
        gemm::gemm(
            c,
            v,
            h,
            out.as_mut_ptr(),
            1,
            v as isize,
            false,
            x.as_ptr(),
            1,
            h as isize,
            w.as_ptr(),
            h as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            threads(),
        );
    }
}

impl HeadLogProb {
    fn chunk_rows(&self, v: usize) -> usize {
        (CHUNK_BYTES / (4 * v.max(1))).max(16)
    }
}

impl CustomOp2 for HeadLogProb {
    fn name(&self) -> &'static str {
        "head-logprob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, h) = l1.shape().dims2()?;
        let (v, h2) = l2.shape().dims2()?;
        if h != h2 || self.rows.iter().any(|&r| r as usize >= m) {
            candle_core::bail!(
                "head-logprob: hidden {:?}, weight {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let x = contiguous_f32(s1, l1, "head-logprob hidden")?;
        let w = contiguous_f32(s2, l2, "head-logprob weight")?;
        let n = self.labels.len();
        let mut out = vec![0f32; n];
        let mut lse = vec![0f32; n];
        let cr = self.chunk_rows(v);
        let (mut xc, mut buf) = (Vec::new(), vec![0f32; cr.min(n) * v]);
        for start in (0..n).step_by(cr) {
            let end = (start + cr).min(n);
            let c = end - start;
            gather(x, h, &self.rows[start..end], &mut xc);
            logits(&xc, w, c, v, h, &mut buf[..c * v]);
            let (o, l) = (&mut out[start..end], &mut lse[start..end]);
            super::fused::par_rows_pair(&buf[..c * v], v, o, l, |r, row, o, l| {
                let z = super::fused::log_sum_exp(row);
                *l = z;
                *o = row[self.labels[start + r] as usize] - z;
            });
        }
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("head-logprob: poisoned state".into()))? = lse;
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, h) = hidden.dims2()?;
        let (v, _) = weight.dims2()?;
        let (hc, wc, gc) = (
            hidden.contiguous()?,
            weight.contiguous()?,
            grad.contiguous()?,
        );
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("head-logprob: poisoned state".into()))?;
        let (sx, lx) = hc.storage_and_layout();
        let (sw, lw) = wc.storage_and_layout();
        let (sg, lg) = gc.storage_and_layout();
        let x = contiguous_f32(cpu(&sx)?, lx, "head-logprob hidden")?;
        let w = contiguous_f32(cpu(&sw)?, lw, "head-logprob weight")?;
        let g = contiguous_f32(cpu(&sg)?, lg, "head-logprob grad")?;
        let n = self.labels.len();
        let mut dx = vec![0f32; m * h];
        let mut dw = vec![0f32; v * h];
        let cr = self.chunk_rows(v);
        let (mut xc, mut buf) = (Vec::new(), vec![0f32; cr.min(n) * v]);
        let mut dxc = vec![0f32; cr.min(n) * h];
        for start in (0..n).step_by(cr) {
            let end = (start + cr).min(n);
            let c = end - start;
            gather(x, h, &self.rows[start..end], &mut xc);
            let d = &mut buf[..c * v];
            logits(&xc, w, c, v, h, d);
            // d logits = g · (onehot(label) − softmax), in place.
            super::fused::par_rows_mut(d, v, |r, row| {
                super::fused::softmax_label_grad(row, lse[start + r], g[start + r]);
                row[self.labels[start + r] as usize] += g[start + r];
            });
            // SAFETY (both calls): buffers hold the element counts the strides address. dxc[c, h] = d[c, v] ·
            // w[v, h]; dw[v, h] += dᵀ[v, c] · xc[c, h], with dᵀ[j, r] = d[r, j] at r·v + j.
            unsafe {
                gemm::gemm(
                    c,
                    h,
                    v,
                    dxc.as_mut_ptr(),
                    1,
                    h as isize,
                    false,
                    d.as_ptr(),
                    1,
                    v as isize,
                    w.as_ptr(),
                    1,
                    h as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    threads(),
                );
                gemm::gemm(
                    v,
                    h,
                    c,
                    dw.as_mut_ptr(),
                    1,
                    h as isize,
                    true,
                    d.as_ptr(),
                    v as isize,
                    1,
                    xc.as_ptr(),
                    1,
                    h as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    threads(),
                );
            }
            for (i, &r) in self.rows[start..end].iter().enumerate() {
                let dst = &mut dx[r as usize * h..(r as usize + 1) * h];
                for (a, b) in dst.iter_mut().zip(&dxc[i * h..(i + 1) * h]) {
                    *a += b;
                }
            }
        }
        let dev = hidden.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, h), dev)?),
            Some(Tensor::from_vec(dw, (v, h), dev)?),
        ))
    }
}

/// `log softmax(hidden[rows[i]] · weightᵀ)[labels[i]]` for f32 CPU tensors: hidden `[M, H]`, weight `[V, H]`.
pub fn head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    rows: &[u32],
    labels: &[u32],
) -> candle_core::Result<Tensor> {
    hidden.contiguous()?.apply_op2(
        &weight.contiguous()?,
        HeadLogProb {
            rows: Arc::new(rows.to_vec()),
            labels: Arc::new(labels.to_vec()),
            lse: Mutex::new(Vec::new()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused_elementwise::tests::{check, rand};

    /// The reference: gather the rows, a plain matmul, log-softmax, the label's entry.
    fn composed(hidden: &Tensor, weight: &Tensor, idx: &Tensor, lab: &Tensor) -> Tensor {
        let logits = hidden
            .index_select(idx, 0)
            .unwrap()
            .matmul(&weight.t().unwrap())
            .unwrap();
        crate::model::layers::log_softmax(&logits)
            .unwrap()
            .gather(lab, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
    }

    #[test]
    fn fused_head_equals_linear_then_log_softmax_with_gradients() {
        let (m, h, v) = (23, 12, 37);
        // Repeated and unordered rows, more labels than one chunk would hold at this vocabulary is not
        // needed for equality; the chunk loop is exercised by the real model's tests.
        let rows: Vec<u32> = vec![3, 0, 7, 7, 22, 15, 1, 9, 4, 18, 11];
        let labels: Vec<u32> = rows.iter().map(|&r| (r * 5 + 2) % v as u32).collect();
        let idx = Tensor::new(rows.as_slice(), &candle_core::Device::Cpu).unwrap();
        let lab = Tensor::new(labels.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        check(
            &[rand(&[m, h], 5), (rand(&[v, h], 6) * 0.5).unwrap()],
            |t| head_logprobs(&t[0], &t[1], &rows, &labels).unwrap(),
            |t| composed(&t[0], &t[1], &idx, &lab),
            1e-5,
        );
    }

    #[test]
    fn fused_head_spans_several_chunks() {
        // A vocabulary large enough that the labels need three chunks of rows.
        let (m, h, v) = (40, 8, 200_000);
        let rows: Vec<u32> = (0..m as u32).chain(0..m as u32).collect();
        let labels: Vec<u32> = rows.iter().map(|&r| r * 4_999 % v as u32).collect();
        let idx = Tensor::new(rows.as_slice(), &candle_core::Device::Cpu).unwrap();
        let lab = Tensor::new(labels.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        check(
            &[rand(&[m, h], 7), (rand(&[v, h], 8) * 0.1).unwrap()],
            |t| head_logprobs(&t[0], &t[1], &rows, &labels).unwrap(),
            |t| composed(&t[0], &t[1], &idx, &lab),
            1e-4,
        );
    }
}
