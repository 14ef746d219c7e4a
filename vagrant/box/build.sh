#!/usr/bin/env bash
# Build (or find cached) a local libvirt Vagrant box for one kernel line, from
# Debian packages only, and `vagrant box add` it.
#
#   vagrant/box/build.sh LINE            # LINE: 6.1 (5.10, 6.12: same recipe)
#   TETHER_BOX_NO_ADD=1 vagrant/box/build.sh 6.1   # build only, print the dir
#
# Box name: tether/debian12-<LINE> (the Vagrantfile's defaults for offline
# hosts; see vagrant/README.md).  Prints the box directory on stdout.
#
# The root filesystem is the QEMU kernel runner's shared userspace
# (vagrant/kernels/build-image.sh: debootstrap'd bookworm with Debian's BCC and
# the project's venv in /opt/tether-venv), copied, plus what a Vagrant guest
# needs: systemd as init, openssh-server, sudo, ifupdown + isc-dhcp-client,
# rsync, the line's kernel with its headers (installed through dpkg, so
# provision.sh finds them), the test peers provision.sh installs, the `vagrant`
# user with Vagrant's insecure public key (from Debian's vagrant package) and
# the host's CA bundle (so pip works in the guest behind the same TLS setup).
# The kernel and initrd sit beside box.img and the box's Vagrantfile boots
# them directly (libvirt.kernel/initrd/cmd_line): no grub, no reboot to pick a
# kernel line.
#
# Cache: ${TETHER_CACHE:-/var/cache/tether}/vagrant/box-<line>-<hash>, hash of
# this script, the base userspace, the kernel .debs, the key and the CA bundle.
# The runner's cache (kernels/base-*, kernels/img-*) is only read.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${TETHER_CACHE:-/var/cache/tether}
kcache=$cache/kernels
vcache=$cache/vagrant
log() { printf 'box: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ $# -ge 1 ] || die "usage: $0 LINE   (6.1, 5.10, 6.12)"
line=$1
[ "$(id -u)" = 0 ] || die "must run as root (chroot, mkfs)"
for t in mkfs.ext4 qemu-img tar sha256sum; do
  command -v "$t" >/dev/null || die "$t not found (apt-get install e2fsprogs qemu-utils)"
done
pubkey=
for k in /usr/share/vagrant/keys/vagrant.pub /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
         /usr/lib/ruby/vendor_ruby/vagrant/keys/vagrant.pub; do
  [ -f "$k" ] && { pubkey=$k; break; }
done
[ -n "$pubkey" ] || pubkey=$(find /usr -path '*vagrant*/keys/vagrant.pub' 2>/dev/null | head -1)
[ -n "$pubkey" ] || die "Vagrant's insecure public key not found (apt-get install vagrant)"
cabundle=/etc/ssl/certs/ca-certificates.crt

# --- the runner's base userspace and the line's kernel .debs ------------------
newest_base() { ls -td "$kcache"/base-*/ 2>/dev/null | while read -r d; do [ -e "$d/.done" ] && { echo "${d%/}"; break; }; done; }
base=$(newest_base)
if [ -z "$base" ] || ! ls "$kcache/debs/linux-image-$line".*-amd64_*.deb >/dev/null 2>&1 &&
   ! ls "$kcache/debs/linux-image-$line"-*_*.deb >/dev/null 2>&1; then
  log "no cached base userspace or $line kernel: building the runner's image first"
  "$repo/vagrant/kernels/build-image.sh" "$line" >/dev/null
  base=$(newest_base)
fi
[ -n "$base" ] || die "no base userspace under $kcache"
# the newest kernel of the line among the cached .debs
kimg=$(ls -t "$kcache"/debs/linux-image-"$line"[.-]*_amd64.deb 2>/dev/null | head -1)
[ -n "$kimg" ] || die "no linux-image for $line in $kcache/debs"
abi=$(basename "$kimg" | sed 's/^linux-image-\(.*\)_[^_]*_amd64\.deb$/\1/')
khdr=$(ls -t "$kcache/debs/linux-headers-${abi}_"*.deb | head -1)
kcommon=$(ls -t "$kcache/debs/linux-headers-${abi%-amd64}-common_"*.deb | head -1)
[ -f "$khdr" ] && [ -f "$kcommon" ] || die "headers for $abi missing in $kcache/debs"

hash=$( { cat "$0"; basename "$base"; basename -a "$kimg" "$khdr" "$kcommon"; cat "$pubkey";
          sha256sum <"$cabundle"; } | sha256sum | cut -c1-12)
box=$vcache/box-$line-$hash
name=tether/debian12-$line
if [ -e "$box/.done" ]; then
  log "cached: $box"
else
  t0=$SECONDS
  rm -rf "$box"; mkdir -p "$box"
  root=$box/root
  umount_all() { for m in dev/pts dev sys proc; do mountpoint -q "$root/$m" && umount -l "$root/$m"; done; return 0; }
  trap umount_all EXIT
  log "copying the base userspace $(basename "$base")"
  cp -a "$base/rootfs" "$root"
  mkdir -p "$root/debs"; cp "$kimg" "$khdr" "$kcommon" "$root/debs/"
  mount -t proc proc "$root/proc"; mount -t sysfs sys "$root/sys"
  mount --bind /dev "$root/dev"; mount --bind /dev/pts "$root/dev/pts"
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  cp "$cabundle" "$root/etc/ssl/certs/ca-certificates.crt"
  pkgs="systemd-sysv udev dbus openssh-server sudo ifupdown isc-dhcp-client rsync make
        initramfs-tools zstd bpfcc-tools iperf3 sockperf stunnel4 tshark"
  log "installing $abi and: $(echo $pkgs)"
  chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c "
    set -e
    echo 'wireshark-common wireshark-common/install-setuid boolean false' | debconf-set-selections
    apt-get -qq update
    apt-get install -y -qq --no-install-recommends $(echo $pkgs) /debs/*.deb
    apt-get clean; rm -rf /var/lib/apt/lists/* /debs
  " >"$box/apt.log" 2>&1 || { tail -20 "$box/apt.log" >&2; die "apt-get in the box failed (log: $box/apt.log)"; }
  [ -f "$root/boot/initrd.img-$abi" ] || chroot "$root" update-initramfs -c -k "$abi" >>"$box/apt.log" 2>&1
  # services may start in the guest (the runner's image forbids it at build time)
  rm -f "$root/usr/sbin/policy-rc.d" "$root/sbin/tether-init"
  # the vagrant user: insecure key (Vagrant swaps it on first up), passwordless sudo
  chroot "$root" useradd -m -s /bin/bash vagrant
  echo 'vagrant:vagrant' | chroot "$root" chpasswd
  install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
  install -m 0600 -o 1000 -g 1000 "$pubkey" "$root/home/vagrant/.ssh/authorized_keys"
  chroot "$root" chown -R vagrant:vagrant /home/vagrant
  echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/vagrant"; chmod 0440 "$root/etc/sudoers.d/vagrant"
  echo 'UseDNS no' >"$root/etc/ssh/sshd_config.d/vagrant.conf"
  # ssh host keys are made on the guest's first boot, not shared by every box;
  # ed25519 only: an RSA key took minutes under TCG (ssh-keygen -A, measured)
  rm -f "$root"/etc/ssh/ssh_host_*
  echo 'HostKey /etc/ssh/ssh_host_ed25519_key' >"$root/etc/ssh/sshd_config.d/hostkey.conf"
  cat >"$root/etc/systemd/system/ssh-hostkeys.service" <<'EOF'
[Unit]
Description=Generate the ssh host key on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
[Install]
WantedBy=multi-user.target
EOF
  chroot "$root" systemctl enable ssh-hostkeys.service >/dev/null 2>&1
  # network: eth0 by DHCP from libvirt's management network (net.ifnames=0)
  cat >"$root/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback
auto eth0
allow-hotplug eth0
iface eth0 inet dhcp
EOF
  echo 'LABEL=tether-root / ext4 defaults,errors=remount-ro 0 1' >"$root/etc/fstab"
  echo tether-vagrant >"$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 tether-vagrant\n::1 localhost ip6-localhost\n' >"$root/etc/hosts"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
  : >"$root/etc/machine-id"
  # the venv is ready: provision.sh only checks it (see the Vagrantfile)
  touch "$root/opt/tether-venv/.provisioned"
  rm -f "$root/etc/resolv.conf"; touch "$root/etc/resolv.conf"
  umount_all; trap - EXIT
  mv "$root/boot/vmlinuz-$abi" "$box/vmlinuz"
  cp "$root/boot/initrd.img-$abi" "$box/initrd.img"
  size_gb=${TETHER_BOX_SIZE_GB:-10}
  log "making the ${size_gb} GiB ext4 disk"
  mkfs.ext4 -q -F -L tether-root -d "$root" "$box/disk.raw" "${size_gb}G"
  rm -rf "$root"
  qemu-img convert -O qcow2 "$box/disk.raw" "$box/box.img"; rm -f "$box/disk.raw"
  printf '{"provider":"libvirt","format":"qcow2","virtual_size":%s}\n' "$size_gb" >"$box/metadata.json"
  cat >"$box/Vagrantfile" <<EOF
# tether/debian12-$line: Debian 12 userspace, kernel $abi booted directly.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.kernel = File.expand_path("vmlinuz", __dir__)
    libvirt.initrd = File.expand_path("initrd.img", __dir__)
    libvirt.cmd_line = "root=LABEL=tether-root rw console=ttyS0 net.ifnames=0 biosdevname=0"
    libvirt.disk_bus = "virtio"
  end
end
EOF
  echo "{\"line\": \"$line\", \"abi\": \"$abi\", \"base\": \"$(basename "$base")\", \"hash\": \"$hash\"}" >"$box/info.json"
  log "packing $box/$(basename "$name").box"
  tar -C "$box" -cf "$box/box.tar" metadata.json Vagrantfile box.img vmlinuz initrd.img info.json
  mv "$box/box.tar" "$box/tether-debian12-$line.box"
  rm -f "$box/box.img" "$box/vmlinuz" "$box/initrd.img"
  touch "$box/.done"
  log "box built in $((SECONDS - t0)) s ($(du -sh "$box/tether-debian12-$line.box" | cut -f1))"
  # older builds of this line are not needed
  for d in "$vcache/box-$line-"*; do [ "$d" = "$box" ] || rm -rf "$d"; done
fi

if [ -z "${TETHER_BOX_NO_ADD:-}" ]; then
  command -v vagrant >/dev/null || die "vagrant not found (apt-get install vagrant vagrant-libvirt)"
  added=${VAGRANT_HOME:-$HOME/.vagrant.d}/boxes/${name//\//-VAGRANTSLASH-}/0/libvirt/info.json
  if ! grep -q "\"$hash\"" "$added" 2>/dev/null; then
    log "vagrant box add $name"
    t0=$SECONDS
    vagrant box add --force --name "$name" "$box/tether-debian12-$line.box" >&2
    log "added in $((SECONDS - t0)) s"
  fi
fi
echo "$box"
