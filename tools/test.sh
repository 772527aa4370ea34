#!/usr/bin/env bash
# The test suite (README's test command; `.ci/run` runs it after installing Open MPI).
#
#   bash tools/test.sh [cargo test arguments...]
#
# One release build. Where Open MPI and libclang are installed (Debian: libopenmpi-dev openmpi-bin libclang-dev
# clang), it has the `mpi` feature, so the data-parallel tests (tests/it/dist.rs) launch `mpirun -np 2`; elsewhere
# the build has the default features and those tests skip, each saying why.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
have_libclang() {
  [[ -n "${LIBCLANG_PATH:-}" ]] && return 0
  compgen -G "/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null || compgen -G "/usr/lib/*/libclang*.so*" >/dev/null
}
features=()
if command -v mpicc >/dev/null && command -v mpirun >/dev/null && have_libclang; then
  features=(--features mpi)
else
  echo "tools/test.sh: Open MPI (mpicc, mpirun) or libclang not found: testing without the mpi feature; the" \
    "data-parallel tests will skip" >&2
fi
exec cargo test --release "${features[@]}" "$@"
