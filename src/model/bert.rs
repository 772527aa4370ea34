//! BERT and DistilBERT encoders with their sequence-classification heads (the IMDB sentiment reward of the
//! paper's Appendix C): bidirectional attention over the real tokens, post-LayerNorm blocks, the logits read from
//! the first (`[CLS]`) position.

use candle_core::Tensor;

use super::config::Activation;
use super::error::Result;
use super::input::Input;
use super::layers::{activate, attention, merge_heads, split_heads, AttnMask, LayerNorm, Linear};
use super::weights::Weights;

/// `BertConfig` fields the forward needs.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
}

/// `DistilBertConfig` fields the forward needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DistilBertConfig {
    pub vocab_size: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub hidden_dim: usize,
    pub activation: Activation,
    pub max_position_embeddings: usize,
}

fn linear(w: &Weights, p: &str, out: usize, inp: usize) -> Result<Linear> {
    Ok(Linear {
        weight: w.get(&format!("{p}.weight"), &[out, inp])?,
        bias: Some(w.get(&format!("{p}.bias"), &[out])?),
    })
}

fn layer_norm(w: &Weights, p: &str, n: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: w.get(&format!("{p}.weight"), &[n])?,
        bias: w.get(&format!("{p}.bias"), &[n])?,
        eps,
    })
}

/// One post-LN encoder block: `x = LN(x + attn(x)); x = LN(x + ffn(x))`.
#[derive(Debug, Clone)]
struct EncoderBlock {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln_attn: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    ln_ffn: LayerNorm,
}

impl EncoderBlock {
    fn forward(
        &self,
        x: &Tensor,
        mask: &AttnMask,
        heads: usize,
        act: Activation,
    ) -> Result<Tensor> {
        let hd = x.dim(2)? / heads;
        let q = split_heads(&self.q.forward(x)?, heads, hd)?;
        let k = split_heads(&self.k.forward(x)?, heads, hd)?;
        let v = split_heads(&self.v.forward(x)?, heads, hd)?;
        let a = merge_heads(&attention(&q, &k, &v, mask, 1.0 / (hd as f64).sqrt())?)?;
        let x = self.ln_attn.forward(&(x + self.o.forward(&a)?)?)?;
        let f = self
            .ffn_out
            .forward(&activate(&self.ffn_in.forward(&x)?, act)?)?;
        self.ln_ffn.forward(&(x + f)?)
    }
}

/// Token + position (+ token type 0) embeddings, then LayerNorm.
fn embed(
    input: &Input,
    words: &Tensor,
    positions: &Tensor,
    token_type0: Option<&Tensor>,
    ln: &LayerNorm,
) -> Result<Tensor> {
    let (b, t) = input.dims();
    let h = words.dim(1)?;
    let tok = words.index_select(&input.ids.flatten_all()?, 0)?;
    let pos = positions.index_select(&input.positions.flatten_all()?, 0)?;
    let mut x = (tok + pos)?;
    if let Some(tt) = token_type0 {
        x = x.broadcast_add(tt)?;
    }
    ln.forward(&x.reshape((b, t, h))?)
}

/// The first position of every row, `[B, H]`.
fn first_token(h: &Tensor) -> Result<Tensor> {
    Ok(h.narrow(1, 0, 1)?.squeeze(1)?)
}

/// `BertForSequenceClassification`: BERT, tanh pooler on `[CLS]`, linear classifier.
#[derive(Debug, Clone)]
pub struct BertClassifier {
    cfg: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type0: Tensor,
    ln_emb: LayerNorm,
    blocks: Vec<EncoderBlock>,
    pooler: Linear,
    classifier: Linear,
}

