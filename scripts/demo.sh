#!/usr/bin/env bash
# Main job: compress the shipped example adapters (real LoRAs on SmolLM2-135M-Instruct) into one
# shared basis per module + a core per adapter, then verify at weight and output level.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
OUT="${SOPPU_DEMO_OUT:-out/demo}"
RANK="${SOPPU_DEMO_RANK:-16}"
ADAPTERS=(examples/adapters/*/)
.venv/bin/soppu compress "${ADAPTERS[@]}" -o "$OUT/bundle" --rank "$RANK" --force
echo
.venv/bin/soppu verify "$OUT/bundle" --adapters "${ADAPTERS[@]}" --base-model smollm2 --plot "$OUT/errors.png"
