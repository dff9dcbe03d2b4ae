# sockguard — set up, run, test.  Everything installs into .venv/ in this tree.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := clang llvm libbpf-dev bpftool iproute2 pkg-config libsystemd-dev gcc
# Only for `make test`: promtool (tests of packaging/prometheus/*.rules.yml). On a host
# where systemd is PID 1 the package also enables prometheus.service, which is why an
# operator's `make setup` does not install it.
# And the image's tools: tests/test_container.py builds the image and runs it with podman.
TEST_APT_PACKAGES = prometheus $(IMAGE_APT_PACKAGES)
# Only for `make vmtest`: the tests on Debian's 5.10/6.1 kernels under qemu (tests/vm/).
VMTEST_APT_PACKAGES := qemu-system-x86
# Only for `make deb` (and `make vmtest-systemd`, which installs the package it builds).
DEB_APT_PACKAGES := fakeroot python3-venv
# Only for `make image` and its test: the image is built from Debian's archive (mmdebstrap)
# and run with podman; runc where crun refuses this machine kind's hybrid cgroups.
IMAGE_APT_PACKAGES := mmdebstrap podman runc $(DEB_APT_PACKAGES)
KERNEL ?= 6.1
# Seconds for one VM run (boot, tests, power-off) under TCG; the make recipe adds a margin.
VMTEST_TIMEOUT ?= 1500
VMTEST_ARGS ?=
# Seconds for the systemd-as-PID-1 VM run (boot, checks, power-off; ~4 min under TCG).
VMTEST_SYSTEMD_TIMEOUT ?= 900

.PHONY: setup system-deps test-deps bpffs venv audit test lint bench clean vmtest vmtest-systemd deb image

setup: system-deps bpffs venv

define apt_ensure
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

system-deps:
	$(call apt_ensure,$(APT_PACKAGES))

test-deps:
	$(call apt_ensure,$(TEST_APT_PACKAGES))

bpffs:
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
	@mountpoint -q /sys/fs/cgroup/unified || mountpoint -q /sys/fs/cgroup || \
		echo "warning: no cgroup v2 mount found (the test lab needs one)"

venv:
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[test,systemd]'
	@# Bytecode now, so that no command compiles the package at start-up (where
	@# PYTHONDONTWRITEBYTECODE is set, nothing would ever write it: ~60 ms a run).
	$(PY) -m compileall -q sockguard

audit:
	$(VENV)/bin/sockguard audit

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: test-deps lint
	$(VENV)/bin/pytest -q

# The same tests on a real Debian kernel in a VM: make vmtest KERNEL=5.10 (or 6.1).
# Needs `make setup` first (the guest runs this tree's .venv). See tests/vm/README.md.
vmtest:
	$(call apt_ensure,$(VMTEST_APT_PACKAGES))
	timeout --kill-after=30 $$(( $(VMTEST_TIMEOUT) + 300 )) \
		tests/vm/run --kernel $(KERNEL) --timeout $(VMTEST_TIMEOUT) --quiet $(VMTEST_ARGS)

# sockguard.service under systemd as PID 1 in the VM: READY, STATUS, journal, watchdog, stop.
# dist/sockguard_<version>_<arch>.deb: a self-contained venv under /opt/sockguard.
deb: venv
	$(call apt_ensure,$(DEB_APT_PACKAGES))
	packaging/debian/build-deb dist

# sockguard:<version> in podman's store, from Debian's archive (packaging/container/).
image: venv
	$(call apt_ensure,$(IMAGE_APT_PACKAGES))
	packaging/container/build-image

vmtest-systemd:
	$(call apt_ensure,$(VMTEST_APT_PACKAGES) $(DEB_APT_PACKAGES))
	timeout --kill-after=30 $$(( $(VMTEST_SYSTEMD_TIMEOUT) + 300 )) \
		tests/vm/run --kernel $(KERNEL) --systemd --timeout $(VMTEST_SYSTEMD_TIMEOUT) --quiet

bench:
	$(PY) benchmarks/audit_scale.py

clean:
	rm -rf build sockguard/bpf bpf/.output *.egg-info
