# The two commands in README.md: `make run` (main job on the embedded tiny default) and `make test`.
PYTHON ?= python
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-dev run test lint

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh dev

run: setup
	mpo run recipes/tiny/sdxl.yaml

test: setup-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -p no:cacheprovider
