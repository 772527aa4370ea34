//! Runs that used to go wrong silently: non-finite steps, reused output directories, resuming with other flags or
//! data, checkpoint replacement cut short, and inputs that failed late (issue 11), plus the final model written once.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use rrhf::fsutil::{replace_dir_with_hook, ReplaceStep};
use rrhf::model::save::safetensors_bytes;
use rrhf::model::weights::read_safetensors;
use serde_json::Value;

use crate::common::fixtures;
use crate::train::{bin, metrics, root, run_ok, scratch, train_cmd, train_losses};

/// Runs a command that must fail; its stderr.
fn run_err(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "command should have failed: {stderr}"
    );
    stderr
}

/// Whether every value of every tensor in a safetensors file is finite.
fn all_finite(path: &Path) -> bool {
    read_safetensors(path, DType::F32, &Device::Cpu)
        .unwrap()
        .values()
        .all(|t| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|x| x.is_finite())
        })
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn checkpoints(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-"))
        .collect()
}

/// Every file under `dir` with its bytes, to show a directory was left untouched.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A copy of a fixture model directory (its weights and tokenizer files, not the reference cases).
fn copy_model(name: &str, to: &Path) -> PathBuf {
    let src = fixtures().join("models").join(name);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let file = p.file_name().unwrap().to_string_lossy().into_owned();
        if !file.starts_with("cases") {
            std::fs::copy(&p, to.join(&file)).unwrap();
        }
    }
    to.to_path_buf()
}

