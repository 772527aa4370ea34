//! `LlamaForCausalLM` (LLaMA, Alpaca, TinyLlama, SmolLM2): GQA, tied embeddings, rope scaling.

use candle_core::Tensor;

use super::config::Activation;
use super::config::LlamaConfig;
use super::error::Result;
use super::fused_proj::{gate_up, heads_linear, swiglu_down};
use super::input::Input;
use super::layers::{
    attention, fused_ok, gated, merge_heads, rope_inv_freq, split_heads, Attend, AttnMask, Dense,
    Linear, RmsNorm, Rotary,
};
use super::weights::Weights;

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// A LLaMA decoder with its output layer.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    inv_freq: Vec<f64>,
    /// bf16 copies of the matrices for the host decoding step (`--decode-dtype bf16`); never used in training.
    decode_bf16: Option<std::sync::Arc<DecodeBf16>>,
}

/// The bf16 copies of [`Llama`]'s matrices that the host decoding step reads instead of the f32 weights.
#[derive(Debug)]
struct DecodeBf16 {
    /// Per block: q, k, v, o, gate, up, down.
    blocks: Vec<[Vec<half::bf16>; 7]>,
    lm_head: Vec<half::bf16>,
}

fn linear(w: &Weights, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    Ok(Linear {
        weight: w.get(&format!("{name}.weight"), &[out, inp])?,
        bias: if bias {
            Some(w.get(&format!("{name}.bias"), &[out])?)
        } else {
            None
        },
    })
}

