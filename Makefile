# Entry points of the project. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
# the CPU wheel lies on the reference machines' disk; elsewhere add your platform's index options here
TORCH  ?= torch==2.13.0
# DVC runs each stage's `python -m stages.<name>` through the shell: the venv must come first on PATH
export PATH := $(BIN):$(PATH)

.PHONY: install browser run run-gpu run-retrieval run-tapt lint test smoke flow serve mlflow-ui clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch can pull a multi-GB CUDA build on a CPU machine
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	touch $@

install: $(STAMP)

run: install  ## the whole pipeline on the configured data and budget profile (the demo: cpu-demo, 19 min on 2 CPU cores)
	@python -c "from dapt.common import active_profile as p; print('budget profile:', p() or 'none (the recipe)')"
	dvc repro
	@echo
	@echo "Report: $(CURDIR)/reports/comparison.html (offline, figures inline; markdown: reports/comparison.md)"
	@echo "Metrics: dvc metrics show | MLflow: make mlflow-ui"

# the GPU profile: the demo as a DVC experiment at the scale where DAPT was measured to pay off (profiles.gpu-demo
# in params.yaml); seeds and snapshots name DVC stages, so they are set here rather than in the profile
GPU_PARAMS := -S profile=gpu-demo -S 'finetune.seeds=[0,1,2,3,4]' -S 'pretrain.snapshots=[0,12,25,50]'

run-gpu: install  ## the demo at GPU scale, as a DVC experiment (see README)
	dvc exp run -n gpu-demo $(GPU_PARAMS)
	@echo "Report: $(CURDIR)/reports/comparison.md; compare with: dvc exp show"

# the other demo task: retrieval of the licence a notice names, among every licence text (ingest.demo.task); no
# adaptation curve: each retrieval fine-tuning run takes 3.4 min on 2 CPU cores (it encodes the 2,594 licence texts
# four times), so 9 runs rather than 15
run-retrieval: install  ## the demo's retrieval task, as a DVC experiment (~40 min on 2 CPU cores)
	dvc exp run -n retrieval-demo -S ingest.demo.task=retrieval -S 'pretrain.snapshots=[]'
	@echo "Report: $(CURDIR)/reports/comparison.md; compare with: dvc exp show"

# task-adaptive pretraining beside DAPT: two more pretraining runs and their fine-tuning (these name DVC stages, so
# they are set here rather than in a profile; `++` adds the keys to the empty pretrain.tapt, Hydra's syntax)
TAPT_PARAMS := -S '++pretrain.tapt.tapt=domain_novocab_init' -S '++pretrain.tapt.dapt_tapt=domain' \
               -S 'finetune.variants=[general,domain,domain_novocab,tapt,dapt_tapt]'

run-tapt: install  ## the demo with TAPT and DAPT + TAPT variants, as a DVC experiment
	dvc exp run -n tapt-demo $(TAPT_PARAMS)
	@echo "Report: $(CURDIR)/reports/comparison.md; compare with: dvc exp show"

# the HTML report's test renders it in headless Chromium: Debian's package where apt can install it
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; }; } \
	  || echo "no Chromium (install chromium): the HTML report test will be skipped"

lint: install  ## ruff's rules and the import contracts (pyproject.toml: [tool.ruff.lint], [tool.importlinter])
	ruff check .
	lint-imports

test: lint browser  ## the linters, then unit, stage and end-to-end tests
	python -m pytest

smoke: install  ## the whole DAG on a tiny random BERT and small data, in a temporary copy
	python -m tests.smoke

flow: install  ## the same DVC stages as a Prefect flow, once
	python -m flows.pipeline

serve: install  ## a Prefect deployment on the cron schedule in params.yaml (pipeline.cron)
	python -m flows.pipeline --serve

mlflow-ui: install
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

clean-venv:
	rm -rf $(VENV)
