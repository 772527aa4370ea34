//! Data-parallel `rrhf train` under `mpirun` (feature `mpi`): two ranks train exactly as one process with twice the
//! gradient accumulation, every rank steps with the same gradients, and a dead or hung rank ends the job.
//!
//! The tests that launch `mpirun` skip (saying why) when the binary was built without the `mpi` feature or
//! `mpirun` is not installed; `.ci/run` installs Open MPI and builds with the feature, so there they run.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::common::{rel_err, temp_dir};
use crate::train::{bin, metrics, train_cmd, train_losses};

/// `mpirun -np N` with the flags this machine needs, or why it cannot run (printed, and the test returns).
fn mpirun(np: usize) -> Option<Command> {
    if !cfg!(feature = "mpi") {
        eprintln!("skipped: rrhf is built without the `mpi` feature (cargo test --release --features mpi)");
        return None;
    }
    let found = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: mpirun not found (Debian: apt-get install openmpi-bin libopenmpi-dev)");
        return None;
    }
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe"]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Open MPI refuses root without it (containers, CI).
        c.arg("--allow-run-as-root");
    }
    Some(c)
}

/// `launcher` running the program and arguments of `cmd`, forwarding `env` to every rank.
fn under(mut launcher: Command, cmd: &Command, env: &[(&str, &str)]) -> Command {
    for (k, v) in env {
        launcher.env(k, v).args(["-x", k]);
    }
    launcher.arg(cmd.get_program()).args(cmd.get_args());
    launcher
}

