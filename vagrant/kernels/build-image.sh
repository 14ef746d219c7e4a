#!/usr/bin/env bash
# Build (or find cached) a bootable test image for one Debian kernel line.
#
#   vagrant/kernels/build-image.sh LINE [ABI]
#
# LINE is a kernel line from the table below (5.10, 6.1, 6.12, 6.12-bpo); ABI
# pins one kernel (e.g. 6.1.0-56-amd64) instead of the newest in the suite.
# Prints the image directory on stdout (vmlinuz, initrd.img, rootfs.img,
# info.json); logs go to stderr.
#
# Every image has the same userspace - Debian 12 (bookworm): python3.11,
# Debian's BCC 0.26 with clang 14, the project's venv - so that a difference
# between two kernels' results is the kernel's (verifier, helpers, hooks), not
# a different compiler or BCC.  What varies is the kernel, its modules and its
# own linux-headers package, which BCC compiles against inside the VM exactly
# as on a Debian host running that kernel.
#
# Only Debian's mirror is used (the host the machine's apt uses); nothing else
# is downloaded except the project's Python dependencies from PyPI.
#
# Cache layout (${TETHER_CACHE:-/var/cache/tether}/kernels):
#   apt/<line>/          private apt state for the line's suites (host apt untouched)
#   debs/                kernel .debs
#   base-<hash>/rootfs   the shared userspace tree (debootstrap + venv)
#   img-<line>-<abi>-<hash>/   what the runner boots
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${TETHER_CACHE:-/var/cache/tether}/kernels
mirror=${TETHER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${TETHER_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
base_suite=bookworm

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Kernel line -> the apt suites its linux-image-amd64 comes from.
suites_for() {
  case $1 in
    5.10) echo "$mirror bullseye|$security bullseye-security" ;;
    6.1) echo "$mirror bookworm|$mirror bookworm-updates|$security bookworm-security" ;;
    6.12) echo "$mirror trixie|$security trixie-security" ;;
    6.12-bpo) echo "$mirror bookworm-backports" ;;
    *) return 1 ;;
  esac
}

