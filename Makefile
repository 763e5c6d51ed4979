# Two commands on a fresh machine: `make run` (demo) and `make test` (whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test bench sysdeps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

## run: create .venv, install, start a local server on 127.0.0.1:7700 and two clients talking by Id
run: $(STAMP)
	$(VENV)/bin/zbus-node demo

## sysdeps: what the NAT lab and benchmarks need from Debian (installed only when root and missing)
sysdeps:
	@missing=""; \
	command -v nft >/dev/null 2>&1 || missing="$$missing nftables"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v nats-server >/dev/null 2>&1 || missing="$$missing nats-server"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "not root: skipping$$missing (NAT lab tests will skip, the NATS baseline too)"; fi; \
	fi

## test: install what the tests need and run the whole suite (exit 5, "no tests", counts as failure-free)
test: $(STAMP) sysdeps
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

## bench: the benchmark harness (zbus vs raw pyzmq vs NATS)
bench: $(STAMP) sysdeps
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
