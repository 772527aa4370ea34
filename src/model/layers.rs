//! Differentiable building blocks shared by the architectures.
//!
//! Every op here has a backward in candle 0.11: the fused inference kernels (`softmax_last_dim`, `rms_norm`,
//! `layer_norm`, `rope*`) drop gradients silently, so norms, softmax and rotary embeddings are composed from
//! elementary ops. Normalisation and softmax of half-precision models run in f32, as transformers does.

use candle_core::{DType, Device, Tensor, D};

use super::config::{Activation, RopeConfig, RopeScaling};
use super::error::{ModelError, Result};
use super::fused::{self, HostMask};
use super::fused_attention::{span_attention, KeySpans};
use super::fused_elementwise::{self, RopeTables};
use super::fused_linear;
pub(crate) use super::ops::fused_ok;
pub use super::ops::{log_softmax, with_composed_ops, MASK_NEG};
use super::ops::{softmax, upcast};

/// A dense layer as a forward applies it (`Linear::forward`, or a decoding kernel for a few rows).
pub type Dense<'a> = dyn Fn(&Linear, &Tensor) -> Result<Tensor> + 'a;

/// Attention of layer `l` over `q`, `k`, `v` with a scale: masked attention over the whole input, or attention to
/// a KV cache that the call extends.
pub type Attend<'a> = dyn FnMut(usize, &Tensor, &Tensor, &Tensor, f64) -> Result<Tensor> + 'a;

/// `x @ w` for `x` of any rank ≥ 2 and a 2-D `w`, as one 2-D matmul over the flattened leading dims.
pub fn matmul_2d(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((lead, inner))?.matmul(w)?;
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(1)?;
    Ok(y.reshape(out_dims)?)
}

/// A dense layer with transformers' `nn.Linear` weight layout `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `x @ Wᵀ + b` over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if fused_ok(&[x, &self.weight]) {
            fused_linear::linear(x, &self.weight)?
        } else {
            matmul_2d(x, &self.weight.t()?)?
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// GPT-2's `Conv1D`: weight layout `[in, out]`.
#[derive(Debug, Clone)]
pub struct Conv1D {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Conv1D {
    /// `x @ W + b` over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(matmul_2d(x, &self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// LLaMA's RMSNorm: `w · x / sqrt(mean(x²) + eps)`, computed in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused_ok(&[x, &self.weight]) {
            return Ok(fused_elementwise::rms_norm(x, &self.weight, self.eps)?);
        }
        let dtype = x.dtype();
        let xf = upcast(x)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}

/// LayerNorm with weight and bias, computed in f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = upcast(x)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centered = xf.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// Applies an activation function.
pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::Silu => x.silu()?,
        Activation::Gelu => x.gelu_erf()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Relu => x.relu()?,
    })
}

/// `act(gate) ⊙ up`, the gated MLP of LLaMA (fused for SiLU in f32 on the CPU).
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    if act == Activation::Silu && fused_ok(&[gate, up]) {
        return Ok(fused_elementwise::swiglu(gate, up)?);
    }
    Ok((activate(gate, act)? * up)?)
}

