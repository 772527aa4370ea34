//! Attention as one CPU op with its own backward, computing only the key spans each query may see.
//!
//! The composed path forms `[B, H, T, T]` scores and probabilities and keeps both for backward. On a prefix-shared
//! packed row (the query, then k responses that each see the query and themselves) most of that square is masked:
//! at k = 6 the response-to-other-response blocks are wasted work and memory, quadratic in the row length. Here
//! each query row visits only the key spans its mask allows, keeps its output and the log-sum-exp of its scores, and
//! backward recomputes the probabilities from those (the flash-attention recipe, row by row). Grouped-query heads
//! read their shared key/value head in place, and q, k, v are read through their strides (no contiguous copies).
//! Tests check values and gradients against the composed attention of `layers.rs`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use super::error::{ModelError, Result};
use super::fused::{exp_approx, multiversion};

/// The key spans each query position may attend to, per batch row: `[start, end)` intervals in key order.
#[derive(Debug, Clone)]
pub struct KeySpans {
    tq: usize,
    tk: usize,
    /// `offsets[r]..offsets[r + 1]` index the spans of query row `r = b · tq + q`.
    offsets: Arc<Vec<u32>>,
    spans: Arc<Vec<(u32, u32)>>,
}

impl KeySpans {
    /// From a boolean mask `[B, Tq, Tk]` flattened on the host (1 = may attend).
    pub fn from_mask(mask: &[u8], b: usize, tq: usize, tk: usize) -> Result<Self> {
        if mask.len() != b * tq * tk {
            return Err(ModelError::Input(format!(
                "attention mask of {} entries does not fit [{b}, {tq}, {tk}]",
                mask.len()
            )));
        }
        let mut offsets = Vec::with_capacity(b * tq + 1);
        let mut spans = Vec::new();
        offsets.push(0u32);
        for row in mask.chunks(tk.max(1)).take(b * tq) {
            let mut j = 0;
            while j < row.len() {
                if row[j] == 0 {
                    j += 1;
                    continue;
                }
                let start = j;
                while j < row.len() && row[j] != 0 {
                    j += 1;
                }
                spans.push((start as u32, j as u32));
            }
            offsets.push(spans.len() as u32);
        }
        Ok(Self {
            tq,
            tk,
            offsets: Arc::new(offsets),
            spans: Arc::new(spans),
        })
    }

    fn row(&self, r: usize) -> &[(u32, u32)] {
        &self.spans[self.offsets[r] as usize..self.offsets[r + 1] as usize]
    }

    /// Query-key pairs the mask allows, over all rows (the work per head).
    pub fn pairs(&self) -> usize {
        self.spans.iter().map(|&(a, b)| (b - a) as usize).sum()
    }
}

/// A `[B, H, T, D]` f32 tensor read through its strides (the last one must be 1).
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    off: usize,
    sb: usize,
    sh: usize,
    st: usize,
    d: usize,
}

impl<'a> View<'a> {
    fn new(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Self> {
        let data = match s {
            CpuStorage::F32(d) => d.as_slice(),
            _ => candle_core::bail!("fused attention: {what} must be f32"),
        };
        let (dims, st) = (l.dims(), l.stride());
        if dims.len() != 4 || st[3] != 1 {
            candle_core::bail!("fused attention: {what} {:?} with strides {st:?}", dims);
        }
        Ok(Self {
            data,
            off: l.start_offset(),
            sb: st[0],
            sh: st[1],
            st: st[2],
            d: dims[3],
        })
    }

    #[inline(always)]
    fn row(&self, b: usize, h: usize, t: usize) -> &'a [f32] {
        let o = self.off + b * self.sb + h * self.sh + t * self.st;
        &self.data[o..o + self.d]
    }
}

/// Row kernels (see `fused.rs`'s `multiversion!`): dot products and updates of `head_dim` lanes.
mod kernels {
    use super::{exp_approx, View};