impl Llama {
    /// Builds the model from weights under transformers' names.
    pub fn new(cfg: &LlamaConfig, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_out = cfg.num_attention_heads * cfg.head_dim;
        let kv_out = cfg.num_key_value_heads * cfg.head_dim;
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.get(name, &[h])?,
                eps: cfg.rms_norm_eps,
            })
        };
        // Grown, not sized by `num_hidden_layers`: the count comes from config.json, and a corrupt one (2^64 − 1) would abort
        // the allocation before the first missing layer weight is reported.
        let mut blocks = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ab = cfg.attention_bias;
            let mb = cfg.mlp_bias;
            let im = cfg.intermediate_size;
            blocks.push(Block {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                q_proj: linear(w, &format!("{p}.self_attn.q_proj"), q_out, h, ab)?,
                k_proj: linear(w, &format!("{p}.self_attn.k_proj"), kv_out, h, ab)?,
                v_proj: linear(w, &format!("{p}.self_attn.v_proj"), kv_out, h, ab)?,
                o_proj: linear(w, &format!("{p}.self_attn.o_proj"), h, q_out, ab)?,
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_proj: linear(w, &format!("{p}.mlp.gate_proj"), im, h, mb)?,
                up_proj: linear(w, &format!("{p}.mlp.up_proj"), im, h, mb)?,
                down_proj: linear(w, &format!("{p}.mlp.down_proj"), h, im, mb)?,
            });
        }
        let embed_tokens = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            w.get("lm_head.weight", &[cfg.vocab_size, h])?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            blocks,
            norm: norm("model.norm.weight")?,
            lm_head,
            inv_freq: rope_inv_freq(&cfg.rope),
            decode_bf16: None,
        })
    }

    /// Final hidden states `[B, T, hidden]` after the last norm.
    pub fn hidden(&self, input: &Input) -> Result<Tensor> {
        let mask = AttnMask::new(&input.mask)?;
        let mut x = self.embed(&input.ids)?;
        let rotary = self.rotary(&input.positions, x.dtype())?;
        for layer in 0..self.blocks.len() {
            x = self.block_masked(layer, &x, &rotary, &mask)?;
        }
        self.norm.forward(&x)
    }

    /// Decoder block `layer` applied to `x` under `mask` (the whole input at once): on f32 CPU tensors the
    /// projections are fused with what follows them (`fused_proj.rs`), elsewhere as [`Llama::block`].
    pub(crate) fn block_masked(
        &self,
        layer: usize,
        x: &Tensor,
        rotary: &Rotary,
        mask: &AttnMask,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let blk = &self.blocks[layer];
        let plain = |l: &Linear| l.bias.is_none() && fused_ok(&[&l.weight]);
        let fused = match rotary.fused_tables() {
            Some(tables)
                if mask.has_spans()
                    && c.hidden_act == Activation::Silu
                    && fused_ok(&[x])
                    && [
                        &blk.q_proj,
                        &blk.k_proj,
                        &blk.v_proj,
                        &blk.gate_proj,
                        &blk.up_proj,
                        &blk.down_proj,
                    ]
                    .into_iter()
                    .all(plain) =>
            {
                Some(tables)
            }
            _ => None,
        };
        let Some(tables) = fused else {
            return self.block(
                layer,
                x,
                rotary,
                &|l, x| l.forward(x),
                &mut |_, q, k, v, scale| attention(q, k, v, mask, scale),
            );
        };
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let hs = blk.input_layernorm.forward(x)?;
        let q = heads_linear(&hs, &blk.q_proj.weight, c.num_attention_heads, Some(tables))?;
        let k = heads_linear(&hs, &blk.k_proj.weight, c.num_key_value_heads, Some(tables))?;
        let v = heads_linear(&hs, &blk.v_proj.weight, c.num_key_value_heads, None)?;
        let a = merge_heads(&attention(&q, &k, &v, mask, scale)?)?;
        let x = (x + blk.o_proj.forward(&a)?)?;
        let hs = blk.post_attention_layernorm.forward(&x)?;
        let gu = gate_up(&hs, &blk.gate_proj.weight, &blk.up_proj.weight)?;
        Ok((x + swiglu_down(&gu, &blk.down_proj.weight)?)?)
    }

    /// The decoder stack over `ids` at `positions`, with the dense layers and attention supplied by the caller:
    /// the masked forward of training and scoring, or a decoding step against a KV cache.
    fn body(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        dense: &Dense,
        attend: &mut Attend,
    ) -> Result<Tensor> {
        let mut x = self.embed(ids)?;
        let rotary = self.rotary(positions, x.dtype())?;
        for layer in 0..self.blocks.len() {
            x = self.block(layer, &x, &rotary, dense, attend)?;
        }
        self.norm.forward(&x)
    }

    /// Token embeddings `[B, T, hidden]`.
    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Rotary tables for `positions`.
    pub(crate) fn rotary(&self, positions: &Tensor, dtype: candle_core::DType) -> Result<Rotary> {
        Rotary::new(&self.inv_freq, positions, dtype)
    }

    /// Decoder block `layer` applied to `x`.
    pub(crate) fn block(
        &self,
        layer: usize,
        x: &Tensor,
        rotary: &Rotary,
        dense: &Dense,
        attend: &mut Attend,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let blk = &self.blocks[layer];
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let hs = blk.input_layernorm.forward(x)?;
        let q = split_heads(&dense(&blk.q_proj, &hs)?, c.num_attention_heads, c.head_dim)?;
        let k = split_heads(&dense(&blk.k_proj, &hs)?, c.num_key_value_heads, c.head_dim)?;
        let v = split_heads(&dense(&blk.v_proj, &hs)?, c.num_key_value_heads, c.head_dim)?;
        let (q, k) = (rotary.apply(&q)?, rotary.apply(&k)?);
        let a = merge_heads(&attend(layer, &q, &k, &v, scale)?)?;
        let x = (x + dense(&blk.o_proj, &a)?)?;
        let hs = blk.post_attention_layernorm.forward(&x)?;
        let gate = dense(&blk.gate_proj, &hs)?;
        let up = dense(&blk.up_proj, &hs)?;
        Ok((x + dense(&blk.down_proj, &gated(&gate, &up, c.hidden_act)?)?)?)
    }

    /// Decoder blocks.
    pub(crate) fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The final norm.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// The output projection `[vocab, hidden]`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
}

impl Llama {
    /// Final hidden states `[B, Tq, hidden]` of `ids` (`[B, Tq]`) at `positions` (`[B, Tq]`), attending to the
    /// rows' cached keys and values, which this call extends (incremental decoding; see [`KvCache`]).
    ///
    /// [`KvCache`]: super::kv_cache::KvCache
    pub fn hidden_step(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        cache: &mut super::kv_cache::KvCache,
    ) -> Result<Tensor> {
        if let Some(h) = self.hidden_step_host(ids, positions, cache)? {
            return Ok(h);
        }
        self.body(
            ids,
            positions,
            &|l, x| super::kv_cache::step_linear(x, &l.weight, l.bias.as_ref()),
            &mut |layer, q, k, v, scale| cache.attend(layer, q, k, v, scale),
        )
    }
}

