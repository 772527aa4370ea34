//! `x @ Wᵀ` as one op with its own backward, for f32 on the CPU.
//!
//! Composed as `x.matmul(&w.t())`, the weight's gradient is formed for the transposed view and then transposed
//! back into a zero-filled buffer: a strided pass over every weight matrix on every backward. Here `dW = gᵀ · x`
//! lands in the weight's own layout.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::fused::contiguous_f32;

struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        let (m, k) = super::fused::rows_by_last(l1);
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!(
                "linear: input {:?} does not fit weight {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let x = contiguous_f32(s1, l1, "linear input")?;
        let w = contiguous_f32(s2, l2, "linear weight")?;
        let mut out = vec![0f32; m * n];
        if m > 0 && n > 0 {
            // SAFETY: the slices hold m·k, n·k and m·n elements, and the strides below stay inside them:
            // out[i, j] at i·n + j, x[i, l] at i·k + l, and (Wᵀ)[l, j] = W[j, l] at j·k + l.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(candle_core::utils::get_num_threads()),
                );
            }
        }
        Ok((CpuStorage::F32(out), super::fused::with_last_dim(dims, n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let m = x.elem_count().checked_div(k).unwrap_or(0);
        let g = g.contiguous()?.reshape((m, n))?;
        let x2 = x.reshape((m, k))?;
        let dx = g.matmul(w)?.reshape(x.shape())?;
        let dw = g.t()?.matmul(&x2)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `x @ wᵀ` for f32 CPU tensors, `x` `[..., K]`, `w` `[N, K]`: `[..., N]` (no reshape nodes around it: in
/// candle's backward each would fill a zeroed buffer and add the gradient into it).
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused_elementwise::tests::{check, rand};

    #[test]
    fn fused_linear_matches_matmul_with_gradients_in_2d_and_3d() {
        check(
            &[rand(&[37, 19], 1), rand(&[23, 19], 2)],
            |t| linear(&t[0], &t[1]).unwrap(),
            |t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
            1e-4,
        );
        check(
            &[rand(&[3, 5, 19], 3), rand(&[23, 19], 4)],
            |t| linear(&t[0], &t[1]).unwrap(),
            |t| {
                t[0].matmul(&t[1].t().unwrap().broadcast_left(3).unwrap())
                    .unwrap()
            },
            1e-4,
        );
    }
}
