#!/usr/bin/env bash
# `make test-vagrant`: the tiers inside a Vagrant VM on a locally built box,
# and a host left as it was found.
#
#   1. Debian's vagrant, vagrant-libvirt and libvirt (installed if missing)
#   2. the host's state is recorded: ip_forward, the iptables/ip6tables rules,
#      libvirt's domains, networks and pools (when libvirtd runs)
#   3. virtlogd and libvirtd are started if they do not run (no systemd needed)
#   4. vagrant/box/build.sh builds or reuses tether/debian12-<line>
#   5. vagrant up <vm> (provisioners: kernel, setup, test = the tiers)
#   6. always: vagrant destroy -f, the box's libvirt volume and whatever pool or
#      network Vagrant made removed, the daemons this script started stopped,
#      LIBVIRT_* chains removed and ip_forward restored - then checked: any
#      difference from step 2 fails the run
#
# Environment: TETHER_VAGRANT_LINES (default "6.1"), TETHER_TIERS (default
# "bpf netns"), TETHER_LIBVIRT_DRIVER (kvm|qemu; default: probed),
# VAGRANT_HOME (default /var/cache/tether/vagrant/home: libvirt's qemu user
# must read the box's kernel, which a 0700 home directory would hide).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
export VAGRANT_HOME=${VAGRANT_HOME:-${TETHER_CACHE:-/var/cache/tether}/vagrant/home}
export VAGRANT_DEFAULT_PROVIDER=libvirt TETHER_LOCAL_BOXES=1
export LIBVIRT_DEFAULT_URI=qemu:///system
lines=${TETHER_VAGRANT_LINES:-6.1}
log() { printf 'test-vagrant: [%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (libvirt's system instance, chroot for the box)"
T0=$SECONDS

# --- 1. tools ----------------------------------------------------------------
need=()
for c in vagrant:vagrant virsh:libvirt-clients libvirtd:libvirt-daemon-system qemu-img:qemu-utils \
         qemu-system-x86_64:qemu-system-x86 iptables:iptables nft:nftables mkfs.ext4:e2fsprogs debootstrap:debootstrap; do
  command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
vagrant plugin list 2>/dev/null | grep -q vagrant-libvirt || need+=(vagrant-libvirt)
dpkg-query -W -f='${Status}' dnsmasq-base 2>/dev/null | grep -q 'install ok installed' || need+=(dnsmasq-base)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need[@]}" libvirt-daemon-driver-qemu >/dev/null || die "apt-get install failed"
fi

# --- 2. the host as found -----------------------------------------------------
state=$(mktemp -d /tmp/tether-vagrant-state.XXXXXX)
snapshot() {  # DIR: what must be the same after the run
  local d=$1; mkdir -p "$d"
  sysctl -n net.ipv4.ip_forward >"$d/ip_forward"
  sysctl -n net.ipv6.conf.all.forwarding >"$d/ip6_forward"
  iptables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]//' >"$d/iptables"
  ip6tables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]//' >"$d/ip6tables"
  if command -v nft >/dev/null; then nft list ruleset >"$d/nft" 2>&1; fi
  ip -o link show type bridge 2>/dev/null | awk -F': ' '{print $2}' | sort >"$d/bridges"
  pgrep -x dnsmasq -a 2>/dev/null | grep -c libvirt >"$d/dnsmasq" || true
  # libvirt's persistent objects, from its config files: they exist whether
  # libvirtd runs or not (Debian ships the "default" network defined, inactive)
  xmlnames() { ls "$1"/*.xml 2>/dev/null | sed 's#.*/##; s#\.xml$##' | sort; }
  xmlnames /etc/libvirt/qemu >"$d/domains"
  xmlnames /etc/libvirt/qemu/networks >"$d/networks"
  xmlnames /etc/libvirt/storage >"$d/pools"
  # (libvirtd's first start also writes nwfilter/ and secrets/: its own
  # configuration, kept; the pool directory is vagrant-libvirt's doing)
  find /etc/libvirt -maxdepth 1 -name storage >"$d/etc-libvirt"
}
snapshot "$state/before"
pidof libvirtd >/dev/null && had_libvirtd=1 || had_libvirtd=
pidof virtlogd >/dev/null && had_virtlogd=1 || had_virtlogd=
pool_vols_before=$(virsh -q vol-list default 2>/dev/null | awk '{print $1}' | sort)

