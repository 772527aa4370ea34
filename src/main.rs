//! The `rrhf` command line: parse, call the library, print.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use rrhf::bench::{format_table, ForwardBench};
use rrhf::device::{DTypeSpec, DeviceSpec};
use rrhf::eval::rank::{rank, RankConfig};
use rrhf::model::load::ModelArgs;
use rrhf::model::{Input, Labels, LoadedModel};
use rrhf::sample::command::{sample, SampleConfig};
use rrhf::train::trainer::{train, TrainConfig};

#[derive(Parser)]
#[command(
    name = "rrhf",
    version,
    long_version = rrhf::LONG_VERSION,
    about = "Rank responses to align language models with human feedback (RRHF)",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the training config variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Train a policy with the RRHF loss on scored records.
    Train(TrainConfig),
    /// Score responses with a model's length-normalised log-probability p_i (the policy as a reward model).
    Rank(RankConfig),
    /// Sample k responses per prompt (the paper's BP/SP/DP/D/P settings, or an OpenAI-compatible endpoint).
    Sample(SampleConfig),
    /// Fill `scores` with a reward model, an LLM judge, VADER, a policy's p_i or the data's labels (+ KL penalty).
    Score(rrhf::score::ScoreConfig),
    /// The paper's metrics for one or more models: average reward of greedy generations, perplexity under an
    /// evaluator LM, RM accuracy of p_i, best-of-n; report.json, report.md, generations.jsonl, eval.png.
    Eval(rrhf::eval::command::EvalConfig),
    /// The paper's iterated settings: IP-n (sample → score → train → eval, n times, resumable stage by stage) and
    /// OP-k (online: re-sample with the current weights every k steps, optional KL penalty), in one command.
    Iterate(rrhf::iterate::IterateConfig),
    /// Per-token log-probabilities of a text under a model.
    Logprobs(LogprobsArgs),
    /// Convert a GGUF file (llama architecture) into a Hugging Face model directory.
    Convert(ConvertArgs),
    /// Benchmarks that print a table.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

impl Command {
    /// The subcommand's name, for messages.
    fn name(&self) -> &'static str {
        match self {
            Command::Train(_) => "train",
            Command::Rank(_) => "rank",
            Command::Sample(_) => "sample",
            Command::Score(_) => "score",
            Command::Eval(_) => "eval",
            Command::Iterate(_) => "iterate",
            Command::Logprobs(_) => "logprobs",
            Command::Convert(_) => "convert",
            Command::Bench { .. } => "bench",
        }
    }
}