/// Inverse rotary frequencies `[rotary_dim / 2]`, with transformers' rope scaling rules.
pub fn rope_inv_freq(cfg: &RopeConfig) -> Vec<f64> {
    let half = cfg.rotary_dim / 2;
    let base: Vec<f64> = (0..half)
        .map(|i| 1.0 / cfg.theta.powf((2 * i) as f64 / cfg.rotary_dim as f64))
        .collect();
    match cfg.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Rotary tables for explicit position ids: `cos`, `sin` of shape `[B, 1, T, rotary_dim]` (each half repeated,
/// the rotate-half layout of LLaMA / GPT-NeoX in transformers).
#[derive(Debug, Clone)]
pub struct Rotary {
    tables: RotaryTables,
    rotary_dim: usize,
}

/// The tables in the form the rotation will use: host tables for the fused CPU op (f32 on the CPU), or
/// `cos`, `sin` tensors `[B, 1, T, rotary_dim]` for the composed ops.
#[derive(Debug, Clone)]
enum RotaryTables {
    Fused(RopeTables),
    Tensors { cos: Tensor, sin: Tensor },
}

impl Rotary {
    /// Builds the tables for `positions` (`[B, T]`, u32) in `dtype`.
    pub fn new(inv_freq: &[f64], positions: &Tensor, dtype: DType) -> Result<Self> {
        let device = positions.device();
        let (b, t) = positions.dims2()?;
        let half = inv_freq.len();
        // Angles in f32 as transformers computes them (positions · inv_freq in float32).
        let inv: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
        let inv = Tensor::from_vec(inv, (1, 1, half), device)?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b, t, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        let tables = if device.is_cpu() && dtype == DType::F32 && fused_ok(&[]) {
            let flat = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
            RotaryTables::Fused(RopeTables::new(
                flat(freqs.cos()?)?,
                flat(freqs.sin()?)?,
                2 * half,
            ))
        } else {
            let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
            RotaryTables::Tensors {
                cos: emb.cos()?.to_dtype(dtype)?.unsqueeze(1)?,
                sin: emb.sin()?.to_dtype(dtype)?.unsqueeze(1)?,
            }
        };
        Ok(Self {
            tables,
            rotary_dim: 2 * half,
        })
    }

    /// The host tables of the fused CPU rotation, where this forward uses it.
    pub(crate) fn fused_tables(&self) -> Option<&RopeTables> {
        match &self.tables {
            RotaryTables::Fused(t) => Some(t),
            RotaryTables::Tensors { .. } => None,
        }
    }

    /// Rotates the first `rotary_dim` dims of `x` (`[B, H, T, head_dim]`); the rest pass through.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(D::Minus1)?;
        let r = self.rotary_dim;
        if r == 0 {
            return Ok(x.clone());
        }
        let (cos, sin) = match &self.tables {
            RotaryTables::Fused(t) => return Ok(t.apply(x)?),
            RotaryTables::Tensors { cos, sin } => (cos, sin),
        };
        let (rot, pass) = if r < head_dim {
            (
                x.narrow(D::Minus1, 0, r)?,
                Some(x.narrow(D::Minus1, r, head_dim - r)?),
            )
        } else {
            (x.clone(), None)
        };
        let x1 = rot.narrow(D::Minus1, 0, r / 2)?;
        let x2 = rot.narrow(D::Minus1, r / 2, r / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let out = (rot.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
        Ok(match pass {
            Some(p) => Tensor::cat(&[&out, &p], D::Minus1)?,
            None => out,
        })
    }
}

/// The attention mask of one forward, in the forms the two softmax paths need.
#[derive(Debug, Clone)]
pub struct AttnMask {
    /// Additive bias `[B, 1, T, T]` (0 or [`MASK_NEG`]) for the composed path.
    bias: Tensor,
    /// The boolean mask on the host, for the fused CPU softmax (half-precision inputs).
    host: Option<HostMask>,
    /// The visible key spans per query, for the fused CPU attention (f32).
    spans: Option<KeySpans>,
}

impl AttnMask {
    /// Whether attention under this mask runs the fused span attention (f32 CPU inputs).
    pub(crate) fn has_spans(&self) -> bool {
        self.spans.is_some()
    }

    /// From a boolean mask `[B, Tq, Tk]` (u8, 1 = query position may attend key position).
    pub fn new(mask: &Tensor) -> Result<Self> {
        let mut m = Self::composed(mask)?;
        if !fused_ok(&[]) {
            return Ok(m);
        }
        m.host = HostMask::new(mask)?;
        if let Some(host) = &m.host {
            let (b, tq, tk) = mask.dims3()?;
            m.spans = Some(KeySpans::from_mask(host.bytes(), b, tq, tk)?);
        }
        Ok(m)
    }

    /// The additive bias only: attention takes the composed ops on every device (the reference in tests).
    pub fn composed(mask: &Tensor) -> Result<Self> {
        let zeros = Tensor::zeros(mask.shape(), DType::F32, mask.device())?;
        let neg = Tensor::full(MASK_NEG, mask.shape(), mask.device())?;
        Ok(Self {
            bias: mask.where_cond(&zeros, &neg)?.unsqueeze(1)?,
            host: None,
            spans: None,
        })
    }
}

/// Scaled dot-product attention under `mask`. `q`: `[B, H, Tq, D]`, `k`, `v`: `[B, Hkv, Tk, D]`; grouped-query
/// heads are expanded. Scores and softmax run in f32 for half types; on the CPU the masked softmax is fused.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let (hkv, tk) = (k.dim(1)?, k.dim(2)?);
    if h % hkv != 0 {
        return Err(ModelError::Input(format!(
            "attention: {h} query heads are not a multiple of {hkv} key/value heads"
        )));
    }
    if let Some(spans) = &mask.spans {
        if q.dtype() == DType::F32 && k.dtype() == DType::F32 && v.dtype() == DType::F32 {
            return span_attention(q, k, v, spans, scale);
        }
    }
    let (k, v) = if hkv != h {
        let rep = h / hkv;
        let expand = |x: &Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, hkv, rep, tk, d))?
                .reshape((b, h, tk, d))?)
        };
        (expand(k)?, expand(v)?)
    } else {
        (k.clone(), v.clone())
    };
    let dtype = q.dtype();
    let raw = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let probs = match &mask.host {
        Some(host) if dtype != DType::F64 => fused::masked_softmax(&upcast(&raw)?, host, scale)?,
        _ => {
            let scores = upcast(&(raw * scale)?)?;
            let scores = scores.broadcast_add(&mask.bias.to_dtype(scores.dtype())?)?;
            softmax(&scores)?
        }
    };
    Ok(probs.to_dtype(dtype)?.matmul(&v.contiguous()?)?)
}

/// `[B, T, H·D]` → `[B, H, T, D]`.
pub fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    Ok(x.reshape((b, t, heads, head_dim))?.transpose(1, 2)?)
}

