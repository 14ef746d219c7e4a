#!/bin/sh
# Move Debian's kernel headers (packages.txt: linux-headers-amd64) out of
# /usr/src into /usr/lib/tether/kernel-headers, with `build` and `source`
# links as in /lib/modules/<release>.  Run at image build time by BOTH
# daemonset/Dockerfile and daemonset/image/build.sh, inside the image.
#
# Why: the DaemonSet mounts the node's /lib/modules and /usr/src (the node's
# own header links point into its /usr/src), which hides anything the image
# keeps there.  On a node without headers for its kernel, the agent's BPF
# compile child mounts these in a private mount namespace instead
# (agent/datapath/loader.py, use_image_headers).  dpkg still lists the files
# under /usr/src: nothing in the image upgrades packages.
set -eu
dest=/usr/lib/tether/kernel-headers
mkdir -p "$dest"
for d in /usr/src/linux-headers-*; do
    [ -d "$d" ] || continue
    # Top-level links are relative to /usr/src (scripts, tools ->
    # ../../lib/linux-kbuild-*): make them absolute before the move.
    for l in "$d"/*; do
        if [ -L "$l" ]; then ln -sfn "$(readlink -f "$l")" "$l"; fi
    done
    mv "$d" "$dest/"
done
link() {  # NAME GLOB: the one directory matching GLOB, linked as NAME
    name=$1 glob=$2
    set -- $(cd "$dest" && ls -d $glob 2>/dev/null)
    if [ $# -ne 1 ]; then
        echo "kernel-headers.sh: want exactly one $dest/$glob, found $#: $*" >&2
        exit 1
    fi
    ln -sfn "$1" "$dest/$name"
}
link build 'linux-headers-*-amd64'
link source 'linux-headers-*-common'
test -f "$dest/build/include/generated/autoconf.h"
test -f "$dest/source/include/linux/kconfig.h"
