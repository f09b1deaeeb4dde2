"""On a CUDA machine: the tiny loop in bf16, and the VLM's shared-prefix path in bf16 against the naive
one. Deselected by default (``-m gpu`` runs them); skipped where no GPU is present."""

from __future__ import annotations

import pytest
import torch

from mpo.run import run_all
from mpo.store import read_parquet
from tests.scripts.tiny_runs import SDXL, recipe_for, shared_models

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_tiny_sdxl_loop_in_bf16_on_gpu(tmp_path_factory, tmp_path):
    recipe = recipe_for(
        tmp_path / "run",
        shared_models(tmp_path_factory),
        SDXL,
        extra=["train.mixed_precision=bf16", "train.max_steps=4", "eval.every=2", "tracking.tracker=none"],
    )
    reports = run_all(recipe)
    assert all(r.did_work for r in reports)
    steps = read_parquet(tmp_path / "run" / "eval.parquet")["step"].tolist()
    assert steps == [0, 2, 4]


def test_vlm_shared_prefix_matches_naive_in_bf16_on_gpu(tmp_path):
    from reward.backends.tiny_vlm import build_tiny_qwen2_vl
    from reward.backends.vlm import VLMBackend
    from reward.checklist import load_checklist
    from reward.types import Sample

    backend = VLMBackend.from_pretrained(
        build_tiny_qwen2_vl(tmp_path / "vlm"), dtype="bfloat16", device="cuda"
    )
    checklist = load_checklist("image-official")
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(torch.rand(3, 64, 64, generator=gen), prompt="a red bus") for _ in range(4)]
    rows = [checklist.question_texts("a red bus")] * len(samples)
    fast = backend.answer(samples, rows)
    naive = backend.answer_naive(samples, rows)
    torch.testing.assert_close(fast.p_yes, naive.p_yes, atol=2e-2, rtol=0)
