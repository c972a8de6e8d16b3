#!/usr/bin/env bash
# Tools the test suite runs for real: an MPI launcher (mpich's mpiexec) for MPIFunction.
# Installs what is missing as root with apt; otherwise says what to install.
set -euo pipefail
if command -v mpiexec >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test tools: installing mpich (mpiexec) with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends mpich >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends mpich >/dev/null; }
else
  echo "test tools: mpiexec is missing; install mpich (sudo apt-get install mpich) for the MPI tests" >&2
  exit 1
fi
