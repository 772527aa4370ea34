//! Gradients by recomputation (gradient checkpointing): the forward keeps only each decoder block's input, and
//! the backward re-runs one block at a time with its graph, so at most one block's activations are alive.
//!
//! A whole-model graph keeps every intermediate tensor of every block until backward reaches it: on SmolLM2-135M
//! that is about 40 KB per token per layer, and with 8 packed queries it dominates the step's memory. Here the
//! forward runs block by block on detached inputs; backward starts at the head (final norm, output layer and the
//! caller's loss, one graph), then for each block from the last one rebuilds its graph from the stored input and
//! backpropagates `Σ out ⊙ g`, whose gradient with respect to `out` is exactly `g`. The gradients equal those of
//! one graph up to the order in which a parameter's contributions are summed (tied embeddings).

use candle_core::{Tensor, Var};

use super::causal_lm::{CausalLm, Labels};
use super::error::{ModelError, Result};
use super::input::Input;

/// Gradients of `loss_fn(label log-probs)` for every variable in `vars` (None: not in the graph), the loss value
/// and whatever else `loss_fn` returns, computed with one decoder block's graph alive at a time.
pub fn grads_by_recompute<T>(
    model: &CausalLm,
    input: &Input,
    labels: &Labels,
    vars: &[Var],
    loss_fn: impl FnOnce(&Tensor) -> Result<(Tensor, T)>,
) -> Result<(T, Vec<Option<Tensor>>)> {
    let stages = model.stages(input)?;
    let n = stages.n_blocks();
    // Forward: block inputs only. Detaching drops each block's graph as soon as its output exists.
    let mut xs = Vec::with_capacity(n + 1);
    xs.push(stages.embed()?.detach());
    for i in 0..n {
        let y = stages.block(i, &xs[i])?.detach();
        xs.push(y);
    }
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    // Detached: candle's parameter gradients are computed from the forward tensors with tracked ops, so
    // keeping one as it is keeps its block's whole graph alive.
    let mut add = |store: &candle_core::backprop::GradStore| -> Result<()> {
        for (slot, v) in grads.iter_mut().zip(vars) {
            if let Some(g) = store.get(v.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + g)?.detach(),
                    None => g.detach(),
                });
            }
        }
        Ok(())
    };
    let missing = || ModelError::Input("recompute: a block input received no gradient".into());
    // Head: final norm, output layer, loss.
    let top = Var::from_tensor(&xs[n])?;
    let lp = model.label_logprobs_from_hidden(&stages.final_norm(top.as_tensor())?, labels)?;
    let (loss, extra) = loss_fn(&lp)?;
    let store = loss.backward()?;
    drop((lp, loss));
    add(&store)?;
    let mut g = store.get(top.as_tensor()).ok_or_else(missing)?.detach();
    drop(store);
    // Blocks, last first, each from its stored input.
    for i in (0..n).rev() {
        xs.truncate(i + 1);
        let inp = Var::from_tensor(&xs[i])?;
        let out = stages.block(i, inp.as_tensor())?;
        let store = (out * &g)?.sum_all()?.backward()?;
        add(&store)?;
        g = store.get(inp.as_tensor()).ok_or_else(missing)?.detach();
    }
    // Embeddings.
    let store = (stages.embed()? * &g)?.sum_all()?.backward()?;
    add(&store)?;
    Ok((extra, grads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::random_weights;
    use crate::model::ModelConfig;
    use candle_core::{DType, Device};

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = b.sqr().unwrap().sum_all().unwrap();
        let (d, n) = (
            d.to_scalar::<f32>().unwrap() as f64,
            n.to_scalar::<f32>().unwrap() as f64,
        );
        (d / n.max(1e-30)).sqrt()
    }

    /// Every parameter's gradient by recomputation equals the one-graph gradient (per-tensor relative error).
    fn same_grads(config: serde_json::Value) {
        let cfg = ModelConfig::from_value(&config, std::path::Path::new("<test>")).unwrap();
        let dev = Device::Cpu;
        let base = CausalLm::new(
            cfg.clone(),
            random_weights(&cfg, 0.2, 3, DType::F32, &dev).unwrap(),
        )
        .unwrap();
        let (model, vars) = base.trainable().unwrap();
        let vars: Vec<Var> = vars.into_iter().map(|(_, v)| v).collect();
        // Two packed-style rows with a padded tail, labels on most positions.
        let rows = vec![
            vec![1u32, 5, 9, 2, 7, 3, 8, 4, 6, 1, 2, 3],
            vec![4u32, 4, 2, 9, 1, 0, 0, 0, 0, 0, 0, 0],
        ];
        let input = Input::causal(&rows, 0, &dev).unwrap();
        let table: Vec<Vec<i64>> = rows
            .iter()
            .enumerate()
            .map(|(r, ids)| {
                (0..ids.len())
                    .map(|t| {
                        let real = if r == 0 { 12 } else { 5 };
                        if t + 1 < real {
                            ids[t + 1] as i64
                        } else {
                            -1
                        }
                    })
                    .collect()
            })
            .collect();
        let labels = Labels::from_table(&table);
        let w = Tensor::from_vec(
            (0..labels.len())
                .map(|i| 0.1 + i as f32 * 0.37 % 1.0)
                .collect::<Vec<_>>(),
            labels.len(),
            &dev,
        )
        .unwrap();
        let loss_of =
            |lp: &Tensor| -> Result<(Tensor, ())> { Ok(((lp * &w)?.sum_all()?.neg()?, ())) };
        let (_, by_recompute) =
            grads_by_recompute(&model, &input, &labels, &vars, loss_of).unwrap();
        let lp = model.label_logprobs(&input, &labels).unwrap();
        let store = loss_of(&lp).unwrap().0.backward().unwrap();
        for (v, g) in vars.iter().zip(&by_recompute) {
            let want = store.get(v.as_tensor()).expect("one-graph gradient");
            let got = g.as_ref().expect("recomputed gradient");
            let e = rel(got, want);
            assert!(e <= 1e-5, "relative gradient error {e}");
        }
    }

    #[test]
    fn recomputed_gradients_equal_one_graph_llama_tied() {
        same_grads(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 11, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true
        }));
    }

    #[test]
    fn recomputed_gradients_equal_one_graph_gpt2_and_neox() {
        same_grads(serde_json::json!({
            "architectures": ["GPT2LMHeadModel"], "vocab_size": 11, "n_embd": 16, "n_layer": 2,
            "n_head": 4, "n_positions": 32
        }));
        same_grads(serde_json::json!({
            "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 11, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "rotary_pct": 0.5, "rotary_emb_base": 10000, "max_position_embeddings": 32,
            "use_parallel_residual": true,
            "tie_word_embeddings": false
        }));
    }
}
