# bbprobe: the two entry points a fresh machine needs.
#   make demo   local collector on SQLite + one full measurement session + compliance report
#   make test   everything the tests need (venv; Debian packages when root), then the suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the test suite uses (installed with apt-get when running as root).
DEB_PACKAGES := systemd iproute2 nftables iperf3 iputils-ping chromium victoria-metrics openssl \
	debhelper debootstrap systemd-container postgresql tmux prometheus

# M-Lab's official ndt7 client (@m-lab/ndt7, npm registry) for the interoperability tests.
NDT7JS := tests/ndt7js

.PHONY: demo test lint bench soak fuzz venv system-deps node-deps dist deb clean

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

# Node.js >= 20.10 (WebSocket behind --experimental-websocket) and the pinned client
# (package-lock.json). Debian's nodejs is installed when root and no node is present.
node-deps:
	@if ! command -v npm >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages: nodejs npm"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; \
	fi
	@if command -v npm >/dev/null; then \
	  if [ ! -f $(NDT7JS)/node_modules/.package-lock.json ] || \
	     [ $(NDT7JS)/package-lock.json -nt $(NDT7JS)/node_modules/.package-lock.json ]; then \
	    cd $(NDT7JS) && npm ci --no-audit --no-fund --loglevel=error; \
	  fi; \
	else \
	  echo "no npm: the ndt7-js interoperability tests will skip (they fail under CI=true)"; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: venv system-deps node-deps lint
	$(BIN)/pytest

demo: venv
	bash scripts/demo.sh

# PEP 517 sdist and wheel in dist/ (the wheel carries the targets tables, example configs,
# Grafana dashboard and units: agent/share.py).
dist: venv
	rm -f dist/bbprobe-*.whl dist/bbprobe-*.tar.gz
	mkdir -p build
	$(BIN)/python -m build --no-isolation --sdist --wheel --outdir dist . > build/dist.log 2>&1 \
	  || { tail -n 30 build/dist.log; exit 1; }
	@ls -l dist/bbprobe-*

# dist/bbprobe_<version>_<arch>.deb (dpkg-buildpackage; DEB_ARCH=arm64|armhf for probes).
deb: dist
	@command -v dpkg-buildpackage >/dev/null && [ -f /usr/share/perl5/Debian/Debhelper/Dh_Lib.pm ] || \
	  { echo "make deb needs Debian's dpkg-dev and debhelper (apt-get install debhelper)"; exit 1; }
	DEB_ARCH=$(DEB_ARCH) DEB_VERSION=$(DEB_VERSION) DEB_PYTHON=$(abspath $(BIN)/python) \
	  bash scripts/build-deb.sh

# Accuracy and capacity against iperf3/ping, and third-party clients (ndt7-js, Chromium on
# /speedtest) against bbprobe's agent, in the network lab (root; ~25 min; tables).
bench: venv system-deps node-deps
	$(BIN)/python -m benchmarks.lab capacity
	$(BIN)/python -m benchmarks.lab accuracy
	$(BIN)/python -m benchmarks.lab protocols

# Goal C7: 200 probes posting realistic results to one collector for 10 minutes (table).
soak: venv
	$(BIN)/python -m benchmarks.soak --probes 200 --seconds 600

# The fuzzers, 10 minutes each: the poison-isolation state machine (issue 23: hostile
# writers against every read surface, 5 min on SQLite then 5 on PostgreSQL; failing
# examples kept in var/hypothesis-poison), then atheris on ingest (corpus in
# var/fuzz-corpus).
fuzz: venv system-deps
	BBPROBE_POISON_SECONDS=300 $(BIN)/pytest tests/collector/test_poison.py -q
	PYTHONPATH=$(CURDIR) $(BIN)/python tests/fuzz_ingest.py -max_total_time=600 \
	  -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 var/fuzz-corpus

clean:
	rm -rf $(VENV) var build dist .pytest_cache .mypy_cache .ruff_cache *.egg-info $(NDT7JS)/node_modules
