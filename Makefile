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

.PHONY: demo test test-all venv pretrain-toy clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(FEDLIT) fit --config configs/quickstart.yaml --method zeroshot
	$(FEDLIT) fit --config configs/quickstart.yaml

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VENV)/bin/pytest

# Regenerate the embedded model's weights (deterministic; ~5 min on 2 idle CPU cores).
pretrain-toy: $(STAMP)
	$(FEDLIT) pretrain-toy

clean:
	rm -rf runs results .pytest_cache
