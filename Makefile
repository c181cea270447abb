# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use and install what they need into it.
PY := .venv/bin/python
PIP := .venv/bin/pip

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"  # the CPU wheel on this machine's index; pins nothing beyond pyproject's range
	$(PIP) install -q -e ".[dev,eval,server,ray]"
	touch $@

# the dashboard test drives Debian's chromium headless; install it when missing (needs root or sudo)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium

.PHONY: demo test test-slow install
install: .venv/.installed

demo: .venv/.installed
	.venv/bin/dynaexq generate --policy calibrated-multilevel --expert-budget int3 --max-new-tokens 40 "def fibonacci(n):"
	.venv/bin/dynaexq eval --expert-budget int3

test: .venv/.installed $(CHROMIUM)
	$(PY) -m pytest -q -m "not slow and not gpu" tests

# soaks, browsers and latency figures (CI runs them after `make test`)
test-slow: .venv/.installed $(CHROMIUM)
	$(PY) -m pytest -q -m "slow and not gpu" tests
