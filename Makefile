# resolverd: `make run` starts the daemon on the static example, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= examples/static.yaml

.PHONY: run test lint typecheck unit bench check-config system-deps bench-deps protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/resolverd run -c $(CONFIG)

check-config: $(STAMP)
	$(BIN)/resolverd check-config $(CONFIG)

# Debian packages the tests drive: dig, kdig, a real etcd server, openssl.
system-deps:
	@.ci/ensure-packages dig:bind9-dnsutils kdig:knot-dnsutils etcd:etcd-server openssl:openssl

# The benchmarks' peers and backends: dnsperf, dnsmasq, etcd.
bench-deps:
	@.ci/ensure-packages dnsperf:dnsperf dnsmasq:dnsmasq-base etcd:etcd-server

lint: $(STAMP)
	$(BIN)/ruff check resolverd tests bench
	$(BIN)/ruff format --check resolverd tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) system-deps
	$(BIN)/pytest -q

# systemd/resolverd.service's sandboxing score (0 = locked down, 10 = fully
# exposed); tests/test_systemd_unit.py holds it at <= 1.5.
.PHONY: unit-security
unit-security:
	@if command -v systemd-analyze >/dev/null 2>&1; then \
		systemd-analyze security --offline=true --no-pager systemd/resolverd.service \
			| grep 'Overall exposure level' \
			|| { echo 'unit-security: systemd-analyze security failed' >&2; exit 1; }; \
	else \
		echo 'unit-security: skipped, systemd-analyze is not installed (Debian: apt-get install systemd)'; \
	fi

test: $(STAMP) system-deps unit-security lint typecheck unit

bench: $(STAMP) bench-deps
	$(BIN)/python bench/dnsbench.py
	$(BIN)/python bench/grpcbench.py
	$(BIN)/python bench/propagation.py
	$(BIN)/python bench/forwardbench.py

# Regenerate the gRPC code from protos/ (committed; a test fails when it is stale).
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/resolverd/api/v1/resolver.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