    const L: usize = 16;

    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; L];
        let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for i in 0..L {
                acc[i] += x[i] * y[i];
            }
        }
        let mut s = acc.iter().sum::<f32>();
        for (x, y) in ra.iter().zip(rb) {
            s += x * y;
        }
        s
    }

    #[inline(always)]
    fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        for (yi, &xi) in y.iter_mut().zip(x) {
            *yi += a * xi;
        }
    }

    /// One query row of one head: `out = softmax(scale · q·Kᵀ) V` over `spans`; returns the log-sum-exp of the
    /// scaled scores (+∞ when no key is visible: the row's output is 0 and its probabilities all 0).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn forward_row(
        q: &[f32],
        k: &View<'_>,
        v: &View<'_>,
        b: usize,
        kvh: usize,
        spans: &[(u32, u32)],
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) -> f32 {
        scores.clear();
        let mut m = f32::NEG_INFINITY;
        for &(s, e) in spans {
            for j in s as usize..e as usize {
                let z = scale * dot(q, k.row(b, kvh, j));
                m = m.max(z);
                scores.push(z);
            }
        }
        out.fill(0.0);
        if scores.is_empty() {
            return f32::INFINITY;
        }
        let mut total = 0f32;
        let mut n = 0;
        for &(s, e) in spans {
            for j in s as usize..e as usize {
                let p = exp_approx(scores[n] - m);
                n += 1;
                total += p;
                axpy(p, v.row(b, kvh, j), out);
            }
        }
        let inv = 1.0 / total;
        for o in out.iter_mut() {
            *o *= inv;
        }
        m + total.ln()
    }

    /// Backward of one query row of one head: adds to `dq` (this row), `dk`, `dv` (this head's `[Tk, D]`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn backward_row(
        q: &[f32],
        o: &[f32],
        g: &[f32],
        lse: f32,
        k: &View<'_>,
        v: &View<'_>,
        b: usize,
        kvh: usize,
        spans: &[(u32, u32)],
        scale: f32,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let d = q.len();
        let delta = dot(g, o);
        for &(s, e) in spans {
            for j in s as usize..e as usize {
                let kj = k.row(b, kvh, j);
                let p = exp_approx(scale * dot(q, kj) - lse);
                let dp = dot(g, v.row(b, kvh, j));
                let ds = scale * p * (dp - delta);
                axpy(ds, kj, dq);
                axpy(ds, q, &mut dk[j * d..(j + 1) * d]);
                axpy(p, g, &mut dv[j * d..(j + 1) * d]);
            }
        }
    }
}

multiversion! {
    forward_row(q: &[f32], k: &super::View<'_>, v: &super::View<'_>, b: usize, kvh: usize, spans: &[(u32, u32)], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) -> f32;
    backward_row(q: &[f32], o: &[f32], g: &[f32], lse: f32, k: &super::View<'_>, v: &super::View<'_>, b: usize, kvh: usize, spans: &[(u32, u32)], scale: f32, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) -> ();
}

/// Runs `f(task)` for every task over the available threads, each thread taking the next task as it finishes one.
fn par_tasks<T: Send>(tasks: Vec<T>, f: impl Fn(T) + Sync) {
    let threads = candle_core::utils::get_num_threads().clamp(1, tasks.len().max(1));
    if threads == 1 {
        tasks.into_iter().for_each(f);
        return;
    }
    let queue = Mutex::new(tasks.into_iter());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let next = queue.lock().map(|mut q| q.next()).unwrap_or(None);
                match next {
                    Some(t) => f(t),
                    None => break,
                }
            });
        }
    });
}

/// The op: q `[B, H, Tq, D]`, k, v `[B, Hkv, Tk, D]` → output `[B, Tq, H, D]` (merged-heads order).
struct SpanAttention {
    spans: KeySpans,
    scale: f32,
    /// Log-sum-exp per `(b, q, h)`, written by the forward for the backward.
    lse: Mutex<Vec<f32>>,
}

fn cpu<'a>(s: &'a Storage, what: &str) -> candle_core::Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("fused attention: {what} is not on the CPU"),
    }
}

