#!/usr/bin/env bash
# Start (or stop, kill, restart) a cluster of private RabbitMQ nodes on this machine, for tests
# of what the fabric does when a broker node fails. The nodes' rabbitmq.conf is cluster.conf
# beside this script (classic-config peer discovery, pause_minority).
#
#   deploy/rabbitmq/start-cluster.sh start        # prints the nodes' broker URLs, comma-separated
#   deploy/rabbitmq/start-cluster.sh stop         # stops every node and removes GC_CLUSTER_DIR
#   deploy/rabbitmq/start-cluster.sh urls         # the URL list again
#   deploy/rabbitmq/start-cluster.sh node-pid K   # the OS pid of node K's Erlang VM
#   deploy/rabbitmq/start-cluster.sh kill K       # kill -9 node K and wait until it is gone
#   deploy/rabbitmq/start-cluster.sh stop-node K  # stop node K gracefully
#   deploy/rabbitmq/start-cluster.sh restart K [K...]  # start them again; wait until rejoined
#   deploy/rabbitmq/start-cluster.sh ctl K ARGS...     # rabbitmqctl on node K
#   deploy/rabbitmq/start-cluster.sh queues K ARGS...  # rabbitmq-queues on node K
#
# Settings (environment):
#   GC_CLUSTER_NODES      how many nodes                                  [3]
#   GC_CLUSTER_NAME       node name prefix: nodes NAME-1@localhost ...    [gc-cluster]
#   GC_CLUSTER_PORT       AMQP port of node 1; node K listens on PORT+K-1 [5701]
#   GC_CLUSTER_DIST_PORT  Erlang distribution port of node 1, likewise    [25701]
#   GC_CLUSTER_DIR        config, data, logs and cookie of every node     [./.cluster]
#
# Every node listens on 127.0.0.1 only and logs in guest/guest; each has its own directory
# GC_CLUSTER_DIR/node-K (its HOME, with the cluster's shared Erlang cookie), so the system's
# /etc/rabbitmq and any broker already running (5672/25672) are left alone.
#
# `start` boots all nodes side by side and classic-config discovery clusters them (its retries
# cut to 2 x 200 ms: with the defaults the first node waits 5 s for peers that wait for it;
# 22 s in all). A node it leaves on its own is joined to node 1 (stop_app; join_cluster;
# start_app), which alone, after a boot without discovery, took 21-24 s.
# Measured here (2 CPUs, RabbitMQ 3.10.8 on Erlang 25): `start` of 3 nodes 13-18 s;
# `kill K` then `restart K` 5 s; `stop-node K` 2.5 s then `restart K` 7 s; `restart 1 2 3`
# after killing all 14 s; `stop` 3-4 s.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
count="${GC_CLUSTER_NODES:-3}"
prefix="${GC_CLUSTER_NAME:-gc-cluster}"
port_base="${GC_CLUSTER_PORT:-5701}"
dist_base="${GC_CLUSTER_DIST_PORT:-25701}"
dir="${GC_CLUSTER_DIR:-$PWD/.cluster}"
ip=127.0.0.1
# The packaged scripts, not /usr/sbin's wrappers (those switch to the rabbitmq user, its
# cookie and /etc/rabbitmq/rabbitmq-env.conf's node name).
bin="${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}"
[ -x "$bin/rabbitmq-server" ] || bin="$(dirname "$(command -v rabbitmq-server)")"
# Seconds to wait for a node to boot, join, or exit.
timeout=120

dir="$(realpath -m "$dir")"
case "$count" in
    '' | *[!0-9]* | 0) echo "GC_CLUSTER_NODES must be a number of nodes, not '$count'" >&2; exit 2 ;;
esac

node_name() { printf '%s-%s@localhost' "$prefix" "$1"; }
node_dir() { printf '%s/node-%s' "$dir" "$1"; }

# The environment the server and the CLI tools need for node K (run in a subshell).
node_env() {
    local k="$1" d name
    d="$(node_dir "$k")" name="$(node_name "$k")"
    export HOME="$d" RABBITMQ_NODENAME="$name"
    export RABBITMQ_NODE_IP_ADDRESS="$ip" RABBITMQ_NODE_PORT="$((port_base + k - 1))"
    export RABBITMQ_DIST_PORT="$((dist_base + k - 1))" RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" RABBITMQ_PID_FILE="$d/node.pid"
    export RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log"
    export ERL_EPMD_ADDRESS="$ip" ERL_CRASH_DUMP="$d/erl_crash.dump"
    # The second flag, unused, puts the node's name on its command line, for `pgrep -af`.
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} -gc_cluster_node $name"
}

ctl() { local k="$1"; shift; (node_env "$k" && "$bin/rabbitmqctl" -q -n "$(node_name "$k")" "$@"); }
queues() { local k="$1"; shift; (node_env "$k" && "$bin/rabbitmq-queues" -q -n "$(node_name "$k")" "$@"); }

