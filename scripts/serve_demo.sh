#!/usr/bin/env bash
# Serve the demo bundle from stock vLLM through the soppu resolver: a registry and a vLLM server on
# 127.0.0.1, every example adapter asked its held-out prompts over the OpenAI API; prints task
# accuracy through vLLM next to PEFT's, and cold / warm latency per adapter (scripts/serve_demo.py).
# Whatever happens, the registry and vLLM (one process group) do not outlive this script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/setup_vllm.sh
export HF_HUB_OFFLINE=1
pgid=""
stop_all() {
  [ -n "$pgid" ] || return 0
  kill -TERM -- "-$pgid" 2>/dev/null || return 0
  for _ in $(seq 1 30); do kill -0 -- "-$pgid" 2>/dev/null || return 0; sleep 1; done
  kill -KILL -- "-$pgid" 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP
# Its own session and process group (id $!): the registry and vLLM are in it, and go with it.
setsid .venv/bin/python scripts/serve_demo.py "$@" &
pgid=$!
wait "$pgid"
