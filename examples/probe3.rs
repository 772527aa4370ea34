use candle_core::{DType, Device, Tensor, Var};
use rrhf::bench::ForwardBench;
use rrhf::model::init::random_weights;
use rrhf::model::{CausalLm, Input, Labels};
use std::time::Instant;
fn main() {
    rrhf::tune_allocator();
    let d = Device::Cpu;
    let b = ForwardBench::default();
    let cfg = b.config().unwrap();
    let model = CausalLm::new(
        cfg.clone(),
        random_weights(&cfg, 0.02, 0, DType::F32, &d).unwrap(),
    )
    .unwrap();
    let (tr, vars) = model.trainable().unwrap();
    let rows: Vec<Vec<u32>> = (0..4)
        .map(|r| {
            (0..256)
                .map(|t| ((r * 7919 + t * 31) % 32000) as u32)
                .collect()
        })
        .collect();
    let input = Input::causal(&rows, 0, &d).unwrap();
    let table: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| {
            (0..256)
                .map(|t| r.get(t + 1).map_or(-1, |&x| x as i64))
                .collect()
        })
        .collect();
    let labels = Labels::from_table(&table);
    for _ in 0..3 {
        let t0 = Instant::now();
        let lp = tr.label_logprobs(&input, &labels).unwrap();
        let loss = lp.mean_all().unwrap().neg().unwrap();
        let t1 = Instant::now();
        let g = loss.backward().unwrap();
        let t2 = Instant::now();
        let _ = g.get(vars[0].1.as_tensor());
        println!(
            "fwd(graph) {:.3}s  bwd {:.3}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64()
        );
    }
    let _ = Var::new(0f32, &d);
    let _ = Tensor::new(0f32, &d);
}
