#!/usr/bin/env bash
# `make demo`: bring the local stack up in .demo/, run the examples, bring it down again.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${GC_HOME:-}" ]; then
  # The demo's own state: start afresh, so an older registry schema never gets in the way.
  export GC_HOME=$here/.demo
  rm -rf "$GC_HOME"
fi
export GC_REGISTRY_URL=${GC_REGISTRY_URL:-http://127.0.0.1:8765}
# An endpoint the demo configures is deleted afterwards, queues and all; one that was there
# before stays.
down_flag=""
if [ ! -f "$GC_HOME/endpoints/${GC_DEMO_ENDPOINT:-demo}/config.yaml" ]; then
  down_flag=--delete-endpoint
fi
trap 'bash "$here/deploy/local-stack.sh" down $down_flag' EXIT
endpoint_id=$(bash "$here/deploy/local-stack.sh" up | tail -n 1)
echo "endpoint: $endpoint_id"
export GC_ENDPOINT_ID=$endpoint_id
echo; echo "== examples/hello_world.py"
"$here/.venv/bin/python" "$here/examples/hello_world.py"
echo; echo "== examples/monte_carlo_pi.py"
"$here/.venv/bin/python" "$here/examples/monte_carlo_pi.py"