/// `[B, H, T, D]` → `[B, T, H·D]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))?)
}

/// Positions `[B, T]` as u32 on `device` from rows of ids (helper for tests and simple callers).
pub fn u32_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let b = rows.len();
    let t = rows.first().map_or(0, |r| r.len());
    if rows.iter().any(|r| r.len() != t) {
        return Err(ModelError::Input("rows of unequal length".into()));
    }
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (b, t), device)?)
}

#[cfg(test)]
mod tests {
    //! Each layer's fused CPU path against its composed path (the one CUDA and half types run), through the
    //! layer API itself, values and gradients.
    use super::*;
    use crate::model::fused_elementwise::tests::{check, rand};

    /// `f` on the fused path against `f` under [`with_composed_ops`].
    fn both(inputs: &[Tensor], tol: f32, f: impl Fn(&[Tensor]) -> Tensor) {
        check(inputs, &f, |t| with_composed_ops(|| f(t)), tol);
    }

    #[test]
    fn composed_ops_flag_is_scoped_to_the_call() {
        let x = rand(&[2, 3], 1);
        assert!(fused_ok(&[&x]));
        with_composed_ops(|| assert!(!fused_ok(&[&x])));
        assert!(fused_ok(&[&x]));
        assert!(!fused_ok(&[&x.to_dtype(DType::BF16).unwrap()]));
    }

    #[test]
    fn linear_rms_norm_and_gated_mlp_paths_agree() {
        both(&[rand(&[2, 7, 19], 1), rand(&[23, 19], 2)], 1e-4, |t| {
            Linear {
                weight: t[1].clone(),
                bias: None,
            }
            .forward(&t[0])
            .unwrap()
        });
        both(&[rand(&[3, 5, 24], 3), rand(&[24], 4)], 1e-5, |t| {
            RmsNorm {
                weight: t[1].clone(),
                eps: 1e-5,
            }
            .forward(&t[0])
            .unwrap()
        });
        both(&[rand(&[4, 7, 10], 5), rand(&[4, 7, 10], 6)], 1e-5, |t| {
            gated(&t[0], &t[1], Activation::Silu).unwrap()
        });
    }

    #[test]
    fn rotary_paths_agree_with_partial_rotation() {
        let positions =
            u32_tensor(&[vec![0, 1, 2, 5, 6], vec![3, 4, 4, 7, 9]], &Device::Cpu).unwrap();
        let inv: Vec<f64> = (0..3)
            .map(|i| 1.0 / 10000f64.powf(i as f64 / 3.0))
            .collect();
        both(&[rand(&[2, 3, 5, 8], 7)], 1e-5, |t| {
            Rotary::new(&inv, &positions, DType::F32)
                .unwrap()
                .apply(&t[0])
                .unwrap()
        });
    }

    /// A packed row (query 0..4, responses 4..7 and 7..9) and a causal row with left padding of 2.
    fn mask() -> Tensor {
        let t = 9;
        let mut m = vec![0u8; 2 * t * t];
        for q in 0..t {
            for k in 0..=q {
                let resp = |i: usize| {
                    if i < 4 {
                        0
                    } else if i < 7 {
                        1
                    } else {
                        2
                    }
                };
                m[q * t + k] = u8::from(resp(k) == 0 || resp(k) == resp(q));
                m[(t + q) * t + k] = u8::from(q >= 2 && k >= 2);
            }
        }
        Tensor::from_vec(m, (2, t, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn attention_paths_agree_in_f32_and_bf16() {
        let mask = mask();
        // Rows with no visible key (padding) differ by design between the paths; compare real rows only.
        let real: Vec<f32> = (0..18)
            .map(|r| f32::from(u8::from(!(9..11).contains(&r))))
            .collect();
        let keep = Tensor::from_vec(real, (2, 1, 9, 1), &Device::Cpu).unwrap();
        let split = |x: &Tensor, h: usize| split_heads(x, h, 4).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let tol = if dtype == DType::F32 { 2e-5 } else { 2e-2 };
            both(
                &[
                    rand(&[2, 9, 16], 8),
                    rand(&[2, 9, 8], 9),
                    rand(&[2, 9, 8], 10),
                ],
                tol,
                |t| {
                    let m = AttnMask::new(&mask).unwrap();
                    let c = |x: &Tensor| x.to_dtype(dtype).unwrap();
                    attention(
                        &split(&c(&t[0]), 4),
                        &split(&c(&t[1]), 2),
                        &split(&c(&t[2]), 2),
                        &m,
                        0.5,
                    )
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .broadcast_mul(&keep)
                    .unwrap()
                },
            );
        }
    }

    #[test]
    fn label_logprob_paths_agree() {
        let labels: Vec<u32> = (0..29).map(|i| (i * 11 % 97) as u32).collect();
        both(&[(rand(&[29, 97], 11) * 3.0).unwrap()], 1e-5, |t| {
            fused::label_logprobs(&t[0], &labels).unwrap()
        });
    }
}
