#!/usr/bin/env bash
# Build the tether image and the test app image WITHOUT Docker: a Debian 12
# root filesystem from debootstrap, packed as OCI images with umoci.
#
#   daemonset/image/build.sh [OUTDIR]     build (cached), print OUTDIR on stdout
#   daemonset/image/build.sh --print      print the output dir and exit
#   daemonset/image/build.sh --check      exit 0 if built (no build)
#
# Output (default ${TETHER_CACHE:-/var/cache/tether}/image/<key>/):
#   tether.oci.tar   OCI layout, tag 0.1.0: the agent and CA image (Dockerfile's twin)
#   app.oci.tar      OCI layout, tag 0.1.0: test workloads (echo server + client)
#   sizes.txt        layer and image sizes
# Import into containerd without a registry:
#   ctr -n k8s.io images import --base-name localhost/tether tether.oci.tar
#   ctr -n k8s.io images import --base-name localhost/tether-app app.oci.tar
#
# Layers: [base] Debian 12 minbase + daemonset/image/packages.txt (shared by
# both images) + [tether] the project in /opt/tether (venv,
# --system-site-packages) or [app] /app/echo.py.
# The base rootfs is cached by the hash of packages.txt and kernel-headers.sh
# (and SUITE, MIRROR);
# the images by the hash of what pip installs (the tracked files of
# pyproject.toml, README.md, agent/, bpf/; working-tree content) and of
# build.sh, echo.py and packages.txt.
#
# Needs root, debootstrap, umoci (UMOCI=..., or tests/node/build.sh builds
# one), network access to the Debian mirror and PyPI.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TAG=${TAG:-0.1.0}
CACHE_ROOT=${TETHER_CACHE:-/var/cache/tether}
PKGS_FILE=$HERE/packages.txt

log() { echo "image/build.sh: $*" >&2; }
packages() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$PKGS_FILE" | grep -v '^$'; }

BASE_KEY=$( { echo "$SUITE $MIRROR minbase"; packages; cat "$HERE/kernel-headers.sh"; } | sha256sum | cut -c1-16)
# What `pip install` reads: the tracked files of these (working-tree content).
PROJECT_FILES=(pyproject.toml README.md agent bpf waypoint)
project_files() { (cd "$ROOT" && git ls-files -z -- "${PROJECT_FILES[@]}"); }
SRC_KEY=$( {
    project_files | sort -z | (cd "$ROOT" && xargs -0 sha256sum)
    cat "$HERE/build.sh" "$HERE/echo.py" "$HERE/packages.txt"
    echo "$BASE_KEY $TAG"
} | sha256sum | cut -c1-16)
OUT=${1:-$CACHE_ROOT/image/$SRC_KEY}
[[ ${1:-} == --print ]] && { echo "$CACHE_ROOT/image/$SRC_KEY"; exit 0; }
if [[ ${1:-} == --check ]]; then
    OUT=$CACHE_ROOT/image/$SRC_KEY
    [[ -f $OUT/tether.oci.tar && -f $OUT/app.oci.tar && -f $OUT/.built ]]; exit
fi

if [[ -f $OUT/tether.oci.tar && -f $OUT/app.oci.tar && -f $OUT/.built ]]; then
    log "cached: $OUT"
    echo "$OUT"
    exit 0
fi

[[ $(id -u) == 0 ]] || { log "must run as root (debootstrap, chroot)"; exit 3; }
command -v debootstrap >/dev/null || { log "debootstrap missing (apt-get install debootstrap)"; exit 3; }

mkdir -p "$CACHE_ROOT/image"
exec 9>"$CACHE_ROOT/image/.lock"
flock 9
T0=$SECONDS

WORK=$(mktemp -d "$CACHE_ROOT/image/work.XXXXXX")
MOUNTS=()
# rm -rf that never crosses into a mount (a chroot's /proc or /dev left
# mounted by an interrupted debootstrap or build).
safe_rm() {
    local d=$1 m
    [[ -e $d ]] || return 0
    for m in $(awk -v p="$(realpath "$d")/" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$d"
}
cleanup() {
    local m
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTS[i]}" 2>/dev/null || true; done
    safe_rm "$WORK"
}
trap cleanup EXIT

