# dwskd — run `make help` for the list of targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export NO_ALBUMENTATIONS_UPDATE ?= 1
export DWSKD_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: help install test test-full lint format run select paper paper-quick teacher-study investigate compare bench disk clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY) ## create .venv and install dwskd (editable) with its dev, medmnist and export extras (pip; ~3 min)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,medmnist,export]"
	$(PY) -c "import torchvision, timm, lightning, onnxruntime, dwskd; print('dwskd', dwskd.__version__, 'installed: torch', __import__('torch').__version__)"

# Two pytest workers of one thread each (a file's tests stay on one worker, so its fixtures are
# built once): on 2 cores that beats one process of two threads for many tiny runs.
test: ## fast test suite (excludes @slow: DDP, submitit, joblib, Optuna, whole sweeps; about 3 min on 2 idle cores)
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow" -q -n 2 --dist loadfile

test-full: ## every test, including slow ones (two one-thread workers, as make test)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

lint: ## ruff lint + format check
	$(PY) -m ruff check dwskd tests experiments
	$(PY) -m ruff format --check dwskd tests experiments

format: ## apply ruff formatting and safe fixes
	$(PY) -m ruff check --fix dwskd tests experiments
	$(PY) -m ruff format dwskd tests experiments

run: ## the default run: synthetic data, dual-model SKD, offline (ARGS="key=value ...")
	$(PY) -m dwskd.run $(ARGS)

select: ## weight selection CLI (ARGS="teacher.source=file teacher.file=... out=student.safetensors")
	$(PY) -m dwskd.select_student $(ARGS)

paper: ## the full table: 4 tasks x 3 teacher scenarios x 6 methods x 3 seeds (many hours on 2 cores; resumes)
	$(PY) -m experiments.paper $(ARGS)

paper-quick: ## one dataset (lung_ct), one seed, tiny epochs (~14 min on 2 cores)
	$(PY) -m experiments.paper --quick $(ARGS)

teacher-study: ## ws/dwskd gain vs teacher strength on lung_ct, brain_mri (hours on 2 cores; resumes)
	$(PY) -m experiments.teacher_study $(ARGS)

investigate: ## dwskd knob variants vs baselines on lung_ct, VALIDATION metrics (after make paper)
	$(PY) -m experiments.investigate $(ARGS)

compare: ## table + plot per swept key of any sweep's runs, mean ± std over seeds (ARGS="outputs/multirun/<time>")
	$(PY) -m experiments.compare $(ARGS)

bench: ## framework costs side by side -> experiments/results/bench.md
	$(PY) -m experiments.bench $(ARGS)

disk: ## disk used by run dirs or sweeps (ARGS="outputs/..."; default: run the default run and measure it)
	$(PY) -m experiments.disk_usage $(if $(ARGS),$(ARGS),--default)

clean: ## remove caches (never run outputs: delete outputs/ yourself)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
