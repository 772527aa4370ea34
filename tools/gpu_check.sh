#!/usr/bin/env bash
# The device check of a CUDA build of rrhf, for a machine with an NVIDIA GPU, its driver, and PyTorch (for the CUDA
# libraries), but no Rust toolchain and no network. Carry the binary from tools/build-cuda.sh and this checkout
# (the fixtures in tests/fixtures and examples/tiny), then:
#
#   bash tools/gpu_check.sh [PATH/TO/rrhf]        # default: $RRHF_BIN, else tools/.cuda-build/target/release/rrhf,
#                                                 # else the bundle tools/.cuda-build/carry (carry that folder)
#
# 1. One RRHF training step on the tiny fixture LLaMA on the GPU (f32 and bf16) against the same step on the CPU
#    in f32: loss and gradient norm (from metrics.jsonl of `rrhf train --max-steps 1`) within relative 1e-4 (f32)
#    and 1e-2 (bf16).
# 2. `rrhf bench train` on a 1.1B-parameter random LLaMA (hidden 2048, 16 layers, 32 heads / 8 KV heads,
#    intermediate 8192, vocab 32000; one query of 256 tokens + k = 6 responses of 256: max length 512, packed) in
#    bf16 with f32 masters: response and row tokens/s, peak GPU memory (nvidia-smi), and model FLOPs utilisation
#    (6·N·tokens + 12·layers·hidden·visible attention pairs per step, over the measured step time, against the GPU's
#    dense bf16 peak from the table below; GPU_PEAK_TFLOPS overrides it).
# 3. `rrhf bench generate` in bf16: generated tokens/s.
# 4. A `cuda,nccl` build (tools/build-cuda.sh with RRHF_CUDA_FEATURES=cuda,nccl): the f32 step of stage 1 with its
#    gradients all-reduced through a one-rank NCCL communicator (RRHF_NCCL_WORLD_OF_ONE=1) must equal the plain step
#    (relative 1e-6; the sum over one rank is a copy); where the machine has two GPUs and mpirun, `mpirun -np 2` (one rank per GPU, --grad-accum 1) must
#    match one process with --grad-accum 2 (loss and grad norm within 1e-5). Skipped for other builds.
# A `cuda,nccl` binary links Open MPI's libmpi.so.40: the machine needs Open MPI's libraries (libopenmpi3) to start it.
# Under 8 minutes in all: every stage runs under `timeout`. Any failure stops the script with a message naming the
# stage; the last line is "gpu_check: PASSED" only when every check passed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-${RRHF_BIN:-$ROOT/tools/.cuda-build/target/release/rrhf}}
GPU=${GPU_INDEX:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rrhf-gpu-check.XXXXXX")
CARRY="$ROOT/tools/.cuda-build/carry"
# The bundle tools/build-cuda.sh leaves for a machine without Rust: the binary gzip'd and the libraries it needs.
if [[ $# -eq 0 && -z "${RRHF_BIN:-}" && ! -x "$BIN" && -f "$CARRY/rrhf.gz" ]]; then
  BIN="$WORK/rrhf"
  gunzip -c "$CARRY/rrhf.gz" >"$BIN"
  chmod +x "$BIN"
  export LD_LIBRARY_PATH="$CARRY/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
START=$SECONDS

die() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
say() { echo "gpu_check: $*"; }
trap 'rc=$?; [[ $rc -ne 0 ]] && echo "gpu_check: FAILED (exit $rc) after $((SECONDS - START)) s; files in $WORK" >&2' EXIT

# --- prerequisites -------------------------------------------------------------------------------------------------
[[ -x "$BIN" ]] || die "no rrhf binary at $BIN (build it with tools/build-cuda.sh and pass its path)"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this machine"
command -v python3 >/dev/null || die "python3 not found (needed to read the JSON outputs)"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader -i "$GPU" 2>/dev/null | head -1) \
  || die "nvidia-smi cannot query GPU $GPU"
[[ -n "$GPU_NAME" ]] || die "nvidia-smi lists no GPU $GPU"
MODEL="$ROOT/tests/fixtures/models/llama"
DATA="$ROOT/examples/tiny/train.jsonl"
[[ -f "$MODEL/model.safetensors" && -f "$DATA" ]] || die "fixtures missing under $ROOT (carry the checkout, not only the binary)"

# The CUDA build loads libcublas, libcublasLt, libcurand and libnvrtc (CUDA 13 or 12) at run time: take them from
# PyTorch's nvidia-* wheels, and from a system CUDA when there is one.
LIBS=$(python3 - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()])
try:
    import torch
    roots.add(os.path.dirname(os.path.dirname(torch.__file__)))
except Exception:
    pass
dirs = []
for r in roots:
    dirs += glob.glob(os.path.join(r, "nvidia", "*", "lib"))
    dirs += glob.glob(os.path.join(r, "torch", "lib"))
print(":".join(sorted(set(d for d in dirs if os.path.isdir(d)))))
EOF
)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [[ -d $d ]] && LIBS="$LIBS:$d"; done
export LD_LIBRARY_PATH="${LIBS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "GPU $GPU: $GPU_NAME; binary $BIN; work dir $WORK"

