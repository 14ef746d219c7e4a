#!/usr/bin/env bash
# Build the k8s test tier's control plane (kube-apiserver and etcd) from Go
# modules, pinned, into a cache directory; skip whatever is already built.
#
#   tests/k8s/build.sh            build if missing, print the bin dir on stdout
#   tests/k8s/build.sh --check    exit 0 if built, 1 if not (no build)
#   tests/k8s/build.sh --print    print the bin dir and exit
#
# Output: ${TETHER_CACHE:-/var/cache/tether}/k8s/<K8S_VERSION>/bin/{kube-apiserver,etcd}
#
# Only the Go module proxy is used (GOPROXY, default proxy.golang.org): no
# GitHub, GCS or container registry downloads.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces the staging
# repos (k8s.io/api, k8s.io/apiserver, ...) with ./staging paths, and `go
# install pkg@version` refuses modules with replace directives. So we write a
# throwaway main module that requires k8s.io/kubernetes at the pinned version
# and replaces every k8s.io/<staging repo> with its published v0.Y.Z tag (the
# list is generated from the pinned kubernetes go.mod), then `go build` the
# command package from it. etcd's server module (go.etcd.io/etcd/server/v3,
# whose main.go is the etcd binary) has the same problem (replaces to ../api
# etc.) and gets the same treatment; its published requirements are
# consistent so it needs no replace lines.
#
# Environment overrides: K8S_VERSION, ETCD_VERSION, TETHER_CACHE, GO (path to
# the go command), GOPROXY/GOMODCACHE/GOCACHE (passed through to go).
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
# The etcd release kubernetes v1.34.4's go.mod requires (and kubeadm 1.34 runs).
ETCD_VERSION=${ETCD_VERSION:-v3.6.4}
CACHE_ROOT=${TETHER_CACHE:-/var/cache/tether}
DEST=$CACHE_ROOT/k8s/$K8S_VERSION
BIN=$DEST/bin
STAMP=$BIN/.built
WANT_STAMP="kubernetes=$K8S_VERSION etcd=$ETCD_VERSION"

built() {
    [[ -x $BIN/kube-apiserver && -x $BIN/etcd && -f $STAMP ]] &&
        [[ "$(cat "$STAMP")" == "$WANT_STAMP" ]]
}

case "${1:-}" in
    --check) built; exit ;;
    --print) echo "$BIN"; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--check|--print]" >&2; exit 2 ;;
esac

log() { echo "build.sh: $*" >&2; }

if built; then
    log "cached: $BIN ($WANT_STAMP)"
    echo "$BIN"
    exit 0
fi

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x $GO ]] || { log "no Go toolchain (set GO=/path/to/go)"; exit 3; }

mkdir -p "$DEST"
# One builder at a time (parallel pytest sessions, CI retries).
exec 9>"$DEST/.lock"
flock 9
if built; then
    log "cached (built by a concurrent run): $BIN"
    echo "$BIN"
    exit 0
fi

export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false -mod=mod"
export GOTOOLCHAIN=local      # never download a toolchain
export GOWORK=off
export GONOSUMDB= GOPRIVATE=  # keep checksum verification through sum.golang.org
export GOOS=linux

log "go: $("$GO" version)"
log "building kubernetes=$K8S_VERSION etcd=$ETCD_VERSION into $BIN"
mkdir -p "$BIN"
WORK=$DEST/src
rm -rf "$WORK"
mkdir -p "$WORK/kube" "$WORK/etcd"

# ---- kube-apiserver ---------------------------------------------------------
KMOD_JSON=$(cd "$WORK/kube" && "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION") || true
KGOMOD=$(printf '%s' "$KMOD_JSON" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
[[ -f $KGOMOD ]] || { log "no go.mod for k8s.io/kubernetes@$K8S_VERSION:"; echo "$KMOD_JSON" >&2; exit 4; }
STAGING_VERSION=v0.${K8S_VERSION#v1.}
{
    echo "module tether.test/k8s-build"
    echo
    grep -E '^go [0-9]' "$KGOMOD"
    grep -E '^godebug ' "$KGOMOD" || true
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    # "	k8s.io/api => ./staging/src/k8s.io/api" -> "	k8s.io/api => k8s.io/api v0.34.4"
    sed -nE 's#^[[:space:]]*(k8s\.io/[A-Za-z0-9._-]+) => \./staging/src/k8s\.io/[A-Za-z0-9._-]+[[:space:]]*$#\t\1 => \1 '"$STAGING_VERSION"'#p' "$KGOMOD"
    echo ")"
} >"$WORK/kube/go.mod"
nrepl=$(grep -c ' => k8s.io/' "$WORK/kube/go.mod" || true)
nstaging=$(grep -c '=> ./staging/' "$KGOMOD" || true)
[[ $nrepl -gt 0 && $nrepl -eq $nstaging ]] || {
    log "generated $nrepl replace lines but kubernetes go.mod has $nstaging staging replaces"; exit 4; }
log "kube go.mod: $nrepl staging repos -> $STAGING_VERSION"

major=${K8S_VERSION#v}; major=${major%%.*}
minor=${K8S_VERSION#v*.}; minor=${minor%%.*}
pkgs="k8s.io/component-base/version k8s.io/client-go/pkg/version"
ldflags="-s -w"
for p in $pkgs; do
    ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=clean -X $p.gitCommit=gomod-$K8S_VERSION"
    ldflags+=" -X $p.buildDate=1970-01-01T00:00:00Z"
done
t0=$SECONDS
(cd "$WORK/kube" && "$GO" build -ldflags "$ldflags" -o "$BIN/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver)
mv -f "$BIN/kube-apiserver.tmp" "$BIN/kube-apiserver"
log "kube-apiserver built in $((SECONDS - t0))s"

# ---- etcd ---------------------------------------------------------------------
EMOD_JSON=$(cd "$WORK/etcd" && "$GO" mod download -json "go.etcd.io/etcd/server/v3@$ETCD_VERSION") || true
EGOMOD=$(printf '%s' "$EMOD_JSON" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
[[ -f $EGOMOD ]] || { log "no go.mod for go.etcd.io/etcd/server/v3@$ETCD_VERSION:"; echo "$EMOD_JSON" >&2; exit 4; }
{
    echo "module tether.test/etcd-build"
    echo
    grep -E '^go [0-9]' "$EGOMOD"
    echo
    echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
} >"$WORK/etcd/go.mod"
t0=$SECONDS
(cd "$WORK/etcd" && "$GO" build -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=gomod-$ETCD_VERSION" \
    -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3)
mv -f "$BIN/etcd.tmp" "$BIN/etcd"
log "etcd built in $((SECONDS - t0))s"

"$BIN/etcd" --version >&2
"$BIN/kube-apiserver" --version >&2
echo "$WANT_STAMP" >"$STAMP"
rm -rf "$WORK"
echo "$BIN"
