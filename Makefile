# tether: the two commands the README promises, plus the developer loop.
#   make demo   - simulated node, real eBPF capture, report, teardown
#   make test   - every test tier (unit, bpf, netns); privileged tiers need root
# Each does its own setup (Debian packages, kernel headers for BCC, venv).

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.provisioned
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-bpf test-netns test-waypoint test-k8s test-kernels test-vagrant presubmit lint typecheck bench fuzz clean

setup: $(STAMP)

$(STAMP): pyproject.toml vagrant/provision.sh agent/tunnel/_tlscore.c
	vagrant/provision.sh $(VENV)

demo: setup
	$(VENV)/bin/tether demo

# CI (CI=true) also fails the run if a privileged tier was skipped.
test: setup
	TETHER_REQUIRE_ALL_TIERS=$${CI:+1} $(PY) -m pytest -ra $(PYTEST_ARGS) tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-bpf: setup
	$(PY) -m pytest -q tests/bpf

test-netns: setup
	$(PY) -m pytest -q tests/netns

# A real Envoy (the waypoint extra) configured over ADS; the netns tests need root
# (tests/netns/test_waypoint_envoy.py: the agent running Envoy end to end).
test-waypoint: setup
	$(PY) -m pytest -q tests/waypoint tests/netns/test_waypoint_envoy.py

test-k8s: setup
	$(PY) -m pytest -q tests/k8s

# The bpf tier and a netns smoke on Debian's 5.10, 6.1 and 6.12 kernels under
# QEMU (vagrant/README.md); images are built from Debian packages and cached.
KERNEL_TOOLS := qemu-system-x86 debootstrap e2fsprogs
test-kernels: setup
	@command -v qemu-system-x86_64 >/dev/null && command -v debootstrap >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(KERNEL_TOOLS); }
	TETHER_KERNELS=1 TETHER_REQUIRE_ALL_TIERS=$${CI:+1} $(PY) -m pytest -ra $(PYTEST_ARGS) tests/kernels

# The bpf and netns tiers inside a Vagrant VM (libvirt) on a box built locally
# from Debian packages (vagrant/box/build.sh); the VM is destroyed and the host's
# libvirt, firewall and ip_forward left as found, checked (vagrant/README.md).
test-vagrant:
	vagrant/test-vagrant.sh

# A real Kubernetes node on this machine (kubelet, containerd, runc built from
# Go modules; tests/node/README.md) with daemonset/ applied by kubectl.
# Opt-in; cold builds take tens of minutes, and it needs the machine to itself
# (fixed paths and ports, an flock).
.PHONY: test-node image
NODE_TOOLS := debootstrap libseccomp-dev gcc
test-node: setup
	@command -v debootstrap >/dev/null && dpkg -s libseccomp-dev >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(NODE_TOOLS); }
	TETHER_NODE=1 TETHER_REQUIRE_ALL_TIERS=$${CI:+1} $(PY) -m pytest -ra -s $(PYTEST_ARGS) tests/node

# The tether image without Docker (daemonset/image/build.sh): OCI archives.
image:
	@command -v debootstrap >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap; }
	daemonset/image/build.sh

lint: setup
	$(VENV)/bin/ruff check agent tests waypoint daemonset vagrant
	$(VENV)/bin/ruff format --check agent tests waypoint daemonset vagrant
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy

presubmit: lint typecheck
	$(PY) -m pytest -q tests/unit tests/bpf/test_compile_matrix.py

# atheris (libFuzzer) over the parsers that face the network or the operator
# (tests/fuzz/): FUZZ_RUNS inputs per target, one target after another, niced;
# prints inputs, time and findings per target, fails on any finding
# (FUZZ_MAX_TIME=s caps each target's time, FUZZ_TARGETS picks some).  Work
# corpora and findings go to build/fuzz/<target>/.  `make test` runs a short
# in-process smoke of the same targets (tests/unit/test_fuzz_smoke.py).
FUZZ_RUNS ?= 1000000
FUZZ_MAX_TIME ?= 0
FUZZ_TARGETS ?=
fuzz: setup
	nice -n 10 $(PY) -m tests.fuzz.run --runs $(FUZZ_RUNS) --max-time $(FUZZ_MAX_TIME) $(FUZZ_TARGETS)

bench: setup
	$(VENV)/bin/tether bench datapath
	$(VENV)/bin/tether bench tunnel
	$(VENV)/bin/tether bench h2

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
