//! The `rrhf` command line: parse, call the library, print.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use rrhf::bench::{format_table, ForwardBench};
use rrhf::device::{DTypeSpec, DeviceSpec};
use rrhf::model::{load_model, Input, Labels, LoadedModel};

#[derive(Parser)]
#[command(
    name = "rrhf",
    version,
    about = "Rank responses to align language models with human feedback (RRHF)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

/// Flags shared by every command that loads a model.
#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: DTypeSpec,
}

impl ModelArgs {
    fn load(&self) -> Result<(LoadedModel, Device)> {
        let device = self.device.open()?;
        let m = load_model(&self.model, &device, self.dtype.dtype())?;
        Ok((m, device))
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
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
    let total: f64 = lps.iter().map(|&x| x as f64).sum();
    writeln!(out, "total {total:.4} over {} predicted tokens", lps.len())?;
    Ok(())
}

fn json_line(ids: &[u32], lps: &[f32]) -> String {
    let total: f64 = lps.iter().map(|&x| x as f64).sum();
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
