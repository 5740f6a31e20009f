# gpuaas: the two commands are `make demo` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := .tools/uv/bin/uv
VENV := .venv
BIN := $(VENV)/bin
CLUSTER ?= gpuaas
SCENARIO ?= program
KUBECONFIG_FILE := .cluster/$(CLUSTER).kubeconfig
# The demo's operator writes the ledger every 10 s (the default is 60 s), so its report shows every grant.
LEDGER_FLUSH_SECONDS ?= 10

.PHONY: setup binaries lint unit integration e2e e2e-kind test demo demo-down operator-start operator-stop bench clean

$(UV):
	python3 -m venv .tools/uv
	.tools/uv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Debian packages: Prometheus for the dashboard test; runc, CNI plugins, iptables and conntrack for the real node;
# mmdebstrap for the operator image's base (built here: no registry); Chromium and a Korean font to render the HTML
# report as a person sees it.
DEBIAN_PACKAGES := prometheus runc containernetworking-plugins iptables conntrack mmdebstrap chromium fonts-noto-cjk

setup: $(UV)  ## Python environment from uv.lock, and the Debian packages above
	$(UV) sync --frozen --quiet
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing Debian packages:" $$missing "(log: .cluster/apt.log)"; mkdir -p .cluster; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } >.cluster/apt.log 2>&1 \
	  || { cat .cluster/apt.log; exit 1; }; fi

binaries:  ## Pinned Kubernetes, etcd, kwok, helm and kind binaries (cached by version outside the repo)
	bash tools/build.sh >/dev/null

lint: setup
	$(BIN)/ruff check operator tests bench e2e tools
	$(BIN)/ruff format --check operator tests bench e2e tools
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo
	$(BIN)/hadolint Dockerfile
	bash tools/sync-chart-crds.sh --check

unit: setup
	$(BIN)/pytest tests/unit -q

integration: setup binaries
	$(BIN)/pytest tests/integration -q

e2e: setup binaries  ## Helm install into a fresh local cluster (gpuaas-e2e), then grant, use, report, upgrade, uninstall
	$(BIN)/pytest e2e -q

E2E_KIND_CLUSTER ?= gpuaas-e2e
E2E_KIND_KUBECONFIG := .cluster/$(E2E_KIND_CLUSTER)-kind.kubeconfig
# The same suite on a kind cluster, for machines with Docker (not runnable where there is no container engine).
# The fake GPU nodes are kept Ready by a KWOK controller the suite runs on this machine, and the operator's webhook
# server is reached by the kind API server through the Docker network's gateway address.
e2e-kind: setup binaries  ## The e2e suite on a kind cluster (needs Docker)
	@command -v docker >/dev/null || { echo "e2e-kind needs Docker (kind runs the cluster in containers)"; exit 1; }
	@mkdir -p .cluster
	KIND="$$(bash tools/build.sh kind)/kind"; \
	"$$KIND" get clusters | grep -qx '$(E2E_KIND_CLUSTER)' || \
	  "$$KIND" create cluster --name $(E2E_KIND_CLUSTER) --kubeconfig $(E2E_KIND_KUBECONFIG) --wait 120s; \
	"$$KIND" get kubeconfig --name $(E2E_KIND_CLUSTER) >$(E2E_KIND_KUBECONFIG); \
	GATEWAY="$$(docker network inspect kind -f '{{range .IPAM.Config}}{{if .Gateway}}{{.Gateway}} {{end}}{{end}}' | tr ' ' '\n' | grep -m1 '\.')"; \
	rc=0; GPUAAS_E2E_KUBECONFIG=$(E2E_KIND_KUBECONFIG) GPUAAS_E2E_WEBHOOK_HOST="$$GATEWAY" $(BIN)/pytest e2e -q || rc=$$?; \
	[ -n "$$KEEP" ] || "$$KIND" delete cluster --name $(E2E_KIND_CLUSTER); exit $$rc

test: setup binaries lint  ## Lint, type-check, layers, then every test tier (unit, integration, e2e) against real control planes
	$(BIN)/pytest tests e2e -q

demo: setup binaries  ## Local cluster with the program scenario, the operator, and the pool totals
	$(BIN)/gpuaas cluster up --scenario $(SCENARIO) --name $(CLUSTER)
	$(MAKE) --no-print-directory operator-start
	$(BIN)/gpuaas pools --kubeconfig $(KUBECONFIG_FILE) --wait 120 >/dev/null
	"$$(bash tools/build.sh kubernetes)/kubectl" --kubeconfig $(KUBECONFIG_FILE) get gpupools
	$(BIN)/gpuaas pools --kubeconfig $(KUBECONFIG_FILE)
	$(BIN)/python tools/demo.py --kubeconfig $(KUBECONFIG_FILE)

demo-down: operator-stop
	$(BIN)/gpuaas cluster down --name $(CLUSTER)

operator-start: operator-stop
	@mkdir -p .cluster
	@nohup $(BIN)/gpuaas run --kubeconfig $(KUBECONFIG_FILE) --webhook-url https://127.0.0.1:9443 --webhook-cert-dir .cluster/webhook --ledger-flush-seconds $(LEDGER_FLUSH_SECONDS) >.cluster/operator.log 2>&1 & echo $$! >.cluster/operator.pid
	@echo "operator running (pid $$(cat .cluster/operator.pid)), log .cluster/operator.log, metrics :8080"

operator-stop:
	@if [ -f .cluster/operator.pid ]; then kill $$(cat .cluster/operator.pid) 2>/dev/null || true; rm -f .cluster/operator.pid; fi

bench: setup binaries
	$(BIN)/python bench/cluster_up.py

clean: demo-down
	rm -rf .venv .tools .cluster
