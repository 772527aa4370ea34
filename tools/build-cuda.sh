#!/usr/bin/env bash
# Builds `rrhf` with `--features cuda` on a machine with neither a GPU nor a system CUDA toolkit.
#
#   bash tools/build-cuda.sh            # → prints the binary's path as its last line
#   bash tools/build-cuda.sh --clippy   # instead: cargo clippy -D warnings of the CUDA-only code (lib + binary)
#
# It also leaves tools/.cuda-build/carry (rrhf.gz + lib/): what a GPU machine without Rust needs, ≈ 20 MB
# (tools/gpu_check.sh unpacks it when given no binary).
#
# What it does, and why:
# 1. Installs the CUDA compiler pieces from PyPI into tools/.cuda-venv (git-ignored): nvidia-cuda-nvcc,
#    nvidia-nvvm, nvidia-cuda-crt, nvidia-cuda-runtime and nvidia-cuda-cccl, all of ONE CUDA minor series
#    (CUDA_SERIES, default 13.0). The CUDA 12 wheels ship ptxas but no nvcc, so CUDA 13 is the oldest series pip can
#    compile with; 13.0 needs an NVIDIA driver ≥ 580 at run time, the smallest requirement of the 13.x series.
#    cudarc 0.19.10 (under candle 0.11) knows CUDA up to 13.4.
# 2. candle-core 0.11 turns on cudarc's `dynamic-linking`, which would put libcuda.so.1, libcublas, libcurand and
#    libnvrtc into the binary's DT_NEEDED: the binary would not even start on a machine without the NVIDIA driver.
#    The script builds against a copy of candle-core (in the build folder) whose only change is `dynamic-loading`
#    in that feature list, so cudarc dlopens the CUDA libraries the first time a CUDA device is opened.
# 3. candle-kernels links its statically compiled MoE kernels against `cudart`; the link folder given to rustc
#    holds only libcudart_static.a (as libcudart.a), so cudart is linked in and itself loads the driver at run time.
# The build happens in a copy of the crate (src/, Cargo.toml, Cargo.lock) under tools/.cuda-build (git-ignored), so
# the `[patch]` never touches the repository's Cargo.lock.
#
# Environment (all optional):
#   CUDA_SERIES       CUDA minor series of the PyPI wheels (default 13.0; ≤ 13.4 for cudarc 0.19.10)
#   CUDA_COMPUTE_CAP  GPU architecture the kernels are compiled for (default 80: PTX for sm_80 is JIT-compiled by
#                     the driver on every later GPU — A100, H100, H200; set 90 to compile natively for Hopper)
#   RRHF_CUDA_VENV    where the wheels go (default tools/.cuda-venv)
#   RRHF_CUDA_BUILD   build folder (default tools/.cuda-build; the target dir is inside it)
#   RRHF_CUDA_FEATURES  cargo features (default cuda; `cuda,nccl` for multi-GPU training, which also needs MPI:
#                     libopenmpi-dev, libclang-dev and clang)
#   CARGO_BUILD_JOBS  as usual
#
# At run time `--device cuda` needs the NVIDIA driver (libcuda.so.1) and CUDA 13 (or 12) libcublas, libcublasLt,
# libcurand and libnvrtc on the loader path (LD_LIBRARY_PATH), e.g. the nvidia/*/lib folders of a PyTorch install.
# Without them, and on machines without a GPU, every `--device cpu` command works as in the CPU build.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SERIES=${CUDA_SERIES:-13.0}
VENV=${RRHF_CUDA_VENV:-$ROOT/tools/.cuda-venv}
BUILD=${RRHF_CUDA_BUILD:-$ROOT/tools/.cuda-build}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
FEATURES=${RRHF_CUDA_FEATURES:-cuda}

die() { echo "build-cuda.sh: $*" >&2; exit 1; }
step() { echo "build-cuda.sh: $*" >&2; }

case "$SERIES" in
  13.[0-4]) ;;
  *) die "CUDA_SERIES=$SERIES: pip has nvcc only for CUDA 13.x and cudarc 0.19.10 knows up to 13.4; use 13.0..13.4" ;;
