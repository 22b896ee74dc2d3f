# bbprobe: the two entry points a fresh machine needs.
#   make demo   local collector on SQLite + one full measurement session + compliance report
#   make test   everything the tests need (venv; Debian packages when root), then the suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the test suite uses (installed with apt-get when running as root).
DEB_PACKAGES := systemd iproute2 nftables iperf3 iputils-ping chromium victoria-metrics openssl

.PHONY: demo test lint bench venv system-deps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi; \
	else \
	  echo "not root: skipping Debian packages ($(DEB_PACKAGES)); tests needing them will skip"; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: venv system-deps lint
	$(BIN)/pytest

demo: venv
	bash scripts/demo.sh

# Accuracy and capacity against iperf3/ping in the network lab (root; ~15 min; tables).
bench: venv system-deps
	$(BIN)/python -m benchmarks.lab capacity
	$(BIN)/python -m benchmarks.lab accuracy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
