#!/usr/bin/env bash
# Build gc-fabric-agent_<version>_<arch>.deb into OUTDIR (default: dist/) with plain dpkg-deb.
#
#   bash deploy/debian/build-deb.sh [OUTDIR]
#
# The package holds a self-contained virtualenv at /opt/gc-fabric (this repo with its `agent`
# extra and their dependencies, installed non-editable), /usr/bin/gc-agent pointing into it,
# the systemd template unit gc-agent@.service, and maintainer scripts that create the
# gc-agent system user. deploy/debian/README.md says what goes where.
#
# Interpreter: the venv links to its interpreter, so it must be one a Debian package
# provides and the package can depend on. `python3` on PATH may be a pyenv shim (it is on
# the development machines), so we use /usr/bin/python3 (or $PYTHON, which must be a
# /usr/bin/python3.X), resolved to its versioned name (/usr/bin/python3.11): the venv then
# survives a change of the default python3, and the package depends on python3.X itself.
set -euo pipefail
umask 022

PACKAGE=gc-fabric-agent
PREFIX=/opt/gc-fabric
SERVICE_USER=gc-agent
ENV_DIR=/etc/gc-fabric
MAINTAINER=${DEB_MAINTAINER:-"gc-fabric maintainers <maintainers@gc-fabric.invalid>"}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
mkdir -p "${1:-$REPO/dist}"
OUTDIR=$(cd "${1:-$REPO/dist}" && pwd)

die() { echo "build-deb: $*" >&2; exit 1; }

command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (apt-get install dpkg)"
PYTHON=$(readlink -f "${PYTHON:-/usr/bin/python3}") || true
case "$PYTHON" in
  /usr/bin/python3.*) ;;
  *) die "need Debian's /usr/bin/python3.X (got '${PYTHON:-nothing}'); apt-get install python3 python3-venv" ;;
esac
PY_VERSION=$("$PYTHON" -I -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$PYTHON" -I -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$PYTHON is Python $PY_VERSION; gc-fabric needs >= 3.10"
"$PYTHON" -I -c 'import ensurepip, venv' 2>/dev/null \
  || die "$PYTHON cannot make a virtualenv; apt-get install python$PY_VERSION-venv"

WORK=$(mktemp -d -t gc-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
VENV=$ROOT$PREFIX
mkdir -p "$ROOT" "$WORK/src"
chmod 0755 "$ROOT"

# Build from a copy: a non-editable `pip install REPO` writes build/ and *.egg-info into the
# tree it builds, and other people work in this checkout. The copy keeps uncommitted edits.
tar -C "$REPO" --anchored --exclude=./.git --exclude=./.venv --exclude=./.demo --exclude=./dist \
    --exclude=./build --no-anchored --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude='.*_cache' -cf - . \
  | tar -C "$WORK/src" -xf -
# Python runs isolated (-I) from here on: neither the caller's directory (a checkout with its
# own gc_agent/ and egg-info) nor PYTHON* variables nor the user's site-packages leak in.
cd "$WORK"

# Why build in the staging tree and relocate, rather than at /opt/gc-fabric itself: the build
# machine may have the package installed (or another build running), and /opt/gc-fabric is
# not ours to clobber. A venv embeds its own path in only two kinds of place: text files
# (script shebangs, bin/activate*, pyvenv.cfg) and compiled .pyc files. So we rewrite the path
# in the text files, drop every .pyc (ensurepip and our own runs of the venv's python made
# some), compile again with the final path recorded (-s/-p), and check that the staging path
# appears nowhere. dh-virtualenv relocates the same way.
echo "build-deb: virtualenv with $PYTHON (Python $PY_VERSION)"
"$PYTHON" -I -m venv "$VENV"
# The client and the agent (the `agent` extra): no registry service, no Parsl.
"$VENV/bin/python" -I -m pip install --quiet --no-compile --no-warn-script-location "$WORK/src[agent]"
VERSION=$("$VENV/bin/python" -I -c 'from importlib.metadata import version; print(version("gc-fabric"))')

# The systemd unit, rendered by the same function `gc-agent enable-on-boot` uses.
mkdir -p "$ROOT/lib/systemd/system"
"$VENV/bin/python" -I -c '
import sys
from pathlib import Path
from gc_agent.systemd import render_unit
sys.stdout.write(render_unit(gc_agent=sys.argv[1], user=sys.argv[2], env_dir=Path(sys.argv[3])))
' "$PREFIX/bin/gc-agent" "$SERVICE_USER" "$ENV_DIR" > "$ROOT/lib/systemd/system/gc-agent@.service"
# An endpoint config for a service, metrics on: what an admin copies to start from.
install -D -m 0644 "$WORK/src/deploy/systemd/config.example.yaml" \
  "$ROOT/usr/share/doc/gc-fabric-agent/examples/config.example.yaml"

"$PYTHON" -I - "$VENV" "$PREFIX" <<'PY'
import sys
from pathlib import Path

staged, final = sys.argv[1].encode(), sys.argv[2].encode()
for path in Path(sys.argv[1]).rglob("*"):
    if path.is_symlink() or not path.is_file():
        continue
    data = path.read_bytes()
    if staged in data and b"\0" not in data:
        path.write_bytes(data.replace(staged, final))
PY
find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +
"$PYTHON" -I -m compileall -q -s "$ROOT" -p / "$VENV/lib" >/dev/null \
  || die "compileall failed"
if leftovers=$(grep -rlF "$ROOT" "$ROOT" | head -5); then
  die "the staging path is still in: $leftovers"
fi

mkdir -p "$ROOT/usr/bin"
ln -s "$PREFIX/bin/gc-agent" "$ROOT/usr/bin/gc-agent"

DEB_VERSION=$(echo "$VERSION" | sed -E 's/\.?(dev|a|b|rc)([0-9]*)/~\1\2/g')
ARCH=$(dpkg --print-architecture)
mkdir -p "$ROOT/DEBIAN"
cat > "$ROOT/DEBIAN/control" <<CONTROL
Package: $PACKAGE
Version: $DEB_VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $(du -sk "$ROOT" | cut -f1)
Depends: python$PY_VERSION, adduser
Section: net
Priority: optional
Homepage: https://github.com/gc-fabric/gc-fabric
Description: gc-fabric endpoint agent (function-as-a-service over RabbitMQ)
 The gc-agent command runs gc-fabric endpoints on this machine: it consumes an
 endpoint's task queue from RabbitMQ and runs the functions it receives.
 Self-contained virtualenv in $PREFIX (Python $PY_VERSION); systemd template
 unit gc-agent@.service; runs as the gc-agent system user.
CONTROL
for script in postinst prerm postrm; do
  install -m 0755 "$HERE/$script" "$ROOT/DEBIAN/$script"
done

DEB=$OUTDIR/${PACKAGE}_${DEB_VERSION}_${ARCH}.deb
# xz -1, not dpkg-deb's -6: the payload is mostly .pyc and shared objects, and -6 takes five
# times as long (about 50 s on two cores) for a .deb only 15% smaller.
dpkg-deb --root-owner-group -Zxz -z"${DEB_XZ_LEVEL:-1}" --build "$ROOT" "$DEB" >/dev/null
echo "build-deb: wrote $DEB"
