# fedlit — the two commands a new user needs:
#   make demo   create .venv if missing, run the quickstart federation (PromptFL vs zero-shot CLIP on the embedded model)
#   make test   create .venv if missing, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
FEDLIT := $(VENV)/bin/fedlit
STAMP := $(VENV)/.fedlit-installed
# torch 2.14.1 / torchvision 0.29.1 resolve from the machine's local wheel files (CUDA build, runs on CPU too).
TORCH := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test test-all venv pretrain-toy reproduce-table1 clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	$(FEDLIT) fit --help > /dev/null  # builds the cached help text (fedlit.catalog), so later calls skip torch
	@touch $(STAMP)

demo: $(STAMP)
	$(FEDLIT) fit --config configs/quickstart.yaml --method zeroshot
	$(FEDLIT) fit --config configs/quickstart.yaml
	@echo ""
	@echo "Next, from this folder (or 'source $(VENV)/bin/activate' once, then plain 'fedlit ...'):"
	@echo "  $(FEDLIT) methods                                    # what can run"
	@echo "  $(FEDLIT) fit --config configs/fedpgp.yaml --config configs/embedded.yaml"
	@echo "  $(FEDLIT) summarize runs --out runs/summary          # one table of every finished run"
	@echo "  $(FEDLIT) plot runs --out runs/figures               # figures (PNG + PDF)"
	@echo "  $(VENV)/bin/tensorboard --logdir runs                 # curves in the browser"

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VENV)/bin/pytest

# Pretrain the embedded model again with the bundled weights' recipe (~5 min on 2 idle CPU cores) into
# runs/fedlit-toy.safetensors (a new file; the bundled weights are never overwritten by default).
pretrain-toy: $(STAMP)
	$(FEDLIT) pretrain-toy --out runs/fedlit-toy.safetensors

# FedPGP Table 1 (8 methods × 5 datasets × SEEDS) → results/table1.md + .csv, paper numbers beside ours.
# Finished cells are skipped, interrupted ones resumed. BACKBONE=fedlit-toy: the embedded grid (CPU, minutes;
# table in results/table1-fedlit-toy.md). Real grid: FEDLIT_DATA=/path/to/coop/data and a GPU (see README).
BACKBONE ?= ViT-B-16
SEEDS ?= 1
METHODS ?= zeroshot coop promptfl fedprox fedmaple fedcocoop fedotp fedpgp
DATASETS ?= oxford_pets oxford_flowers dtd caltech101 food101
ROUNDS ?=
FIT_ARGS ?=
reproduce-table1: $(STAMP)
	$(PY) -m fedlit.apps.table1 --backbone $(BACKBONE) --seeds $(SEEDS) --methods $(METHODS) --datasets $(DATASETS) \
		$(if $(ROUNDS),--rounds $(ROUNDS)) $(if $(FIT_ARGS),--fit_args="$(FIT_ARGS)") --out results

clean:
	rm -rf runs results .pytest_cache
