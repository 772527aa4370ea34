//! Attention as one CPU op with its own backward, computing only the key spans each query may see.
//!
//! The composed path forms `[B, H, T, T]` scores and probabilities and keeps both for backward. On a prefix-shared
//! packed row (the query, then k responses that each see the query and themselves) most of that square is masked:
//! at k = 6 the response-to-other-response blocks are wasted work and memory, quadratic in the row length. Here
//! each tile of query rows multiplies only against the key spans its rows may see (a few gemm calls per tile),
//! keeps its output and the log-sum-exp of its scores, and backward recomputes the probabilities from those (the
//! flash-attention recipe, on the CPU). Grouped-query heads
//! read their shared key/value head in place, and q, k, v are read through their strides (no contiguous copies).
//! Tests check values and gradients against the composed attention of `layers.rs`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use super::error::{ModelError, Result};
use super::fused::exp_approx;

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

/// Query rows per tile: the tile's scores against the keys it may see are a few gemm calls.
const TILE: usize = 32;

/// `dst[m, n] (+)= alpha·dst + beta · lhs[m, k] · rhs[k, n]` through strides (row, column) of each operand, on
/// the calling thread (the callers already run one task per thread).
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        if accumulate { 1.0 } else { 0.0 },
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// The key spans a tile of query rows needs (the union of the rows' spans) and, per row, which columns of the
/// tile's score matrix are visible.
struct Tile {
    /// `(key start, length, column offset)` of each union interval.
    keys: Vec<(usize, usize, usize)>,
    /// Columns of the score matrix (the union's total length).
    cols: usize,
}

impl Tile {
    fn new(spans: &KeySpans, rows: std::ops::Range<usize>) -> Self {
        let mut all: Vec<(u32, u32)> = rows.flat_map(|r| spans.row(r).iter().copied()).collect();
        all.sort_unstable();
        let mut keys = Vec::new();
        let mut cols = 0;
        let mut cur: Option<(u32, u32)> = None;
        for (a, b) in all {
            match cur {
                Some((ca, cb)) if a <= cb => cur = Some((ca, cb.max(b))),
                _ => {
                    if let Some((ca, cb)) = cur {
                        keys.push((ca as usize, (cb - ca) as usize, cols));
                        cols += (cb - ca) as usize;
                    }
                    cur = Some((a, b));
                }
            }
        }
        if let Some((ca, cb)) = cur {
            keys.push((ca as usize, (cb - ca) as usize, cols));
            cols += (cb - ca) as usize;
        }
        Self { keys, cols }
    }

