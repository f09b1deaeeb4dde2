# The two commands in README.md: `make run` (main job on the embedded tiny default) and `make test`.
PYTHON ?= python
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-dev run test test-cluster test-slow lint test-floor

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh dev

run: setup
	mpo run recipes/tiny/sdxl.yaml

test: setup-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -p no:cacheprovider

# The cluster command's slow tests: `mpo run` under accelerate launch with 2 processes (ZeRO-2, ZeRO-3),
# an error on one rank, SIGTERM / SIGINT to the launcher and the resume (CI runs these too, ~8 min).
test-cluster:
	$(PYTHON) -m pytest -q -p no:cacheprovider -m slow tests/test_launch_run.py tests/test_launch_configs.py

# Every slow test (about 30 min on 2 cores).
test-slow:
	$(PYTHON) -m pytest -q -p no:cacheprovider -m slow

# The reward's model tests on the lowest transformers that pyproject admits, in a throwaway venv.
FLOOR = $(shell sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
test-floor:
	$(PYTHON) -m venv --system-site-packages .venv-floor
	.venv-floor/bin/pip install -q "transformers==$(FLOOR).0"
	PYTHONPATH=$(CURDIR) .venv-floor/bin/python -m pytest -q -p no:cacheprovider tests/test_vlm_families.py \
		tests/test_vqascore.py tests/test_vlm_backend.py tests/test_video_frames.py