#[derive(Args)]
struct LogprobsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score.
    #[arg(long, conflicts_with = "input")]
    text: Option<String>,
    /// JSONL file, one `{"text": ...}` object per line; prints one JSON line per input line.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Print one JSON line `{"ids", "logprobs", "total"}` instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output directory (Hugging Face layout).
    #[arg(long)]
    output: PathBuf,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Tokens/s of forward and forward+backward on a LLaMA of hidden 512, 8 layers, vocab 32000, batch 4×256.
    Forward {
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        #[arg(long, default_value = "f32")]
        dtype: DTypeSpec,
        /// Timed repetitions (the median is shown).
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Sequences per batch.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
    },
    /// One RRHF optimizer step: on a real model and records (`--model DIR --data FILE`: s/step, tokens/s, GFLOP/s,
    /// peak RSS, user/system time), or without them on a random LLaMA (k = 4, query 128 + 64), packed vs padded.
    Train {
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// A real model (Hugging Face directory or .gguf); needs --data.
        #[arg(long, requires = "data")]
        model: Option<PathBuf>,
        /// Scored records, tokenised as `rrhf train` does (--max-len, --max-query-len, --format ...).
        #[arg(long, requires = "model")]
        data: Option<PathBuf>,
        #[command(flatten)]
        records: rrhf::data::args::RecordArgs,
        /// Queries per step (one micro-batch).
        #[arg(long, default_value_t = 1)]
        batch_queries: usize,
        /// Untimed steps before the timed ones.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// packed or padded rows.
        #[arg(long, default_value = "packed")]
        layout: rrhf::data::batch::Layout,
        /// Print the measurement as one JSON line instead of a table.
        #[arg(long)]
        json: bool,
        /// Recompute each decoder block in backward (as `rrhf train --grad-checkpoint`).
        #[arg(long)]
        grad_checkpoint: bool,
        /// The random LLaMA (without --model): its shape and the synthetic step.
        #[command(flatten)]
        synthetic: SyntheticTrainArgs,
    },
    /// Generated tokens/s of greedy, beam and diverse beam search (KV-cached) on the forward benchmark's LLaMA.
    Generate {
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        #[arg(long, default_value = "f32")]
        dtype: DTypeSpec,
        /// Prompts per batch (random LLaMA), or with --model a prompts file (JSON lines, as `rrhf sample`).
        #[arg(long, default_value = "4")]
        prompts: String,
        /// Tokens per prompt.
        #[arg(long, default_value_t = 64)]
        prompt_len: usize,
        /// New tokens per sequence (no stop id, so every sequence has exactly this many).
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Timed repetitions (the median is shown).
        #[arg(long, default_value_t = 1)]
        iters: usize,
        /// A real model (Hugging Face dir or .gguf): decode the prompts of --prompts one at a time, stopping at
        /// its stop ids.
        #[arg(long)]
        model: Option<PathBuf>,
        /// With --model: the most new tokens per prompt.
        #[arg(long, default_value_t = 48)]
        max_new_tokens: usize,
        /// With --model: comma-separated strategies, greedy and/or beam.
        #[arg(long, default_value = "greedy,beam")]
        strategy: String,
        /// With --model: beams of beam search.
        #[arg(long, default_value_t = 4)]
        num_beams: usize,
        /// With --model: print one JSON object (rows with the generated ids, and the prompt ids).
        #[arg(long)]
        json: bool,
        /// With --model: bf16 decodes with bf16 copies of the matrices (as `rrhf sample --decode-dtype bf16`).
        #[arg(long)]
        decode_dtype: Option<DTypeSpec>,
    },
    /// Seconds per AdamW step on 45M parameters: rrhf's fused update against candle_nn's AdamW.
    Optim {
        #[arg(long, default_value_t = 3)]
        iters: usize,
    },
    /// Responses/s of reward-model scoring: the forward LLaMA with a score head, batch 16 × 256 tokens.
    Score {
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
        #[arg(long, default_value = "f32")]
        dtype: DTypeSpec,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Responses per forward.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Tokens per response (query included).
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
    },
}

/// `rrhf bench train` without --model: the random LLaMA and the synthetic records (defaults: hidden 512, 8 layers,
/// 8 heads, vocab 32000; 2 queries × k = 4, query 128 + response 64 tokens; packed and padded).
#[derive(clap::Args, Debug, Clone)]
struct SyntheticTrainArgs {
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    #[arg(long, default_value_t = 8)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Key/value heads (default: --heads).
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long, default_value_t = 1376)]
    intermediate: usize,
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Responses per query.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Queries per step.
    #[arg(long, default_value_t = 2)]
    queries: usize,
    #[arg(long, default_value_t = 128)]
    query_len: usize,
    #[arg(long, default_value_t = 64)]
    response_len: usize,
    /// Compute dtype (bf16/f16: f32 masters, as `rrhf train --dtype`).
    #[arg(long, default_value = "f32")]
    dtype: DTypeSpec,
    /// Time only this layout (default: packed and padded).
    #[arg(long)]
    only_layout: Option<rrhf::data::batch::Layout>,
}

/// Large tensor buffers stay mapped between training steps (see `rrhf::alloc`).
#[global_allocator]
static ALLOC: rrhf::alloc::CachingAlloc = rrhf::alloc::CachingAlloc::new();