#[test]
fn nan_step_stops_without_writing_weights() {
    let tmp = scratch("nan-stop");
    let out = tmp.join("run");
    let err = run_err(
        train_cmd(&out, &["--max-steps", "6", "--save-every", "2"])
            .env("RRHF_FAULT_NAN_AT_STEP", "3"),
    );
    assert!(
        err.contains("step 3") && err.contains("the loss is NaN"),
        "{err}"
    );
    assert!(
        err.contains("train.jsonl:"),
        "the micro-batch's records by file:line: {err}"
    );
    assert!(
        err.contains(&out.join("checkpoint-2").display().to_string()),
        "names the last good checkpoint: {err}"
    );
    assert!(err.contains("--skip-nonfinite"), "{err}");
    assert!(
        !out.join("model.safetensors").exists(),
        "no final model after a non-finite step"
    );
    assert_eq!(checkpoints(&out), vec!["checkpoint-2"]);
    assert!(all_finite(&out.join("checkpoint-2/model.safetensors")));
    let m = metrics(&out);
    assert_eq!(train_losses(&out).len(), 2, "steps 1 and 2 were taken");
    let last = m.last().unwrap();
    assert_eq!(last["step"], 3);
    assert_eq!(last["stopped"], true);
    assert!(
        last["records"].as_array().is_some_and(|r| r.len() == 4),
        "{last}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn nan_weights_stop_at_the_first_step() {
    // A real NaN (no test hook): a model whose output layer holds NaN.
    let tmp = scratch("nan-weights");
    let model = copy_model("llama", &tmp.join("model"));
    let file = model.join("model.safetensors");
    let mut w = read_safetensors(&file, DType::F32, &Device::Cpu).unwrap();
    let head = w.get("lm_head.weight").unwrap();
    let nan = (head * f64::NAN).unwrap();
    w.insert("lm_head.weight".into(), nan);
    std::fs::write(&file, safetensors_bytes(&w, None).unwrap()).unwrap();
    let out = tmp.join("run");
    let mut cmd = train_cmd(&out, &["--max-steps", "3", "--save-every", "1"]);
    // The later --model wins (clap's args_override_self).
    cmd.arg("--model").arg(&model);
    let err = run_err(&mut cmd);
    assert!(err.contains("step 1") && err.contains("NaN"), "{err}");
    assert!(err.contains("No checkpoint was written"), "{err}");
    assert!(!out.join("model.safetensors").exists());
    assert!(checkpoints(&out).is_empty());
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn skip_nonfinite_skips_the_step_and_counts_it() {
    let tmp = scratch("nan-skip");
    let out = tmp.join("run");
    run_ok(
        train_cmd(&out, &["--max-steps", "4", "--skip-nonfinite", "1"])
            .env("RRHF_FAULT_NAN_AT_STEP", "2"),
    );
    let m = metrics(&out);
    let skipped: Vec<&Value> = m.iter().filter(|v| v.get("nonfinite").is_some()).collect();
    assert_eq!(skipped.len(), 1, "{m:?}");
    assert_eq!(skipped[0]["step"], 2);
    assert_eq!(skipped[0]["skipped_nonfinite"], 1);
    assert!(
        skipped[0].get("loss").is_none(),
        "a skipped step logs no loss"
    );
    let steps: Vec<&Value> = m.iter().filter(|v| v.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 3, "steps 1, 3 and 4 were taken");
    assert_eq!(steps.last().unwrap()["skipped_nonfinite"], 1);
    assert!(all_finite(&out.join("model.safetensors")));

    // A second bad step is one more than --skip-nonfinite 1 allows.
    let out2 = tmp.join("run2");
    let err = run_err(
        train_cmd(&out2, &["--max-steps", "4", "--skip-nonfinite", "1"])
            .env("RRHF_FAULT_NAN_AT_STEP", "2,3"),
    );
    assert!(
        err.contains("step 3") && err.contains("--skip-nonfinite 1"),
        "{err}"
    );
    assert!(!out2.join("model.safetensors").exists());
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn reused_output_is_refused() {
    let tmp = scratch("reused");
    let out = tmp.join("run");
    run_ok(&mut train_cmd(
        &out,
        &["--max-steps", "2", "--save-every", "1"],
    ));
    let before = snapshot(&out);
    let err = run_err(&mut train_cmd(&out, &["--max-steps", "3"]));
    assert!(err.contains("holds a previous run"), "{err}");
    assert!(
        err.contains("--overwrite") && err.contains("--resume"),
        "{err}"
    );
    assert!(
        err.contains(&out.join("checkpoint-2").display().to_string()),
        "suggests the checkpoint to resume from: {err}"
    );
    assert!(
        snapshot(&out) == before,
        "the previous run must be left untouched"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn overwrite_clears_previous_run() {
    let tmp = scratch("overwrite");
    let out = tmp.join("run");
    run_ok(&mut train_cmd(
        &out,
        &["--max-steps", "4", "--save-every", "2"],
    ));
    assert_eq!(checkpoints(&out), vec!["checkpoint-2", "checkpoint-4"]);
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    run_ok(&mut train_cmd(&out, &["--max-steps", "1", "--overwrite"]));
    assert_eq!(
        checkpoints(&out),
        vec!["checkpoint-1"],
        "old checkpoints removed"
    );
    assert_eq!(train_losses(&out).len(), 1, "metrics of the new run only");
    let args: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("args.json")).unwrap()).unwrap();
    assert_eq!(args["max_steps"], 1);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine",
        "files that are not the run's stay"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn overwrite_never_clears_the_model_being_trained() {
    let tmp = scratch("overwrite-model");
    let model = copy_model("llama", &tmp.join("model"));
    let before = snapshot(&model);
    let mut cmd = train_cmd(&model, &["--max-steps", "1", "--overwrite"]);
    cmd.arg("--model").arg(&model);
    let err = run_err(&mut cmd);
    assert!(err.contains("would delete the --model"), "{err}");
    assert!(
        snapshot(&model) == before,
        "the input model is left as it was"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn resume_refuses_changed_batch() {
    let tmp = scratch("resume-flags");
    let out = tmp.join("run");
    run_ok(&mut train_cmd(
        &out,
        &["--max-steps", "4", "--save-every", "2"],
    ));
    let ck = out.join("checkpoint-2");
    let before = snapshot(&out);
    for (flag, value, then) in [
        ("--batch-queries", "2", "4"),
        ("--grad-accum", "1", "2"),
        ("--max-len", "48", "64"),
        ("--margin", "0.5", "0.0"),
        ("--sft-reduction", "sum", "mean"),
    ] {
        let err = run_err(
            train_cmd(
                &out,
                &["--max-steps", "4", "--save-every", "2", flag, value],
            )
            .arg("--resume")
            .arg(&ck),
        );
        assert!(
            err.contains(&format!("{flag} was {then}")) && err.contains(&format!("is {value} now")),
            "{flag}: {err}"
        );
    }
    // Without --max-steps a changed batch also changes the step count; the flag is still what is named.
    let err = run_err(
        train_cmd(&out, &["--save-every", "2", "--batch-queries", "2"])
            .arg("--resume")
            .arg(&ck),
    );
    assert!(err.contains("--batch-queries was 4"), "{err}");
    assert!(snapshot(&out) == before, "a refused resume writes nothing");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn resume_refuses_changed_data() {
    let tmp = scratch("resume-data");
    let data = tmp.join("train.jsonl");
    let text = std::fs::read_to_string(root().join("examples/tiny/train.jsonl")).unwrap();
    std::fs::write(&data, &text).unwrap();
    let out = tmp.join("run");
    let cmd = |out: &Path| {
        let mut c = train_cmd(out, &["--max-steps", "4", "--save-every", "2"]);
        c.arg("--data").arg(&data);
        c
    };
    run_ok(&mut cmd(&out));
    // Same number of records, one score changed.
    std::fs::write(
        &data,
        text.replacen("[2.0, 3.0, 1.0, 0.0]", "[3.0, 2.0, 1.0, 0.0]", 1),
    )
    .unwrap();
    let err = run_err(cmd(&out).arg("--resume").arg(out.join("checkpoint-2")));
    assert!(err.contains("--data content was crc32"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The files of a fake checkpoint holding `tag`.
fn fake_checkpoint(dir: &Path, tag: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        std::fs::write(dir.join(f), format!("{tag}:{f}")).unwrap();
    }
}

/// The directories under `parent` that hold a complete checkpoint with `tag`.
fn complete_copies(parent: &Path, tag: &str) -> Vec<String> {
    names(parent)
        .into_iter()
        .filter(|n| {
            let d = parent.join(n);
            [
                "model.safetensors",
                "optimizer.safetensors",
                "trainer_state.json",
            ]
            .iter()
            .all(|f| std::fs::read_to_string(d.join(f)).ok() == Some(format!("{tag}:{f}")))
        })
        .collect()
}

#[test]
fn checkpoint_replace_survives_kill() {
    for kill_at in [
        ReplaceStep::MoveOldAside,
        ReplaceStep::MoveNewIn,
        ReplaceStep::RemoveOld,
    ] {
        let tmp = scratch(&format!("replace-{kill_at:?}"));
        let dest = tmp.join("checkpoint-6");
        let new = tmp.join(".checkpoint-6.tmp");
        fake_checkpoint(&dest, "old");
        fake_checkpoint(&new, "new");
        // A panic stops the swap exactly there, without any clean-up code running, as a kill would.
        let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            replace_dir_with_hook(&new, &dest, |step| {
                if step == kill_at {
                    panic!("killed before {step:?}");
                }
                Ok(())
            })
        }));
        assert!(killed.is_err());
        assert_eq!(
            complete_copies(&tmp, "old").len(),
            1,
            "killed before {kill_at:?}: the old checkpoint must survive complete: {:?}",
            names(&tmp)
        );
        assert_eq!(
            complete_copies(&tmp, "new").len(),
            1,
            "killed before {kill_at:?}: the new checkpoint must survive complete: {:?}",
            names(&tmp)
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
    // Uninterrupted: the new one under the name, nothing else left.
    let tmp = scratch("replace-done");
    let dest = tmp.join("checkpoint-6");
    let new = tmp.join(".checkpoint-6.tmp");
    fake_checkpoint(&dest, "old");
    fake_checkpoint(&new, "new");
    rrhf::fsutil::replace_dir(&new, &dest).unwrap();
    assert_eq!(complete_copies(&tmp, "new"), vec!["checkpoint-6"]);
    assert_eq!(names(&tmp), vec!["checkpoint-6"]);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn resumed_run_replaces_its_checkpoints_and_prunes_stale_ones() {
    let tmp = scratch("resume-prune");
    let out = tmp.join("run");
    run_ok(&mut train_cmd(
        &out,
        &["--max-steps", "6", "--save-every", "2"],
    ));
    assert_eq!(
        checkpoints(&out),
        vec!["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    );
    let full = std::fs::read(out.join("model.safetensors")).unwrap();
    // Resume from 2 keeping one checkpoint: the rewritten 4 must not be pruned in favour of the stale 6.
    run_ok(
        train_cmd(
            &out,
            &[
                "--max-steps",
                "6",
                "--save-every",
                "2",
                "--save-total-limit",
                "1",
            ],
        )
        .arg("--resume")
        .arg(out.join("checkpoint-2")),
    );
    assert_eq!(checkpoints(&out), vec!["checkpoint-6"]);
    assert!(
        names(&out).iter().all(|n| !n.starts_with('.')),
        "no temporary or aside copies left: {:?}",
        names(&out)
    );
    assert!(std::fs::read(out.join("model.safetensors")).unwrap() == full);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn final_model_is_a_link_to_the_last_checkpoint() {
    let tmp = scratch("link");
    let out = tmp.join("run");
    run_ok(&mut train_cmd(&out, &["--max-steps", "2"]));
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        let a = std::fs::read(out.join(f)).unwrap();
        let b = std::fs::read(out.join("checkpoint-2").join(f)).unwrap();
        assert!(a == b, "{f} differs from the checkpoint's");
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let ia = std::fs::metadata(out.join(f)).unwrap().ino();
            let ib = std::fs::metadata(out.join("checkpoint-2").join(f))
                .unwrap()
                .ino();
            assert_eq!(ia, ib, "{f} is written once and linked");
        }
    }
    // With another --save-dtype the final model is its own file.
    let out2 = tmp.join("bf16");
    run_ok(&mut train_cmd(
        &out2,
        &["--max-steps", "1", "--save-dtype", "bf16"],
    ));
    let w = read_safetensors(&out2.join("model.safetensors"), DType::BF16, &Device::Cpu).unwrap();
    let raw = std::fs::read(out2.join("model.safetensors")).unwrap();
    assert!(raw.windows(6).any(|x| x == b"\"BF16\""), "saved as bf16");
    assert!(!w.is_empty());
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn max_len_beyond_model_positions_is_refused() {
    let tmp = scratch("maxlen");
    for (model, max_len, field) in [
        ("gpt2", "65", "n_positions = 64"),
        ("llama", "129", "max_position_embeddings = 128"),
    ] {
        let out = tmp.join(model);
        let mut cmd = train_cmd(&out, &["--max-steps", "1", "--max-len", max_len]);
        cmd.arg("--model")
            .arg(fixtures().join("models").join(model));
        let err = run_err(&mut cmd);
        assert!(
            err.contains(&format!("--max-len {max_len}")) && err.contains(field),
            "{err}"
        );
        assert!(!out.exists(), "nothing may be written");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn rank_and_policy_score_refuse_max_len_beyond_gpt2_positions() {
    let tmp = scratch("maxlen-rank");
    // A record longer than the fixture GPT-2's 64 positions: before the check this failed deep in the embedding.
    let data = tmp.join("long.jsonl");
    let query = "Human: tell me a long story about the sea and the ships ".repeat(8);
    let rec = serde_json::json!({"query": query, "responses": [" once upon a time", " no"], "scores": [1.0, 0.0]});
    std::fs::write(&data, format!("{rec}\n")).unwrap();
    let model = fixtures().join("models").join("gpt2");
    let rank_out = tmp.join("rank.jsonl");
    let score_out = tmp.join("score.jsonl");
    let reward = format!("policy:{}", model.display());
    for (cmd, out) in [
        (
            bin()
                .args(["rank", "--model"])
                .arg(&model)
                .arg("--data")
                .arg(&data)
                .arg("--output")
                .arg(&rank_out)
                .args(["--max-len", "512"]),
            &rank_out,
        ),
        (
            bin()
                .args(["score", "--reward", &reward, "--data"])
                .arg(&data)
                .arg("--output")
                .arg(&score_out)
                .args(["--max-len", "512"]),
            &score_out,
        ),
    ] {
        let err = run_err(cmd);
        assert!(
            err.contains("n_positions") && err.contains("--max-len 64 or less"),
            "{err}"
        );
        assert!(!out.exists(), "nothing may be written");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn empty_query_with_bosless_tokenizer_is_refused_with_its_line() {
    let tmp = scratch("empty-query");
    let model = copy_model("gpt2", &tmp.join("model"));
    // The same tokenizer without its BOS-adding post-processor.
    let tok_path = model.join("tokenizer.json");
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    tok["post_processor"] = Value::Null;
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let data = tmp.join("d.jsonl");
    std::fs::write(
        &data,
        "{\"query\": \"Hi\", \"responses\": [\"a\", \"b\"], \"scores\": [1.0, 0.0]}\n\
         {\"query\": \"\", \"responses\": [\"a\", \"b\"], \"scores\": [1.0, 0.0]}\n",
    )
    .unwrap();
    let out = tmp.join("run");
    let err = run_err(
        bin()
            .args(["train", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(&out)
            .args(["--max-len", "32", "--max-steps", "1"]),
    );
    assert!(
        err.contains("d.jsonl:2") && err.contains("zero tokens"),
        "{err}"
    );
    assert!(!out.exists(), "nothing may be written");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A `torch.save` zip archive holding one tensor `w` of `storage` (`FloatStorage`, `DoubleStorage`) whose pickle
/// claims shape `dims`, with `data` as its storage bytes (pickle protocol 2, as torch writes it).
fn torch_zip(path: &Path, storage: &str, dims: &[i32], data: &[u8]) {
    fn int(p: &mut Vec<u8>, v: i32) {
        p.push(b'J');
        p.extend(v.to_le_bytes());
    }
    fn text(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    }
    let mut p = vec![0x80, 2, b'}', b'('];
    text(&mut p, "w");
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    // The storage's persistent id: ("storage", FloatStorage, key, location, numel).
    p.push(b'(');
    text(&mut p, "storage");
    p.extend(format!("ctorch\n{storage}\n").as_bytes());
    text(&mut p, "0");
    text(&mut p, "cpu");
    int(&mut p, (data.len() / 4) as i32);
    p.extend(b"tQ");
    int(&mut p, 0);
    p.push(b'(');
    for &d in dims {
        int(&mut p, d);
    }
    p.extend(b"t(");
    let mut stride = 1i32;
    let mut strides = Vec::new();
    for &d in dims.iter().rev() {
        strides.push(stride);
        stride = stride.wrapping_mul(d);
    }
    for s in strides.into_iter().rev() {
        int(&mut p, s);
    }
    p.push(b't');
    p.push(0x89);
    p.extend(b"ccollections\nOrderedDict\n)RtRu.");
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(&p).unwrap();
    z.start_file("archive/data/0", opts).unwrap();
    z.write_all(data).unwrap();
    z.finish().unwrap();
}

#[test]
fn corrupt_pt_shapes_are_checked_against_the_file_size() {
    use rrhf::model::reward::read_pickle;
    let tmp = scratch("pt");
    let data: Vec<u8> = [1f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    // The hand-written pickle is what torch writes: a well-formed one reads back.
    let good = tmp.join("good.pt");
    torch_zip(&good, "FloatStorage", &[2, 2], &data);
    let t = read_pickle(&good, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        t["w"].to_vec2::<f32>().unwrap(),
        vec![vec![1.0, 2.0], vec![3.0, 4.0]]
    );
    // A header promising 2^40 floats (4 TiB) over 16 bytes of data: refused, nothing of that size allocated.
    let huge = tmp.join("huge.pt");
    torch_zip(&huge, "FloatStorage", &[1 << 20, 1 << 20], &data);
    let err = read_pickle(&huge, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt") && err.contains("`w`"), "{err}");
    // One whose byte count overflows 64 bits when multiplied out ((2^31 − 1)^2 doubles).
    let overflow = tmp.join("overflow.pt");
    torch_zip(&overflow, "DoubleStorage", &[i32::MAX, i32::MAX], &data);
    let err = read_pickle(&overflow, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
