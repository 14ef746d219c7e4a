#!/usr/bin/env bash
# Build the node tier's binaries from Go modules, pinned, into a cache
# directory keyed by every pinned version; skip whatever is already built.
#
#   tests/node/build.sh            build if missing, print the bin dir on stdout
#   tests/node/build.sh --check    exit 0 if built, 1 if not (no build)
#   tests/node/build.sh --print    print the bin dir and exit
#
# Output: ${TETHER_CACHE:-/var/cache/tether}/node/<versions>/bin/
#   kubelet kube-controller-manager kube-scheduler kubectl   (k8s.io/kubernetes)
#   containerd ctr containerd-shim-runc-v2                   (containerd/v2)
#   runc                                                     (CGO, seccomp)
#   cni/{bridge,host-local,loopback,portmap}                 (CNI plugins)
#   umoci                                                    (OCI image tool)
#   pause                                                    (sandbox: sleeps forever)
# kube-apiserver and etcd come from tests/k8s/build.sh (same kubernetes pin).
#
# Recipe: the same throwaway main module as tests/k8s/build.sh (see there why
# k8s.io/kubernetes needs one: its go.mod replaces the staging repos with
# ./staging paths). The other modules get a throwaway module too, so every
# binary is built the same way with `go build` from the module proxy only.
#
# Needs: Go (GO=...), gcc and libseccomp-dev (runc). Environment overrides:
# K8S_VERSION CONTAINERD_VERSION RUNC_VERSION CNI_VERSION UMOCI_VERSION
# TETHER_CACHE GO GOPROXY/GOMODCACHE/GOCACHE.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}       # 1.35 turns failCgroupV1 on by default
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.4.2}
RUNC_VERSION=${RUNC_VERSION:-v1.5.3}
CNI_VERSION=${CNI_VERSION:-v1.10.0}
UMOCI_VERSION=${UMOCI_VERSION:-v0.6.0}
CACHE_ROOT=${TETHER_CACHE:-/var/cache/tether}
KEY="k8s-$K8S_VERSION.containerd-$CONTAINERD_VERSION.runc-$RUNC_VERSION.cni-$CNI_VERSION.umoci-$UMOCI_VERSION"
DEST=$CACHE_ROOT/node/$KEY
BIN=$DEST/bin
STAMP=$BIN/.built
WANT_STAMP="$KEY pause=1"
ALL="kubelet kube-controller-manager kube-scheduler kubectl containerd ctr containerd-shim-runc-v2
     runc cni/bridge cni/host-local cni/loopback cni/portmap umoci pause"

built() {
    [[ -f $STAMP && "$(cat "$STAMP")" == "$WANT_STAMP" ]] || return 1
    local b
    for b in $ALL; do [[ -x $BIN/$b ]] || return 1; done
}

case "${1:-}" in
    --check) built; exit ;;
    --print) echo "$BIN"; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--check|--print]" >&2; exit 2 ;;
esac

log() { echo "node/build.sh: $*" >&2; }

if built; then
    log "cached: $BIN"
    echo "$BIN"
    exit 0
fi

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x $GO ]] || { log "no Go toolchain (set GO=/path/to/go)"; exit 3; }

mkdir -p "$DEST"
exec 9>"$DEST/.lock"
flock 9
if built; then
    log "cached (built by a concurrent run): $BIN"
    echo "$BIN"
    exit 0
fi

export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false -mod=mod"
export GOTOOLCHAIN=local
export GOWORK=off
export GONOSUMDB= GOPRIVATE=
export GOOS=linux

log "go: $("$GO" version)"
log "building $KEY into $BIN"
mkdir -p "$BIN/cni"
WORK=$DEST/src
rm -rf "$WORK"
mkdir -p "$WORK"
T_ALL=$SECONDS

