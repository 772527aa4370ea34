//! Projections fused with what follows them in a LLaMA block, as CPU ops with their own backward (f32):
//!
//! - [`heads_linear`]: `x @ Wᵀ` split into heads and (for queries and keys) rotated, written straight into the
//!   `[B, H, T, D]` layout attention reads. Composed, that is a linear, a reshape, a transpose, a contiguous copy
//!   and the rotation: five graph nodes, and in candle's backward each one fills a zeroed buffer and adds the
//!   gradient into it.
//! - [`gate_up`]: the two MLP input projections as one node `[..., 2·I]`; its backward sums the two input gradients
//!   inside gemm (no separate add).
//! - [`swiglu_down`]: `silu(g) ⊙ u` and the down projection as one node that keeps no `[tokens, I]` activation:
//!   backward forms it again from its input.
//!
//! Tests check values and gradients against the composed ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};

use super::fused::{contiguous_f32, par_rows};
use super::fused_elementwise::{sigmoid, RopeTables};

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`, each operand given by its row and column strides, over the
/// available threads.
///
/// # Safety
/// The pointers must address every element the sizes and strides reach.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        }
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
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::Rayon(candle_core::utils::get_num_threads()),
    );
}

fn cpu<'a>(s: &'a Storage, what: &str) -> candle_core::Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("fused projection: {what} is not on the CPU"),
    }
}

/// A contiguous f32 CPU tensor's elements, for a backward pass.
fn with_slice<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    f(contiguous_f32(cpu(&s, what)?, l, what)?)
}

/// Rotates the first `rotary_dim` dims of a head row by the angle of position slot `bt` (`sign` −1: the inverse).
#[inline(always)]
fn rotate(src: &[f32], dst: &mut [f32], tables: &RopeTables, bt: usize, sign: f32) {
    let (cos, sin, r) = tables.parts();
    let half = r / 2;
    let (c, s) = (&cos[bt * half..][..half], &sin[bt * half..][..half]);
    for i in 0..half {
        let (x1, x2) = (src[i], src[i + half]);
        let sn = s[i] * sign;
        dst[i] = x1 * c[i] - x2 * sn;
        dst[i + half] = x2 * c[i] + x1 * sn;
    }
    dst[r..].copy_from_slice(&src[r..]);
}

/// `x @ Wᵀ` for `x` `[B, T, K]`, `W` `[H·D, K]`, returned as heads `[B, H, T, D]` (contiguous), each head row
/// rotated by its position's rotary angle when `rope` is given.
struct HeadsLinear {
    heads: usize,
    rope: Option<RopeTables>,
}

impl HeadsLinear {
    /// `(B, T, K, D)` of an input and weight layout.
    fn dims(&self, lx: &Layout, lw: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, t, k) = lx.shape().dims3()?;
        let (o, k2) = lw.shape().dims2()?;
        if k != k2 || self.heads == 0 || o % self.heads != 0 {
            candle_core::bail!(
                "heads linear: input {:?} does not fit weight {:?} in {} heads",
                lx.shape(),
                lw.shape(),
                self.heads
            );
        }
        Ok((b, t, k, o / self.heads))
    }
}

impl CustomOp2 for HeadsLinear {
    fn name(&self) -> &'static str {
        "heads-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, k, d) = self.dims(l1, l2)?;
        let (h, n, o) = (self.heads, b * t, self.heads * d);
        let x = contiguous_f32(s1, l1, "heads linear input")?;
        let w = contiguous_f32(s2, l2, "heads linear weight")?;
        let mut y = vec![0f32; n * o];
        // SAFETY: y is n×o (row stride o), x n×k, and Wᵀ[l, j] = W[j, l] at j·k + l within the n·k, o·k slices.
        unsafe {
            gemm_f32(
                (n, o, k),
                y.as_mut_ptr(),
                o,
                false,
                x.as_ptr(),
                (k, 1),
                w.as_ptr(),
                (1, k),
            )
        };
        let mut out = vec![0f32; n * o];
        // Output row (bi, hi, ti) is head hi of token row bi·t + ti.
        par_rows(&mut out, d.max(1), |r, dst| {
            let (bi, hi, ti) = (r / (h * t), (r / t) % h, r % t);
            let src = &y[((bi * t + ti) * h + hi) * d..][..d];
            match &self.rope {
                Some(tables) => rotate(src, dst, tables, bi * t + ti, 1.0),
                None => dst.copy_from_slice(src),
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, d))))
    }

    fn bwd(
        &self,
        x_t: &Tensor,
        w_t: &Tensor,
        _res: &Tensor,
        g_t: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, t, k) = x_t.dims3()?;
        let (o, _) = w_t.dims2()?;
        let (h, n) = (self.heads, b * t);
        let d = o / h;
        let g_t = g_t.contiguous()?;
        // The output gradient back in token-row order [B·T, H·D], un-rotated.
        let mut gy = vec![0f32; n * o];
        with_slice(&g_t, "heads linear gradient", |g| {
            par_rows(&mut gy, d.max(1), |r, dst| {
                // Row r of gy is (token row, head) = (r / h, r % h).
                let (bt, hi) = (r / h, r % h);
                let (bi, ti) = (bt / t, bt % t);
                let src = &g[((bi * h + hi) * t + ti) * d..][..d];
                match &self.rope {
                    Some(tables) => rotate(src, dst, tables, bt, -1.0),
                    None => dst.copy_from_slice(src),
                }
            });
            Ok(())
        })?;
        let mut dx = vec![0f32; n * k];
        let mut dw = vec![0f32; o * k];
        with_slice(x_t, "heads linear input", |x| {
            with_slice(w_t, "heads linear weight", |w| {
                // SAFETY: dx = gy (n×o) · W (o×k); dW = gyᵀ (o×n) · x (n×k); all slices hold what the strides reach.
                unsafe {
                    gemm_f32(
                        (n, k, o),
                        dx.as_mut_ptr(),
                        k,
                        false,
                        gy.as_ptr(),
                        (o, 1),
                        w.as_ptr(),
                        (k, 1),
                    );
                    gemm_f32(
                        (o, k, n),
                        dw.as_mut_ptr(),
                        k,
                        false,
                        gy.as_ptr(),
                        (1, o),
                        x.as_ptr(),
                        (k, 1),
                    );
                }
                Ok(())
            })
        })?;
        let dev = x_t.device();
        Ok((
            Some(Tensor::from_vec(dx, (b, t, k), dev)?),
            Some(Tensor::from_vec(dw, (o, k), dev)?),
        ))
    }
}

/// `x @ wᵀ` split into `heads` heads `[B, H, T, D]` and rotated by `rope` where given; f32 CPU `x` `[B, T, K]`,
/// `w` `[H·D, K]`.
pub fn heads_linear(
    x: &Tensor,
    w: &Tensor,
    heads: usize,
    rope: Option<&RopeTables>,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        HeadsLinear {
            heads,
            rope: rope.cloned(),
        },
    )
}

/// `[x @ W_gateᵀ, x @ W_upᵀ]` side by side in the last dim (`[..., 2·I]`).
struct GateUp;

impl CustomOp3 for GateUp {
    fn name(&self) -> &'static str {
        "gate-up"
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
        let dims = l1.shape().dims();
        let (n, k) = super::fused::rows_by_last(l1);
        let (i, k2) = l2.shape().dims2()?;
        if k != k2 || l3.shape().dims2()? != (i, k) {
            candle_core::bail!(
                "gate-up: input {:?}, gate {:?}, up {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let x = contiguous_f32(s1, l1, "gate-up input")?;
        let wg = contiguous_f32(s2, l2, "gate weight")?;
        let wu = contiguous_f32(s3, l3, "up weight")?;
        let mut gu = vec![0f32; n * 2 * i];
        // SAFETY: gu is n×2i (row stride 2i): the gate projection in columns 0..i, the up one in i..2i.
        unsafe {
            for (w, col) in [(wg, 0), (wu, i)] {
                gemm_f32(
                    (n, i, k),
                    gu.as_mut_ptr().add(col),
                    2 * i,
                    false,
                    x.as_ptr(),
                    (k, 1),
                    w.as_ptr(),
                    (1, k),
                );
            }
        }
        Ok((
            CpuStorage::F32(gu),
            super::fused::with_last_dim(dims, 2 * i),
        ))
    }

    fn bwd(
        &self,
        x_t: &Tensor,
        wg_t: &Tensor,
        wu_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (i, k) = wg_t.dims2()?;
        let n = x_t.elem_count().checked_div(k).unwrap_or(0);
        let grad = grad.contiguous()?;
        let mut dx = vec![0f32; n * k];
        let mut dwg = vec![0f32; i * k];
        let mut dwu = vec![0f32; i * k];
        with_slice(&grad, "gate-up gradient", |dgu| {
            with_slice(x_t, "gate-up input", |x| {
                with_slice(wg_t, "gate weight", |wg| {
                    with_slice(wu_t, "up weight", |wu| {
                        // SAFETY: dgu is n×2i; dx = dg·W_gate + du·W_up (n×k), dW = d·ᵀ x (i×k).
                        unsafe {
                            for (w, col, acc) in [(wg, 0, false), (wu, i, true)] {
                                gemm_f32(
                                    (n, k, i),
                                    dx.as_mut_ptr(),
                                    k,
                                    acc,
                                    dgu.as_ptr().add(col),
                                    (2 * i, 1),
                                    w.as_ptr(),
                                    (k, 1),
                                );
                            }
                            for (dw, col) in [(&mut dwg, 0), (&mut dwu, i)] {
                                gemm_f32(
                                    (i, k, n),
                                    dw.as_mut_ptr(),
                                    k,
                                    false,
                                    dgu.as_ptr().add(col),
                                    (1, 2 * i),
                                    x.as_ptr(),
                                    (k, 1),
                                );
                            }
                        }
                        Ok(())
                    })
                })
            })
        })?;
        let dev = x_t.device();
        Ok((
            Some(Tensor::from_vec(dx, x_t.shape(), dev)?),
            Some(Tensor::from_vec(dwg, (i, k), dev)?),
            Some(Tensor::from_vec(dwu, (i, k), dev)?),
        ))
    }
}

/// The two MLP input projections of f32 CPU `x` `[..., K]` (weights `[I, K]`) side by side: `[..., 2·I]`.
pub fn gate_up(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w_gate.contiguous()?, &w_up.contiguous()?, GateUp)
}

/// `silu(g) ⊙ u` of one row of `[g, u]` into `out`.
#[inline(always)]
fn swiglu_row(gu: &[f32], out: &mut [f32]) {
    let (g, u) = gu.split_at(out.len());
    for j in 0..out.len() {
        out[j] = g[j] * sigmoid(g[j]) * u[j];
    }
}

/// `(silu(g) ⊙ u) @ W_downᵀ` for `gu = [g, u]` `[..., 2·I]` and `W_down` `[H, I]`. The gated activation is formed
/// a row block at a time and not kept: backward forms it again from `gu` (one element-wise pass) instead of the
/// graph holding `[tokens, I]` per layer until then.
struct SwiGluDown;

impl CustomOp2 for SwiGluDown {
    fn name(&self) -> &'static str {
        "swiglu-down"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        let (n, two_i) = super::fused::rows_by_last(l1);
        let (h, i) = l2.shape().dims2()?;
        if two_i != 2 * i {
            candle_core::bail!(
                "swiglu-down: input {:?} does not fit weight {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let gu = contiguous_f32(s1, l1, "swiglu-down input")?;
        let w = contiguous_f32(s2, l2, "down weight")?;
        let mut act = vec![0f32; n * i];
        par_rows(&mut act, i.max(1), |r, o| {
            swiglu_row(&gu[r * two_i..][..two_i], o)
        });
        let mut out = vec![0f32; n * h];
        // SAFETY: out = act (n×i) · W_downᵀ (i×h), Wᵀ[l, j] = W[j, l] at j·i + l.
        unsafe {
            gemm_f32(
                (n, h, i),
                out.as_mut_ptr(),
                h,
                false,
                act.as_ptr(),
                (i, 1),
                w.as_ptr(),
                (1, i),
            )
        };
        Ok((CpuStorage::F32(out), super::fused::with_last_dim(dims, h)))
    }

    fn bwd(
        &self,
        gu_t: &Tensor,
        w_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (h, i) = w_t.dims2()?;
        let n = gu_t.elem_count().checked_div(2 * i).unwrap_or(0);
        let grad = grad.contiguous()?;
        let mut dgu = vec![0f32; n * 2 * i];
        let mut dw = vec![0f32; h * i];
        with_slice(gu_t, "swiglu-down input", |gu| {
            with_slice(w_t, "down weight", |w| {
                with_slice(&grad, "swiglu-down gradient", |d| {
                    let mut act = vec![0f32; n * i];
                    par_rows(&mut act, i.max(1), |r, o| {
                        swiglu_row(&gu[r * 2 * i..][..2 * i], o)
                    });
                    let mut dact = vec![0f32; n * i];
                    // SAFETY: dW = dᵀ (h×n) · act (n×i); d_act = d (n×h) · W (h×i).
                    unsafe {
                        gemm_f32(
                            (h, i, n),
                            dw.as_mut_ptr(),
                            i,
                            false,
                            d.as_ptr(),
                            (1, h),
                            act.as_ptr(),
                            (i, 1),
                        );
                        gemm_f32(
                            (n, i, h),
                            dact.as_mut_ptr(),
                            i,
                            false,
                            d.as_ptr(),
                            (h, 1),
                            w.as_ptr(),
                            (i, 1),
                        );
                    }
                    // d/dg = d_act ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))), d/du = d_act ⊙ silu(g).
                    par_rows(&mut dgu, (2 * i).max(1), |r, o| {
                        let (g, u) = gu[r * 2 * i..(r + 1) * 2 * i].split_at(i);
                        let dr = &dact[r * i..(r + 1) * i];
                        let (og, ou) = o.split_at_mut(i);
                        for j in 0..i {
                            let s = sigmoid(g[j]);
                            og[j] = dr[j] * u[j] * s * (1.0 + g[j] * (1.0 - s));
                            ou[j] = dr[j] * g[j] * s;
                        }
                    });
                    Ok(())
                })
            })
        })?;
        let dev = gu_t.device();
        Ok((
            Some(Tensor::from_vec(dgu, gu_t.shape(), dev)?),
            Some(Tensor::from_vec(dw, (h, i), dev)?),
        ))
    }
}

/// `(silu(g) ⊙ u) @ w_downᵀ` for f32 CPU `gu = [g, u]` `[..., 2·I]` (see [`gate_up`]), `w_down` `[H, I]`.
pub fn swiglu_down(gu: &Tensor, w_down: &Tensor) -> candle_core::Result<Tensor> {
    gu.contiguous()?
        .apply_op2(&w_down.contiguous()?, SwiGluDown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused_elementwise::tests::{check, rand};
    use crate::model::layers::split_heads;

    #[test]
    fn heads_linear_equals_linear_split_and_rotate() {
        let (b, t, k, h, d, r) = (2, 5, 7, 3, 6, 4);
        let cos = rand(&[b, t, r / 2], 3);
        let sin = rand(&[b, t, r / 2], 4);
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let tables = RopeTables::new(flat(&cos), flat(&sin), r);
        for rope in [Some(&tables), None] {
            check(
                &[rand(&[b, t, k], 1), rand(&[h * d, k], 2)],
                |x| heads_linear(&x[0], &x[1], h, rope).unwrap(),
                |x| {
                    let y = x[0].matmul(&x[1].t().unwrap().broadcast_left(b).unwrap());
                    let heads = split_heads(&y.unwrap(), h, d).unwrap();
                    match rope {
                        Some(tables) => tables.apply(&heads).unwrap(),
                        None => heads,
                    }
                },
                1e-4,
            );
        }
    }

    #[test]
    fn gate_up_equals_two_linears_side_by_side() {
        check(
            &[rand(&[2, 9, 11], 5), rand(&[13, 11], 6), rand(&[13, 11], 7)],
            |x| gate_up(&x[0], &x[1], &x[2]).unwrap(),
            |x| {
                let proj = |w: &Tensor| x[0].matmul(&w.t().unwrap().broadcast_left(2).unwrap());
                Tensor::cat(&[proj(&x[1]).unwrap(), proj(&x[2]).unwrap()], 2).unwrap()
            },
            1e-4,
        );
    }

    #[test]
    fn swiglu_down_equals_the_gate_then_a_linear() {
        let i = 13;
        check(
            &[rand(&[2, 9, 2 * i], 8), rand(&[11, i], 9)],
            |x| swiglu_down(&x[0], &x[1]).unwrap(),
            |x| {
                let g = x[0].narrow(2, 0, i).unwrap();
                let u = x[0].narrow(2, i, i).unwrap();
                let act = (g.silu().unwrap() * u).unwrap();
                act.matmul(&x[1].t().unwrap().broadcast_left(2).unwrap())
                    .unwrap()
            },
            1e-4,
        );
    }
}
