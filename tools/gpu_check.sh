#!/usr/bin/env bash
# The one script a GPU session runs: build with the CUDA kernels, test, sanitize, benchmark.
#
#   bash tools/gpu_check.sh [STAGE ...]     stages: env build test sanitize bench (default: all, in order);
#                                           test = test_cuda test_suite,
#                                           sanitize = memcheck racecheck synccheck initcheck
#
# Every stage's output is tee'd to ${OUT:-/tmp/gpu_out}/<stage>.log and a one-line verdict per stage goes
# to $OUT/summary.txt. Stages run even after an earlier one failed (except that nothing runs without a
# successful build); the exit status is non-zero if any stage but bench failed. Each step is capped at
# 560 s, so a session limited to 10-minute commands can run the stages one call at a time, e.g.
#   bash tools/gpu_check.sh env build;  bash tools/gpu_check.sh test_cuda;  bash tools/gpu_check.sh test_suite
#   bash tools/gpu_check.sh memcheck racecheck;  bash tools/gpu_check.sh synccheck initcheck bench
#
# Knobs: PYTHON (default python), MAX_JOBS (parallel compile jobs, default: all cores),
#        PYTEST_ARGS (extra pytest arguments), SANITIZER (path to compute-sanitizer).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
SUMMARY="$OUT/summary.txt"
FAILED=0

# run_stage NAME TIMEOUT_S COMMAND...: run, tee to $OUT/NAME.log, record the verdict. SOFT=1 in the
# environment records a failure without failing the script.
run_stage() {
  local name="$1" limit="$2"
  shift 2
  local start status
  start=$(date +%s)
  echo "=== [$name] $*" | tee -a "$OUT/$name.log"
  timeout --signal=INT --kill-after=30 "$limit" bash -c "$*" 2>&1 | tee -a "$OUT/$name.log"
  status=${PIPESTATUS[0]}
  local verdict="ok"
  [[ $status -ne 0 ]] && verdict="FAILED (exit $status)"
  [[ $status -eq 124 ]] && verdict="TIMED OUT after ${limit}s"
  if [[ $status -ne 0 ]]; then
    if [[ "${SOFT:-0}" == 1 ]]; then verdict="$verdict, soft"; else FAILED=1; fi
  fi
  local command="$*"
  printf '%-22s %-28s %4ss  %s\n' "$name" "$verdict" "$(( $(date +%s) - start ))" "${command:0:110}" \
    | tee -a "$SUMMARY"
  return "$status"
}

find_sanitizer() {
  if [[ -n "${SANITIZER:-}" ]]; then echo "$SANITIZER"; return; fi
  for candidate in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
      /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -n "$candidate" && -x "$candidate" ]] && { echo "$candidate"; return; }
  done
  local nvcc_dir
  nvcc_dir="$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")"
  [[ -x "$nvcc_dir/compute-sanitizer" ]] && echo "$nvcc_dir/compute-sanitizer"
}

stage_env() {
  run_stage env 120 "nvidia-smi; nvcc --version || true; $PYTHON -c 'import torch, sys; \
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'; \
$PYTHON -c 'import triton; print(\"triton\", triton.__version__)' || echo 'triton: not installed'; \
git -C '$ROOT' rev-parse HEAD 2>/dev/null; git -C '$ROOT' status --short 2>/dev/null | head -50"
}

stage_build() {
  # Editable install: builds svp_kernels/_C*.so in place, so tests importing the source tree see it.
  # --no-deps: the GPU machine has no network; torch, numpy etc. must already be installed.
  run_stage build 560 "SVP_KERNELS_FORCE_CUDA=1 $PYTHON -m pip install -v --no-build-isolation --no-deps -e . \
&& $PYTHON -c 'import svp_kernels as sk; assert sk._ops.extension_has_cuda(), \"_C built without CUDA\"; \
print(\"available backends:\", sk.available_backends())'"
}

stage_test_cuda() {
  # The CUDA kernels' own tests: the quick signal.
  run_stage test_cuda_backend 560 "$PYTHON -m pytest tests/test_cuda_backend.py -q -rs --durations=15 \
--junitxml='$OUT/test_cuda_backend.xml' ${PYTEST_ARGS:-}"
}

stage_test_suite() {
  # The whole suite: on a GPU the backend-parametrised tests pick up the cuda and triton backends by
  # themselves (Triton runs compiled, not interpreted).
  run_stage test_suite 560 "$PYTHON -m pytest tests -q -rs --durations=25 --junitxml='$OUT/test_suite.xml' \
${PYTEST_ARGS:-}"
}

# sanitize_with TOOL [EXTRA ARGS...]: tools/sanitize_cuda.py under compute-sanitizer --tool TOOL.
sanitize_with() {
  local tool="$1"
  shift
  local sanitizer
  sanitizer="$(find_sanitizer)"
  if [[ -z "$sanitizer" ]]; then
    echo "sanitize: compute-sanitizer not found (set SANITIZER=...)" | tee -a "$SUMMARY"
    FAILED=1
    return 1
  fi
  # No caching allocator: every torch allocation is a fresh cudaMalloc, so memcheck sees exact bounds and
  # initcheck sees reads of workspace that no kernel wrote. memcheck runs all four dtypes, the others the
  # two element sizes of the accumulation types (--quick).
  local script_args="--quick"
  [[ "$tool" == memcheck ]] && script_args=""
  run_stage "sanitize_$tool" 560 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$sanitizer' --tool $tool $* --error-exitcode 1 \
--print-limit 50 $PYTHON tools/sanitize_cuda.py $script_args"
}

stage_bench() {
  # The runner belongs to bench/; its flags may change, so a failure is recorded but does not fail the script.
  SOFT=1 run_stage bench 560 "$PYTHON bench/run.py --device cuda --variants cuda,triton,eager,compile"
  [[ -f bench/results/cuda.csv ]] && cp bench/results/cuda.csv "$OUT/bench_cuda.csv"
  return 0
}

stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(env build test sanitize bench)
echo "gpu_check: $(date -u +%FT%TZ) stages: ${stages[*]} -> $OUT" | tee -a "$SUMMARY"
for stage in "${stages[@]}"; do
  case "$stage" in
    env) stage_env ;;
    build) stage_build || { echo "gpu_check: build failed; see $OUT/build.log" | tee -a "$SUMMARY"; exit 1; } ;;
    test) stage_test_cuda; stage_test_suite ;;
    test_cuda) stage_test_cuda ;;
    test_suite) stage_test_suite ;;
    sanitize) for tool in memcheck racecheck synccheck initcheck; do sanitize_with "$tool"; done ;;
    memcheck) sanitize_with memcheck ;;
    racecheck) sanitize_with racecheck --racecheck-report all ;;
    synccheck) sanitize_with synccheck ;;
    initcheck) sanitize_with initcheck ;;
    bench) stage_bench ;;
    *)
      echo "gpu_check: unknown stage '$stage'" \
        "(env build test test_cuda test_suite sanitize memcheck racecheck synccheck initcheck bench)" >&2
      exit 2
      ;;
  esac
done
echo "gpu_check: done, $([[ $FAILED -eq 0 ]] && echo 'all stages ok' || echo 'SOME STAGES FAILED'); summary: $SUMMARY" \
  | tee -a "$SUMMARY"
exit "$FAILED"
