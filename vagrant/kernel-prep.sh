#!/usr/bin/env bash
# Vagrant only: make a VM boot the kernel line it stands for, and give it what
# vagrant/provision.sh cannot install from the box's own release.  Runs before
# provision.sh; the Vagrantfile reboots the VM after it when it says so.
#
# usage: vagrant/kernel-prep.sh MODE
#   none          the box's own kernel is the line (Debian 12 / 6.1,
#                 Ubuntu 24.04 / 6.8, Debian 13 / 6.12)
#   bullseye-5.10 a Debian 12 box booting Debian 11's 5.10 kernel: tether needs
#                 Python >= 3.11, which Debian 11 (3.9) does not have, so the
#                 5.10 VM keeps bookworm's userspace and changes only the kernel
#                 - the same split the offline QEMU runner (vagrant/kernels) uses
#   jammy-py311   Ubuntu 22.04 / 5.15: the kernel is the box's, but its python3
#                 is 3.10; install python3.11 (jammy-updates, universe) for the
#                 venv.  BCC's Python module is pure Python (ctypes on
#                 libbcc.so), so python3.11 uses Ubuntu's python3-bpfcc as is.
set -euo pipefail
mode=${1:-none}
export DEBIAN_FRONTEND=noninteractive
log() { printf 'kernel-prep: %s\n' "$*" >&2; }

case $mode in
  none) ;;
  bullseye-5.10)
    # bullseye main too: the 5.10 headers depend on gcc-10 (linux-compiler-gcc-10-x86)
    cat >/etc/apt/sources.list.d/bullseye-kernel.list <<'EOF'
deb http://deb.debian.org/debian bullseye main
deb http://deb.debian.org/debian-security bullseye-security main
EOF
    # bookworm stays preferred; bullseye only provides what bookworm lacks
    cat >/etc/apt/preferences.d/bullseye-kernel <<'EOF'
Package: *
Pin: release n=bullseye
Pin-Priority: 100

Package: *
Pin: release n=bullseye-security
Pin-Priority: 100
EOF
    apt-get update -qq
    ver=$(apt-cache madison linux-image-amd64 | awk '$3 ~ /^5\.10\./ {print $3}' | sort -V | tail -n 1)
    abi=$(apt-cache show "linux-image-amd64=$ver" 2>/dev/null | sed -n 's/^Depends: linux-image-\([^ ]*\) .*/\1/p' | head -n 1)
    [ -n "$abi" ] || { log "no 5.10 kernel in bullseye-security"; exit 1; }
    log "installing linux-image-$abi and its headers"
    apt-get install -y -qq --no-install-recommends "linux-image-$abi" "linux-headers-$abi" >/dev/null
    # boot it by default (grub accepts a menu path of titles)
    os=$(. /etc/os-release && echo "$NAME")
    echo "GRUB_DEFAULT=\"Advanced options for $os>$os, with Linux $abi\"" >/etc/default/grub.d/90-tether-kernel.cfg
    update-grub >/dev/null 2>&1
    log "next boot: $abi (the Vagrantfile reboots now)"
    ;;
  jammy-py311)
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv >/dev/null
    # Ubuntu has no bpftool package; it is in linux-tools for the running kernel
    apt-get install -y -qq --no-install-recommends linux-tools-common "linux-tools-$(uname -r)" >/dev/null || true
    ;;
  *) log "unknown mode $mode"; exit 1 ;;
esac
