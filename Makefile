# sockguard — set up, run, test.  Everything installs into .venv/ in this tree.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# prometheus: for promtool (tests of packaging/prometheus/*.rules.yml). On a host where
# systemd is PID 1 the package also enables prometheus.service; `systemctl disable --now
# prometheus` if that node should not run one.
APT_PACKAGES := clang llvm libbpf-dev bpftool iproute2 pkg-config libsystemd-dev gcc prometheus

.PHONY: setup system-deps bpffs venv audit test lint bench clean

setup: system-deps bpffs venv

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

bpffs:
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
	@mountpoint -q /sys/fs/cgroup/unified || mountpoint -q /sys/fs/cgroup || \
		echo "warning: no cgroup v2 mount found (the test lab needs one)"

venv:
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[test,systemd]'

audit:
	$(VENV)/bin/sockguard audit

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

bench:
	$(PY) benchmarks/audit_scale.py

clean:
	rm -rf build sockguard/bpf bpf/.output *.egg-info