[ $# -ge 1 ] || die "usage: $0 LINE [ABI]   (LINE: 5.10 6.1 6.12 6.12-bpo)"
line=$1
abi=${2:-}
suites=$(suites_for "$line") || die "unknown kernel line $line (known: 5.10 6.1 6.12 6.12-bpo)"
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
for t in debootstrap mkfs.ext4 apt-get dpkg-deb python3; do
  command -v "$t" >/dev/null || die "$t not found (apt-get install debootstrap e2fsprogs)"
done
mkdir -p "$cache/debs"

# --- the line's kernel packages ---------------------------------------------
aptdir=$cache/apt/$line
mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial"
: >"$aptdir/status"
{
  IFS='|' read -ra entries <<<"$suites"
  for e in "${entries[@]}"; do echo "deb [signed-by=$keyring] ${e% *} ${e#* } main"; done
} >"$aptdir/sources.list"
apt_opts=(-o "Dir::State=$aptdir" -o "Dir::State::status=$aptdir/status"
          -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache=$aptdir"
          -o "Dir::Cache::archives=$aptdir/archives"
          -o "Dir::Etc::sourcelist=$aptdir/sources.list" -o "Dir::Etc::sourceparts=-"
          -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
# refresh the lists at most once a day
if [ -z "$(find "$aptdir/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  log "apt-get update for $line ($suites)"
  apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update failed for $line"
fi
if [ -z "$abi" ]; then
  abi=$(apt-cache "${apt_opts[@]}" depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: linux-image-\(.*-amd64\)$/\1/p' | head -1)
  [ -n "$abi" ] || die "cannot resolve linux-image-amd64 in $line"
fi
kver_deb=$(apt-cache "${apt_opts[@]}" show "linux-image-$abi" 2>/dev/null |
           sed -n 's/^Version: //p' | head -1)
[ -n "$kver_deb" ] || die "linux-image-$abi is not in $line's suites"
log "kernel line $line: $abi ($kver_deb)"

# The common headers package name: 6.12 names it <ver>+debNN-common, older lines <ver>-common.
common_pkg=$(apt-cache "${apt_opts[@]}" depends "linux-headers-$abi" 2>/dev/null |
             sed -n 's/^ *Depends: \(linux-headers-.*-common\)$/\1/p' | head -1)
[ -n "$common_pkg" ] || die "cannot resolve the common headers of linux-headers-$abi"
kdebs=("linux-image-$abi" "linux-headers-$abi" "$common_pkg")
need=()
for p in "${kdebs[@]}"; do
  ls "$cache/debs/${p}_"*.deb >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "downloading ${need[*]}"
  (cd "$cache/debs" && apt-get "${apt_opts[@]}" -qq download "${need[@]}" >&2) ||
    die "apt-get download ${need[*]} failed"
fi
deb_of() { ls -t "$cache/debs/${1}_"*.deb | head -1; }

# --- the shared userspace (bookworm) ------------------------------------------
# Debian packages the tests use inside the VM (vagrant/provision.sh's list minus
# the benchmark peers and tshark, which the bpf and netns tiers do not run).
base_pkgs="python3 python3-venv python3-bpfcc libbpfcc bpftool iproute2 kmod procps
  busybox-static ca-certificates netbase iputils-ping util-linux"
base_hash=$( { echo "$base_suite $mirror"; echo "$base_pkgs";
               sed -n '/^# --- the shared userspace/,/^# --- end of the shared userspace/p' "$0";
               cat "$repo/pyproject.toml"; } | sha256sum | cut -c1-12)
base=$cache/base-$base_hash
rootfs=$base/rootfs

in_chroot_mounts() {
  mount -t proc proc "$rootfs/proc"
  mount -t sysfs sys "$rootfs/sys"
  mount --bind /dev "$rootfs/dev"
  mount --bind /dev/pts "$rootfs/dev/pts"
}
undo_chroot_mounts() {
  for m in dev/pts dev sys proc; do
    mountpoint -q "$rootfs/$m" && umount -l "$rootfs/$m"
  done
  return 0
}

if [ ! -e "$base/.done" ]; then
  t0=$SECONDS
  # never rm -rf a tree with something mounted inside it
  if [ -d "$rootfs" ]; then undo_chroot_mounts; fi
  if grep -q " $base/" /proc/mounts; then die "something is still mounted under $base"; fi
  if [ ! -e "$base/.os-done" ]; then
  rm -rf "$base"
  mkdir -p "$base"
  log "debootstrap $base_suite (minbase) into $rootfs"
  debootstrap --variant=minbase --keyring="$keyring" "$base_suite" "$rootfs" "$mirror" \
    >"$base/debootstrap.log" 2>&1 || { tail -20 "$base/debootstrap.log" >&2; die "debootstrap failed (log: $base/debootstrap.log)"; }
  trap undo_chroot_mounts EXIT
  in_chroot_mounts
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $base_suite main
deb $mirror $base_suite-updates main
deb $security $base_suite-security main
EOF
  cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"; chmod +x "$rootfs/usr/sbin/policy-rc.d"
  log "installing packages: $(echo $base_pkgs)"
  chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
    "apt-get -qq update && apt-get -y -qq upgrade && apt-get install -y -qq --no-install-recommends $(echo $base_pkgs)" \
    >"$base/apt.log" 2>&1 || { tail -20 "$base/apt.log" >&2; die "apt-get in the image failed (log: $base/apt.log)"; }
  chroot "$rootfs" sh -c 'apt-get clean; rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/*'
  touch "$base/.os-done"
  else
    log "reusing the Debian packages in $rootfs; redoing the venv"
    trap undo_chroot_mounts EXIT
    in_chroot_mounts
    rm -rf "$rootfs/tether" "$rootfs/wheels" "$rootfs/opt/tether-venv"
  fi
  # The venv the tests run in, as vagrant/provision.sh makes it: from Debian's
  # python3 with system site packages (bcc).  tether is installed editable from
  # /tether, where the runner mounts the project disk at boot.  The wheels come
  # from PyPI through the host's pip (its proxy and CA settings), built by a
  # host Python of the image's version (3.11), and are installed offline.
  hostpy=
  for py in ${TETHER_HOST_PYTHON:-} "$repo/.venv/bin/python" python3 python3.11; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null &&
       "$py" -m pip --version >/dev/null 2>&1; then hostpy=$py; break; fi
  done
  [ -n "$hostpy" ] || die "no host Python 3.11 with pip to fetch wheels (set TETHER_HOST_PYTHON)"
  mkdir -p "$rootfs/tether" "$rootfs/wheels"
  (cd "$repo" && { git ls-files -z --cached --others --exclude-standard 2>/dev/null ||
     find . -path ./.venv -prune -o -type f -print0; } | xargs -0 cp --parents -t "$rootfs/tether")
  log "fetching wheels for tether[dev] with $hostpy"
  # setuptools too: the image's venv has Debian's 66, older than the 74.1 that
  # reads pyproject's ext-modules (the install below runs without isolation)
  "$hostpy" -m pip wheel -q -w "$rootfs/wheels" "$rootfs/tether[dev]" wheel "setuptools>=74.1" >"$base/wheels.log" 2>&1 ||
    { tail -20 "$base/wheels.log" >&2; die "pip wheel failed (log: $base/wheels.log)"; }
  rm -f "$rootfs"/wheels/tether-*.whl
  rm -rf "$rootfs/tether/build" "$rootfs"/tether/*.egg-info
  log "creating /opt/tether-venv (offline, from the wheels)"
  chroot "$rootfs" /bin/sh -c '
    set -e
    unset PIP_FIND_LINKS PIP_CERT
    python3 -m venv --system-site-packages /opt/tether-venv
    /opt/tether-venv/bin/pip install -q --no-index --find-links /wheels wheel "setuptools>=74.1"
    /opt/tether-venv/bin/pip install -q --no-index --find-links /wheels --no-build-isolation -e "/tether[dev]"
    /opt/tether-venv/bin/python -c "import bcc, agent.datapath.loader, pytest"
  ' >"$base/pip.log" 2>&1 || { tail -20 "$base/pip.log" >&2; die "pip in the image failed (log: $base/pip.log)"; }
  rm -rf "$rootfs/wheels"
  # keep the editable finder's target dir, drop the copy (the disk is mounted there)
  find "$rootfs/tether" -mindepth 1 -delete
  # the init the kernel runs after the initramfs hands over (see tether-init)
  install -m 0755 "$here/tether-init" "$rootfs/sbin/tether-init"
  echo tether-vm >"$rootfs/etc/hostname"
  printf '127.0.0.1 localhost tether-vm\n::1 localhost ip6-localhost\n' >"$rootfs/etc/hosts"
  rm -rf "$rootfs/root/.cache"
  undo_chroot_mounts
  trap - EXIT
  touch "$base/.done"
  # older userspaces are not needed: every image is self-contained
  for d in "$cache"/base-*; do [ "$d" = "$base" ] || [ ! -d "$d" ] || grep -q " $d/" /proc/mounts || rm -rf "$d"; done
  log "base userspace built in $((SECONDS - t0)) s ($(du -sh "$rootfs" | cut -f1))"
fi
# --- end of the shared userspace ---------------------------------------------

# --- the kernel image ---------------------------------------------------------
img_hash=$( { echo "$base_hash"; for p in "${kdebs[@]}"; do basename "$(deb_of "$p")"; done;
              cat "$here/mkinitrd.py" "$here/tether-init"; } | sha256sum | cut -c1-12)
img=$cache/img-$line-$abi-$img_hash
if [ -e "$img/.done" ]; then
  log "cached: $img"
  echo "$img"
  exit 0
fi
t0=$SECONDS
rm -rf "$img"
mkdir -p "$img"
work=$img/root
log "composing the $abi root filesystem"
cp -a "$rootfs" "$work"
# tar --keep-directory-symlink: the packages ship ./lib/modules, and /lib is a
# symlink (merged /usr) that plain dpkg-deb -x would replace by a directory.
for p in "${kdebs[@]}"; do
  dpkg-deb --fsys-tarfile "$(deb_of "$p")" | tar -x --keep-directory-symlink -C "$work"
done
install -m 0755 "$here/tether-init" "$work/sbin/tether-init"
chroot "$work" /sbin/depmod -a "$abi"
mv "$work/boot/vmlinuz-$abi" "$img/vmlinuz"
python3 "$here/mkinitrd.py" "$work" "$abi" "$work/bin/busybox" "$img/initrd.img" >&2
# The image: the tree plus room for the tests (BCC objects, pins, logs).
mb=$(( $(du -sm "$work" | cut -f1) + 768 ))
mkfs.ext4 -q -F -L tether-root -d "$work" "$img/rootfs.img" "${mb}M" >&2 ||
  die "mkfs.ext4 -d failed"
rm -rf "$work"
cat >"$img/info.json" <<EOF
{"line": "$line", "abi": "$abi", "version": "$kver_deb", "suites": "$suites",
 "base": "$base_hash", "userspace": "$base_suite"}
EOF
touch "$img/.done"
for d in "$cache/img-$line-"*; do [ "$d" = "$img" ] || rm -rf "$d"; done
log "image $img built in $((SECONDS - t0)) s ($(du -sh --apparent-size "$img/rootfs.img" | cut -f1) apparent, $(du -sh "$img/rootfs.img" | cut -f1) used)"
echo "$img"