/// Runs `cmd` to completion, killing it (and failing) after `limit`: a hung job must not hang the test suite.
fn run_within(cmd: &mut Command, limit: Duration) -> (Output, Duration) {
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the command");
    loop {
        if child.try_wait().expect("waiting for the command").is_some() {
            break;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collecting output");
            panic!(
                "still running after {limit:?} (killed): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t0.elapsed();
    (child.wait_with_output().expect("collecting output"), took)
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn weights(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("reading model.safetensors")
}

/// `(norm, crc32)` of each step's gradients as dumped by `RRHF_DEBUG_GRAD_DUMP` for `rank`.
fn grad_dump(dir: &Path, rank: usize) -> Vec<(f64, String)> {
    std::fs::read_to_string(dir.join(format!("grads-rank{rank}.jsonl")))
        .unwrap_or_else(|e| panic!("grads-rank{rank}.jsonl: {e}"))
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["norm"].as_f64().unwrap(),
                v["crc32"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Flags of the comparison runs: 64 records in steps of 12 queries (micro-batches of 3), so the sixth step is a
/// partial one of 4 queries whose two micro-batches (3 and 1 queries) fall on different ranks; evaluation is
/// sharded too.
const FLAGS: &[&str] = &[
    "--max-steps",
    "6",
    "--batch-queries",
    "3",
    "--eval-data",
    "examples/tiny/eval.jsonl",
    "--eval-every",
    "3",
];

#[test]
fn two_ranks_train_like_one_process_with_twice_the_accumulation() {
    let Some(launcher) = mpirun(2) else { return };
    let tmp = temp_dir();
    let (one, two) = (tmp.join("one"), tmp.join("two"));
    let (dump_one, dump_two) = (tmp.join("dump1"), tmp.join("dump2"));
    std::fs::create_dir_all(&dump_one).unwrap();
    std::fs::create_dir_all(&dump_two).unwrap();

    let mut single = train_cmd(&one, FLAGS);
    single
        .args(["--grad-accum", "4"])
        .current_dir(crate::train::root())
        .env("RRHF_DEBUG_GRAD_DUMP", &dump_one);
    let (out, _) = run_within(&mut single, Duration::from_secs(300));
    ok(&out);

    let mut ranks = train_cmd(&two, FLAGS);
    ranks.args(["--grad-accum", "2"]);
    let dump = dump_two.to_str().unwrap();
    let mut job = under(launcher, &ranks, &[("RRHF_DEBUG_GRAD_DUMP", dump)]);
    job.current_dir(crate::train::root());
    let (out, _) = run_within(&mut job, Duration::from_secs(300));
    ok(&out);

    // The same steps, losses and evaluations.
    let (a, b) = (train_losses(&one), train_losses(&two));
    assert_eq!(a.len(), 6, "single-process steps");
    assert_eq!(a.len(), b.len(), "steps differ");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1e-8),
            "step {}: loss {y} with 2 ranks, {x} with one process",
            i + 1
        );
    }
    let evals = |dir: &Path| -> Vec<(f64, f64)> {
        metrics(dir)
            .iter()
            .filter_map(|v| Some((v.get("eval_loss")?.as_f64()?, v["eval_queries"].as_f64()?)))
            .collect()
    };
    let (ea, eb) = (evals(&one), evals(&two));
    assert_eq!(ea.len(), 2, "evaluations at steps 3 and 6");
    for (x, y) in ea.iter().zip(&eb) {
        assert_eq!(x.1, y.1, "every eval query counted once");
        assert!(
            (x.0 - y.0).abs() <= 1e-5 * x.0.abs(),
            "eval loss {} vs {}",
            y.0,
            x.0
        );
    }
    let m = metrics(&two);
    let step = m.iter().find(|v| v.get("loss").is_some()).unwrap();
    assert_eq!(step["world_size"], 2);
    assert!(
        step["comm_bytes"].as_f64().unwrap() > 0.0,
        "communication is logged: {step}"
    );
    assert_eq!(
        step["tokens"],
        m_tokens(&one),
        "tokens are the whole step's"
    );

    // The same final weights.
    let (wa, wb) = (
        weights(&one.join("model.safetensors")),
        weights(&two.join("model.safetensors")),
    );
    assert_eq!(wa.len(), wb.len());
    for (name, t) in &wa {
        let e = rel_err(&wb[name], t);
        assert!(e <= 1e-5, "{name}: relative difference {e:e}");
    }

    // Every rank stepped with the same gradients, equal to the single process's step gradients.
    let (g0, g1, g) = (
        grad_dump(&dump_two, 0),
        grad_dump(&dump_two, 1),
        grad_dump(&dump_one, 0),
    );
    assert_eq!(g0.len(), 6);
    assert_eq!(g0, g1, "ranks 0 and 1 hold different gradients");
    for (i, ((n2, _), (n1, _))) in g0.iter().zip(&g).enumerate() {
        assert!(
            (n2 - n1).abs() <= 1e-5 * n1,
            "step {}: gradient norm {n2} with 2 ranks, {n1} with one process",
            i + 1
        );
    }
}

#[test]
fn a_nonfinite_loss_on_one_rank_is_skipped_by_all_like_one_process() {
    // The first micro-batch of step 2 (rank 0's) gets a NaN loss; rank 1's are fine. Every rank must skip the step,
    // blaming the same records as one process does, and go on identically.
    let Some(launcher) = mpirun(2) else { return };
    let tmp = temp_dir();
    let (one, two) = (tmp.join("one"), tmp.join("two"));
    let flags = ["--max-steps", "4", "--skip-nonfinite", "1"];
    let mut single = train_cmd(&one, &flags);
    single
        .args(["--grad-accum", "4"])
        .env("RRHF_FAULT_NAN_AT_STEP", "2");
    let (out, _) = run_within(&mut single, Duration::from_secs(300));
    ok(&out);
    let mut ranks = train_cmd(&two, &flags);
    ranks.args(["--grad-accum", "2"]);
    let mut job = under(launcher, &ranks, &[("RRHF_FAULT_NAN_AT_STEP", "2")]);
    let (out, _) = run_within(&mut job, Duration::from_secs(300));
    ok(&out);
    let skipped = |dir: &Path| -> Vec<Value> {
        metrics(dir)
            .into_iter()
            .filter(|v| v.get("nonfinite").is_some())
            .map(|v| json_pick(&v, &["step", "nonfinite", "records", "skipped_nonfinite"]))
            .collect()
    };
    let (sa, sb) = (skipped(&one), skipped(&two));
    assert_eq!(sa.len(), 1, "{sa:?}");
    assert_eq!(sa, sb, "the skipped step differs");
    let (a, b) = (train_losses(&one), train_losses(&two));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "loss {y} with 2 ranks, {x} with one"
        );
    }
}

/// The `keys` of a JSON object.
fn json_pick(v: &Value, keys: &[&str]) -> Value {
    keys.iter()
        .map(|k| (k.to_string(), v[k].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Tokens of the first logged step of a run.
fn m_tokens(dir: &Path) -> Value {
    metrics(dir)
        .into_iter()
        .find(|v| v.get("loss").is_some())
        .map(|v| v["tokens"].clone())
        .unwrap()
}

#[test]
fn grad_checkpoint_path_is_all_reduced_too() {
    // The recompute path computes gradients by its own route; the ranks must still step identically.
    let Some(launcher) = mpirun(2) else { return };
    let tmp = temp_dir();
    let dump = tmp.join("dump");
    std::fs::create_dir_all(&dump).unwrap();
    let cmd = train_cmd(&tmp.join("out"), &["--max-steps", "2", "--grad-checkpoint"]);
    let mut job = under(
        launcher,
        &cmd,
        &[("RRHF_DEBUG_GRAD_DUMP", dump.to_str().unwrap())],
    );
    let (out, _) = run_within(&mut job, Duration::from_secs(300));
    ok(&out);
    let (g0, g1) = (grad_dump(&dump, 0), grad_dump(&dump, 1));
    assert_eq!(g0.len(), 2);
    assert_eq!(g0, g1, "ranks 0 and 1 hold different gradients");
}

#[test]
fn a_killed_rank_ends_the_job_and_the_last_checkpoint_is_intact() {
    let Some(launcher) = mpirun(2) else { return };
    let tmp = temp_dir();
    let out_dir = tmp.join("out");
    let cmd = train_cmd(
        &out_dir,
        &[
            "--max-steps",
            "8",
            "--save-every",
            "2",
            "--collective-timeout-s",
            "20",
        ],
    );
    let mut job = under(launcher, &cmd, &[("RRHF_FAULT_RANK_AT_STEP", "1:4:kill")]);
    let (out, took) = run_within(&mut job, Duration::from_secs(120));
    assert!(!out.status.success(), "the job must fail when a rank dies");
    assert!(took < Duration::from_secs(100), "took {took:?}");
    let ck = out_dir.join("checkpoint-2");
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "config.json",
    ] {
        assert!(ck.join(f).exists(), "checkpoint-2/{f} must survive");
    }
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 2);
    assert!(
        !out_dir.join("checkpoint-4").exists(),
        "no checkpoint after the kill"
    );
    weights(&ck.join("model.safetensors"));

    // It resumes with the same world size and refuses another one.
    let mut resume = train_cmd(
        &out_dir,
        &["--max-steps", "8", "--save-every", "2", "--resume"],
    );
    resume.arg(&ck);
    let single = resume.output().unwrap();
    assert!(!single.status.success());
    let err = String::from_utf8_lossy(&single.stderr);
    assert!(err.contains("world size"), "{err}");
    let (out, _) = run_within(
        &mut under(mpirun(2).unwrap(), &resume, &[]),
        Duration::from_secs(300),
    );
    ok(&out);
    assert_eq!(train_losses(&out_dir).len(), 8);
}

#[test]
fn a_hung_rank_ends_the_job_within_the_collective_timeout() {
    let Some(launcher) = mpirun(2) else { return };
    let tmp = temp_dir();
    let cmd = train_cmd(
        &tmp.join("out"),
        &["--max-steps", "6", "--collective-timeout-s", "3"],
    );
    let mut job = under(launcher, &cmd, &[("RRHF_FAULT_RANK_AT_STEP", "1:3:hang")]);
    let (out, _) = run_within(&mut job, Duration::from_secs(120));
    assert!(!out.status.success(), "the job must fail when a rank hangs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not finish within --collective-timeout-s 3"),
        "{err}"
    );
}

#[test]
fn commands_without_a_parallel_version_are_refused_under_mpirun() {
    let Some(launcher) = mpirun(2) else { return };
    let mut cmd = bin();
    cmd.args(["logprobs", "--model", "x", "--text", "y"]);
    let (out, _) = run_within(&mut under(launcher, &cmd, &[]), Duration::from_secs(60));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Both ranks' messages may interleave: look for one piece of it.
    assert!(
        err.contains("does not run in parallel (world size 2"),
        "{err}"
    );
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_launcher_without_the_mpi_feature_is_refused() {
    // Every rank would otherwise train alone and write the same output directory.
    let tmp = temp_dir();
    let out = train_cmd(&tmp.join("out"), &["--max-steps", "1"])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without the `mpi` feature"), "{err}");
    assert!(!tmp.join("out").exists(), "nothing may be written");
}

/// `rrhf sample` (greedy) or `rrhf score` run by one process and by `mpirun -np 2`: the output files must be equal
/// byte for byte. `args` holds `{out}` where the output goes.
fn one_and_two_ranks(args: &[&str]) -> Option<(Vec<u8>, Vec<u8>, crate::common::TempDir)> {
    let launcher = mpirun(2)?;
    let tmp = temp_dir();
    let run = |out: &Path| -> Command {
        let mut c = bin();
        c.current_dir(crate::train::root());
        for a in args {
            c.arg(a.replace("{out}", out.to_str().unwrap()));
        }
        c
    };
    let (one, two) = (tmp.join("one.jsonl"), tmp.join("two.jsonl"));
    let (out, _) = run_within(&mut run(&one), Duration::from_secs(300));
    ok(&out);
    let (out, _) = run_within(
        &mut under(launcher, &run(&two), &[]),
        Duration::from_secs(300),
    );
    ok(&out);
    for r in 0..2 {
        assert!(
            tmp.join(format!("two.jsonl.rank{r}-of-2")).exists(),
            "rank {r} writes its part"
        );
    }
    let (a, b) = (std::fs::read(&one).unwrap(), std::fs::read(&two).unwrap());
    Some((a, b, tmp))
}

#[test]
fn sharded_greedy_sampling_equals_one_process_byte_for_byte() {
    // 64 prompts in blocks of 3: 22 blocks, the last one short.
    let args = [
        "sample",
        "--model",
        "tests/fixtures/models/llama",
        "--prompts",
        "examples/tiny/train.jsonl",
        "--output",
        "{out}",
        "--setting",
        "BP",
        "--strategy",
        "greedy",
        "--max-new-tokens",
        "6",
        "--batch-prompts",
        "3",
    ];
    let Some((a, b, tmp)) = one_and_two_ranks(&args) else {
        return;
    };
    assert_eq!(String::from_utf8_lossy(&a).lines().count(), 64);
    assert!(a == b, "the merged output differs from one process's");

    // --resume continues each rank's part: nothing is left to do, and the merged output is the same.
    let launcher = mpirun(2).unwrap();
    let mut again = bin();
    again.current_dir(crate::train::root());
    let two = tmp.join("two.jsonl");
    for a in args {
        again.arg(a.replace("{out}", two.to_str().unwrap()));
    }
    again.arg("--resume");
    let (out, _) = run_within(&mut under(launcher, &again, &[]), Duration::from_secs(300));
    ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("sampled 0 of 64 prompts (64 already in the output"),
        "{log}"
    );
    assert!(std::fs::read(&two).unwrap() == a, "resumed output differs");
}

#[test]
fn sharded_scoring_equals_one_process_byte_for_byte() {
    // 64 records in blocks of 12 (--batch-size 3): 6 blocks, the last one of 4 records.
    let args = [
        "score",
        "--data",
        "examples/tiny/train.jsonl",
        "--output",
        "{out}",
        "--reward",
        "model:tests/fixtures/score/models/llama_rm",
        "--batch-size",
        "3",
    ];
    let Some((a, b, _tmp)) = one_and_two_ranks(&args) else {
        return;
    };
    let text = String::from_utf8_lossy(&a);
    assert_eq!(text.lines().count(), 64);
    assert!(!text.contains("\"scores\":null"), "every record is scored");
    assert!(a == b, "the merged output differs from one process's");
}

/// `rrhf --version` names the features a cluster job depends on, so a launch script can check its binary.
#[test]
fn version_names_the_build_features() {
    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("rrhf "), "{text}");
    assert_eq!(text.contains("mpi"), cfg!(feature = "mpi"), "{text}");
    assert_eq!(text.contains("cuda"), cfg!(feature = "cuda"), "{text}");
    assert_eq!(text.contains("nccl"), cfg!(feature = "nccl"), "{text}");
}