# go.mod of a module at a version, from the proxy (path on stdout).
modfile() {
    local dir=$1 mod=$2 json gomod
    json=$(cd "$dir" && "$GO" mod download -json "$mod") || true
    gomod=$(printf '%s' "$json" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
    [[ -f $gomod ]] || { log "no go.mod for $mod:"; echo "$json" >&2; exit 4; }
    echo "$gomod"
}

# throwaway <dir> <module> <version>: a main module requiring <module>@<version>
# with the same go directive (replace lines are added by the caller if needed).
throwaway() {
    local dir=$1 mod=$2 ver=$3 gomod
    mkdir -p "$dir"
    gomod=$(modfile "$dir" "$mod@$ver")
    {
        echo "module tether.test/node-build"
        echo
        grep -E '^go [0-9]' "$gomod"
        grep -E '^godebug ' "$gomod" || true
        echo
        echo "require $mod $ver"
    } >"$dir/go.mod"
    echo "$gomod"
}

gobuild() {  # gobuild <dir> <out> <pkg> [go build args...]
    local dir=$1 out=$2 pkg=$3 t0=$SECONDS
    shift 3
    (cd "$dir" && "$GO" build "$@" -o "$out.tmp" "$pkg")
    mv -f "$out.tmp" "$out"
    log "$(basename "$out") built in $((SECONDS - t0))s"
}

# ---- kubernetes: kubelet, controller-manager, scheduler, kubectl -------------
K=$WORK/kube
KGOMOD=$(throwaway "$K" k8s.io/kubernetes "$K8S_VERSION")
STAGING_VERSION=v0.${K8S_VERSION#v1.}
{
    echo
    echo "replace ("
    sed -nE 's#^[[:space:]]*(k8s\.io/[A-Za-z0-9._-]+) => \./staging/src/k8s\.io/[A-Za-z0-9._-]+[[:space:]]*$#\t\1 => \1 '"$STAGING_VERSION"'#p' "$KGOMOD"
    echo ")"
} >>"$K/go.mod"
nrepl=$(grep -c ' => k8s.io/' "$K/go.mod" || true)
nstaging=$(grep -c '=> ./staging/' "$KGOMOD" || true)
[[ $nrepl -gt 0 && $nrepl -eq $nstaging ]] || {
    log "generated $nrepl replace lines but kubernetes go.mod has $nstaging staging replaces"; exit 4; }
major=${K8S_VERSION#v}; major=${major%%.*}
minor=${K8S_VERSION#v*.}; minor=${minor%%.*}
kld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    kld+=" -X $p.gitTreeState=clean -X $p.gitCommit=gomod-$K8S_VERSION"
    kld+=" -X $p.buildDate=1970-01-01T00:00:00Z"
done
for c in kubelet kube-controller-manager kube-scheduler kubectl; do
    [[ -x $BIN/$c ]] || gobuild "$K" "$BIN/$c" "k8s.io/kubernetes/cmd/$c" -ldflags "$kld"
done

# ---- containerd ---------------------------------------------------------------
C=$WORK/containerd
throwaway "$C" github.com/containerd/containerd/v2 "$CONTAINERD_VERSION" >/dev/null
cld="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
cld+=" -X github.com/containerd/containerd/v2/version.Revision=gomod"
for c in containerd ctr containerd-shim-runc-v2; do
    [[ -x $BIN/$c ]] || gobuild "$C" "$BIN/$c" "github.com/containerd/containerd/v2/cmd/$c" \
        -tags "no_btrfs no_devmapper no_zfs" -ldflags "$cld"
done

# ---- runc (CGO + libseccomp) -------------------------------------------------
R=$WORK/runc
throwaway "$R" github.com/opencontainers/runc "$RUNC_VERSION" >/dev/null
[[ -x $BIN/runc ]] || CGO_ENABLED=1 gobuild "$R" "$BIN/runc" github.com/opencontainers/runc \
    -tags seccomp -ldflags "-s -w -X main.version=${RUNC_VERSION#v} -X main.gitCommit=gomod"

# ---- CNI plugins --------------------------------------------------------------
N=$WORK/cni
throwaway "$N" github.com/containernetworking/plugins "$CNI_VERSION" >/dev/null
for p in main/bridge ipam/host-local main/loopback meta/portmap; do
    [[ -x $BIN/cni/${p#*/} ]] || gobuild "$N" "$BIN/cni/${p#*/}" \
        "github.com/containernetworking/plugins/plugins/$p" -ldflags "-s -w"
done

# ---- umoci --------------------------------------------------------------------
U=$WORK/umoci
throwaway "$U" github.com/opencontainers/umoci "$UMOCI_VERSION" >/dev/null
[[ -x $BIN/umoci ]] || gobuild "$U" "$BIN/umoci" github.com/opencontainers/umoci/cmd/umoci \
    -ldflags "-s -w -X main.version=${UMOCI_VERSION#v}"

# ---- pause: the sandbox image's only binary -----------------------------------
P=$WORK/pause
mkdir -p "$P"
cat >"$P/go.mod" <<EOF
module tether.test/pause

go 1.22
EOF
cat >"$P/main.go" <<'EOF'
// pause: PID 1 of a pod sandbox; reaps children, exits on SIGINT/SIGTERM.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 8)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sig {
		if s == syscall.SIGCHLD {
			for {
				var ws syscall.WaitStatus
				if pid, _ := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
EOF
gobuild "$P" "$BIN/pause" . -ldflags "-s -w"

for b in $ALL; do [[ -x $BIN/$b ]] || { log "missing $b"; exit 5; }; done
"$BIN/kubelet" --version >&2
"$BIN/containerd" --version >&2
"$BIN/runc" --version >&2
echo "$WANT_STAMP" >"$STAMP"
rm -rf "$WORK"
log "all built in $((SECONDS - T_ALL))s"
echo "$BIN"