# --- 6. teardown (on every exit) ---------------------------------------------
strip_libvirt_chains() {  # remove LIBVIRT_* chains that were not there before
  local tool=$1 before=$2 table c
  for table in filter nat mangle raw; do
    $tool -t "$table" -S >/dev/null 2>&1 || continue
    # the jumps into the chains from the built-in ones, then the chains
    $tool -t "$table" -S | grep -E -- '-j LIBVIRT_' | grep '^-A' | while read -r _ rest; do
      grep -qxF -- "-A $rest" <(grep -v '^\*\|^:\|^COMMIT' "$before") || eval "$tool -t $table -D $rest"
    done
    for c in $($tool -t "$table" -S | awk '$1=="-N" && $2 ~ /^LIBVIRT_/ {print $2}'); do
      grep -q "^:$c " "$before" && continue
      $tool -t "$table" -F "$c"; $tool -t "$table" -X "$c"
    done
  done
}
teardown() {
  local rc=$? t=$SECONDS
  trap - EXIT INT TERM
  log "teardown"
  cd "$here"
  for l in $lines; do
    vm=debian12-$l; [ "$l" = 5.10 ] && vm=debian11-5.10; [ "$l" = 6.12 ] && vm=debian13-6.12
    timeout 600 vagrant destroy -f "$vm" >&2 || log "vagrant destroy $vm failed"
  done
  if virsh -q list --all >/dev/null 2>&1; then
    # domains, networks and pools that were not there before (Vagrant's
    # management network, the storage pool it defines) and the box volumes
    # vagrant-libvirt uploaded into the default pool
    for d in $(virsh -q list --all --name); do
      grep -qxF "$d" "$state/before/domains" || { virsh destroy "$d"; virsh undefine --nvram "$d" || virsh undefine "$d"; } >/dev/null 2>&1
    done
    for v in $(virsh -q vol-list default 2>/dev/null | awk '{print $1}'); do
      grep -qxF "$v" <<<"$pool_vols_before" || virsh vol-delete --pool default "$v" >/dev/null
    done
    for n in $(virsh -q net-list --all --name); do
      grep -qxF "$n" "$state/before/networks" && continue
      virsh net-destroy "$n" >/dev/null 2>&1; virsh net-undefine "$n" >/dev/null 2>&1
    done
    # networks libvirt autostarted because we started libvirtd
    if [ -z "$had_libvirtd" ]; then
      for n in $(virsh -q net-list --name); do virsh net-destroy "$n" >/dev/null 2>&1; done
    fi
    for p in $(virsh -q pool-list --all --name); do
      grep -qxF "$p" "$state/before/pools" && continue
      virsh pool-destroy "$p" >/dev/null 2>&1; virsh pool-undefine "$p" >/dev/null 2>&1
    done
  fi
  # the pool's config directory, if vagrant-libvirt's pool made it and it is empty now
  grep -qxF /etc/libvirt/storage "$state/before/etc-libvirt" ||
    { rmdir /etc/libvirt/storage/autostart /etc/libvirt/storage 2>/dev/null || true; }
  stop_daemon() {
    local name=$1 pid
    pid=$(cat "/run/$name.pid" 2>/dev/null || pidof "$name")
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    log "$name ($pid) did not stop"
  }
  [ -n "$had_libvirtd" ] || stop_daemon libvirtd
  [ -n "$had_virtlogd" ] || stop_daemon virtlogd
  strip_libvirt_chains iptables "$state/before/iptables"
  strip_libvirt_chains ip6tables "$state/before/ip6tables"
  sysctl -qw net.ipv4.ip_forward="$(cat "$state/before/ip_forward")"
  sysctl -qw net.ipv6.conf.all.forwarding="$(cat "$state/before/ip6_forward")"
  # tables iptables-nft created (empty now) that were not there before
  if command -v nft >/dev/null; then
    for fam in ip ip6; do
      for tb in $(nft list tables "$fam" 2>/dev/null | awk '{print $3}'); do
        grep -q "^table $fam $tb " "$state/before/nft" 2>/dev/null && continue
        [ -z "$(nft list table "$fam" "$tb" | grep -E '^\s+(ip|ip6|meta|iifname|oifname|jump|counter|ct|tcp|udp)')" ] &&
          nft delete table "$fam" "$tb"
      done
    done
  fi
  # checked: anything different from before is a leftover and fails the run
  snapshot "$state/after"
  local left=0 f
  for f in ip_forward ip6_forward iptables ip6tables nft bridges dnsmasq domains networks pools etc-libvirt; do
    [ -e "$state/before/$f" ] || continue
    if ! diff -u "$state/before/$f" "$state/after/$f" >"$state/diff-$f"; then
      log "leftover ($f):"; cat "$state/diff-$f" >&2; left=1
    fi
  done
  [ -n "$had_libvirtd" ] || ! pidof libvirtd >/dev/null || { log "leftover: libvirtd runs"; left=1; }
  [ -n "$had_virtlogd" ] || ! pidof virtlogd >/dev/null || { log "leftover: virtlogd runs"; left=1; }
  if pgrep -f 'qemu-system.*guest=vagrant_' >/dev/null; then log "leftover: a Vagrant qemu runs"; left=1; fi
  log "teardown took $((SECONDS - t)) s; host checked: $([ $left = 0 ] && echo 'nothing left over' || echo 'LEFTOVERS')"
  rm -rf "$state"
  [ $left = 0 ] || rc=1
  log "total $((SECONDS - T0)) s, exit $rc"
  exit $rc
}
trap teardown EXIT
trap 'exit 130' INT TERM

# --- 3. libvirt without systemd ------------------------------------------------
if [ -z "$had_virtlogd" ]; then log "starting virtlogd"; virtlogd -d; fi
if [ -z "$had_libvirtd" ]; then
  log "starting libvirtd (nice 10: the guests it starts inherit it)"; nice -n 10 libvirtd -d
  for _ in $(seq 50); do virsh -q list >/dev/null 2>&1 && break; sleep 0.2; done
  # networks it autostarted are ours to stop again (teardown)
fi
virsh -q list >/dev/null || die "libvirtd does not answer on qemu:///system"

# --- 4./5. box, up (with the tiers), per line -------------------------------------
fail=0
for l in $lines; do
  vm=debian12-$l; [ "$l" = 5.10 ] && vm=debian11-5.10; [ "$l" = 6.12 ] && vm=debian13-6.12
  t=$SECONDS
  nice -n 10 "$here/box/build.sh" "$l" >/dev/null || die "box build for $l failed"
  log "box tether/debian12-$l ready in $((SECONDS - t)) s"
  t=$SECONDS
  cd "$here"
  log "vagrant up $vm (driver: ${TETHER_LIBVIRT_DRIVER:-probed}, tiers: ${TETHER_TIERS:-bpf netns})"
  if vagrant up "$vm" --provider=libvirt; then
    log "$vm: up, provisioned and tested in $((SECONDS - t)) s: PASS"
  else
    log "$vm: FAILED after $((SECONDS - t)) s"
    fail=1
  fi
done
exit $fail