/// `--zero-stage 1`: each rank keeps AdamW's state for half the parameters and the updated weights travel by
/// broadcast, so training is bit-identical to the replicated two-rank run; checkpoints hold the whole state (equal
/// to the replicated run's) and resume.
#[test]
fn zero_stage_1_shards_the_optimizer_state_and_trains_bit_identically() {
    let Some(_) = mpirun(2) else { return };
    let tmp = temp_dir();
    let flags = [FLAGS, &["--grad-accum", "2", "--save-every", "3"]].concat();
    let run = |dir: &Path, extra: &[&str]| -> Output {
        let mut cmd = train_cmd(dir, &flags);
        cmd.args(extra);
        let mut job = under(mpirun(2).unwrap(), &cmd, &[]);
        job.current_dir(crate::train::root());
        let (out, _) = run_within(&mut job, Duration::from_secs(300));
        ok(&out);
        out
    };
    let (plain, zero) = (tmp.join("plain"), tmp.join("zero"));
    run(&plain, &[]);
    let out = run(&zero, &["--zero-stage", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ZeRO-1: AdamW state sharded over 2 ranks"),
        "{err}"
    );
    assert_eq!(train_losses(&plain), train_losses(&zero));
    let exact = |a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str| {
        assert_eq!(a.len(), b.len(), "{what}: entries");
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.to_dtype(candle_core::DType::F32).unwrap();
            let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        for (name, t) in a {
            assert!(
                bits(&b[name]) == bits(t),
                "{what}: {name} differs (relative {:e})",
                rel_err(&b[name], t)
            );
        }
    };
    let final_weights = weights(&zero.join("model.safetensors"));
    exact(
        &weights(&plain.join("model.safetensors")),
        &final_weights,
        "final weights",
    );
    for ck in ["checkpoint-3", "checkpoint-6"] {
        exact(
            &weights(&plain.join(ck).join("optimizer.safetensors")),
            &weights(&zero.join(ck).join("optimizer.safetensors")),
            ck,
        );
    }
    // Resumed from checkpoint-3 with sharded state: the same final weights.
    let mut resume = train_cmd(&zero, &flags);
    resume
        .args(["--zero-stage", "1", "--resume"])
        .arg(zero.join("checkpoint-3"));
    let mut job = under(mpirun(2).unwrap(), &resume, &[]);
    job.current_dir(crate::train::root());
    let (out, _) = run_within(&mut job, Duration::from_secs(300));
    ok(&out);
    exact(
        &final_weights,
        &weights(&zero.join("model.safetensors")),
        "weights after resuming",
    );
}

/// `mpirun -np 2 rrhf iterate --setting IP`: sample and score sharded, train data parallel, eval on rank 0 — the
/// same samples and scores byte for byte, and the same trained model and report, as one process with twice the
/// gradient accumulation. OP refuses to run under a launcher.
#[test]
fn ip_iterate_under_two_ranks_equals_one_process() {
    let Some(_) = mpirun(2) else { return };
    let tmp = temp_dir();
    let fixtures = crate::common::fixtures();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let args = |out: &Path, accum: &str| -> Vec<String> {
        let model = fixtures.join("models/llama");
        let prompts = root.join("examples/tiny/prompts.jsonl");
        [
            "iterate",
            "--setting",
            "IP",
            "--iterations",
            "1",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--reward",
            "vader",
            "--output",
            out.to_str().unwrap(),
            "--strategy",
            "beam",
            "--num-responses",
            "3",
            "--max-new-tokens",
            "6",
            "--max-len",
            "128",
            "--lr",
            "1e-3",
            "--epochs",
            "1",
            "--batch-queries",
            "1",
            "--batch-prompts",
            "2",
            "--grad-accum",
            accum,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (one, two) = (tmp.join("one"), tmp.join("two"));
    let mut single = bin();
    single.args(args(&one, "2"));
    let (out, _) = run_within(&mut single, Duration::from_secs(300));
    ok(&out);
    let mut ranks = bin();
    ranks.args(args(&two, "1"));
    let (out, _) = run_within(
        &mut under(mpirun(2).unwrap(), &ranks, &[]),
        Duration::from_secs(300),
    );
    ok(&out);
    for f in ["iter-1/samples.jsonl", "iter-1/scores.jsonl"] {
        assert!(
            std::fs::read(one.join(f)).unwrap() == std::fs::read(two.join(f)).unwrap(),
            "{f} differs between one process and two ranks"
        );
    }
    let (wa, wb) = (
        weights(&one.join("iter-1/model/model.safetensors")),
        weights(&two.join("iter-1/model/model.safetensors")),
    );
    for (name, t) in &wa {
        let e = rel_err(&wb[name], t);
        assert!(e <= 1e-5, "{name}: relative difference {e:e}");
    }
    let rewards = |dir: &Path| -> Vec<f64> {
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap())
                .unwrap();
        r["rows"]
            .as_array()
            .unwrap_or_else(|| panic!("report.json: {r}"))
            .iter()
            .map(|row| row["eval"]["reward_mean"].as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    let (ra, rb) = (rewards(&one), rewards(&two));
    assert_eq!(ra.len(), 2, "iterations 0 and 1 in the report");
    for (a, b) in ra.iter().zip(&rb) {
        assert!(
            (a - b).abs() <= 1e-6,
            "held-out reward {b} with 2 ranks, {a} with one"
        );
    }

    let mut op = bin();
    op.args(args(&tmp.join("op"), "1"))
        .args(["--setting", "OP", "--resample-every", "2"]);
    let (out, _) = run_within(
        &mut under(mpirun(2).unwrap(), &op, &[]),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not run in parallel"), "{err}");
}
