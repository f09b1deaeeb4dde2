"""Fixtures shared by the trainer, eval and export tests: the session's tiny models, and a run
directory already through generate, score and select (once per session; tests copy it before they
write anything)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.scripts.tiny_runs import SDXL, finished_overrides, prepare, shared_models


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    return shared_models(tmp_path_factory)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, models) -> Path:
    torch.set_num_threads(1)
    return prepare(tmp_path_factory.mktemp("prepared") / "run", models)


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    """A run directory that ``mpo run`` finished (tiny SDXL, 2 steps, exported), for the fault tests;
    copy it before changing anything."""
    from mpo.cli import main

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", str(SDXL), *finished_overrides(out, shared_models(tmp_path_factory))]) == 0
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, much faster on a shared machine, and makes CPU kernels
    bitwise independent of the batch (the batch-invariance tests rely on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
