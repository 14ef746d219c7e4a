#!/bin/bash
# Inside a kernel test VM, started by /sbin/tether-init with the project disk
# at /tether: run guest_run.py in the image's venv (it writes the report to
# /dev/ttyS1).  Kept on the project disk, not in the image, so changing what
# runs in the VM never needs an image rebuild.
cd /tether || exit 1
export PYTHONUNBUFFERED=1 TETHER_IN_KERNEL_VM=1
echo "guest: $(uname -r), $(nproc) cpus, $(awk '/MemTotal/{print $2/1024 " MiB"}' /proc/meminfo), up $(cut -d' ' -f1 /proc/uptime) s"
exec /opt/tether-venv/bin/python vagrant/kernels/guest_run.py
