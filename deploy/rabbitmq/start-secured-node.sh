#!/usr/bin/env bash
# Start (or stop) a private RabbitMQ node whose users are the registry's: tokens checked by
# the registry's /auth/* routes (broker_config/rabbitmq.conf), nothing else allowed.
#
#   deploy/rabbitmq/start-secured-node.sh start   # prints the registry's broker URL file
#   deploy/rabbitmq/start-secured-node.sh stop
#   deploy/rabbitmq/start-secured-node.sh ctl list_users     # rabbitmqctl on this node
#
# Settings (environment):
#   GC_NODE_DIR        where the node keeps config, data, logs, cookie   [./.secured-node]
#   GC_NODE_NAME       Erlang node name                                  [gc-secured@localhost]
#   GC_NODE_PORT       AMQP port (listens on 127.0.0.1 unless GC_NODE_IP) [5673];
#                      `none`: no plaintext listener (with GC_NODE_TLS_PORT)
#   GC_DIST_PORT       Erlang distribution port                          [25673]
#   GC_REGISTRY_URL    the registry the node asks                        [http://127.0.0.1:8765]
#   GC_AUTH_CACHE_TTL  milliseconds a decision is cached                 [from rabbitmq.conf]
#   GC_REGISTRY_BROKER_USER / _PASSWORD  the registry's own broker account [gc-registry / random]
#   GC_REGISTRY_AUTH_SECRET  what the node presents to the registry's /auth/* [random]
#   GC_NODE_TLS_PORT   AMQPS port, on the same address                   [none: no TLS listener]
#   GC_NODE_TLS_CERT / GC_NODE_TLS_KEY  the node's certificate and key (PEM; needed for TLS)
#   GC_NODE_TLS_CA     the CA that signed the certificate (PEM)          [none: a public CA]
#   GC_NODE_TLS_HOST   the name clients reach the node by, as in the certificate [localhost]
#
# The node's own rabbitmq.conf, enabled_plugins and definitions.json go into GC_NODE_DIR,
# so the system's /etc/rabbitmq and any broker already running are left alone. `start`
# writes the registry's broker URL (with its password) to GC_NODE_DIR/registry-broker-url,
# mode 0600: give it to `gc-registry serve --broker-url-file` so its ledger can consume, and
# the secret the node presents on /auth/* to GC_NODE_DIR/registry-auth-secret, mode 0600:
# give it to `gc-registry serve --broker-auth-secret-file`.
# With a TLS listener the TLS settings go into the node's rabbitmq.conf from
# broker_config/rabbitmq-tls.conf, and that URL is an amqps:// one (with ?cafile=GC_NODE_TLS_CA).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config_dir="$(cd "$here/../../broker_config" && pwd)"
dir="${GC_NODE_DIR:-$PWD/.secured-node}"
node="${GC_NODE_NAME:-gc-secured@localhost}"
port="${GC_NODE_PORT:-5673}"
ip="${GC_NODE_IP:-127.0.0.1}"
dist_port="${GC_DIST_PORT:-25673}"
registry="${GC_REGISTRY_URL:-http://127.0.0.1:8765}"
tls_port="${GC_NODE_TLS_PORT:-}"
if [ -n "$tls_port" ] && { [ -z "${GC_NODE_TLS_CERT:-}" ] || [ -z "${GC_NODE_TLS_KEY:-}" ]; }; then
    echo "GC_NODE_TLS_PORT needs GC_NODE_TLS_CERT and GC_NODE_TLS_KEY (the node's PEM files)" >&2
    exit 2
fi
if [ "$port" = none ] && [ -z "$tls_port" ]; then
    echo "GC_NODE_PORT=none leaves the node no listener: set GC_NODE_TLS_PORT too" >&2
    exit 2
fi
account="${GC_REGISTRY_BROKER_USER:-gc-registry}"
# The packaged scripts, not /usr/sbin's wrappers (those switch to the rabbitmq user).
bin="${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}"
[ -x "$bin/rabbitmq-server" ] || bin="$(dirname "$(command -v rabbitmq-server)")"

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
# The node and its CLI share an Erlang cookie of their own under GC_NODE_DIR.
export HOME="$dir"
export RABBITMQ_NODENAME="$node"
# Without a plaintext port the tcp listener is switched off in rabbitmq.conf instead.
[ "$port" = none ] || export RABBITMQ_NODE_IP_ADDRESS="$ip" RABBITMQ_NODE_PORT="$port"
export RABBITMQ_DIST_PORT="$dist_port" RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/node.pid"
export RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log"
export ERL_EPMD_ADDRESS="${ERL_EPMD_ADDRESS:-127.0.0.1}"

ctl() { "$bin/rabbitmqctl" -q -n "$node" "$@"; }

