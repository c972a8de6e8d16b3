#!/usr/bin/env bash
# Bring the embedded stack up or down under GC_HOME: the registry on SQLite and one
# local endpoint agent with a process pool. `make demo` and the README use it.
#   deploy/local-stack.sh up      # prints the GC_HOME to export, and the endpoint id on its last line
#   deploy/local-stack.sh down    # returns once everything it stopped has exited
#   deploy/local-stack.sh down --delete-endpoint   # also deletes the endpoint and its queues
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
export GC_HOME=${GC_HOME:-$here/.demo}
export GC_REGISTRY_URL=${GC_REGISTRY_URL:-http://127.0.0.1:8765}
endpoint=${GC_DEMO_ENDPOINT:-demo}
port=${GC_REGISTRY_URL##*:}
mkdir -p "$GC_HOME"

registry_up() { curl -fsS "$GC_REGISTRY_URL/health" >/dev/null 2>&1; }

# PID: SIGTERM, then wait until it has exited (SIGKILL after 30 s): whoever starts the stack
# again next finds its port free.
stop_and_wait() {
  local pid="$1"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "pid $pid did not exit within 30 s of SIGTERM; killing it" >&2
  kill -9 "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

case "${1:-}" in
up)
  if ! registry_up; then
    "$bin/gc-registry" serve --auth open --port "$port" >"$GC_HOME/registry.log" 2>&1 &
    echo $! >"$GC_HOME/registry.pid"
    for _ in $(seq 1 100); do registry_up && break; sleep 0.1; done
    registry_up || { echo "registry did not start; see $GC_HOME/registry.log" >&2; exit 1; }
    echo "registry: serving on $GC_REGISTRY_URL (SQLite at $GC_HOME/registry.db)"
  fi
  if [ ! -f "$GC_HOME/endpoints/$endpoint/config.yaml" ]; then
    "$bin/gc-agent" configure "$endpoint" --engine processes --workers 2 >/dev/null
  fi
  # Read the whole listing first: `grep -q` closing the pipe early would fail the writer
  # under pipefail.
  listing=$("$bin/gc-agent" list)
  grep -q "^$endpoint .*running" <<<"$listing" || "$bin/gc-agent" start "$endpoint" --detach
  # Without these, gc-agent and gc-client look in ~/.gc and at the default registry.
  echo "To use this stack from your shell:"
  echo "  export GC_HOME=$GC_HOME GC_REGISTRY_URL=$GC_REGISTRY_URL"
  "$bin/python" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['endpoint_id'])" \
    "$GC_HOME/endpoints/$endpoint/config.yaml"
  ;;
down)
  # gc-agent stop and delete return once the agent has exited.
  if [ "${2:-}" = --delete-endpoint ] && [ -f "$GC_HOME/endpoints/$endpoint/config.yaml" ]; then
    "$bin/gc-agent" delete "$endpoint" --yes --with-queues
  else
    listing=$("$bin/gc-agent" list)
    if grep -q "^$endpoint .*running" <<<"$listing"; then "$bin/gc-agent" stop "$endpoint"; fi
  fi
  if [ -f "$GC_HOME/registry.pid" ]; then
    stop_and_wait "$(cat "$GC_HOME/registry.pid")"
    rm -f "$GC_HOME/registry.pid"
    # The vhost's ledger belonged to this stack's throwaway database; let it go, so that
    # the next stack (another clone, or this one after `make clean`) may take the vhost.
    "$bin/gc-registry" release-vhost >/dev/null
  fi
  echo "local stack stopped"
  ;;
*)
  echo "usage: $0 up | down [--delete-endpoint]" >&2; exit 2 ;;
esac