check_index() {
    case "${1:-}" in
        '' | *[!0-9]*) echo "node index must be a number 1..$count, not '${1:-}'" >&2; exit 2 ;;
    esac
    if [ "$1" -lt 1 ] || [ "$1" -gt "$count" ]; then
        echo "node index must be 1..$count, not $1" >&2
        exit 2
    fi
    if [ ! -d "$(node_dir "$1")" ]; then
        echo "no node $1 in $dir: start the cluster first" >&2
        exit 1
    fi
}

# The pid of node K's Erlang VM (written by the node at boot: the sure way to find it), or
# nothing when the node is not running.
node_pid() {
    local file pid
    file="$(node_dir "$1")/node.pid"
    [ -s "$file" ] || return 0
    pid="$(cat "$file")"
    if alive "$pid"; then printf '%s\n' "$pid"; fi
}

# Whether a process lives (a zombie, killed and not yet reaped, does not).
alive() {
    local state
    state="$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

wait_gone() {
    local pid="$1" deadline=$((SECONDS + timeout))
    while alive "$pid"; do
        if [ "$SECONDS" -gt "$deadline" ]; then
            echo "process $pid did not exit in ${timeout}s" >&2
            return 1
        fi
        sleep 0.1
    done
}

listening() { (exec 3<>"/dev/tcp/$ip/$1") 2>/dev/null; }

render_node() {
    local k="$1" d nodes="" j
    d="$(node_dir "$k")"
    rm -rf "$d"
    mkdir -p "$d/log"
    for j in $(seq 1 "$count"); do
        nodes+="cluster_formation.classic_config.nodes.$j = $(node_name "$j")"$'\n'
    done
    local conf
    conf="$(cat "$here/cluster.conf")"
    printf '%s\n' "${conf//@NODES@/${nodes%$'\n'}}" >"$d/rabbitmq.conf"
    # The first node to take the discovery lock waits for peers that are themselves waiting
    # for that lock (10 x 500 ms by default) before it starts a cluster of its own. Here
    # all boot together: let it give up soon, and the others join it (13 s, not 22 s).
    printf '%s\n' '' '# start-cluster.sh: every node boots at once on one machine.' \
        'cluster_formation.discovery_retry_limit = 2' \
        'cluster_formation.discovery_retry_interval = 200' >>"$d/rabbitmq.conf"
    : >"$d/rabbitmq-env.conf"
    printf '[].\n' >"$d/enabled_plugins"
    install -m 400 "$dir/.erlang.cookie" "$d/.erlang.cookie"
}

# Boot node K in the background; the server's wrapper pid goes into SERVERS[K].
declare -A SERVERS=()
launch() {
    local k="$1" d
    d="$(node_dir "$1")"
    (node_env "$k" && exec nohup "$bin/rabbitmq-server" </dev/null >>"$d/log/startup.log" 2>&1) &
    SERVERS[$k]=$!
}

# Wait until node K has booted. await_startup gives up at once while the node is not yet
# known to epmd, so it is retried while the server lives.
await_node() {
    local k="$1" server="${SERVERS[$1]}" deadline=$((SECONDS + timeout))
    until ctl "$k" await_startup --timeout "$timeout" >/dev/null 2>&1; do
        if ! alive "$server" || [ "$SECONDS" -gt "$deadline" ]; then
            echo "node $(node_name "$k") did not start; see $(node_dir "$k")/log" >&2
            tail -n 20 "$(node_dir "$k")/log/startup.log" >&2 || true
            return 1
        fi
        sleep 0.3
    done
}

# The nodes node K sees running in its cluster, one a line.
running_nodes() {
    ctl "$1" cluster_status --formatter json 2>/dev/null |
        python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)["running_nodes"]))' 2>/dev/null
}

# Wait until node K and node J (the cluster's) each list the other among their running nodes.
await_clustered() {
    local k="$1" j="$2" deadline=$((SECONDS + timeout))
    until running_nodes "$k" | grep -xF >/dev/null "$(node_name "$j")" \
        && running_nodes "$j" | grep -xF >/dev/null "$(node_name "$k")"; do
        if [ "$SECONDS" -gt "$deadline" ]; then
            echo "node $(node_name "$k") did not cluster with $(node_name "$j") in ${timeout}s" >&2
            return 1
        fi
        sleep 0.3
    done
}

urls() {
    local k out=""
    for k in $(seq 1 "$count"); do
        out+="amqp://guest:guest@$ip:$((port_base + k - 1))/%2F,"
    done
    printf '%s\n' "${out%,}"
}

abandon_start() {
    local k pid
    for k in $(seq 1 "$count"); do
        pid="$(node_pid "$k")"
        [ -z "$pid" ] || { kill -9 "$pid"; wait_gone "$pid" || true; }
    done
}

