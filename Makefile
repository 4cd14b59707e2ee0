# Every target installs into .venv first when pyproject.toml or requirements.lock changed;
# a second call installs nothing.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow bench tables table-vit table-lm table-diffusion table-grpo figures clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@bash scripts/install.sh $(VENV)

install: $(STAMP) ## Create .venv and install gradsmooth with its pinned dependencies

run: $(STAMP) ## Train the default job (timm ViT on digits with Gradient Smoothing); extra overrides in ARGS="..."
	$(PYTHON) train.py $(ARGS)

test: $(STAMP) ## Run the test suite without the slow end-to-end checks
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP) ## Run only the slow end-to-end checks (full default runs)
	$(PYTHON) -m pytest -m slow $(PYTEST_ARGS)

bench: $(STAMP) ## Time smoothing against its base optimizers, write results/bench/smoothing.md; options in ARGS="..."
	$(PYTHON) scripts/bench_smoothing.py $(ARGS)

table-vit: $(STAMP) ## Sweep the ViT table (48 runs, about an hour on 2 CPU cores) and write results/vit/
	$(PYTHON) scripts/run_table.py vit

table-lm: $(STAMP) ## Sweep the LM table (12 runs, about 45 minutes on 2 CPU cores) and write results/lm/
	$(PYTHON) scripts/run_table.py lm

table-diffusion: $(STAMP) ## Sweep the diffusion table (12 runs, about 45 minutes on 2 CPU cores) and write results/diffusion/
	$(PYTHON) scripts/run_table.py diffusion

table-grpo: $(STAMP) ## Sweep the GRPO table (6 runs, about 25 minutes on 2 CPU cores) and write results/grpo/
	$(PYTHON) scripts/run_table.py grpo

tables: table-vit table-lm table-diffusion table-grpo ## Rebuild every table from new sweeps

figures: $(STAMP) ## Draw depth diagnostics (baseline against smoothing) from the newest vit and lm table sweeps into results/analysis/
	$(PYTHON) scripts/make_figures.py vit && $(PYTHON) scripts/make_figures.py lm

clean: ## Remove run directories and caches (keeps .venv)
	rm -rf runs multirun .pytest_cache
