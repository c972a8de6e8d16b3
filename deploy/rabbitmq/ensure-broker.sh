#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on GC_BROKER_HOST:GC_BROKER_PORT (default 127.0.0.1:5672):
# use one already listening; else start the system's rabbitmq-server; else, as root with apt,
# install it and start it; else say how to get one.
set -euo pipefail
host=${GC_BROKER_HOST:-127.0.0.1}
port=${GC_BROKER_PORT:-5672}

listening() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

wait_for_broker() {
  for _ in $(seq 1 90); do
    if listening && rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  return 1
}

if listening; then
  echo "broker: RabbitMQ already listening on $host:$port"
  exit 0
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "broker: installing rabbitmq-server with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q rabbitmq-server >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q rabbitmq-server >/dev/null; }
  else
    cat >&2 <<MSG
broker: no RabbitMQ answers on $host:$port and rabbitmq-server is not installed.
  Install it (Debian/Ubuntu: sudo apt-get install rabbitmq-server), or point
  GC_BROKER_URL at a broker you have, then run this again.
MSG
    exit 1
  fi
fi

echo "broker: starting rabbitmq-server"
rabbitmq-server -detached >/dev/null 2>&1 || true
if wait_for_broker; then
  echo "broker: RabbitMQ is up on $host:$port"
else
  echo "broker: rabbitmq-server did not come up within 90 s; see /var/log/rabbitmq/" >&2
  exit 1
fi
