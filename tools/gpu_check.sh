#!/usr/bin/env bash
# `make gpu-check`: everything that needs a real GPU, in one command with a time limit per phase (docs/verification.md).
#   phase 1  pytest on the test files with GPU cases (the ones that skip "no CUDA device" / run the triton and
#            cuda backends on CUDA tensors when a device is visible)
#   phase 2  compute-sanitizer memcheck (cuda + triton backends) and racecheck (cuda backend only: Triton's JIT
#            under racecheck does not fit the budget) on tools/gpu_sanitize_cases.py
#   phase 3  python -m benchmarks --gpu --quick
# Logs and summary.md go to ${OUT:-gpu_check_out}. Exit status: 0 when every phase passed, 1 when one failed or
# timed out; with no CUDA device: one line saying so, a summary.md saying so, and exit 0 (nothing was checked, no
# failure: `make test` is the CPU suite). Per-phase limits (seconds) can be overridden through the environment.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT:-gpu_check_out}
T_TESTS=${GPU_CHECK_T_TESTS:-150}
T_MEMCHECK=${GPU_CHECK_T_MEMCHECK:-60}
T_RACECHECK=${GPU_CHECK_T_RACECHECK:-40}
T_BENCH=${GPU_CHECK_T_BENCH:-200}  # the benchmark's own --time-budget; its hard timeout adds 40 s
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.md"
START=$(date +%s)
FAILED=0

say() { printf '%s\n' "$*"; }
header() { say ""; say "=== gpu-check: $* ($(date -u +%H:%M:%S) UTC, $(( $(date +%s) - START )) s in) ==="; }
row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"; }

{
  say "# make gpu-check"
  say ""
  say "$(date -u '+%Y-%m-%d %H:%M:%S') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  say ""
} > "$SUMMARY"

# run_phase NAME LIMIT LOG CMD...: runs CMD under `timeout`, tees its output to LOG, records a summary row.
run_phase() {
  local name=$1 limit=$2 log=$3
  shift 3
  header "$name (limit ${limit} s)"
  say "\$ $*"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$log"
  rc=${PIPESTATUS[0]}
  local secs=$(( $(date +%s) - t0 ))
  case $rc in
    0) status="passed" ;;
    124|137) status="TIMED OUT after ${limit} s"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  say "--- $name: $status in ${secs} s (log: $OUT_DIR/$log)"
  row "$name" "$status" "$secs" "$log"
}

header "device"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  line="gpu-check: no CUDA device is visible (torch.cuda.is_available() is False) — nothing to check; the CPU suite is \`make test\`"
  say "$line"
  say "$line" >> "$SUMMARY"
  say "gpu-check: exit 0 (no GPU is not a failure); summary in $SUMMARY"
  exit 0
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$OUT_DIR/device.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "device:", torch.cuda.get_device_name(0))' \
  | tee -a "$OUT_DIR/device.txt"
{
  say "device: $(tail -n 1 "$OUT_DIR/device.txt")"
  say ""
  say "| phase | status | seconds | log |"
  say "|---|---|---|---|"
} >> "$SUMMARY"

# Phase 1: the test files with GPU cases (fused-backend parametrisations or explicit CUDA tests).
mapfile -t GPU_TESTS < <(grep -lE 'backend_params|cuda\.is_available|"cuda"' tests/test_*.py | sort)
say "GPU-relevant test files (${#GPU_TESTS[@]}): ${GPU_TESTS[*]}"
run_phase "1 pytest (GPU test files)" "$T_TESTS" pytest.log \
  "$PY" -m pytest -q -x --durations=15 -p no:cacheprovider "${GPU_TESTS[@]}"

# Phase 2: compute-sanitizer. PyTorch's caching allocator would hide out-of-bounds accesses inside its pools.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -z "$SANITIZER" ]; then
  header "2 compute-sanitizer"
  say "--- compute-sanitizer not found (PATH, /usr/local/cuda/bin): phase 2 SKIPPED"
  row "2 compute-sanitizer" "SKIPPED: compute-sanitizer not found" 0 "-"
else
  run_phase "2a memcheck (cuda, triton)" "$T_MEMCHECK" memcheck.log \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check no \
    "$PY" tools/gpu_sanitize_cases.py --backends cuda,triton
  run_phase "2b racecheck (cuda)" "$T_RACECHECK" racecheck.log \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool racecheck --error-exitcode 1 \
    "$PY" tools/gpu_sanitize_cases.py --backends cuda
fi

# Phase 3: the GPU benchmark (cells not started within its own budget are recorded as not run).
run_phase "3 benchmarks --gpu --quick" $(( T_BENCH + 40 )) bench.log \
  "$PY" -m benchmarks --gpu --quick --time-budget "$T_BENCH" --out "$OUT_DIR/bench"

TOTAL=$(( $(date +%s) - START ))
VERDICT=$([ "$FAILED" = 0 ] && echo "all phases passed" || echo "SOME PHASES FAILED")
{ say ""; say "total: ${TOTAL} s — $VERDICT"; } >> "$SUMMARY"
header "done: $VERDICT in ${TOTAL} s; summary in $SUMMARY"
exit "$FAILED"
