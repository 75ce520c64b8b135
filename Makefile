# One entry point for people and CI. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
REPO ?= model_repository
TRAIN_ARGS ?=
PYTEST_ARGS ?=
BENCH_GATEWAY_ARGS ?=
GPU_BENCH_ARGS ?=

.PHONY: help install train-and-publish test lint gpu-check gpu-bench clean \
	triton-up triton-down triton-status triton-bench up down reload status compose-check compose-test k8s-check bench bench-engines gateway bench-gateway predictor predictor-bench precision-bench \
	torchserve-up torchserve-down torchserve-status torchserve-reload torchserve-bench perf-analyzer

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

install: $(INSTALLED) ## create .venv and install pinned dependencies (quick when done)

$(INSTALLED): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint requirements.lock --editable '.[dev]'
	touch $@

train-and-publish: install ## train on digits, export TorchScript + ONNX, check parity, publish a new version
	$(PY) -m training train-and-publish --repo $(REPO) $(TRAIN_ARGS)

up: install ## the whole local stack (3 engines + gateway + Prometheus) under supervisord; waits until ready
	$(PY) -m services.stack up

down: ## stop the local stack; fails if any of its processes survives
	$(PY) -m services.stack down

reload: ## every engine of the running stack to the newest published version, no restart
	$(PY) -m services.stack reload

status: ## supervisor's view of the local stack and the gateway's /readyz
	$(PY) -m services.stack status

BENCH_USERS ?= 8
BENCH_SPAWN_RATE ?= 8
BENCH_DURATION ?= 30s
BENCH_ARGS ?=
BENCH_ENGINES_ARGS ?=

bench: install ## Locust comparison of the 3 backends through the gateway (after `make up`); report in reports/bench-<time>/
	$(PY) -m loadtests.bench --users $(BENCH_USERS) --spawn-rate $(BENCH_SPAWN_RATE) --duration $(BENCH_DURATION) $(BENCH_ARGS)

compose-check: install ## validate compose.yaml, the Dockerfiles, Prometheus and Grafana config (no Docker needed)
	$(PY) -m pytest tests/stack/test_compose_static.py -q

k8s-check: install ## render and validate the Kubernetes manifests offline (no cluster needed)
	$(PY) -m pytest tests/deploy/test_kubernetes_static.py -q

compose-test: install ## build the images and run the stack under Docker for real (tests/stack/test_compose_up.py; root or a running engine)
	$(PY) -m pytest tests/stack/test_compose_up.py -q -s $(PYTEST_ARGS)

test: install ## the whole test suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install ## ruff and strict mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check services training tests loadtests
	$(VENV)/bin/mypy

gpu-check: install ## on a CUDA host: the tests marked gpu, then engine throughput (fp32/fp16, batch 1-256, TorchScript/ONNX)
	$(PY) -m pytest -m gpu tests -q -rs
	$(PY) -m services.predictor.gpu_check --repo $(REPO)

gpu-bench: install ## on a CUDA host: the predictor end to end, 1 and 4 workers, fp32/fp16, 1- and 64-image requests: images/s, p50/p99, GPU util
	$(PY) -m loadtests.gpu_bench --repo $(REPO) --json reports/gpu-bench.json $(GPU_BENCH_ARGS)

clean: ## remove generated models, checkpoints, run folders and reports (keeps .venv)
	rm -rf checkpoints runs reports
	find $(REPO) -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +

PERF_ANALYZER_ARGS ?=

perf-analyzer: install ## Triton's perf_analyzer (set up once in .cache/) against predictor, Triton and TorchServe: one table
	$(PY) -m loadtests.perf_analyzer_bench --repo $(REPO) $(PERF_ANALYZER_ARGS)

# --- Triton (local tritonserver from the nvidia-pytriton wheel) -------------------------------
TRITON_BENCH_ENV := TRITON_RUN_DIR=runs/triton-bench TRITON_HTTP_PORT=8210 TRITON_GRPC_PORT=8211 TRITON_METRICS_PORT=8212

triton-up: install ## start the local tritonserver (python-backend twins of $(REPO)) on 8200/8201/8202
	TRITON_REPOSITORY=$(REPO) $(PY) -m services.triton up

triton-down: ## stop the local tritonserver and its python stubs
	$(PY) -m services.triton down

triton-status: ## is the local tritonserver (standalone or the stack's) running and ready?
	$(PY) -m services.triton status

triton-bench: install ## Triton start-to-ready, sequential p50/p99, throughput with 8 clients
	mkdir -p reports
	TRITON_REPOSITORY=$(REPO) $(TRITON_BENCH_ENV) $(PY) -m loadtests.triton_bench --json reports/triton-bench.json

# --- TorchServe ------------------------------------------------------------------------------
torchserve-up: install ## start TorchServe on the newest published version (waits until its worker is READY)
	TORCHSERVE_REPOSITORY=$(REPO) $(PY) -m services.torchserve up

torchserve-down: ## stop TorchServe; fails if a Java or worker process survives
	TORCHSERVE_REPOSITORY=$(REPO) $(PY) -m services.torchserve down

# status and reload find the running instance (runs/torchserve, or the stack's
# runs/stack/torchserve) and the repository it serves on their own.
torchserve-status: ## TorchServe processes, served versions, worker states (JSON; exit 0 = ready)
	$(PY) -m services.torchserve status

torchserve-reload: install ## serve the newest published version without a restart
	$(PY) -m services.torchserve reload

torchserve-bench: install ## TorchServe start-to-ready time and p50/p99 of 200 sequential requests
	TORCHSERVE_REPOSITORY=$(REPO) $(PY) -m loadtests.torchserve_bench

# --- Gateway ---------------------------------------------------------------------------------
gateway: install ## run the gateway on :8000 in front of the engines (settings: GATEWAY_*)
	$(PY) -m services.gateway

bench-gateway: install ## what the gateway costs, unpinned as `make up` runs it: added p50 at concurrency 1, throughput ratio at 1/8/32
	$(PY) -m loadtests.gateway_bench --repo $(REPO) $(BENCH_GATEWAY_ARGS)

bench-engines: install ## predictor (both engines), Triton, TorchServe direct on CPU 0, wrk on CPU 1: req/s, p50/p99, CPU ms/req, ratios
	mkdir -p reports
	$(PY) -m loadtests.engines_bench --repo $(REPO) --json reports/engines-bench.json $(BENCH_ENGINES_ARGS)

# --- Predictor -------------------------------------------------------------------------------
predictor: install ## run the FastAPI predictor on $(REPO) (port 8100; every setting is a PREDICTOR_* variable)
	PREDICTOR_REPOSITORY=$(REPO) $(PY) -m services.predictor

predictor-bench: install ## predictor req/s, p50/p99 at concurrency 1/8/32, batching on/off, vs its /noop ceiling
	mkdir -p reports
	$(PY) -m loadtests.predictor_bench --repo $(REPO) --json reports/predictor-bench.json

precision-bench: install ## int8 vs fp32 (a version published with --int8): model-only images/s and predictor req/s
	$(PY) -m loadtests.precision_bench --repo $(REPO)