# ---- base rootfs (cached by package list) -----------------------------------
BASE=$CACHE_ROOT/image/base-$BASE_KEY
if [[ ! -f $BASE/.built ]]; then
    t=$SECONDS
    safe_rm "$BASE"
    mkdir -p "$BASE"
    log "debootstrap $SUITE ($(packages | tr '\n' ' ')) -> $BASE/rootfs"
    debootstrap --variant=minbase --include="$(packages | paste -sd, -)" \
        "$SUITE" "$BASE/rootfs" "$MIRROR" >"$BASE/debootstrap.log" 2>&1 || {
        tail -20 "$BASE/debootstrap.log" >&2; exit 4; }
    # The kernel headers out of /usr/src, where the DaemonSet's mounts hide them
    # (the same script as the Dockerfile's).
    cp "$HERE/kernel-headers.sh" "$BASE/rootfs/tmp/kernel-headers.sh"
    chroot "$BASE/rootfs" /bin/sh /tmp/kernel-headers.sh
    # What Debian's docker images do: no caches, no package lists, no logs.
    chroot "$BASE/rootfs" apt-get clean
    rm -rf "$BASE/rootfs"/var/lib/apt/lists/* "$BASE/rootfs"/var/cache/apt/*.bin \
        "$BASE/rootfs"/var/log/*.log "$BASE/rootfs"/var/log/apt/* "$BASE/rootfs"/tmp/*
    : >"$BASE/rootfs/etc/resolv.conf"
    echo tether >"$BASE/rootfs/etc/hostname"
    chroot "$BASE/rootfs" dpkg-query -W -f='${Package}=${Version}\n' >"$BASE/packages.lock"
    date -u +%FT%TZ >"$BASE/.built"
    log "base rootfs in $((SECONDS - t))s ($(wc -l <"$BASE/packages.lock") packages)"
fi

UMOCI=${UMOCI:-$(command -v umoci || true)}
if [[ -z $UMOCI ]]; then
    UMOCI=$("$ROOT/tests/node/build.sh" --print)/umoci
fi
[[ -x $UMOCI ]] || { log "umoci missing (UMOCI=/path, or run tests/node/build.sh)"; exit 3; }

# ---- OCI layout with the base layer ------------------------------------------
# unpack/repack: umoci records the difference between the unpacked bundle and
# the repacked one as a new layer.
OCI=$WORK/oci
"$UMOCI" init --layout "$OCI"
"$UMOCI" new --image "$OCI:base"
"$UMOCI" unpack --image "$OCI:base" "$WORK/b"
cp -a "$BASE/rootfs/." "$WORK/b/rootfs/"
"$UMOCI" repack --image "$OCI:base" --history.created_by "debootstrap --variant=minbase $SUITE + packages.txt + kernel-headers.sh" "$WORK/b"
rm -rf "$WORK/b"

chroot_mounts() {  # proc, dev and the host's resolver for pip
    local r=$1
    mount -t proc proc "$r/proc"; MOUNTS+=("$r/proc")
    mount --rbind /dev "$r/dev"; mount --make-rslave "$r/dev"; MOUNTS+=("$r/dev")
    cp /etc/resolv.conf "$r/etc/resolv.conf"
}
chroot_umounts() {
    local r=$1
    umount -l "$r/dev"; umount "$r/proc"
    MOUNTS=()
    : >"$r/etc/resolv.conf"
}

# ---- tether ---------------------------------------------------------------------
t=$SECONDS
"$UMOCI" unpack --image "$OCI:base" "$WORK/t"
R=$WORK/t/rootfs
mkdir -p "$R/src"
project_files | (cd "$ROOT" && tar --null -T - -cf -) | tar -C "$R/src" -xf -
chroot_mounts "$R"
# The host's CA bundle only for the download (a TLS-inspecting proxy), not kept.
cp /etc/ssl/certs/ca-certificates.crt "$R/tmp/host-ca.crt"
chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    PIP_CERT=/tmp/host-ca.crt PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    /bin/sh -ec '
        python3 -m venv --system-site-packages /opt/tether
        /opt/tether/bin/pip install -q "/src[fast,waypoint]"
        /opt/tether/bin/python -c "import bcc, agent.cli"
        /opt/tether/bin/pip freeze >/opt/tether/requirements.lock
    '
chroot_umounts "$R"
rm -rf "$R/src" "$R/tmp/host-ca.crt" "$R/root/.cache"
find "$R/opt/tether" -name __pycache__ -prune -exec rm -rf {} +
cp "$R/opt/tether/requirements.lock" "$WORK/tether.requirements.lock"
"$UMOCI" repack --image "$OCI:tether-wip" --history.created_by "venv /opt/tether + pip install ." "$WORK/t"
"$UMOCI" config --image "$OCI:tether-wip" --tag "$TAG" \
    --config.env PATH=/opt/tether/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env PYTHONUNBUFFERED=1 \
    --config.entrypoint tether --config.cmd --help \
    --config.workingdir / --author tether
safe_rm "$WORK/t"
log "tether layer in $((SECONDS - t))s"

oci_tar() {  # oci_tar <out.tar> <tag>: a layout holding only that tag
    local lay=$WORK/out
    rm -rf "$lay"
    cp -a "$OCI" "$lay"
    local t
    for t in $("$UMOCI" ls --layout "$lay"); do
        [[ $t == "$2" ]] || "$UMOCI" rm --image "$lay:$t"
    done
    "$UMOCI" gc --layout "$lay"
    tar -C "$lay" --sort=name --owner=0 --group=0 --numeric-owner -cf "$1.tmp" .
    mv -f "$1.tmp" "$1"
    rm -rf "$lay"
}
mkdir -p "$OUT"
oci_tar "$OUT/tether.oci.tar" "$TAG"
"$UMOCI" rm --image "$OCI:$TAG"

# ---- app: echo server/client on the same base ------------------------------------
"$UMOCI" unpack --image "$OCI:base" "$WORK/a"
mkdir -p "$WORK/a/rootfs/app"
install -m 0755 "$HERE/echo.py" "$WORK/a/rootfs/app/echo.py"
"$UMOCI" repack --image "$OCI:app-wip" --history.created_by "COPY echo.py /app/" "$WORK/a"
"$UMOCI" config --image "$OCI:app-wip" --tag "$TAG" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env PYTHONUNBUFFERED=1 \
    --config.entrypoint python3 --config.entrypoint /app/echo.py --config.cmd serve \
    --config.workingdir /app --author tether
rm -rf "$WORK/a"
oci_tar "$OUT/app.oci.tar" "$TAG"

{
    echo "built $(date -u +%FT%TZ) in $((SECONDS - T0))s (base rootfs cached: $BASE)"
    echo "base rootfs (uncompressed): $(du -sh --apparent-size "$BASE/rootfs" | cut -f1)"
    echo "tether.oci.tar: $(du -h --apparent-size "$OUT/tether.oci.tar" | cut -f1)"
    echo "app.oci.tar:    $(du -h --apparent-size "$OUT/app.oci.tar" | cut -f1)"
    echo "layers (gzip) of tether:"
    tar -tvf "$OUT/tether.oci.tar" | awk '$6 ~ /blobs\/sha256/ && $3 > 100000 {printf "  %8.1f MiB %s\n", $3/1048576, $6}'
} >"$OUT/sizes.txt"
cp "$BASE/packages.lock" "$OUT/packages.lock"
cp "$WORK/tether.requirements.lock" "$OUT/requirements.lock"
date -u +%FT%TZ >"$OUT/.built"
cat "$OUT/sizes.txt" >&2
echo "$OUT"
