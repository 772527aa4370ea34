//! Fused CPU ops with their own backward for the per-layer element-wise chains: RMSNorm, rotary embedding and
//! SwiGLU. Each replaces five to ten autograd nodes (and as many temporary buffers, and zero-filled gradient
//! buffers in candle's backward) with one. f32 on the CPU only; callers fall back to composed ops elsewhere.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::fused::{contiguous_f32, exp_approx, par_rows};

fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1)
}

/// `y = w ⊙ x / sqrt(mean(x²) + eps)` over the last dim.
struct RmsNormOp {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = last_dim(l1);
        let x = contiguous_f32(s1, l1, "rms-norm x")?;
        let w = contiguous_f32(s2, l2, "rms-norm weight")?;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, h, |r, o| {
            let row = &x[r * h..(r + 1) * h];
            let inv = inv_rms(row, self.eps);
            for ((oi, &xi), &wi) in o.iter_mut().zip(row).zip(w) {
                *oi = xi * inv * wi;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &RmsNormGradX { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(&g, &RmsNormGradW { eps: self.eps })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// dL/dx = r·(g⊙w) − r³/H · x · Σ(g⊙w⊙x), r = 1/rms(x).
struct RmsNormGradX {
    eps: f32,
}

impl CustomOp3 for RmsNormGradX {
    fn name(&self) -> &'static str {
        "rms-norm-grad-x"
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
        let h = last_dim(l1);
        let x = contiguous_f32(s1, l1, "rms-norm-grad x")?;
        let w = contiguous_f32(s2, l2, "rms-norm-grad weight")?;
        let g = contiguous_f32(s3, l3, "rms-norm-grad grad")?;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, h, |r, o| {
            let (xr, gr) = (&x[r * h..(r + 1) * h], &g[r * h..(r + 1) * h]);
            let inv = inv_rms(xr, self.eps);
            let dot: f32 = xr.iter().zip(gr).zip(w).map(|((a, b), c)| a * b * c).sum();
            let k = inv * inv * inv * dot / h as f32;
            for i in 0..h {
                o[i] = inv * gr[i] * w[i] - k * xr[i];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// dL/dw = Σ_rows g ⊙ x · r.
struct RmsNormGradW {
    eps: f32,
}

impl CustomOp2 for RmsNormGradW {
    fn name(&self) -> &'static str {
        "rms-norm-grad-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = last_dim(l1);
        let x = contiguous_f32(s1, l1, "rms-norm-grad-w x")?;
        let g = contiguous_f32(s2, l2, "rms-norm-grad-w grad")?;
        let mut out = vec![0f32; h];
        for r in 0..x.len() / h.max(1) {
            let (xr, gr) = (&x[r * h..(r + 1) * h], &g[r * h..(r + 1) * h]);
            let inv = inv_rms(xr, self.eps);
            for i in 0..h {
                out[i] += gr[i] * xr[i] * inv;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(h)))
    }
}

/// RMSNorm of f32 CPU `x` (`[..., H]`) with weight `[H]`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNormOp { eps: eps as f32 })
}

/// Rotate-half rotary embedding of `x` `[B, H, T, D]` with host tables `cos`, `sin` `[B, T, R/2]`; dims ≥ R pass.
struct RopeOp {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    rotary_dim: usize,
    /// −1 in the backward pass: the transpose of a rotation is the rotation by −θ.
    sign: f32,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = l.shape().dims4()?;
        let half = self.rotary_dim / 2;
        if self.cos.len() != b * t * half {
            candle_core::bail!("rope: tables do not fit {:?}", l.shape());
        }
        let x = contiguous_f32(s, l, "rope x")?;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |r, o| {
            let (bi, ti) = (r / (h * t), r % t);
            let base = (bi * t + ti) * half;
            let (c, sn) = (&self.cos[base..base + half], &self.sin[base..base + half]);
            let row = &x[r * d..(r + 1) * d];
            for i in 0..half {
                let (x1, x2) = (row[i], row[i + half]);
                let s = sn[i] * self.sign;
                o[i] = x1 * c[i] - x2 * s;
                o[i + half] = x2 * c[i] + x1 * s;
            }
            o[self.rotary_dim..].copy_from_slice(&row[self.rotary_dim..]);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = RopeOp {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            rotary_dim: self.rotary_dim,
            sign: -self.sign,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// Host rotary tables for the fused path.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    rotary_dim: usize,
}

impl RopeTables {
    /// From `cos`, `sin` of shape `[B, T, R/2]` (f32, host).
    pub fn new(cos: Vec<f32>, sin: Vec<f32>, rotary_dim: usize) -> Self {
        Self {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            rotary_dim,
        }
    }

    /// `cos`, `sin` (`[B, T, R/2]`) and the rotary width `R`.
    pub(crate) fn parts(&self) -> (&[f32], &[f32], usize) {
        (&self.cos, &self.sin, self.rotary_dim)
    }

    /// Rotates f32 CPU `x` `[B, H, T, D]`.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(RopeOp {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            rotary_dim: self.rotary_dim,
            sign: 1.0,
        })
    }
}

/// The logistic function with the fused ops' fast exp.
pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

/// `silu(gate) ⊙ up` (LLaMA's MLP).
struct SwiGluOp;

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "swiglu-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s1, l1, "swiglu gate")?;
        let u = contiguous_f32(s2, l2, "swiglu up")?;
        let n = last_dim(l1);
        let mut out = vec![0f32; g.len()];
        par_rows(&mut out, n, |r, o| {
            let (gr, ur) = (&g[r * n..(r + 1) * n], &u[r * n..(r + 1) * n]);
            for i in 0..n {
                o[i] = gr[i] * sigmoid(gr[i]) * ur[i];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dg = gate.apply_op3_no_bwd(up, &grad, &SwiGluGrad { wrt_gate: true })?;
        let du = gate.apply_op3_no_bwd(up, &grad, &SwiGluGrad { wrt_gate: false })?;
        Ok((Some(dg), Some(du)))
    }
}

/// d/dgate = grad ⊙ up ⊙ σ(g)(1 + g(1 − σ(g))); d/dup = grad ⊙ silu(g).
struct SwiGluGrad {
    wrt_gate: bool,
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
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
        let g = contiguous_f32(s1, l1, "swiglu-grad gate")?;
        let u = contiguous_f32(s2, l2, "swiglu-grad up")?;
        let d = contiguous_f32(s3, l3, "swiglu-grad grad")?;
        let n = last_dim(l1);
        let mut out = vec![0f32; g.len()];
        par_rows(&mut out, n, |r, o| {
            let span = r * n..(r + 1) * n;
            let (gr, ur, dr) = (&g[span.clone()], &u[span.clone()], &d[span]);
            for i in 0..n {
                let s = sigmoid(gr[i]);
                o[i] = if self.wrt_gate {
                    dr[i] * ur[i] * s * (1.0 + gr[i] * (1.0 - s))
                } else {
                    dr[i] * gr[i] * s
                };
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `silu(gate) ⊙ up` for f32 CPU tensors of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGluOp)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    /// Seeded standard-normal test tensor.
    pub(crate) fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Values and gradients of a fused op equal the composed reference for every input.
    pub(crate) fn check(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&ts), composed(&ts));
        assert!(
            max_diff(&a, &b) < tol,
            "values differ by {}",
            max_diff(&a, &b)
        );
        let w = rand(a.dims(), 99);
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let d = max_diff(
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            assert!(d < tol, "gradient of input {i} differs by {d}");
        }
    }

    #[test]
    fn fused_rms_norm_matches_composed() {
        let norm = |t: &[Tensor]| crate::model::layers::RmsNorm {
            weight: t[1].clone(),
            eps: 1e-5,
        };
        check(
            &[rand(&[3, 5, 24], 1), rand(&[24], 2)],
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| {
                let xf = &t[0];
                let var = xf.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let _ = norm(t);
                xf.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(&t[1])
                    .unwrap()
            },
            1e-5,
        );
    }

    #[test]
    fn fused_rope_matches_rotate_half() {
        let (b, h, t, d, r) = (2, 3, 5, 8, 6);
        let cos = rand(&[b, t, r / 2], 3);
        let sin = rand(&[b, t, r / 2], 4);
        let tables = RopeTables::new(
            cos.flatten_all().unwrap().to_vec1().unwrap(),
            sin.flatten_all().unwrap().to_vec1().unwrap(),
            r,
        );
        let full = |x: &Tensor| {
            Tensor::cat(&[x, x], D::Minus1)
                .unwrap()
                .unsqueeze(1)
                .unwrap()
        };
        let (c, s) = (full(&cos), full(&sin));
        check(
            &[rand(&[b, h, t, d], 5)],
            |x| tables.apply(&x[0]).unwrap(),
            |x| {
                let rot = x[0].narrow(D::Minus1, 0, r).unwrap();
                let pass = x[0].narrow(D::Minus1, r, d - r).unwrap();
                let x1 = rot.narrow(D::Minus1, 0, r / 2).unwrap();
                let x2 = rot.narrow(D::Minus1, r / 2, r / 2).unwrap();
                let rh = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
                let out = (rot.broadcast_mul(&c).unwrap() + rh.broadcast_mul(&s).unwrap()).unwrap();
                Tensor::cat(&[&out, &pass], D::Minus1).unwrap()
            },
            1e-5,
        );
    }

    #[test]
    fn fused_swiglu_matches_composed() {
        check(
            &[rand(&[4, 7, 10], 6), rand(&[4, 7, 10], 7)],
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
            1e-5,
        );
        let _ = DType::F32;
    }
}
