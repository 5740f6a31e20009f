# gpuaas: the two commands are `make demo` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := .tools/uv/bin/uv
VENV := .venv
BIN := $(VENV)/bin
CLUSTER ?= gpuaas
SCENARIO ?= program
KUBECONFIG_FILE := .cluster/$(CLUSTER).kubeconfig

.PHONY: setup binaries lint unit integration test demo demo-down operator-start operator-stop bench clean

$(UV):
	python3 -m venv .tools/uv
	.tools/uv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

setup: $(UV)  ## Python environment from uv.lock
	$(UV) sync --frozen --quiet

binaries:  ## Pinned Kubernetes, etcd, kwok, helm and kind binaries (cached by version outside the repo)
	bash tools/build.sh >/dev/null

lint: setup
	$(BIN)/ruff check operator tests bench
	$(BIN)/ruff format --check operator tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: setup
	$(BIN)/pytest tests/unit -q

integration: setup binaries
	$(BIN)/pytest tests/integration -q

test: setup binaries lint  ## Lint, type-check, layers, then every test tier against the real local control plane
	$(BIN)/pytest tests -q

demo: setup binaries  ## Local cluster with the program scenario, the operator, and the pool totals
	$(BIN)/gpuaas cluster up --scenario $(SCENARIO) --name $(CLUSTER)
	$(MAKE) --no-print-directory operator-start
	$(BIN)/gpuaas pools --kubeconfig $(KUBECONFIG_FILE) --wait 120 >/dev/null
	"$$(bash tools/build.sh kubernetes)/kubectl" --kubeconfig $(KUBECONFIG_FILE) get gpupools
	$(BIN)/gpuaas pools --kubeconfig $(KUBECONFIG_FILE)

demo-down: operator-stop
	$(BIN)/gpuaas cluster down --name $(CLUSTER)

operator-start: operator-stop
	@mkdir -p .cluster
	@nohup $(BIN)/gpuaas run --kubeconfig $(KUBECONFIG_FILE) --webhook-url https://127.0.0.1:9443 --webhook-cert-dir .cluster/webhook >.cluster/operator.log 2>&1 & echo $$! >.cluster/operator.pid
	@echo "operator running (pid $$(cat .cluster/operator.pid)), log .cluster/operator.log, metrics :8080"

operator-stop:
	@if [ -f .cluster/operator.pid ]; then kill $$(cat .cluster/operator.pid) 2>/dev/null || true; rm -f .cluster/operator.pid; fi

bench: setup binaries
	$(BIN)/python bench/cluster_up.py

clean: demo-down
	rm -rf .venv .tools .cluster