impl Llama {
    /// Makes the host decoding step read bf16 copies of the matrices (half the bytes; an approximation of the f32
    /// policy: each weight rounded to bf16, products and sums still f32). Weights changed later are not seen.
    /// Refused for activations the host step does not cover (the flag would silently change nothing).
    pub fn enable_bf16_decode(&mut self) -> Result<()> {
        if self.cfg.hidden_act != Activation::Silu {
            return Err(super::error::ModelError::Input(format!(
                "--decode-dtype bf16 covers LLaMA blocks with the SiLU activation; this model's is {:?}: drop the flag",
                self.cfg.hidden_act
            )));
        }
        fn copy(t: &Tensor) -> Result<Vec<half::bf16>> {
            Ok(t.to_dtype(candle_core::DType::BF16)?
                .flatten_all()?
                .to_vec1::<half::bf16>()?)
        }
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            blocks.push([
                copy(&b.q_proj.weight)?,
                copy(&b.k_proj.weight)?,
                copy(&b.v_proj.weight)?,
                copy(&b.o_proj.weight)?,
                copy(&b.gate_proj.weight)?,
                copy(&b.up_proj.weight)?,
                copy(&b.down_proj.weight)?,
            ]);
        }
        self.decode_bf16 = Some(std::sync::Arc::new(DecodeBf16 {
            blocks,
            lm_head: copy(&self.lm_head)?,
        }));
        Ok(())
    }

    /// The bf16 copy of the output layer, when bf16 decoding is on.
    pub(crate) fn decode_head_bf16(&self) -> Option<&[half::bf16]> {
        self.decode_bf16.as_deref().map(|d| d.lm_head.as_slice())
    }
}