render_config() {
    : >"$dir/rabbitmq-env.conf"
    cp "$config_dir/enabled_plugins" "$dir/enabled_plugins"
    cp "$config_dir/definitions.json" "$dir/definitions.json"
    # The node proves itself to the registry with a secret (HTTP basic auth from the user
    # info of its auth_http URLs). Bash expansions, not sed: no argument shows it in `ps`.
    local secret="${GC_REGISTRY_AUTH_SECRET:-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')}"
    local conf asking="${registry%/}"
    asking="${asking%%://*}://rabbitmq:${secret}@${asking#*://}"
    conf="$(cat "$config_dir/rabbitmq.conf")"
    (umask 077 && printf '%s\n' "${conf//http:\/\/127.0.0.1:8765/"$asking"}" >"$dir/rabbitmq.conf" \
        && printf '%s\n' "$secret" >"$dir/registry-auth-secret")
    if [ -n "${GC_AUTH_CACHE_TTL:-}" ]; then
        sed -i -e "s#^auth_cache.cache_ttl = .*#auth_cache.cache_ttl = $GC_AUTH_CACHE_TTL#" \
            "$dir/rabbitmq.conf"
    fi
    printf 'load_definitions = %s\n' "$dir/definitions.json" >>"$dir/rabbitmq.conf"
    [ "$port" != none ] || printf 'listeners.tcp = none\n' >>"$dir/rabbitmq.conf"
    [ -z "$tls_port" ] || render_tls >>"$dir/rabbitmq.conf"
    add_account
}

render_tls() {
    # Absolute paths: the node runs with HOME and its working directory elsewhere.
    local cert key ca=""
    cert="$(realpath "$GC_NODE_TLS_CERT")" key="$(realpath "$GC_NODE_TLS_KEY")"
    [ -z "${GC_NODE_TLS_CA:-}" ] || ca="$(realpath "$GC_NODE_TLS_CA")"
    sed -e "s#@LISTENER@#$ip:$tls_port#" -e "s#@CERTFILE@#$cert#" -e "s#@KEYFILE@#$key#" \
        -e "s#@CACERTFILE@#$ca#" "$config_dir/rabbitmq-tls.conf" |
        if [ -n "$ca" ]; then cat; else grep -v '^ssl_options.cacertfile'; fi
}

# The URL the registry's ledger reaches this node by: amqps:// by name when it has TLS.
broker_url() {
    local account="$1" password="$2"
    if [ -z "$tls_port" ]; then
        printf 'amqp://%s:%s@%s:%s/%%2F\n' "$account" "$password" "$ip" "$port"
        return
    fi
    local query=""
    [ -z "${GC_NODE_TLS_CA:-}" ] || query="?cafile=$(python3 -c \
        'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$(realpath "$GC_NODE_TLS_CA")")"
    printf 'amqps://%s:%s@%s:%s/%%2F%s\n' "$account" "$password" "${GC_NODE_TLS_HOST:-localhost}" \
        "$tls_port" "$query"
}

add_account() {
    # The registry's account goes into the node's definitions (password salted and hashed
    # the way RabbitMQ's internal backend does), so it exists from the first moment.
    local password="${GC_REGISTRY_BROKER_PASSWORD:-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')}"
    GC_ACCOUNT="$account" GC_PASSWORD="$password" python3 - "$dir/definitions.json" <<'PY'
import base64, hashlib, json, os, sys
path, salt = sys.argv[1], os.urandom(4)
digest = hashlib.sha256(salt + os.environ["GC_PASSWORD"].encode()).digest()
definitions = json.load(open(path))
definitions["users"] = [{"name": os.environ["GC_ACCOUNT"], "tags": [],
                         "password_hash": base64.b64encode(salt + digest).decode(),
                         "hashing_algorithm": "rabbit_password_hashing_sha256"}]
definitions["permissions"] = [{"user": os.environ["GC_ACCOUNT"], "vhost": vhost["name"],
                               "configure": ".*", "write": ".*", "read": ".*"}
                              for vhost in definitions["vhosts"]]
json.dump(definitions, open(path, "w"), indent=2)
PY
    (umask 077 && broker_url "$account" "$password" >"$dir/registry-broker-url")
}

case "${1:-start}" in
    start)
        render_config
        mkdir -p "$dir/log"
        nohup "$bin/rabbitmq-server" </dev/null >"$dir/log/startup.log" 2>&1 &
        server=$!
        # await_startup gives up at once while the node is not yet known to epmd: retry.
        until ctl await_startup --timeout 120 >/dev/null 2>&1; do
            if ! kill -0 "$server" 2>/dev/null; then
                echo "the secured node $node did not start; see $dir/log" >&2
                tail -n 20 "$dir/log/startup.log" >&2 || true
                exit 1
            fi
            sleep 0.5
        done
        echo "$dir/registry-broker-url"
        ;;
    stop)
        ctl stop "$dir/node.pid" >/dev/null 2>&1 || true
        ;;
    ctl)
        shift
        ctl "$@"
        ;;
    *)
        echo "usage: $0 start|stop|ctl ARGS..." >&2
        exit 2
        ;;
esac