/// `rrhf bench generate --model DIR --prompts FILE`.
fn bench_generate_real(
    model: &Path,
    prompts: &Path,
    device: DeviceSpec,
    dtype: DTypeSpec,
    bench: &rrhf::bench::RealGenerateBench,
    json: bool,
    decode_dtype: Option<DTypeSpec>,
) -> Result<()> {
    let dev = device.open()?;
    let mut loaded = rrhf::model::load_model(model, &dev, dtype.dtype())
        .with_context(|| format!("loading {}", model.display()))?;
    match decode_dtype {
        None | Some(DTypeSpec::F32) => {}
        Some(DTypeSpec::Bf16) => loaded.model.enable_bf16_decode()?,
        Some(DTypeSpec::F16) => anyhow::bail!("--decode-dtype takes f32 or bf16"),
    }
    let (texts, _) = rrhf::sample::prompts::read_prompts(
        prompts,
        rrhf::data::readers::InputFormat::Auto,
        rrhf::data::readers::PromptTemplate::None,
        false,
    )
    .with_context(|| format!("reading prompts from {}", prompts.display()))?;
    let tok = &loaded.tokenizer;
    let ids = texts
        .iter()
        .map(|p| tok.encode(&p.query, true))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let rows = bench.run(&loaded.model, &ids, &tok.stop_ids, tok.pad_id, &dev)?;
    if json {
        println!(
            "{}",
            json!({
                "model": model.display().to_string(),
                "prompts": ids,
                "stop_ids": tok.stop_ids,
                "pad_id": tok.pad_id,
                "max_new_tokens": bench.max_new_tokens,
                "num_beams": bench.num_beams,
                "length_penalty": 1.0,
                "early_stopping": false,
                "rows": rows,
            })
        );
        return Ok(());
    }
    println!(
        "rrhf bench generate: {} on {} ({} prompts, one at a time), at most {} new tokens, {device}, {dtype}",
        model.display(),
        prompts.display(),
        ids.len(),
        bench.max_new_tokens
    );
    println!(
        "{:<12} {:>10} {:>8} {:>12}",
        "strategy", "seconds", "tokens", "tokens/s"
    );
    for r in &rows {
        println!(
            "{:<12} {:>10.3} {:>8} {:>12.1}",
            r.name, r.seconds, r.tokens, r.tokens_per_s
        );
    }
    Ok(())
}

/// `rrhf bench train --model DIR --data FILE`.
fn bench_train_real(
    model: &Path,
    data: &Path,
    records: &rrhf::data::args::RecordArgs,
    device: DeviceSpec,
    bench: rrhf::train::bench::RealTrainBench,
    json: bool,
) -> Result<()> {
    let dev = device.open()?;
    let loaded = rrhf::model::load_model(model, &dev, candle_core::DType::F32)?;
    let prepared = rrhf::train::trainer::prepare(data, records, &loaded)?;
    let pad_id = loaded.tokenizer.pad_id;
    let r = bench.run(loaded.model, &prepared.records, pad_id, &dev)?;
    if json {
        println!("{}", r.to_json());
        return Ok(());
    }
    println!(
        "rrhf bench train: {} on {} ({} records), {} queries per step, {} layout{}, max len {}, {device}, median of {} steps",
        model.display(),
        data.display(),
        prepared.records.len(),
        bench.batch_queries,
        bench.layout,
        if bench.grad_checkpoint {
            ", gradient checkpointing"
        } else {
            ""
        },
        records.max_len,
        r.steps
    );
    println!(
        "{:>9} {:>11} {:>13} {:>9} {:>11} {:>8} {:>8} {:>12}",
        "s/step",
        "row tokens",
        "resp. tok/s",
        "GFLOP/s",
        "peak RSS",
        "user s",
        "sys s",
        "minor faults"
    );
    println!(
        "{:>9.3} {:>11.0} {:>13.1} {:>9.1} {:>9.2}GB {:>8.2} {:>8.2} {:>12.0}",
        r.step_s,
        r.row_tokens,
        r.response_tokens / r.step_s,
        r.gflops(),
        r.max_rss as f64 / 1e9,
        r.user_s,
        r.sys_s,
        r.minor_faults
    );
    Ok(())
}