# --- 0. the CUDA device opens --------------------------------------------------------------------------------------
timeout 60 "$BIN" logprobs --device "cuda:$GPU" --model "$MODEL" --text "Hello world" >"$WORK/logprobs.txt" 2>&1 \
  || { cat "$WORK/logprobs.txt" >&2; die "stage 0: rrhf logprobs --device cuda:$GPU failed (output above): are the CUDA libraries on LD_LIBRARY_PATH=$LD_LIBRARY_PATH?"; }
say "stage 0: cuda:$GPU opens; logprobs ran"

# --- 1. one training step, GPU against CPU f32 -----------------------------------------------------------------------
one_step() { # device dtype [name [grad-accum [launcher...]]] → prints "loss grad_norm"
  local dev=$1 dt=$2 out="$WORK/step-${3:-$1-$2}" accum=${4:-2}
  shift $(( $# < 4 ? $# : 4 ))
  timeout 120 "$@" "$BIN" train --model "$MODEL" --data "$DATA" --output "$out" --lr 2e-5 --batch-queries 4 \
    --grad-accum "$accum" --max-len 64 --seed 3 --max-steps 1 --device "$dev" --dtype "$dt" >"$out.log" 2>&1 \
    || { cat "$out.log" >&2; die "rrhf train --max-steps 1 --device $dev --dtype $dt ${*:+under $*} failed (output above)"; }
  python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).readline()); print(d["loss"], d["grad_norm"])' \
    "$out/metrics.jsonl" || die "no loss/grad_norm in $out/metrics.jsonl"
}
# (Each result is captured before `read`: a failure inside $(...) must stop the script, not feed `read` nothing.)
R=$(one_step cpu f32) || exit 1
read -r CPU_LOSS CPU_NORM <<<"$R"
say "stage 1: CPU f32 step: loss $CPU_LOSS, grad norm $CPU_NORM"
for spec in "f32 1e-4" "bf16 1e-2"; do
  read -r DT TOL <<<"$spec"
  R=$(one_step "cuda:$GPU" "$DT") || exit 1
  read -r LOSS NORM <<<"$R"
  [[ $DT == f32 ]] && GPU_F32="$LOSS $NORM"
  python3 - "$DT" "$TOL" "$CPU_LOSS" "$LOSS" "$CPU_NORM" "$NORM" <<'EOF' || die "stage 1: GPU $DT step differs from the CPU f32 step (above)"
import sys
dt, tol = sys.argv[1], float(sys.argv[2])
cl, gl, cn, gn = map(float, sys.argv[3:7])
el, en = abs(gl - cl) / abs(cl), abs(gn - cn) / abs(cn)
print(f"gpu_check: stage 1: GPU {dt} step: loss {gl:.6f} (rel err {el:.2e}), grad norm {gn:.6f} (rel err {en:.2e}); bound {tol:g}")
ok = el <= tol and en <= tol
if not ok:
    print(f"gpu_check: stage 1: {dt}: relative error above {tol:g}", file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
done

# --- 2. training throughput on a 1.1B LLaMA in bf16 -------------------------------------------------------------------
case "$GPU_NAME" in
  *H200*|*H100*SXM*|*H100*HBM3*|*GH200*) PEAK=989 ;;
  *H100*PCIe*|*H100*) PEAK=756 ;;
  *H800*) PEAK=989 ;;
  *B200*) PEAK=2250 ;;
  *A100*|*A800*) PEAK=312 ;;
  *L40S*) PEAK=362 ;;
  *L40*) PEAK=181 ;;
  *L4*) PEAK=121 ;;
  *A10G*|*A10*) PEAK=125 ;;
  *4090*) PEAK=165 ;;
  *) PEAK="" ;;
esac
PEAK=${GPU_PEAK_TFLOPS:-$PEAK}
BENCH_ARGS=(bench train --device "cuda:$GPU" --dtype bf16 --hidden 2048 --layers 16 --heads 32 --kv-heads 8
  --intermediate 8192 --vocab 32000 --k 6 --queries 1 --query-len 256 --response-len 256 --only-layout packed
  --iters 3 --json)