    /// Sets the columns of `row` (one score row of this tile) that `spans` (the row's own) do not allow to −∞.
    fn mask_row(&self, spans: &[(u32, u32)], row: &mut [f32]) {
        for &(start, len, off) in &self.keys {
            let mut j = start;
            let end = start + len;
            for &(a, b) in spans {
                let (a, b) = (a as usize, b as usize);
                if b <= j || a >= end {
                    continue;
                }
                for x in &mut row[off + (j - start)..off + (a.max(j) - start)] {
                    *x = f32::NEG_INFINITY;
                }
                j = b.min(end);
            }
            for x in &mut row[off + (j - start)..off + len] {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Raw parts of a strided `[B, H, T, D]` view for gemm: the pointer to row `(b, h, t)` and the row stride.
impl View<'_> {
    fn ptr(&self, b: usize, h: usize, t: usize) -> *const f32 {
        self.row(b, h, t).as_ptr()
    }
}

/// Forward of one tile (rows `q0..q1` of head `hi` in batch row `bi`): writes `o` (`[rows, D]`) and `lse`.
#[allow(clippy::too_many_arguments)]
fn forward_tile(
    q: &View<'_>,
    k: &View<'_>,
    v: &View<'_>,
    spans: &KeySpans,
    scale: f32,
    (bi, hi, kvh): (usize, usize, usize),
    (q0, q1): (usize, usize),
    scores: &mut Vec<f32>,
    o: &mut [f32],
    lse: &mut [f32],
) {
    let (r0, rows, d) = (bi * spans.tq + q0, q1 - q0, q.d);
    let tile = Tile::new(spans, r0..r0 + rows);
    let cols = tile.cols;
    scores.clear();
    scores.resize(rows * cols, 0.0);
    // SAFETY: every operand is addressed inside its buffer: q rows q0..q1 of (bi, hi), k/v rows of (bi, kvh) in
    // the tile's intervals, scores rows × cols, o rows × d.
    unsafe {
        for &(start, len, off) in &tile.keys {
            mm(
                rows,
                len,
                d,
                scores.as_mut_ptr().add(off),
                cols,
                false,
                q.ptr(bi, hi, q0),
                q.st,
                1,
                k.ptr(bi, kvh, start),
                1,
                k.st,
                scale,
            );
        }
    }
    for (i, row) in scores.chunks_mut(cols.max(1)).take(rows).enumerate() {
        tile.mask_row(spans.row(r0 + i), row);
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            lse[i] = f32::INFINITY;
            continue;
        }
        let mut total = 0f32;
        for x in row.iter_mut() {
            *x = exp_approx(*x - m);
            total += *x;
        }
        let inv = 1.0 / total;
        for x in row.iter_mut() {
            *x *= inv;
        }
        lse[i] = m + total.ln();
    }
    o.fill(0.0);
    // SAFETY: as above; o is rows × d.
    unsafe {
        for &(start, len, off) in &tile.keys {
            mm(
                rows,
                d,
                len,
                o.as_mut_ptr(),
                d,
                true,
                scores.as_ptr().add(off),
                cols,
                1,
                v.ptr(bi, kvh, start),
                v.st,
                1,
                1.0,
            );
        }
    }
}

/// Backward of one tile: adds to `dq` (`[rows, D]`), `dk`, `dv` (this head's `[Tk, D]`).
#[allow(clippy::too_many_arguments)]
fn backward_tile(
    (q, k, v, o, g): (&View<'_>, &View<'_>, &View<'_>, &View<'_>, &View<'_>),
    spans: &KeySpans,
    lse: &[f32],
    scale: f32,
    (bi, hi, kvh, h): (usize, usize, usize, usize),
    (q0, q1): (usize, usize),
    (p, dp): (&mut Vec<f32>, &mut Vec<f32>),
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (r0, rows, d) = (bi * spans.tq + q0, q1 - q0, q.d);
    let tile = Tile::new(spans, r0..r0 + rows);
    let cols = tile.cols;
    p.clear();
    p.resize(rows * cols, 0.0);
    dp.clear();
    dp.resize(rows * cols, 0.0);
    // SAFETY: operands addressed inside their buffers, as in forward_tile; dk/dv are Tk × d.
    unsafe {
        for &(start, len, off) in &tile.keys {
            mm(
                rows,
                len,
                d,
                p.as_mut_ptr().add(off),
                cols,
                false,
                q.ptr(bi, hi, q0),
                q.st,
                1,
                k.ptr(bi, kvh, start),
                1,
                k.st,
                scale,
            );
            mm(
                rows,
                len,
                d,
                dp.as_mut_ptr().add(off),
                cols,
                false,
                g.ptr(bi, hi, q0),
                g.st,
                1,
                v.ptr(bi, kvh, start),
                1,
                v.st,
                1.0,
            );
        }
    }
    for i in 0..rows {
        let row = &mut p[i * cols..(i + 1) * cols];
        tile.mask_row(spans.row(r0 + i), row);
        let l = lse[(r0 + i) * h + hi];
        let gi = g.row(bi, hi, q0 + i);
        let delta: f32 = gi
            .iter()
            .zip(o.row(bi, hi, q0 + i))
            .map(|(a, b)| a * b)
            .sum();
        let dprow = &mut dp[i * cols..(i + 1) * cols];
        for (x, y) in row.iter_mut().zip(dprow.iter_mut()) {
            let pv = if l.is_finite() {
                exp_approx(*x - l)
            } else {
                0.0
            };
            *x = pv;
            // dS (scaled), kept where dP was.
            *y = scale * pv * (*y - delta);
        }
    }
    // SAFETY: as above.
    unsafe {
        for &(start, len, off) in &tile.keys {
            // dQ += dS · K
            mm(
                rows,
                d,
                len,
                dq.as_mut_ptr(),
                d,
                true,
                dp.as_ptr().add(off),
                cols,
                1,
                k.ptr(bi, kvh, start),
                k.st,
                1,
                1.0,
            );
            // dK += dSᵀ · Q, dV += Pᵀ · dO
            mm(
                len,
                d,
                rows,
                dk.as_mut_ptr().add(start * d),
                d,
                true,
                dp.as_ptr().add(off),
                1,
                cols,
                q.ptr(bi, hi, q0),
                q.st,
                1,
                1.0,
            );
            mm(
                len,
                d,
                rows,
                dv.as_mut_ptr().add(start * d),
                d,
                true,
                p.as_ptr().add(off),
                1,
                cols,
                g.ptr(bi, hi, q0),
                g.st,
                1,
                1.0,
            );
        }
    }
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
        // Tasks: one per (batch row, head, tile of query rows); results scattered into [B, Tq, H, D] after.
        let tasks: Vec<(usize, usize, usize)> = (0..b)
            .flat_map(|bi| {
                (0..h).flat_map(move |hi| (0..tq).step_by(TILE).map(move |q0| (bi, hi, q0)))
            })
            .collect();
        let done = Mutex::new(Vec::with_capacity(tasks.len()));
        par_tasks(tasks, |(bi, hi, q0)| {
            let q1 = (q0 + TILE).min(tq);
            let (mut scores, mut o, mut l) =
                (Vec::new(), vec![0f32; (q1 - q0) * d], vec![0f32; q1 - q0]);
            let coords = (bi, hi, hi / rep);
            forward_tile(
                &q,
                &k,
                &v,
                &self.spans,
                self.scale,
                coords,
                (q0, q1),
                &mut scores,
                &mut o,
                &mut l,
            );
            if let Ok(mut done) = done.lock() {
                done.push((bi, hi, q0, o, l));
            }
        });
        let done = done
            .into_inner()
            .map_err(|_| candle_core::Error::Msg("fused attention: poisoned state".into()))?;
        for (bi, hi, q0, o, l) in done {
            for (i, (orow, lv)) in o.chunks(d).zip(l).enumerate() {
                let r = bi * tq + q0 + i;
                out[(r * h + hi) * d..(r * h + hi + 1) * d].copy_from_slice(orow);
                lse[r * h + hi] = lv;
            }
        }
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
            let (mut p, mut dp) = (Vec::new(), Vec::new());
            for q0 in (0..tq).step_by(TILE) {
                let q1 = (q0 + TILE).min(tq);
                backward_tile(
                    (&q, &k, &v, &o, &g),
                    &self.spans,
                    &lse,
                    self.scale,
                    (bi, hi, hi / rep, h),
                    (q0, q1),
                    (&mut p, &mut dp),
                    &mut dq[q0 * d..q1 * d],
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
