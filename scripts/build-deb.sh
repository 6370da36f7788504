#!/usr/bin/env bash
# `make deb`: builds dist/meshd_<version>_<arch>.deb with dpkg-deb. Everything meshd needs is inside:
# a venv at /usr/lib/meshd made here from Debian's /usr/bin/python3 (3.11 on Debian 12, the same path and
# minor version on the target), with meshd and its dependencies installed from wheels at build time, so
# installing the package needs no network and no pip. The architecture is this machine's: the bundled
# wheels (cryptography, cffi, zeroconf) hold compiled code, so an "all" package would install on an arm64
# Pi and then fail to import. Layout and maintainer scripts: docs/install.md, packaging/deb/.
#
# Environment: DEB_VERSION (default: meshd.__version__), DEB_OUT (default: dist), PIP (default: .venv's).
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."
REPO=$PWD
PIP=${PIP:-$REPO/.venv/bin/pip}
PYTHON=/usr/bin/python3
VERSION=${DEB_VERSION:-$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' meshd/__init__.py)}
ARCH=$(dpkg --print-architecture)
OUT=${DEB_OUT:-$REPO/dist}
PYVER=$($PYTHON -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[[ $PYVER == 3.11 ]] || { echo "build-deb: $PYTHON is $PYVER; Debian 12's python3 (3.11) is the target" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/meshd-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
LIB=$ROOT/usr/lib/meshd
DOC=$ROOT/usr/share/doc/meshd

# 1. The venv: no pip inside (dpkg owns these files), no activate scripts (they would name $WORK).
$PYTHON -m venv --without-pip "$LIB"
rm -f "$LIB"/bin/activate* "$LIB"/bin/Activate.ps1
"$PIP" wheel --quiet --disable-pip-version-check --wheel-dir "$WORK/wheels" "$REPO"
"$PIP" --python "$LIB/bin/python" install --quiet --disable-pip-version-check --no-index \
    --find-links "$WORK/wheels" --no-compile --no-warn-script-location meshd-ambient
# The compiled core: the node data path's hot modules built with mypyc beside their .py files (a fifth less
# CPU per request; the pure-Python build where this machine has no compiler; scripts/compile_core.py).
"$REPO/.venv/bin/python" scripts/compile_core.py "$LIB/lib/python$PYVER/site-packages"
# Only the interpreter links and our own launcher stay in bin/ (the dependencies' scripts name $WORK).
find "$LIB/bin" -mindepth 1 ! -name "python*" -delete
cat >"$LIB/bin/meshd" <<'PY'
#!/usr/lib/meshd/bin/python3 -I
import sys

from meshd.cli import main

sys.exit(main())
PY
chmod 0755 "$LIB/bin/meshd"
sed -i "s|^command = .*|command = $PYTHON -m venv --without-pip /usr/lib/meshd|" "$LIB/pyvenv.cfg"
# Byte-code compiled now (the tree is read-only at run time: ProtectSystem=strict), with the installed
# paths in tracebacks, valid whatever the files' dates.
$PYTHON -m compileall -q -j0 -s "$ROOT" -p / --invalidation-mode unchecked-hash "$LIB/lib"
if grep -rIl --exclude=RECORD --exclude=direct_url.json "$WORK" "$LIB" >/dev/null; then
    echo "build-deb: the build path leaked into:" >&2
    grep -rIl --exclude=RECORD --exclude=direct_url.json "$WORK" "$LIB" >&2
    exit 1
fi

# 2. The command, the units, the configuration, the docs.
install -d "$ROOT/usr/bin"
ln -s ../lib/meshd/bin/meshd "$ROOT/usr/bin/meshd"
install -D -m 0644 systemd/meshd.service "$ROOT/lib/systemd/system/meshd.service"
install -D -m 0644 systemd/meshd-waypoint.service "$ROOT/lib/systemd/system/meshd-waypoint.service"
install -D -m 0644 packaging/deb/meshd.toml "$ROOT/etc/meshd/meshd.toml"
install -D -m 0644 README.md "$DOC/README.md"
install -d "$DOC/docs" "$DOC/examples"
cp -r docs/. "$DOC/docs/"
install -m 0644 packaging/deb/copyright "$DOC/copyright"
install -D -m 0644 systemd/meshd.service.d/capture.conf "$DOC/examples/systemd/meshd.service.d/capture.conf"
install -m 0644 systemd/resolved-meshd.conf "$DOC/examples/systemd/resolved-meshd.conf"
cp -r configs "$DOC/examples/configs"

# 3. Control files.
install -d "$ROOT/DEBIAN"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$ROOT/DEBIAN/"
echo /etc/meshd/meshd.toml >"$ROOT/DEBIAN/conffiles"
cat >"$ROOT/DEBIAN/control" <<CONTROL
Package: meshd
Version: $VERSION
Architecture: $ARCH
Maintainer: meshd developers <meshd@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
Depends: python3 (>= 3.11), python3 (<< 3.12), passwd
Suggests: nftables
Section: net
Priority: optional
Description: ambient service mesh for Linux hosts without Kubernetes
 meshd gives the services on a few Linux hosts SPIFFE identities, mutual TLS
 (HBONE tunnels, as Istio's ambient mode), L4 and L7 authorization policy, a
 waypoint L7 proxy, metrics and access logs, without Kubernetes. This package
 holds meshd with its Python dependencies (a self-contained venv under
 /usr/lib/meshd), the systemd units meshd.service and meshd-waypoint.service,
 and an example /etc/meshd/meshd.toml. Guide: /usr/share/doc/meshd/docs/install.md.
CONTROL
find "$ROOT" -type d -exec chmod 0755 {} +

mkdir -p "$OUT"
DEB=$OUT/meshd_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
echo "$DEB"