BASE_MEM=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU" | head -1)
(while sleep 0.2; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU" | head -1; done) \
  >"$WORK/mem.txt" 2>/dev/null &
MEM_PID=$!
set +e
timeout 240 "$BIN" "${BENCH_ARGS[@]}" >"$WORK/bench_train.json" 2>"$WORK/bench_train.log"
RC=$?
set -e
kill "$MEM_PID" 2>/dev/null || true
wait "$MEM_PID" 2>/dev/null || true
if [[ $RC -ne 0 ]]; then
  cat "$WORK/bench_train.log" >&2
  [[ $RC -eq 124 ]] && die "stage 2: rrhf bench train ran past 240 s"
  die "stage 2: rrhf ${BENCH_ARGS[*]} failed (exit $RC, output above)"
fi
python3 - "$WORK/bench_train.json" "$WORK/mem.txt" "$BASE_MEM" "${PEAK:-0}" "$GPU_NAME" <<'EOF' || die "stage 2: could not read the benchmark output"
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
mem = [int(x) for x in open(sys.argv[2]).read().split() if x.strip().isdigit()]
base, peak, name = int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
tflops = r["model_flops_per_step"] / r["step_s"] / 1e12
print(f"gpu_check: stage 2: bench train, 1.1B LLaMA bf16 ({r['compute_params']/1e9:.2f}B params in matmuls), "
      f"1 query x k=6, {r['row_tokens']} packed tokens per step: {r['step_s']:.3f} s/step, "
      f"{r['response_tokens_per_s']:.0f} response tokens/s, {r['row_tokens_per_s']:.0f} row tokens/s")
if mem:
    print(f"gpu_check: stage 2: peak GPU memory {max(mem)} MiB ({max(mem) - base} MiB above the {base} MiB in use before)")
else:
    print("gpu_check: stage 2: peak GPU memory: no nvidia-smi sample")
if peak > 0:
    print(f"gpu_check: stage 2: model FLOP/s {tflops:.1f} TFLOP/s = MFU {100 * tflops / peak:.1f} % of {name}'s {peak:g} TFLOP/s dense bf16")
else:
    print(f"gpu_check: stage 2: model FLOP/s {tflops:.1f} TFLOP/s; MFU unknown: no peak for {name!r} in the table (set GPU_PEAK_TFLOPS)")
EOF

# --- 3. generation throughput ---------------------------------------------------------------------------------------
timeout 120 "$BIN" bench generate --device "cuda:$GPU" --dtype bf16 >"$WORK/bench_generate.txt" 2>&1 \
  || { cat "$WORK/bench_generate.txt" >&2; die "stage 3: rrhf bench generate --device cuda:$GPU failed (output above)"; }
sed 's/^/gpu_check: stage 3: /' "$WORK/bench_generate.txt"

# --- 4. NCCL ---------------------------------------------------------------------------------------------------------
same_step() { # label tolerance "loss norm" "loss norm"
  python3 - "$@" <<'EOF'
import sys
label, tol = sys.argv[1], float(sys.argv[2])
a, b = [list(map(float, x.split())) for x in sys.argv[3:5]]
err = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"gpu_check: stage 4: {label}: loss, grad norm {b} vs {a}: rel err {err:.1e} (bound {tol:g})")
sys.exit(0 if err <= tol else 1)
EOF
}
if "$BIN" --version | grep -q nccl; then
  # A one-rank sum is a copy: any difference beyond the GPU's own run-to-run noise is a bug in the NCCL path.
  R=$(RRHF_NCCL_WORLD_OF_ONE=1 one_step "cuda:$GPU" f32 nccl-1) || exit 1
  same_step "one-rank NCCL all-reduce vs the plain GPU f32 step" 1e-6 "$GPU_F32" "$R" \
    || die "stage 4: the step through a one-rank NCCL all-reduce differs from the plain GPU step"
  NGPU=$(nvidia-smi --list-gpus | wc -l)
  if [[ $NGPU -ge 2 ]] && command -v mpirun >/dev/null; then
    ROOT_FLAG=(); [[ $(id -u) -eq 0 ]] && ROOT_FLAG=(--allow-run-as-root)
    R1=$(one_step cuda f32 nccl-one-accum2 2) || exit 1
    R2=$(one_step cuda f32 nccl-two-ranks 1 mpirun -np 2 "${ROOT_FLAG[@]}" -x LD_LIBRARY_PATH) || exit 1
    same_step "2 ranks x grad-accum 1 (NCCL) vs 1 process x grad-accum 2" 1e-5 "$R1" "$R2" \
      || die "stage 4: two NCCL ranks differ from one process with twice the accumulation"
  else
    say "stage 4: two-rank NCCL step skipped: $NGPU GPU(s)$(command -v mpirun >/dev/null || echo ', no mpirun')"
  fi
else
  say "stage 4: skipped: $BIN is not a cuda,nccl build ($("$BIN" --version))"
fi

say "done in $((SECONDS - START)) s"
say "PASSED"
