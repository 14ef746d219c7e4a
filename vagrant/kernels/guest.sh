#!/bin/bash
# Inside a kernel test VM, started by /sbin/tether-init with the project disk
# at /tether: run guest_run.py in the image's venv (it writes the report to
# /dev/ttyS1).  Kept on the project disk, not in the image, so changing what
# runs in the VM never needs an image rebuild.
cd /tether || exit 1
export PYTHONUNBUFFERED=1 TETHER_IN_KERNEL_VM=1
# Under TCG the agent's BPF compile alone takes 35-40 s on the 6.x lines (the
# kernel matrix also runs several guests at once): give the agent 5 minutes to
# get ready instead of the host's 60 s.
export TETHER_READY_TIMEOUT=${TETHER_READY_TIMEOUT:-300}
echo "guest: $(uname -r), $(nproc) cpus, $(awk '/MemTotal/{print $2/1024 " MiB"}' /proc/meminfo), up $(cut -d' ' -f1 /proc/uptime) s"
exec /opt/tether-venv/bin/python vagrant/kernels/guest_run.py
