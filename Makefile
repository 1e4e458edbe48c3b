# Tether developer entry points. Every target builds what it needs, starting
# from a plain checkout with only python3 and make installed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The 25 slowest tests are listed at the end, so CI logs show where the time goes.
PYTEST_ARGS ?= --durations=25

.PHONY: venv venv-runtime demo test lint pytest proto proto-check sysdeps soak clean fuzz bench bench-quick \
	arm64-sysdeps arm64-smoke

venv: $(STAMP)

# The runtime alone (what `make demo` needs): no test, lint or plot extras.
RUNTIME_STAMP := $(VENV)/.installed-runtime
venv-runtime: $(RUNTIME_STAMP)

define make_venv
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed; installing python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
endef

$(RUNTIME_STAMP): pyproject.toml
	$(make_venv)
	$(PY) -m pip install -q -e .
	@touch $@

$(STAMP): pyproject.toml
	$(make_venv)
	$(PY) -m pip install -q -e '.[test]'
	@touch $@ $(RUNTIME_STAMP)

# System tools the end-to-end tests drive: curl (the real CONNECT client) and
# HAProxy (the load balancer in front of broker replicas); the benchmark
# harness's ssh contender (sshd, ssh, autossh) and link emulator (ip, ss).
SYSDEPS := curl:curl haproxy:haproxy sshd:openssh-server ssh:openssh-client autossh:autossh \
	ip:iproute2 ss:iproute2

sysdeps:
	@missing=""; for pair in $(SYSDEPS); do \
	  cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

demo: venv-runtime
	$(VENV)/bin/tether demo

lint: venv proto-check
	$(VENV)/bin/ruff check protocol broker edge_agent tether tests benchmarks scripts fuzz deploy/systemd
	$(VENV)/bin/ruff format --check protocol broker edge_agent tether tests benchmarks scripts fuzz deploy/systemd
	$(VENV)/bin/mypy

pytest: venv sysdeps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: lint pytest

# Coverage-guided fuzzing (atheris): every target in fuzz/ for FUZZ_SECONDS
# each; seeds in fuzz/corpus/<target>/, new inputs in fuzz/.work/<target>/.
FUZZ_SECONDS ?= 60
fuzz: venv
	$(PY) fuzz/run.py all --seconds $(FUZZ_SECONDS)

# The committed konnectivity_pb2 module must match the .proto.
proto: venv
	$(PY) scripts/gen_proto.py

proto-check: venv
	$(PY) scripts/gen_proto.py --check

# Offline install bundle for edge devices without internet (docs/operations.md):
# wheels for linux x86_64, aarch64 and armv7l plus deploy/systemd/install.sh
# in wheelhouse/. Downloads from PyPI; takes minutes.
WHEELHOUSE_ARCH   ?= x86_64 aarch64 armv7l
WHEELHOUSE_PYTHON ?= 3.11
.PHONY: wheelhouse
wheelhouse: venv
	$(PY) deploy/systemd/wheelhouse.py --clean --dest wheelhouse \
	  $(foreach a,$(WHEELHOUSE_ARCH),--arch $(a)) $(foreach v,$(WHEELHOUSE_PYTHON),--python-version $(v))

# The agent on arm64 (docs/operations.md, "Tested on arm64"): a Debian 12
# arm64 root (debootstrap, cached in ARM64_ROOT and reused while its stamp
# matches), qemu-user through binfmt_misc, install.sh from an aarch64
# wheelhouse without network, and the installed agent tunnelling to a native
# broker: a GET with sha256, an echo, a refused dial, a drain with exit 0.
# Needs root; the first run downloads the root and takes about 10 minutes.
ARM64_ROOT ?= /var/cache/tether/arm64-root
ARM64_SYSDEPS := debootstrap:debootstrap qemu-aarch64-static:qemu-user-static \
	unshare:util-linux chroot:coreutils

arm64-sysdeps:
	@missing=""; for pair in $(ARM64_SYSDEPS); do \
	  cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  for try in 1 2 3; do \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends $$missing && exit 0; \
	    echo "apt-get failed (try $$try of 3)"; sleep 10; \
	  done; exit 1; \
	fi

arm64-smoke: venv sysdeps arm64-sysdeps
	$(PY) scripts/arm64_smoke.py --root $(ARM64_ROOT)

# Benchmark harness (benchmarks/README.md): every contender over emulated
# links; results in benchmarks/results/<time>/. Needs root for the link
# emulation (without it, loopback scenarios only).
bench: venv sysdeps
	$(PY) -m benchmarks run

bench-quick: venv sysdeps
	$(PY) -m benchmarks run --quick

# Mixed traffic with faults over an emulated link: make soak DURATION=600
DURATION ?= 600
soak: venv
	$(PY) -m benchmarks.soak --duration $(DURATION)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