esac
command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain"
command -v python3 >/dev/null || die "python3 not found: needed to install the CUDA compiler wheels"
command -v g++ >/dev/null || die "g++ not found: nvcc needs a host C++ compiler (apt-get install g++)"

# 1. The CUDA compiler from PyPI.
if [[ ! -x "$VENV/bin/pip" ]]; then
  step "creating $VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
fi
step "installing CUDA $SERIES compiler wheels into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check \
  "nvidia-cuda-nvcc~=$SERIES.0" "nvidia-nvvm~=$SERIES.0" "nvidia-cuda-crt~=$SERIES.0" \
  "nvidia-cuda-runtime~=$SERIES.0" "nvidia-cuda-cccl~=$SERIES.0" \
  || die "pip install of the CUDA $SERIES wheels failed (network? PyPI reachable?)"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
MAJOR=${SERIES%%.*}
CUDA_ROOT_DIR="$SITE/nvidia/cu$MAJOR"
NVCC_BIN="$CUDA_ROOT_DIR/bin/nvcc"
[[ -x "$NVCC_BIN" ]] || die "no nvcc at $NVCC_BIN after pip install: the wheel layout changed?"
[[ -f "$CUDA_ROOT_DIR/lib/libcudart_static.a" ]] || die "no libcudart_static.a in $CUDA_ROOT_DIR/lib"
# nvcc looks for cicc in ../nvvm/bin and the CCCL headers (nv/target, cuda/std) under include/cccl.
[[ -x "$CUDA_ROOT_DIR/nvvm/bin/cicc" ]] || die "no nvvm/bin/cicc under $CUDA_ROOT_DIR (nvidia-nvvm missing?)"
"$NVCC_BIN" --version >/dev/null || die "$NVCC_BIN --version failed"
step "$("$NVCC_BIN" --version | tail -1); compute capability $CUDA_COMPUTE_CAP"

