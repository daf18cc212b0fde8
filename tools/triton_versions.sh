#!/usr/bin/env bash
# Compile every Triton launch variant for sm_90 (no GPU needed) with each Triton the backend supports, and
# check them against bench/results/sm90-static.csv: tools/gpu_compile_check.py in one virtual environment
# per pinned version (created when missing: torch pinned as tools/install_deps.py pins it, CPU build,
# triton==VERSION from PyPI), then with the Triton of the Python that runs the suite.
#
#   bash tools/triton_versions.sh            # CI: fails on a variant that does not compile, or whose
#                                            #     registers/spills/shared memory/occupancy differ from the
#                                            #     committed rows of its version, or that spills with the
#                                            #     suite's Triton (pinned older ones: no spill beyond the
#                                            #     reviewed rows)
#   bash tools/triton_versions.sh --write    # record the rows of every version in the CSV instead
#
# SVP_TRITON_VERSIONS (default "3.5.0 3.6.0": the oldest supported, MIN_TRITON in
# svp_kernels/backends/triton/__init__.py, and torch 2.11's) and SVP_TRITON_VENVS (default
# ~/.cache/svp_kernels/venvs) override the versions and where their environments live. Cost: ≈ 1.6 GB and
# ≈ 1–3 min of pip per environment the first time; then each version's compilation (minutes: see
# bench/NOTES.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VERSIONS=${SVP_TRITON_VERSIONS:-"3.5.0 3.6.0"}
VENVS=${SVP_TRITON_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/svp_kernels/venvs}
CSV=bench/results/sm90-static.csv
MODE=--compare
if [[ "${1:-}" == "--write" ]]; then MODE=""; fi
TORCH_PIN=$("$PYTHON" -c "import sys; sys.path.insert(0, 'tools'); import install_deps; print(install_deps.TORCH_PIN)")

status=0
LOG=$(mktemp)
check() {  # check PYTHON [OPTIONS]: run gpu_compile_check.py; print its summary, failures and spills
  local rc=0 python=$1
  shift
  env -u TRITON_INTERPRET PYTHONPATH="$PWD" "$python" -W ignore tools/gpu_compile_check.py --csv "$CSV" $MODE \
    "$@" >"$LOG" 2>&1 || rc=$?
  grep -E "^FAILED|differ|spills=[1-9]" "$LOG" | head -n 20 || true
  tail -n 1 "$LOG"
  return $rc
}
for version in $VERSIONS; do
  venv="$VENVS/triton-$version"
  if ! "$venv/bin/python" -c "import torch, triton; assert triton.__version__ == '$version'" 2>/dev/null; then
    echo "creating $venv ($TORCH_PIN, triton==$version)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install -q "$TORCH_PIN" "triton==$version" numpy
  fi
  echo "== triton $version"
  # a pinned older Triton may keep the few-byte spills its rows record (bench/NOTES.md); no new ones
  if [[ -n "$MODE" ]]; then
    check "$venv/bin/python" --spills-as-recorded || status=1
  else
    check "$venv/bin/python" || true
  fi
done
echo "== the suite's triton ($PYTHON)"
check "$PYTHON" || status=1  # the suite's Triton: no spill at all
rm -f "$LOG"
exit $status
