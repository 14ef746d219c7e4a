# tether: the two commands the README promises, plus the developer loop.
#   make demo   - simulated node, real eBPF capture, report, teardown
#   make test   - every test tier (unit, bpf, netns); privileged tiers need root
# Each does its own setup (Debian packages, kernel headers for BCC, venv).

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.provisioned
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-bpf test-netns test-k8s test-kernels presubmit lint typecheck bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml vagrant/provision.sh
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

test-k8s: setup
	$(PY) -m pytest -q tests/k8s

# The bpf tier and a netns smoke on Debian's 5.10, 6.1 and 6.12 kernels under
# QEMU (vagrant/README.md); images are built from Debian packages and cached.
KERNEL_TOOLS := qemu-system-x86 debootstrap e2fsprogs
test-kernels: setup
	@command -v qemu-system-x86_64 >/dev/null && command -v debootstrap >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(KERNEL_TOOLS); }
	TETHER_KERNELS=1 $(PY) -m pytest -ra $(PYTEST_ARGS) tests/kernels

# A real Kubernetes node on this machine (kubelet, containerd, runc built from
# Go modules; tests/node/README.md) with daemonset/ applied by kubectl.
# Opt-in; cold builds take tens of minutes, and it needs the machine to itself
# (fixed paths and ports, an flock).
.PHONY: test-node image
NODE_TOOLS := debootstrap libseccomp-dev gcc
test-node: setup
	@command -v debootstrap >/dev/null && dpkg -s libseccomp-dev >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(NODE_TOOLS); }
	TETHER_NODE=1 $(PY) -m pytest -ra -s $(PYTEST_ARGS) tests/node

# The tether image without Docker (daemonset/image/build.sh): OCI archives.
image:
	@command -v debootstrap >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap; }
	daemonset/image/build.sh

lint: setup
	$(VENV)/bin/ruff check agent tests
	$(VENV)/bin/ruff format --check agent tests
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy

presubmit: lint typecheck
	$(PY) -m pytest -q tests/unit tests/bpf/test_compile_matrix.py

bench: setup
	$(VENV)/bin/tether bench datapath
	$(VENV)/bin/tether bench tunnel
	$(VENV)/bin/tether bench h2

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
