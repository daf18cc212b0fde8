#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU (CI runs this; so can anyone with nvcc):
#   1. every csrc/cuda/*.cu -> object, for sm_80 and sm_90, with -I csrc/include only (no torch header);
#   2. csrc/bindings_cuda.cpp and csrc/bindings.cpp (its SVP_WITH_CUDA parts included), syntax only, against
#      the installed torch's headers (skipped when torch is not importable).
#
#   bash tools/check_cuda.sh            # NVCC=/path/to/nvcc, CXX=g++ and JOBS=N override the defaults
#   bash tools/check_cuda.sh --emulate  # then also run the kernels on the CPU under the fiber emulator
#                                       # (tools/emulate_cuda/run_emulation.py --quick, about a minute)
#
# One line per file (ok / FAILED + the compiler output); exits non-zero if any file fails or warns.
# Objects go to a temporary directory that is removed afterwards.
set -euo pipefail
EMULATE=0
for arg in "$@"; do
  case "$arg" in
    --emulate) EMULATE=1 ;;
    *) echo "check_cuda: unknown argument '$arg' (--emulate)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
if [[ ! -x "$NVCC" ]]; then
  echo "check_cuda: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 2
fi
# The toolkit's include directory (nvcc may be a wrapper script, so look in the usual places too).
CUDA_INCLUDE=""
for dir in "${CUDA_HOME:-}/include" "$(dirname "$(readlink -f "$NVCC")")/../include" /usr/local/cuda/include; do
  if [[ -f "$dir/cuda_runtime.h" ]]; then CUDA_INCLUDE="$(cd "$dir" && pwd)"; break; fi
done

OUT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/svp_check_cuda.XXXXXX")"
trap 'rm -rf "$OUT_DIR"' EXIT

# Torch include flags for the adapter (-isystem: torch's own headers may warn; ours may not), plus Python's
# and the extension name for bindings.cpp's pybind11 module. CPU wheels ship c10/cuda but not the generated
# c10/cuda/impl/cuda_cmake_macros.h: stub it for the syntax check.
TORCH_FLAGS=""
if TORCH_INCLUDES="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null)"; then
  for dir in $TORCH_INCLUDES; do TORCH_FLAGS+=" -isystem $dir"; done
  TORCH_FLAGS+=" -isystem $("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  TORCH_FLAGS+=" -DTORCH_EXTENSION_NAME=_C"
  first="${TORCH_INCLUDES%% *}"
  if [[ ! -f "$first/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
    mkdir -p "$OUT_DIR/stub/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$OUT_DIR/stub/c10/cuda/impl/cuda_cmake_macros.h"
    TORCH_FLAGS+=" -isystem $OUT_DIR/stub"
  fi
fi

# nvcc: the -D__CUDA_NO_* / --expt-relaxed-constexpr / -fPIC flags are the ones torch's CUDAExtension adds
# to every .cu (no implicit half/bfloat16 conversions), so this check sees what setup.py's build sees.
# -Werror all-warnings turns every nvcc/ptxas warning into an error; the host compiler gets
# -Wall -Wextra -Werror. -Wno-unknown-pragmas: nvcc's host pass sees the `#pragma unroll` inside
# __host__ __device__ functions (svp/philox.h), which gcc does not know.
export NVCC CXX OUT_DIR ROOT CUDA_INCLUDE TORCH_FLAGS
compile_one() {
  local src="$1"
  local name log start status
  name="$(basename "$src")"
  log="$OUT_DIR/$name.log"
  start=$(date +%s)
  status=0
  case "$src" in
    *.cu)
      "$NVCC" -c "$src" -o "$OUT_DIR/$name.o" \
        -std=c++17 -O3 -I "$ROOT/csrc/include" \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC \
        -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror,-Wno-unknown-pragmas \
        >"$log" 2>&1 || status=$?
      ;;
    *.cpp)
      if [[ -z "$TORCH_FLAGS" || -z "$CUDA_INCLUDE" ]]; then
        echo "skipped ${src#$ROOT/}  (no torch or no cuda_runtime.h to check against)"
        return 0
      fi
      # shellcheck disable=SC2086
      "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -DSVP_WITH_CUDA $TORCH_FLAGS \
        -isystem "$CUDA_INCLUDE" -I "$ROOT/csrc" -I "$ROOT/csrc/include" "$src" >"$log" 2>&1 || status=$?
      ;;
  esac
  if [[ $status -eq 0 ]]; then
    echo "ok      ${src#$ROOT/}  ($(( $(date +%s) - start ))s)"
  else
    echo "FAILED  ${src#$ROOT/}"
    sed 's/^/        /' "$log"
    return 1
  fi
}
export -f compile_one

shopt -s nullglob
sources=("$ROOT"/csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda: no csrc/cuda/*.cu files" >&2
  exit 2
fi
sources+=("$ROOT/csrc/bindings_cuda.cpp" "$ROOT/csrc/bindings.cpp")
echo "check_cuda: $("$NVCC" --version | tail -1), sm_80 + sm_90, ${#sources[@]} file(s), $JOBS job(s)"
# Largest first, so the parallel jobs finish together.
ls -S "${sources[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one "$1"' _ {}
echo "check_cuda: all clean"
if [[ $EMULATE -eq 1 ]]; then
  "$PYTHON" "$ROOT/tools/emulate_cuda/run_emulation.py" --quick
fi