# 2. candle-core with cudarc's dynamic loading.
CANDLE_VERSION=$(grep -A1 '^name = "candle-core"$' "$ROOT/Cargo.lock" | sed -n 's/^version = "\(.*\)"$/\1/p')
[[ -n "$CANDLE_VERSION" ]] || die "candle-core not found in Cargo.lock"
(cd "$ROOT" && cargo fetch --locked >/dev/null) || die "cargo fetch failed"
CARGO_HOME_DIR=${CARGO_HOME:-$HOME/.cargo}
SRC=$(ls -d "$CARGO_HOME_DIR"/registry/src/*/"candle-core-$CANDLE_VERSION" 2>/dev/null | head -1)
[[ -d "$SRC" ]] || die "candle-core $CANDLE_VERSION sources not found under $CARGO_HOME_DIR/registry/src"
mkdir -p "$BUILD"
# Copied once per candle version (a fresh copy would make cargo rebuild candle-core every time).
if [[ "$(cat "$BUILD/candle-core.version" 2>/dev/null)" != "$CANDLE_VERSION" ]]; then
  rm -rf "$BUILD/candle-core"
  cp -r "$SRC" "$BUILD/candle-core"
  grep -q '"dynamic-linking",' "$BUILD/candle-core/Cargo.toml" \
    || die "candle-core $CANDLE_VERSION no longer asks for cudarc's dynamic-linking: revisit this script"
  sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$BUILD/candle-core/Cargo.toml"
  echo "$CANDLE_VERSION" >"$BUILD/candle-core.version"
fi
grep -q '"dynamic-loading",' "$BUILD/candle-core/Cargo.toml" || die "$BUILD/candle-core is not the patched copy; remove it"

# 3. cudart linked statically: a link folder with nothing but libcudart.a.
mkdir -p "$BUILD/link"
ln -sf "$CUDA_ROOT_DIR/lib/libcudart_static.a" "$BUILD/link/libcudart.a"

# The crate copy the build runs in (the patch rewrites its Cargo.lock, not the repository's).
mkdir -p "$BUILD/crate"
# A file whose contents differ from the previous copy gets a fresh modification time (its own may be older than
# the previous build — edited while that build ran — and cargo would call the build up to date); an unchanged file
# keeps the previous copy's, so a rerun recompiles only what changed.
rm -rf "$BUILD/crate/src.new" "$BUILD/crate/assets"
cp -a "$ROOT/src" "$BUILD/crate/src.new"
(cd "$BUILD/crate/src.new" && find . -type f) | while read -r f; do
  if cmp -s "$BUILD/crate/src.new/$f" "$BUILD/crate/src/$f" 2>/dev/null; then
    touch -r "$BUILD/crate/src/$f" "$BUILD/crate/src.new/$f"
  else
    touch "$BUILD/crate/src.new/$f"
  fi
done
rm -rf "$BUILD/crate/src"
mv "$BUILD/crate/src.new" "$BUILD/crate/src"
cp -a "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" "$BUILD/crate/"
if [[ -d "$ROOT/assets" ]]; then cp -a "$ROOT/assets" "$BUILD/crate/assets"; fi
cat >>"$BUILD/crate/Cargo.toml" <<EOF

[patch.crates-io]
candle-core = { path = "$BUILD/candle-core" }
EOF

export NVCC="$NVCC_BIN" CUDA_HOME="$CUDA_ROOT_DIR" CUDA_PATH="$CUDA_ROOT_DIR" CUDA_ROOT="$CUDA_ROOT_DIR"
export PATH="$CUDA_ROOT_DIR/bin:$PATH"
export CARGO_TARGET_DIR="$BUILD/target"
# rustc-link-search for the static cudart; -lrt/-ldl/-lpthread are what libcudart_static.a needs.
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$BUILD/link -C link-arg=-lrt -C link-arg=-ldl -C link-arg=-lpthread"
if [[ "${1:-}" == "--clippy" ]]; then
  step "cargo clippy --release --features $FEATURES --lib --bins -- -D warnings"
  (cd "$BUILD/crate" && cargo clippy --release --features "$FEATURES" --lib --bins -- -D warnings) \
    || die "cargo clippy --features $FEATURES found problems (see above)"
  step "clippy clean"
  exit 0
fi
step "cargo build --release --features $FEATURES (target $CARGO_TARGET_DIR; this takes a while)"
start=$(date +%s)
(cd "$BUILD/crate" && cargo build --release --features "$FEATURES" --bin rrhf) || die "cargo build --features $FEATURES failed (see above)"
BIN="$CARGO_TARGET_DIR/release/rrhf"
[[ -x "$BIN" ]] || die "no binary at $BIN"

# The point of steps 2 and 3: no CUDA library among the binary's dynamic dependencies.
if command -v readelf >/dev/null; then
  if readelf -d "$BIN" | grep -E 'NEEDED.*(libcuda|libcublas|libcurand|libnvrtc|libcudart|libnccl)' >&2; then
    die "$BIN still links a CUDA library dynamically (above): it would not start without the driver"
  fi
fi
"$BIN" --help >/dev/null || die "$BIN --help failed"
step "built in $(( $(date +%s) - start )) s, $(du -h "$BIN" | cut -f1)"

# 4. A bundle for a GPU machine without Rust (tools/gpu_check.sh finds it): the binary gzip'd (the device tool
#    carries at most 64 MiB; the 70 MB binary, mostly PTX text, packs to ≈ 20 MB) and the shared libraries it needs
#    beyond the C/C++ runtime (Open MPI's, for an mpi or nccl build: machines with PyTorch rarely have them). Without
#    a launcher rrhf never initialises MPI, so these libraries only have to load.
CARRY="$BUILD/carry"
rm -rf "$CARRY"
mkdir -p "$CARRY/lib"
gzip -c "$BIN" >"$CARRY/rrhf.gz"
ldd "$BIN" | awk '/=> \// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libgcc_s.so*|libstdc++.so*|ld-linux*|libpthread.so*|libdl.so*|librt.so*) ;;
    *) cp -L "$lib" "$CARRY/lib/" ;;
  esac
done
step "bundle for a machine without Rust: $CARRY ($(du -sh "$CARRY" | cut -f1); carry tools/.cuda-build/carry)"
echo "$BIN"
