//! Every parameter gets a gradient, and gradients agree with finite differences in f64.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use rrhf::model::{CausalLm, Input, Labels, Weights};

use crate::common::{load, rel_err, Cases, MODELS};

fn nll(model: &CausalLm, input: &Input, labels: &Labels) -> Tensor {
    let lp = model.label_logprobs(input, labels).unwrap();
    lp.mean_all().unwrap().neg().unwrap()
}

#[test]
fn every_trainable_parameter_receives_a_nonzero_gradient() {
    for &name in MODELS {
        let m = load(name, DType::F32);
        let cases = Cases::load(name);
        let input = cases.input("plain");
        let labels = Labels::from_table(&cases.labels("plain"));
        let (trainable, vars) = m.model.trainable().unwrap();
        assert_eq!(
            vars.len(),
            m.model.weights().tensors().len(),
            "{name}: every weight is a parameter"
        );
        let grads = nll(&trainable, &input, &labels).backward().unwrap();
        for (pname, var) in &vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: {pname} got no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient of {pname} has norm {norm}"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    for &name in MODELS {
        let m = load(name, DType::F64);
        let cases = Cases::load(name);
        let input = cases.input("custom");
        let labels = Labels::from_table(&cases.labels("custom"));
        let (trainable, vars) = m.model.trainable().unwrap();
        let grads = nll(&trainable, &input, &labels).backward().unwrap();
        let base: HashMap<String, Tensor> = m.model.weights().tensors().clone();
        let h = 1e-5;
        for (pname, var) in &vars {
            let ana = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let orig = &base[pname];
            let flat = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let n = flat.len();
            for &i in &[0, n / 2, n - 1] {
                let eval = |delta: f64| -> f64 {
                    let mut v = flat.clone();
                    v[i] += delta;
                    let mut w = base.clone();
                    w.insert(
                        pname.clone(),
                        Tensor::from_vec(v, orig.shape(), orig.device()).unwrap(),
                    );
                    let model =
                        CausalLm::new(m.model.config().clone(), Weights::new(w, "perturbed"))
                            .unwrap();
                    nll(&model, &input, &labels).to_scalar::<f64>().unwrap()
                };
                let num = (eval(h) - eval(-h)) / (2.0 * h);
                let err = (num - ana[i]).abs();
                assert!(
                    err <= 1e-6 + 1e-4 * ana[i].abs(),
                    "{name}: d loss / d {pname}[{i}]: finite difference {num:.9e}, backward {:.9e}",
                    ana[i]
                );
            }
        }
    }
}

/// The composed ops (the path CUDA and bf16/f16 take) give the fused CPU ops' log-probs and gradients, on every
/// fixture model and input case (padding, custom masks, long positions), in f32.
#[test]
fn composed_path_equals_fused_path_with_gradients() {
    use rrhf::model::layers::with_composed_ops;
    for &name in MODELS {
        let m = load(name, DType::F32);
        let cases = Cases::load(name);
        let (trainable, vars) = m.model.trainable().unwrap();
        for case in &cases.names {
            let input = cases.input(case);
            let labels = Labels::from_table(&cases.labels(case));
            let lp_fused = trainable.label_logprobs(&input, &labels).unwrap();
            let lp_comp = with_composed_ops(|| trainable.label_logprobs(&input, &labels).unwrap());
            let e = rel_err(&lp_comp, &lp_fused);
            assert!(e <= 1e-5, "{name}/{case}: log-probs differ by {e:.2e}");
            let g_fused = lp_fused
                .mean_all()
                .unwrap()
                .neg()
                .unwrap()
                .backward()
                .unwrap();
            let g_comp = lp_comp
                .mean_all()
                .unwrap()
                .neg()
                .unwrap()
                .backward()
                .unwrap();
            for (pname, var) in &vars {
                let (a, b) = (
                    g_comp.get(var.as_tensor()).unwrap(),
                    g_fused.get(var.as_tensor()).unwrap(),
                );
                let e = rel_err(a, b);
                assert!(
                    e <= 1e-4,
                    "{name}/{case}: gradient of {pname} differs by {e:.2e}"
                );
            }
        }
    }
}
