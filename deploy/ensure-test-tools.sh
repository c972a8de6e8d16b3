#!/usr/bin/env bash
# Tools the test suite runs for real: an MPI launcher (mpich's mpiexec) for MPIFunction;
# Debian's chromium for the browser tests; Node.js with npm, and Go with Debian's amqp091-go,
# for the other-language clients in examples/ and the AsyncAPI validator; podman for the
# container tests. Installs what is missing as root with apt (npm
# packages into a cache outside the repository); otherwise says what to install.
# Quiet when everything is there.
set -euo pipefail
#: Where npm packages go (tests/toolchains.py reads the same default).
GC_TOOLS_CACHE="${GC_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gc-fabric}"
#: The npm packages, pinned: the Node example's AMQP client and the AsyncAPI validator.
NPM_PACKAGES=(amqplib@2.3.1 @asyncapi/parser@3.6.6)

apt_install() {  # WHAT PACKAGE...: install with apt-get as root, else say what to install
  local what="$1"; shift
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test tools: installing $what with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
  else
    echo "test tools: $what is missing; install it (sudo apt-get install $*)" >&2
    exit 1
  fi
}

command -v mpiexec >/dev/null 2>&1 || apt_install "mpich (mpiexec)" mpich

# A real browser for the dashboard's tests (tests/integration/test_ui_browser.py): Debian's
# chromium and its driver; Selenium drives them, nothing is downloaded at test time.
{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 \
  || apt_install "chromium and chromium-driver" chromium chromium-driver

# Node.js and npm: Debian's, unless a node with its own npm is already installed.
command -v node >/dev/null 2>&1 || apt_install "Node.js" nodejs
command -v npm >/dev/null 2>&1 || apt_install "npm" npm
missing_npm=()
for package in "${NPM_PACKAGES[@]}"; do
  [ -f "$GC_TOOLS_CACHE/node/node_modules/${package%@*}/package.json" ] || missing_npm+=("$package")
done
if [ "${#missing_npm[@]}" -gt 0 ]; then
  echo "test tools: installing ${missing_npm[*]} into $GC_TOOLS_CACHE/node with npm"
  mkdir -p "$GC_TOOLS_CACHE/node"
  npm install --prefix "$GC_TOOLS_CACHE/node" --no-audit --no-fund --ignore-scripts --silent \
    "${NPM_PACKAGES[@]}" >/dev/null
fi

# Go and the RabbitMQ client Debian packages for it (GOPATH=/usr/share/gocode, no modules).
command -v go >/dev/null 2>&1 || apt_install "Go" golang-go
[ -d /usr/share/gocode/src/github.com/rabbitmq/amqp091-go ] \
  || apt_install "the Go AMQP client (amqp091-go)" golang-github-rabbitmq-amqp091-go-dev

# Podman for the container tests (tests/integration/test_containers.py), with runc (crun
# refuses hybrid cgroups), catatonit (--init) and mmdebstrap, which builds their image
# from Debian's packages.
{ command -v podman && command -v runc && command -v catatonit && command -v mmdebstrap; } \
  >/dev/null 2>&1 \
  || apt_install "podman, runc, catatonit and mmdebstrap" podman runc conmon catatonit \
       fuse-overlayfs uidmap slirp4netns mmdebstrap
