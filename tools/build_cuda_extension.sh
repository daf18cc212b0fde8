#!/usr/bin/env bash
# Build svp_kernels._C with the CUDA kernels (sm_90) against a CUDA build of torch, without a GPU, and run the
# CPU tests against that build — in a virtual environment of its own, never in the Python that runs the suite:
#
#   bash tools/build_cuda_extension.sh                 # the whole suite against the CUDA build
#   bash tools/build_cuda_extension.sh -k projection   # extra arguments go to pytest
#
#   SVP_CUDA_VENV=/work/venvs/cuda-torch   the environment (created when missing)
#   SVP_CUDA_TORCH=torch==2.14.1           what pip installs there (a CUDA 13 build)
#   SVP_CUDA_BUILD_DIR=/tmp/svp_cuda_build the copy of the tracked files that is built and tested
#   TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=2   the targets and the parallel compile jobs
#
# Steps, each timed: (1) the venv and its packages, (2) a copy of the tracked files (the in-tree _C of the
# suite's CPU build stays untouched: both would have the same file name), (3) `setup.py build_ext --inplace`
# with SVP_KERNELS_FORCE_CUDA=1 (setup.py finds the toolkit itself, docs/gpu.md), (4) an import check that _C
# has the CUDA kernels registered and that svp_kernels loads them, with no GPU present, (5) pytest. Exits
# non-zero when any step fails. The last lines give each step's seconds and the disk the venv and the build use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SVP_CUDA_VENV:-/work/venvs/cuda-torch}"
TORCH_REQ="${SVP_CUDA_TORCH:-torch==2.14.1}"
BUILD="${SVP_CUDA_BUILD_DIR:-${TMPDIR:-/tmp}/svp_cuda_build}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
declare -a TIMES=()
step() {  # step NAME COMMAND...: run and time one step (its status is the command's)
  local name="$1" start=$SECONDS rc=0
  shift
  echo "== $name"
  "$@" || rc=$?
  TIMES+=("$name $((SECONDS - start))s")
  return $rc
}

make_venv() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
  fi
  # numpy and pytest for the suite, ninja for parallel compiles; the [train] extras the suite imports.
  "$VENV/bin/python" -m pip install -q "$TORCH_REQ" numpy pytest ninja tqdm scikit-learn matplotlib
  "$VENV/bin/python" -c 'import torch; assert torch.version.cuda, torch.__version__; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
}

copy_tree() {
  rm -rf "$BUILD"
  mkdir -p "$BUILD"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$BUILD")
}

build() {
  (cd "$BUILD" && SVP_KERNELS_FORCE_CUDA=1 "$VENV/bin/python" setup.py -q build_ext --inplace)
}

import_check() {
  (cd "$BUILD" && PYTHONPATH="$BUILD" "$VENV/bin/python" - <<'EOF'
import glob, subprocess, torch
import svp_kernels as sk
from svp_kernels import _ops
assert _ops.extension_has_cuda(), "svp_kernels._C was built without the CUDA kernels"
for name in ("projection_forward", "projection_backward", "loss_epilogue", "cosine_gram", "dropped_projection"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"svp_kernels::{name}", "CUDA"), name
so = glob.glob("svp_kernels/_C*.so")[0]
print("import ok:", so, "- CUDA kernels registered; backends here:", sk.available_backends())
EOF
  )
}

run_tests() {
  (cd "$BUILD" && PYTHONPATH="$BUILD" TRITON_INTERPRET=1 SVP_KERNELS_REQUIRE=cpu "$VENV/bin/python" -m pytest tests -q \
     -p no:cacheprovider "$@")
}

status=0
step venv make_venv
step copy copy_tree
step build build
step import import_check
step tests run_tests "$@" || status=$?
echo "== cost"
printf '%s\n' "${TIMES[@]}"
du -sh "$VENV" "$BUILD" | sed 's/^/disk /'
exit $status
