#!/usr/bin/env bash
# Build hbone-peer (Istio's own HBONE dialer and server, istio.io/istio/pkg/hbone,
# behind a small main in hbone-peer/) from Go modules, pinned by go.mod and
# go.sum, into a cache directory keyed by those files; print the binary's path.
#
#   tests/interop/build.sh          build if missing, print the binary on stdout
#
# Only the Go module proxy is used (GOPROXY, default proxy.golang.org).  Cold:
# about 170 MB of modules and 20 s on 2 cores; cached afterwards.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=$here/hbone-peer
CACHE_ROOT=${TETHER_CACHE:-/var/cache/tether}
key=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-12)
dest=$CACHE_ROOT/interop/hbone-peer-$key
bin=$dest/hbone-peer

log() { echo "interop/build.sh: $*" >&2; }

if [[ -x $bin ]]; then
    log "cached: $bin"
    echo "$bin"
    exit 0
fi
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x $GO ]] || { log "no Go toolchain (set GO=/path/to/go)"; exit 3; }
export GOMODCACHE=${GOMODCACHE:-$CACHE_ROOT/gomod} GOCACHE=${GOCACHE:-$CACHE_ROOT/gocache}
export GOFLAGS=-mod=readonly GOTOOLCHAIN=${GOTOOLCHAIN:-local}
mkdir -p "$dest"
log "building hbone-peer with $("$GO" version) (modules in $GOMODCACHE)"
(cd "$src" && "$GO" build -trimpath -o "$bin.tmp" .)
mv "$bin.tmp" "$bin"
# keep only this build: older keys are stale inputs
find "$CACHE_ROOT/interop" -maxdepth 1 -name 'hbone-peer-*' ! -name "hbone-peer-$key" \
    -exec rm -rf {} + 2>/dev/null || true
echo "$bin"
