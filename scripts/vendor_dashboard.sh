#!/usr/bin/env bash
# Refresh the dashboard's vendored client library from npm: cytoscape (MIT), pinned below.
# Usage: scripts/vendor_dashboard.sh [VERSION]   (then commit meshd/observe/web/vendor/)
# The dashboard has no build step: the daemon serves these files as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.35.0}"
dest=meshd/observe/web/vendor
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "cytoscape@${version}" >/dev/null)
tar -xzf "$work/cytoscape-${version}.tgz" -C "$work"
cp "$work/package/dist/cytoscape.min.js" "$dest/cytoscape.min.js"
cp "$work/package/LICENSE" "$dest/cytoscape.LICENSE"
integrity="$(sha256sum "$dest/cytoscape.min.js" | cut -d' ' -f1)"
cat > "$dest/VERSIONS" <<VERSIONS
# Vendored by scripts/vendor_dashboard.sh from the npm registry; do not edit by hand.
cytoscape ${version} MIT dist/cytoscape.min.js sha256:${integrity}
VERSIONS
echo "vendored cytoscape ${version} into ${dest}"