start() {
    local k port started=$SECONDS
    for k in $(seq 1 "$count"); do
        if [ -n "$(node_pid "$k")" ]; then
            echo "node $(node_name "$k") is already running (from $dir): stop it first" >&2
            exit 1
        fi
        for port in $((port_base + k - 1)) $((dist_base + k - 1)); do
            if listening "$port"; then
                echo "port $port is taken: set GC_CLUSTER_PORT / GC_CLUSTER_DIST_PORT" >&2
                exit 1
            fi
        done
    done
    mkdir -p "$dir"
    # A start that fails leaves no node running (and GC_CLUSTER_DIR with their logs).
    trap abandon_start EXIT
    # `stop` removes GC_CLUSTER_DIR only when this marker says it is one of ours.
    : >"$dir/.gc-cluster"
    (umask 077 && head -c 15 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$dir/.erlang.cookie")
    for k in $(seq 1 "$count"); do
        render_node "$k"
        launch "$k"
    done
    for k in $(seq 1 "$count"); do
        await_node "$k"
    done
    # Booting side by side, discovery may leave some nodes on their own: join those to node 1.
    for k in $(seq 2 "$count"); do
        if ! running_nodes 1 | grep -xF >/dev/null "$(node_name "$k")"; then
            ctl "$k" stop_app >/dev/null
            ctl "$k" join_cluster "$(node_name 1)" >/dev/null
            ctl "$k" start_app >/dev/null
        fi
    done
    for k in $(seq 2 "$count"); do
        await_clustered "$k" 1
    done
    trap - EXIT
    echo "cluster of $count nodes started in $((SECONDS - started)) s ($dir)" >&2
    urls
}

# Start nodes again (after `kill` or `stop-node`) and wait until each has rejoined.
restart() {
    local k peer
    for k in "$@"; do
        check_index "$k"
        if [ -n "$(node_pid "$k")" ]; then
            echo "node $(node_name "$k") is already running" >&2
            SERVERS[$k]="$(node_pid "$k")"
        else
            launch "$k"
        fi
    done
    for k in "$@"; do
        await_node "$k"
    done
    for k in "$@"; do
        # A peer that runs: the node has rejoined when both see each other running.
        for peer in $(seq 1 "$count"); do
            if [ "$peer" != "$k" ] && [ -n "$(node_pid "$peer")" ]; then
                await_clustered "$k" "$peer"
                break
            fi
        done
    done
}

kill_node() {
    local pid
    pid="$(node_pid "$1")"
    if [ -z "$pid" ]; then
        echo "node $(node_name "$1") is not running" >&2
        return 1
    fi
    kill -9 "$pid"
    wait_gone "$pid"
}

stop_node() {
    local pid
    pid="$(node_pid "$1")"
    [ -n "$pid" ] || return 0
    kill -CONT "$pid" 2>/dev/null || true   # a paused node could not answer
    # `stop PIDFILE` returns once the VM has exited; kill it if it will not.
    if ! ctl "$1" stop "$(node_dir "$1")/node.pid" --timeout "$timeout" >/dev/null 2>&1; then
        kill -9 "$pid" 2>/dev/null || true
    fi
    wait_gone "$pid"
}

stop() {
    local k pids=()
    for k in $(seq 1 "$count"); do
        stop_node "$k" &
        pids+=($!)
    done
    for k in "${pids[@]}"; do
        wait "$k" || true
    done
    for k in $(seq 1 "$count"); do
        if [ -n "$(node_pid "$k")" ]; then
            echo "node $(node_name "$k") is still running" >&2
            exit 1
        fi
    done
    if [ -e "$dir/.gc-cluster" ]; then
        rm -rf "$dir"
    fi
}

command="${1:-start}"
[ "$#" -eq 0 ] || shift
case "$command" in
    start) start ;;
    stop) stop ;;
    urls) urls ;;
    node-pid)
        check_index "${1:-}"
        pid="$(node_pid "$1")"
        if [ -z "$pid" ]; then
            echo "node $(node_name "$1") is not running" >&2
            exit 1
        fi
        printf '%s\n' "$pid"
        ;;
    kill) check_index "${1:-}" && kill_node "$1" ;;
    stop-node) check_index "${1:-}" && stop_node "$1" ;;
    restart)
        [ "$#" -gt 0 ] || { echo "usage: $0 restart K [K...]" >&2; exit 2; }
        restart "$@"
        ;;
    ctl) check_index "${1:-}" && ctl "$@" ;;
    queues) check_index "${1:-}" && queues "$@" ;;
    *)
        echo "usage: $0 start|stop|urls|node-pid K|kill K|stop-node K|restart K...|ctl K ARGS...|queues K ARGS..." >&2
        exit 2
        ;;
esac