/// Host-side decoding step (CPU, f32, a few rows): the same computation as [`Llama::hidden_step`] on host
/// slices, with the weights read in place. A step is bound by reading the weights; composed tensor ops would add
/// some 40 small allocations and dispatches per layer.
impl Llama {
    fn hidden_step_host(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        cache: &mut super::kv_cache::KvCache,
    ) -> Result<Option<Tensor>> {
        use super::config::Activation;
        use super::decode_matmul::{matmul_rows_w, WeightRows};
        use super::kv_cache::{AttnDims, HostF32, STEP_ROWS_MAX};
        let (b, t) = ids.dims2()?;
        let m = b * t;
        let c = &self.cfg;
        if !cache.is_host() || m > STEP_ROWS_MAX || c.hidden_act != Activation::Silu {
            if self.decode_bf16.is_some() && t == 1 && m > STEP_ROWS_MAX {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    eprintln!(
                        "rrhf: note: --decode-dtype bf16 applies to decoding steps of at most {STEP_ROWS_MAX} rows; \
                         steps of {m} rows (prompts × beams) decode with the f32 weights"
                    )
                });
            }
            return Ok(None);
        }
        let host = HostF32::new;
        let Some(emb) = host(&self.embed_tokens) else {
            return Ok(None);
        };
        fn opt(l: &Linear) -> Option<(HostF32<'_>, Option<HostF32<'_>>)> {
            let w = HostF32::new(&l.weight)?;
            let b = match &l.bias {
                Some(b) => Some(HostF32::new(b)?),
                None => None,
            };
            Some((w, b))
        }
        struct HostBlock<'a> {
            ln1: HostF32<'a>,
            q: (HostF32<'a>, Option<HostF32<'a>>),
            k: (HostF32<'a>, Option<HostF32<'a>>),
            v: (HostF32<'a>, Option<HostF32<'a>>),
            o: (HostF32<'a>, Option<HostF32<'a>>),
            ln2: HostF32<'a>,
            gate: (HostF32<'a>, Option<HostF32<'a>>),
            up: (HostF32<'a>, Option<HostF32<'a>>),
            down: (HostF32<'a>, Option<HostF32<'a>>),
        }
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            let hb = (|| {
                Some(HostBlock {
                    ln1: host(&blk.input_layernorm.weight)?,
                    q: opt(&blk.q_proj)?,
                    k: opt(&blk.k_proj)?,
                    v: opt(&blk.v_proj)?,
                    o: opt(&blk.o_proj)?,
                    ln2: host(&blk.post_attention_layernorm.weight)?,
                    gate: opt(&blk.gate_proj)?,
                    up: opt(&blk.up_proj)?,
                    down: opt(&blk.down_proj)?,
                })
            })();
            match hb {
                Some(hb) => blocks.push(hb),
                None => return Ok(None),
            }
        }
        let Some(norm) = host(&self.norm.weight) else {
            return Ok(None);
        };
        let hs = c.hidden_size;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        let pos = positions.flatten_all()?.to_vec1::<u32>()?;
        let emb = emb.get();
        let mut x = Vec::with_capacity(m * hs);
        for &id in &ids {
            let id = id as usize;
            if id >= c.vocab_size {
                return Err(super::error::ModelError::Input(format!(
                    "token id {id} is outside the vocabulary ({})",
                    c.vocab_size
                )));
            }
            x.extend_from_slice(&emb[id * hs..(id + 1) * hs]);
        }
        // Rotary tables per row: angles in f32 as transformers (position · inv_freq).
        let half = self.inv_freq.len();
        let inv: Vec<f32> = self.inv_freq.iter().map(|&f| f as f32).collect();
        let mut cos = Vec::with_capacity(m * half);
        let mut sin = Vec::with_capacity(m * half);
        for &p in &pos {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let rope = |xs: &mut [f32], heads: usize| {
            for (row, chunk) in xs.chunks_exact_mut(heads * hd).enumerate() {
                let (cr, sr) = (
                    &cos[row * half..(row + 1) * half],
                    &sin[row * half..(row + 1) * half],
                );
                for head in chunk.chunks_exact_mut(hd) {
                    for j in 0..half {
                        let (x1, x2) = (head[j], head[j + half]);
                        head[j] = x1 * cr[j] - x2 * sr[j];
                        head[j + half] = x2 * cr[j] + x1 * sr[j];
                    }
                }
            }
        };
        let eps = c.rms_norm_eps;
        let rms = |xs: &[f32], w: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(xs.len());
            for row in xs.chunks_exact(hs) {
                let var = row.iter().map(|v| v * v).sum::<f32>() / hs as f32;
                let d = (var + eps as f32).sqrt();
                out.extend(row.iter().zip(w).map(|(v, g)| (v / d) * g));
            }
            out
        };
        let bf16 = self.decode_bf16.as_deref();
        // Weight `j` (q, k, v, o, gate, up, down) of block `layer`: its bf16 copy when bf16 decoding is on.
        let lin = |xs: &[f32],
                   k: usize,
                   l: &(HostF32, Option<HostF32>),
                   layer: usize,
                   j: usize|
         -> Vec<f32> {
            let w = match bf16 {
                Some(d) => WeightRows::Bf16(&d.blocks[layer][j]),
                None => WeightRows::F32(l.0.get()),
            };
            let mut y = matmul_rows_w(xs, m, k, w);
            if let Some(bias) = &l.1 {
                let bias = bias.get();
                for row in y.chunks_exact_mut(bias.len()) {
                    for (v, b) in row.iter_mut().zip(bias) {
                        *v += b;
                    }
                }
            }
            y
        };
        let dims = AttnDims {
            rows: b,
            tq: t,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        for (layer, blk) in blocks.iter().enumerate() {
            let h1 = rms(&x, blk.ln1.get());
            let mut q = lin(&h1, hs, &blk.q, layer, 0);
            let mut k = lin(&h1, hs, &blk.k, layer, 1);
            let v = lin(&h1, hs, &blk.v, layer, 2);
            if half > 0 {
                rope(&mut q, nh);
                rope(&mut k, nkv);
            }
            let a = cache.attend_rows(layer, &q, &k, &v, dims, scale)?;
            let o = lin(&a, nh * hd, &blk.o, layer, 3);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h2 = rms(&x, blk.ln2.get());
            let mut g = lin(&h2, hs, &blk.gate, layer, 4);
            let u = lin(&h2, hs, &blk.up, layer, 5);
            g.iter_mut()
                .zip(&u)
                .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            let d = lin(&g, c.intermediate_size, &blk.down, layer, 6);
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
        let x = rms(&x, norm.get());
        Ok(Some(Tensor::from_vec(
            x,
            (b, t, hs),
            self.embed_tokens.device(),
        )?))
    }
}
