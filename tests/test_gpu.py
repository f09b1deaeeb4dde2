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


@pytest.mark.parametrize("family", ["sdxl", "cogvideox"])
def test_batching_across_prompts_on_gpu_in_bf16(family):
    """On a GPU, cuBLAS / SDPA may pick other kernels per batch size: several prompts per batch then
    differ from one prompt per batch only at bf16 rounding (relative L2 below 2 %)."""
    from mpo.backbones.base import repeat_rows
    from mpo.backbones.cogvideox import CogVideoXBackbone
    from mpo.backbones.sdxl import SDXLBackbone
    from mpo.backbones.tiny import COGVIDEOX_SIZE, SDXL_SIZE, tiny_cogvideox_pipeline, tiny_sdxl_pipeline
    from mpo.schema import GenerateConfig
    from mpo.seeds import candidate_noise

    cls, pipe, size = {
        "sdxl": (SDXLBackbone, tiny_sdxl_pipeline, SDXL_SIZE),
        "cogvideox": (CogVideoXBackbone, tiny_cogvideox_pipeline, COGVIDEOX_SIZE),
    }[family]
    backbone = cls(pipe().to(torch.bfloat16), "cuda")
    gen = GenerateConfig(num_inference_steps=4, scheduler="dpmpp_2m", **size)
    shape = backbone.latent_shape(gen)
    prompts = ["a photo of a cat", "a red car in the city", "the blue sea"]
    embeds = [repeat_rows(backbone.encode_prompts([p]), 2, "e") for p in prompts]
    noise = [
        torch.stack([candidate_noise(shape, 10 * k + i, "cuda", torch.bfloat16) for i in range(2)])
        for k in range(3)
    ]
    negative = backbone.encode_prompts([""])
    alone = torch.cat([backbone.sample(embeds[k], negative, noise[k], gen) for k in range(3)]).float()
    rows = {key: torch.cat([e[key] for e in embeds]) for key in embeds[0]}
    together = backbone.sample(rows, negative, torch.cat(noise), gen).float()
    assert ((together - alone).norm() / alone.norm()).item() < 2e-2