impl CustomOp3 for SpanAttention {
    fn name(&self) -> &'static str {
        "span-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, tq, d) = l1.shape().dims4()?;
        let (_, hkv, tk, _) = l2.shape().dims4()?;
        if tq != self.spans.tq || tk != self.spans.tk || hkv == 0 || h % hkv != 0 {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?} do not fit the mask",
                l1.dims(),
                l2.dims()
            );
        }
        let (q, k, v) = (
            View::new(s1, l1, "q")?,
            View::new(s2, l2, "k")?,
            View::new(s3, l3, "v")?,
        );
        let rep = h / hkv;
        let rows = b * tq;
        let mut out = vec![0f32; rows * h * d];
        let mut lse = vec![0f32; rows * h];
        // Tasks: runs of query rows (all heads), about 8 per thread so uneven spans even out.
        let per = rows
            .div_ceil(8 * candle_core::utils::get_num_threads().max(1))
            .max(1);
        let tasks: Vec<_> = out
            .chunks_mut(per * h * d)
            .zip(lse.chunks_mut(per * h))
            .enumerate()
            .collect();
        par_tasks(tasks, |(ti, (o, l))| {
            let mut scores = Vec::new();
            for (i, (orow, lrow)) in o.chunks_mut(h * d).zip(l.chunks_mut(h)).enumerate() {
                let r = ti * per + i;
                let (bi, qi) = (r / tq, r % tq);
                let spans = self.spans.row(r);
                for (hi, (oh, lh)) in orow.chunks_mut(d).zip(lrow.iter_mut()).enumerate() {
                    *lh = fast::forward_row(
                        q.row(bi, hi, qi),
                        &k,
                        &v,
                        bi,
                        hi / rep,
                        spans,
                        self.scale,
                        &mut scores,
                        oh,
                    );
                }
            }
        });
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused attention: poisoned state".into()))? = lse;
        Ok((CpuStorage::F32(out), Shape::from((b, tq, h, d))))
    }

    fn bwd(
        &self,
        q_t: &Tensor,
        k_t: &Tensor,
        v_t: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, tq, d) = q_t.dims4()?;
        let (_, hkv, tk, _) = k_t.dims4()?;
        let rep = h / hkv;
        let g_t = grad_res.contiguous()?;
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused attention: poisoned state".into()))?;
        let (sq, lq) = q_t.storage_and_layout();
        let (sk, lk) = k_t.storage_and_layout();
        let (sv, lv) = v_t.storage_and_layout();
        let (so, lo) = res.storage_and_layout();
        let (sg, lg) = g_t.storage_and_layout();
        let q = View::new(cpu(&sq, "q")?, lq, "q")?;
        let k = View::new(cpu(&sk, "k")?, lk, "k")?;
        let v = View::new(cpu(&sv, "v")?, lv, "v")?;
        // The output and its gradient are [B, Tq, H, D]: view them as [B, H, Tq, D].
        let o = View::new(cpu(&so, "output")?, &lo.transpose(1, 2)?, "output")?;
        let g = View::new(cpu(&sg, "output gradient")?, &lg.transpose(1, 2)?, "grad")?;
        let mut dq = vec![0f32; b * h * tq * d];
        // Per query head, then summed over the heads that share a key/value head.
        let mut dk_h = vec![0f32; b * h * tk * d];
        let mut dv_h = vec![0f32; b * h * tk * d];
        let tasks: Vec<_> = dq
            .chunks_mut(tq * d)
            .zip(dk_h.chunks_mut(tk * d))
            .zip(dv_h.chunks_mut(tk * d))
            .enumerate()
            .collect();
        par_tasks(tasks, |(bh, ((dq, dk), dv))| {
            let (bi, hi) = (bh / h, bh % h);
            for qi in 0..tq {
                let r = bi * tq + qi;
                fast::backward_row(
                    q.row(bi, hi, qi),
                    o.row(bi, hi, qi),
                    g.row(bi, hi, qi),
                    lse[r * h + hi],
                    &k,
                    &v,
                    bi,
                    hi / rep,
                    self.spans.row(r),
                    self.scale,
                    &mut dq[qi * d..(qi + 1) * d],
                    dk,
                    dv,
                );
            }
        });
        let fold = |per_head: Vec<f32>| -> Vec<f32> {
            if rep == 1 {
                return per_head;
            }
            let n = tk * d;
            let mut out = vec![0f32; b * hkv * n];
            for (bh, src) in per_head.chunks(n).enumerate() {
                let (bi, hi) = (bh / h, bh % h);
                let dst = &mut out[(bi * hkv + hi / rep) * n..][..n];
                for (x, y) in dst.iter_mut().zip(src) {
                    *x += y;
                }
            }
            out
        };
        let dev = q_t.device();
        let dq = Tensor::from_vec(dq, (b, h, tq, d), dev)?;
        let dk = Tensor::from_vec(fold(dk_h), (b, hkv, tk, d), dev)?;
        let dv = Tensor::from_vec(fold(dv_h), (b, hkv, tk, d), dev)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `softmax(scale · q·kᵀ | spans) v` for f32 CPU tensors: q `[B, H, Tq, D]`, k, v `[B, Hkv, Tk, D]` (any strides
/// with a unit last stride). Returns `[B, H, Tq, D]` as a view of a `[B, Tq, H, D]` buffer, so merging the heads
/// afterwards is free. Rows with no visible key give 0.
pub fn span_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spans: &KeySpans,
    scale: f64,
) -> Result<Tensor> {
    // The kernels read rows of head_dim in place; a layout without unit last stride (GPT-J's rotary) is copied.
    let unit = |t: &Tensor| -> Result<Tensor> {
        Ok(if t.stride().last() == Some(&1) {
            t.clone()
        } else {
            t.contiguous()?
        })
    };
    let (q, k, v) = (unit(q)?, unit(k)?, unit(v)?);
    let op = SpanAttention {
        spans: spans.clone(),
        scale: scale as f32,
        lse: Mutex::new(Vec::new()),
    };
    Ok(q.apply_op3(&k, &v, op)?.transpose(1, 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused_elementwise::tests::{check, rand};
    use crate::model::layers::{attention, AttnMask};
    use candle_core::Device;

    /// A batch of prefix-shared packed rows: a query of `x` tokens, then responses of the given lengths, each
    /// seeing the query and its own earlier tokens; a trailing pad block sees nothing (left as an empty row).
    fn packed_mask(rows: &[(usize, Vec<usize>)], t: usize) -> Vec<u8> {
        let mut m = vec![0u8; rows.len() * t * t];
        for (bi, (x, resps)) in rows.iter().enumerate() {
            let at = |q: usize, k: usize| (bi * t + q) * t + k;
            let mut m_set = |q: usize, k: usize| m[at(q, k)] = 1;
            for q in 0..*x {
                for k in 0..=q {
                    m_set(q, k);
                }
            }
            let mut start = *x;
            for &len in resps {
                for q in start..start + len {
                    for k in 0..*x {
                        m_set(q, k);
                    }
                    for k in start..=q {
                        m_set(q, k);
                    }
                }
                start += len;
            }
        }
        m
    }

    fn compare(b: usize, h: usize, hkv: usize, t: usize, d: usize, rows: &[(usize, Vec<usize>)]) {
        let mask = packed_mask(rows, t);
        let spans = KeySpans::from_mask(&mask, b, t, t).unwrap();
        let mask_t = Tensor::from_vec(mask, (b, t, t), &Device::Cpu).unwrap();
        let amask = AttnMask::composed(&mask_t).unwrap();
        // q, k, v as the model makes them: heads split from [B, T, H·D] by a transposed view.
        let split = |x: &Tensor, heads: usize| {
            x.reshape((b, t, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let real: Vec<bool> = {
            let host = mask_t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            host.chunks(t).map(|r| r.iter().any(|&x| x != 0)).collect()
        };
        // Rows with no visible key differ by design (0 here, a mean of v in the composed path): zero them in both.
        let keep = Tensor::from_vec(
            real.iter()
                .map(|&r| f32::from(u8::from(r)))
                .collect::<Vec<_>>(),
            (b, 1, t, 1),
            &Device::Cpu,
        )
        .unwrap();
        check(
            &[
                rand(&[b, t, h * d], 11),
                rand(&[b, t, hkv * d], 12),
                rand(&[b, t, hkv * d], 13),
            ],
            |x| {
                span_attention(
                    &split(&x[0], h),
                    &split(&x[1], hkv),
                    &split(&x[2], hkv),
                    &spans,
                    0.3,
                )
                .unwrap()
                .broadcast_mul(&keep)
                .unwrap()
            },
            |x| {
                attention(
                    &split(&x[0], h),
                    &split(&x[1], hkv),
                    &split(&x[2], hkv),
                    &amask,
                    0.3,
                )
                .unwrap()
                .broadcast_mul(&keep)
                .unwrap()
            },
            2e-5,
        );
    }

    #[test]
    fn span_attention_equals_dense_masked_attention_on_packed_rows() {
        compare(2, 4, 2, 23, 16, &[(5, vec![4, 6, 3]), (9, vec![7, 2])]);
    }

    #[test]
    fn span_attention_equals_dense_on_plain_causal_rows_and_odd_head_dims() {
        compare(1, 3, 3, 17, 13, &[(17, vec![])]);
        compare(
            3,
            6,
            2,
            11,
            20,
            &[(11, vec![]), (4, vec![7]), (2, vec![1, 1, 1])],
        );
    }

    #[test]
    fn spans_skip_the_response_to_response_blocks() {
        let mask = packed_mask(&[(10, vec![5, 5, 5])], 25);
        let spans = KeySpans::from_mask(&mask, 1, 25, 25).unwrap();
        let dense: usize = mask.iter().map(|&x| x as usize).sum();
        assert_eq!(spans.pairs(), dense);
        // Causal over the whole row would be 25·26/2 = 325 pairs; the star mask leaves 55 + 3·(50 + 15) = 250.
        assert_eq!(dense, 250);
        // Query 12 (response 1, from 10) sees the query and its own keys 10..=12: one contiguous span.
        assert_eq!(spans.row(12), &[(0, 13)]);
        assert_eq!(spans.row(17), &[(0, 10), (15, 18)]);
    }
}
