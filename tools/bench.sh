#!/usr/bin/env bash
# Runs `rrhf bench forward` and the PyTorch reference on the same machine, one after the other, and prints the
# tokens/s ratios (rrhf / PyTorch). Needs the Python packages of tools/requirements-fixtures.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x tools/.venv/bin/python ] && PY=tools/.venv/bin/python
cargo build --release --quiet
ours=$(./target/release/rrhf bench forward "$@")
theirs=$("$PY" tools/bench_forward.py "$@")
echo "$ours"; echo; echo "$theirs"; echo
echo "ratio (rrhf tokens/s ÷ PyTorch tokens/s):"
for pass in forward forward+backward; do
  a=$(echo "$ours" | awk -v p="$pass" '$1==p {print $3}')
  b=$(echo "$theirs" | awk -v p="$pass" '$1==p {print $3}')
  awk -v p="$pass" -v a="$a" -v b="$b" 'BEGIN { printf "%-20s %6.2f×\n", p, a / b }'
done