fn main() {
    rrhf::tune_allocator();
    let argv = match expand_config(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(argv);
    // Under mpirun/srun this joins MPI's world (held until the end of main, which finalises it); otherwise a world
    // of one.
    let _world = match rrhf::dist::init() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let comm = rrhf::dist::world();
    // Commands with a parallel version (data-parallel training, sharded sampling and scoring, and IP-n made of
    // them; `iterate --setting OP` refuses by itself).
    let parallel_ok = matches!(
        cli.command,
        Command::Train(_) | Command::Sample(_) | Command::Score(_) | Command::Iterate(_)
    );
    let result = match parallel_ok {
        false if comm.is_parallel() => comm
            .require_single(cli.command.name())
            .map_err(anyhow::Error::from),
        _ => run(cli),
    };
    if let Err(e) = result {
        if comm.is_parallel() {
            // The other ranks may be waiting for this one in a collective: end the job on all of them.
            eprintln!("error: rank {} of {}: {e:#}", comm.rank(), comm.size());
            comm.abort(1);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(cfg) => {
            let mut args = serde_json::to_value(&cfg)?;
            args["command"] = json!("train");
            let s = train(&cfg, &args)?;
            if !rrhf::dist::world().is_root() {
                // Rank 0 reports for the job.
                return Ok(());
            }
            let skipped = if s.skipped_nonfinite > 0 {
                format!(
                    " ({} skipped for a non-finite loss or gradient)",
                    s.skipped_nonfinite
                )
            } else {
                String::new()
            };
            eprintln!(
                "trained {} steps{skipped}: final loss {:.4}, {:.0} tokens/s; model in {}",
                s.steps,
                s.final_loss,
                s.tokens_per_s,
                cfg.output.display()
            );
            Ok(())
        }
        Command::Rank(cfg) => {
            let s = rank(&cfg)?;
            match s.accuracy {
                Some(a) => println!(
                    "ranked {} records; accuracy of p on {} ordered pairs (chosen vs rejected for pairwise data): {a:.4}",
                    s.records, s.pairs
                ),
                None => println!("ranked {} records (no pairs with different rewards)", s.records),
            }
            Ok(())
        }
        Command::Sample(cfg) => {
            let s = sample(&cfg)?;
            if rrhf::dist::world().is_root() {
                eprintln!("{s}");
            }
            Ok(())
        }
        Command::Score(cfg) => Ok(rrhf::score::command::run_cli(&cfg)?),
        Command::Eval(cfg) => Ok(rrhf::eval::command::run_cli(&cfg)?),
        Command::Iterate(cfg) => Ok(rrhf::iterate::run_cli(&cfg)?),
        Command::Logprobs(a) => logprobs(a),
        Command::Convert(a) => convert(a),
        Command::Bench { which } => match which {
            BenchCommand::Forward {
                device,
                dtype,
                iters,
                batch,
                seq_len,
            } => {
                let b = ForwardBench {
                    iters,
                    batch,
                    seq_len,
                    ..ForwardBench::default()
                };
                let dev = device.open()?;
                let rows = b.run(&dev, dtype.dtype())?;
                let title = format!(
                    "rrhf bench forward: LLaMA hidden {} × {} layers, {} heads, vocab {}, batch {}×{}, {device}, {dtype}",
                    b.hidden, b.layers, b.heads, b.vocab, b.batch, b.seq_len
                );
                print!("{}", format_table(&title, &rows));
                Ok(())
            }
            BenchCommand::Train {
                device,
                iters,
                model: Some(model),
                data: Some(data),
                records,
                batch_queries,
                warmup,
                layout,
                json,
                grad_checkpoint,
                ..
            } => bench_train_real(
                &model,
                &data,
                &records,
                device,
                rrhf::train::bench::RealTrainBench {
                    batch_queries,
                    warmup,
                    steps: iters,
                    layout,
                    grad_checkpoint,
                },
                json,
            ),
            BenchCommand::Train {
                device,
                iters,
                json,
                synthetic: a,
                ..
            } => {
                let b = rrhf::train::bench::TrainBench {
                    model: ForwardBench {
                        hidden: a.hidden,
                        layers: a.layers,
                        heads: a.heads,
                        kv_heads: a.kv_heads.unwrap_or(a.heads),
                        intermediate: a.intermediate,
                        vocab: a.vocab,
                        ..ForwardBench::default()
                    },
                    queries: a.queries,
                    k: a.k,
                    query_len: a.query_len,
                    response_len: a.response_len,
                    iters,
                    dtype: a.dtype.dtype(),
                    layouts: match a.only_layout {
                        Some(l) => vec![l],
                        None => vec![
                            rrhf::data::batch::Layout::Packed,
                            rrhf::data::batch::Layout::Padded,
                        ],
                    },
                };
                let results = b.run_report(&device.open()?)?;
                if json {
                    for r in &results {
                        println!("{}", r.to_json());
                    }
                    return Ok(());
                }
                let rows: Vec<rrhf::bench::BenchRow> = results
                    .iter()
                    .map(|r| rrhf::bench::BenchRow {
                        what: format!("{} ({} tokens)", r.layout, r.row_tokens),
                        seconds: r.step_s,
                        tokens_per_s: r.response_tokens as f64 / r.step_s,
                    })
                    .collect();
                let title = format!(
                    "rrhf bench train: one optimizer step, LLaMA hidden {} × {} layers, {} heads ({} kv), vocab {}, {} queries × k = {} (query {} + response {} tokens), {device}, {}; tokens/s = response tokens",
                    b.model.hidden, b.model.layers, b.model.heads, b.model.kv_heads, b.model.vocab, b.queries, b.k, b.query_len, b.response_len, a.dtype
                );
                print!("{}", format_table(&title, &rows));
                Ok(())
            }
            BenchCommand::Generate {
                device,
                dtype,
                prompts,
                prompt_len,
                new_tokens,
                iters,
                model,
                max_new_tokens,
                strategy,
                num_beams,
                json,
                decode_dtype,
            } => {
                if let Some(model) = model {
                    let b = rrhf::bench::RealGenerateBench {
                        max_new_tokens,
                        num_beams,
                        strategies: strategy.split(',').map(|s| s.trim().to_string()).collect(),
                    };
                    return bench_generate_real(
                        &model,
                        Path::new(&prompts),
                        device,
                        dtype,
                        &b,
                        json,
                        decode_dtype,
                    );
                }
                let prompts: usize = prompts
                    .parse()
                    .with_context(|| format!("--prompts {prompts:?}: a count without --model"))?;
                let b = rrhf::bench::GenerateBench {
                    prompts,
                    prompt_len,
                    new_tokens,
                    iters,
                    ..rrhf::bench::GenerateBench::default()
                };
                let dev = device.open()?;
                let rows = b.run(&dev, dtype.dtype())?;
                let title = format!(
                    "rrhf bench generate: forward-benchmark LLaMA, {} prompts × {} tokens, {} new tokens, {device}, {dtype}",
                    b.prompts, b.prompt_len, b.new_tokens
                );
                print!("{}", format_table(&title, &rows));
                Ok(())
            }
            BenchCommand::Optim { iters } => {
                let (fused, candle) = rrhf::train::bench::bench_adamw(45_000_000, iters)?;
                println!("rrhf bench optim: AdamW step on 45M f32 parameters (CPU)");
                println!("{:<24} {:>12}", "optimizer", "s/step");
                println!("{:<24} {:>12.4}", "rrhf fused AdamW", fused);
                println!("{:<24} {:>12.4}", "candle_nn AdamW", candle);
                println!("speed-up {:.1}×", candle / fused);
                Ok(())
            }
            BenchCommand::Score {
                device,
                dtype,
                iters,
                batch,
                seq_len,
            } => Ok(rrhf::score::bench::run_cli(
                device, dtype, iters, batch, seq_len,
            )?),
        },
    }
}

/// Token ids of `text` and `logprobs[t] = log P(ids[t+1] | ids[..=t])`.
fn text_logprobs(m: &LoadedModel, device: &Device, text: &str) -> Result<(Vec<u32>, Vec<f32>)> {
    let ids = m.tokenizer.encode(text, true)?;
    if ids.len() < 2 {
        return Ok((ids, Vec::new()));
    }
    let input = Input::causal(std::slice::from_ref(&ids), m.tokenizer.pad_id, device)?;
    let labels = Labels {
        flat_positions: (0..ids.len() as u32 - 1).collect(),
        ids: ids[1..].to_vec(),
    };
    let lp: Tensor = m.model.label_logprobs(&input, &labels)?;
    Ok((ids, lp.to_vec1::<f32>()?))
}

fn logprobs(a: LogprobsArgs) -> Result<()> {
    let (m, device) = a.model.load()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if let Some(path) = &a.input {
        let f = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line =
                line.with_context(|| format!("{}:{}: cannot read line", path.display(), i + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
            let Some(text) = v.get("text").and_then(|t| t.as_str()) else {
                bail!(
                    "{}:{}: field `text` (a string) is missing",
                    path.display(),
                    i + 1
                );
            };
            let (ids, lps) = text_logprobs(&m, &device, text)?;
            writeln!(out, "{}", json_line(&ids, &lps))?;
        }
        return Ok(());
    }
    let Some(text) = &a.text else {
        bail!("give --text TEXT or --input FILE.jsonl");
    };
    let (ids, lps) = text_logprobs(&m, &device, text)?;
    if a.json {
        writeln!(out, "{}", json_line(&ids, &lps))?;
        return Ok(());
    }
    writeln!(out, "{:>6} {:>8}  {:>10}  token", "pos", "id", "logprob")?;
    for (t, id) in ids.iter().enumerate() {
        let tok = m.tokenizer.decode(&[*id], false)?;
        let lp = if t == 0 {
            "-".to_string()
        } else {
            format!("{:.4}", lps[t - 1])
        };
        writeln!(out, "{t:>6} {id:>8}  {lp:>10}  {tok:?}")?;
    }
    let total: f64 = lps.iter().map(|&x| x as f64).fold(0.0, |a, b| a + b);
    writeln!(out, "total {total:.4} over {} predicted tokens", lps.len())?;
    Ok(())
}

fn json_line(ids: &[u32], lps: &[f32]) -> String {
    let total: f64 = lps.iter().map(|&x| x as f64).fold(0.0, |a, b| a + b);
    json!({"ids": ids, "logprobs": lps, "total": total}).to_string()
}

fn convert(a: ConvertArgs) -> Result<()> {
    let (m, _) = a.model.load()?;
    save_to(&m, &a.output)?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

fn save_to(m: &LoadedModel, dir: &Path) -> Result<()> {
    rrhf::model::save::save_pretrained(dir, m.model.weights(), &m.tokenizer, &m.side, None)?;
    Ok(())
}

/// Expands `--config FILE.toml` into flags placed right after the subcommand, so flags given on the command line
/// (which come later) override the file. Keys are flag names (`max_len` or `max-len`); `true` turns a switch on.
fn expand_config(argv: Vec<String>) -> Result<Vec<String>> {
    let Some(i) = argv
        .iter()
        .position(|a| a == "--config" || a.starts_with("--config="))
    else {
        return Ok(argv);
    };
    let (path, drop) = match argv[i].strip_prefix("--config=") {
        Some(p) => (p.to_string(), 1),
        None => (
            argv.get(i + 1)
                .cloned()
                .context("--config needs a FILE.toml")?,
            2,
        ),
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{path}: cannot read the config file"))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{path}: invalid TOML"))?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        let flag = format!("--{}", key.replace('_', "-"));
        // An array repeats the flag once per element (e.g. `stop = ["Human:", "Assistant:"]`).
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            v => vec![v],
        };
        for v in values {
            match v {
                toml::Value::Boolean(true) => flags.push(flag.clone()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => flags.extend([flag.clone(), s.clone()]),
                toml::Value::Integer(n) => flags.extend([flag.clone(), n.to_string()]),
                toml::Value::Float(x) => flags.extend([flag.clone(), x.to_string()]),
                other => bail!(
                    "{path}: key `{key}`: expected a string, number, boolean or an array of them, got {}",
                    other.type_str()
                ),
            }
        }
    }
    let mut out: Vec<String> = Vec::with_capacity(argv.len() + flags.len());
    for (j, a) in argv.iter().enumerate() {
        if j >= i && j < i + drop {
            continue;
        }
        out.push(a.clone());
        // Right after the subcommand name.
        if j == 1 {
            out.append(&mut flags);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::expand_config;

    #[test]
    fn config_file_becomes_flags_after_the_subcommand() {
        let path = std::env::temp_dir().join(format!("rrhf-config-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "max_len = 64\nskip_invalid = true\nlayout = \"padded\"\nstop = [\"Human:\", \"Assistant:\"]\nquiet = false\n",
        )
        .unwrap();
        let argv: Vec<String> = [
            "rrhf",
            "sample",
            "--config",
            path.to_str().unwrap(),
            "--seed",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = expand_config(argv).unwrap();
        // toml::Table keeps keys sorted; the command line comes last so it overrides the file.
        assert_eq!(
            out,
            [
                "rrhf",
                "sample",
                "--layout",
                "padded",
                "--max-len",
                "64",
                "--skip-invalid",
                "--stop",
                "Human:",
                "--stop",
                "Assistant:",
                "--seed",
                "3"
            ]
        );
        std::fs::write(&path, "weights = { a = 1 }\n").unwrap();
        let argv = vec![
            "rrhf".into(),
            "train".into(),
            format!("--config={}", path.display()),
        ];
        let err = expand_config(argv).unwrap_err().to_string();
        assert!(err.contains("weights"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