impl BertClassifier {
    /// Builds from weights under transformers' names (`bert.` prefix, `classifier`).
    pub fn new(cfg: &BertConfig, num_labels: usize, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        // Grown, not sized by `num_hidden_layers`: the count comes from config.json, and a corrupt one (2^64 − 1) would abort
        // the allocation before the first missing layer weight is reported.
        let mut blocks = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("bert.encoder.layer.{i}");
            blocks.push(EncoderBlock {
                q: linear(w, &format!("{p}.attention.self.query"), h, h)?,
                k: linear(w, &format!("{p}.attention.self.key"), h, h)?,
                v: linear(w, &format!("{p}.attention.self.value"), h, h)?,
                o: linear(w, &format!("{p}.attention.output.dense"), h, h)?,
                ln_attn: layer_norm(w, &format!("{p}.attention.output.LayerNorm"), h, eps)?,
                ffn_in: linear(
                    w,
                    &format!("{p}.intermediate.dense"),
                    cfg.intermediate_size,
                    h,
                )?,
                ffn_out: linear(w, &format!("{p}.output.dense"), h, cfg.intermediate_size)?,
                ln_ffn: layer_norm(w, &format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        let tt = w.get(
            "bert.embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, h],
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            word_embeddings: w.get(
                "bert.embeddings.word_embeddings.weight",
                &[cfg.vocab_size, h],
            )?,
            position_embeddings: w.get(
                "bert.embeddings.position_embeddings.weight",
                &[cfg.max_position_embeddings, h],
            )?,
            token_type0: tt.narrow(0, 0, 1)?,
            ln_emb: layer_norm(w, "bert.embeddings.LayerNorm", h, eps)?,
            blocks,
            pooler: linear(w, "bert.pooler.dense", h, h)?,
            classifier: linear(w, "classifier", num_labels, h)?,
        })
    }

    /// The config the model was built with.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// Logits `[B, num_labels]`; `input.mask` must let every position see the real tokens of its row.
    pub fn logits(&self, input: &Input) -> Result<Tensor> {
        let mask = AttnMask::new(&input.mask)?;
        let mut x = embed(
            input,
            &self.word_embeddings,
            &self.position_embeddings,
            Some(&self.token_type0),
            &self.ln_emb,
        )?;
        for blk in &self.blocks {
            x = blk.forward(&x, &mask, self.cfg.num_attention_heads, self.cfg.hidden_act)?;
        }
        let pooled = self.pooler.forward(&first_token(&x)?)?.tanh()?;
        self.classifier.forward(&pooled)
    }
}

/// `DistilBertForSequenceClassification`: DistilBERT, `pre_classifier` + ReLU on `[CLS]`, linear classifier.
#[derive(Debug, Clone)]
pub struct DistilBertClassifier {
    cfg: DistilBertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    ln_emb: LayerNorm,
    blocks: Vec<EncoderBlock>,
    pre_classifier: Linear,
    classifier: Linear,
}

/// DistilBERT's LayerNorms use eps 1e-12 (fixed in transformers, not a config field).
const DISTILBERT_LN_EPS: f64 = 1e-12;

impl DistilBertClassifier {
    /// Builds from weights under transformers' names (`distilbert.` prefix, `pre_classifier`, `classifier`).
    pub fn new(cfg: &DistilBertConfig, num_labels: usize, w: &Weights) -> Result<Self> {
        let d = cfg.dim;
        let eps = DISTILBERT_LN_EPS;
        // Grown, not sized by `n_layers`: the count comes from config.json, and a corrupt one (2^64 − 1) would abort
        // the allocation before the first missing layer weight is reported.
        let mut blocks = Vec::new();
        for i in 0..cfg.n_layers {
            let p = format!("distilbert.transformer.layer.{i}");
            blocks.push(EncoderBlock {
                q: linear(w, &format!("{p}.attention.q_lin"), d, d)?,
                k: linear(w, &format!("{p}.attention.k_lin"), d, d)?,
                v: linear(w, &format!("{p}.attention.v_lin"), d, d)?,
                o: linear(w, &format!("{p}.attention.out_lin"), d, d)?,
                ln_attn: layer_norm(w, &format!("{p}.sa_layer_norm"), d, eps)?,
                ffn_in: linear(w, &format!("{p}.ffn.lin1"), cfg.hidden_dim, d)?,
                ffn_out: linear(w, &format!("{p}.ffn.lin2"), d, cfg.hidden_dim)?,
                ln_ffn: layer_norm(w, &format!("{p}.output_layer_norm"), d, eps)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            word_embeddings: w.get(
                "distilbert.embeddings.word_embeddings.weight",
                &[cfg.vocab_size, d],
            )?,
            position_embeddings: w.get(
                "distilbert.embeddings.position_embeddings.weight",
                &[cfg.max_position_embeddings, d],
            )?,
            ln_emb: layer_norm(w, "distilbert.embeddings.LayerNorm", d, eps)?,
            blocks,
            pre_classifier: linear(w, "pre_classifier", d, d)?,
            classifier: linear(w, "classifier", num_labels, d)?,
        })
    }

    /// The config the model was built with.
    pub fn config(&self) -> &DistilBertConfig {
        &self.cfg
    }

    /// Logits `[B, num_labels]`; `input.mask` must let every position see the real tokens of its row.
    pub fn logits(&self, input: &Input) -> Result<Tensor> {
        let mask = AttnMask::new(&input.mask)?;
        let mut x = embed(
            input,
            &self.word_embeddings,
            &self.position_embeddings,
            None,
            &self.ln_emb,
        )?;
        for blk in &self.blocks {
            x = blk.forward(&x, &mask, self.cfg.n_heads, self.cfg.activation)?;
        }
        let pooled = self.pre_classifier.forward(&first_token(&x)?)?.relu()?;
        self.classifier.forward(&pooled)
    }
}
