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


def _tiny_on_gpu(family: str):
    from mpo.backbones.registry import get_backbone_class

    cls = get_backbone_class(family)
    return cls(cls.tiny_pipeline().to(torch.bfloat16), "cuda"), cls.tiny_size


def _candidates(backbone, size, prompts, **sampling):
    """Two candidates per prompt, all prompts in one batch, from seeded bf16 noise on the GPU."""
    from mpo.backbones.base import repeat_rows
    from mpo.schema import GenerateConfig
    from mpo.seeds import candidate_noise

    gen = GenerateConfig(**{"num_inference_steps": 4, **size, **sampling})
    shape = backbone.latent_shape(gen)
    embeds = [repeat_rows(backbone.encode_prompts([p]), 2, "e") for p in prompts]
    rows = {key: torch.cat([e[key] for e in embeds]) for key in embeds[0]}
    noise = torch.stack(
        [
            candidate_noise(shape, 10 * PROMPTS.index(p) + i, "cuda", torch.bfloat16)
            for p in prompts
            for i in range(2)
        ]
    )
    return backbone.sample(rows, backbone.encode_negative(), noise, gen).float()


PROMPTS = ["a photo of a cat", "a red car in the city", "the blue sea"]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["sdxl", "cogvideox", "wan"])
def test_batching_across_prompts_on_gpu_in_bf16(family):
    """On a GPU, cuBLAS / SDPA may pick other kernels per batch size: several prompts per batch then
    differ from one prompt per batch only at bf16 rounding (relative L2 below 2 %)."""
    backbone, size = _tiny_on_gpu(family)
    alone = torch.cat([_candidates(backbone, size, [p], scheduler="dpmpp_2m") for p in PROMPTS])
    together = _candidates(backbone, size, PROMPTS, scheduler="dpmpp_2m")
    assert _relative(together, alone) < 2e-2


@pytest.mark.parametrize("family", ["sdxl", "cogvideox"])
@pytest.mark.parametrize("kernel", ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math"])
def test_attention_kernels_on_gpu_agree_at_bf16_rounding(family, kernel):
    backbone, size = _tiny_on_gpu(family)
    default = _candidates(backbone, size, PROMPTS[:1])
    forced = _candidates(backbone, size, PROMPTS[:1], attention=kernel)
    assert _relative(forced, default) < 2e-2
    assert torch.equal(_candidates(backbone, size, PROMPTS[:1], attention=kernel), forced)


def test_channels_last_on_gpu_agrees_at_bf16_rounding():
    backbone, size = _tiny_on_gpu("sdxl")
    default = _candidates(backbone, size, PROMPTS[:1])
    nhwc = _candidates(backbone, size, PROMPTS[:1], channels_last=True)
    assert _relative(nhwc, default) < 2e-2
    assert all(p.is_contiguous() for p in backbone.denoiser.parameters())


def test_auto_batch_on_gpu_finds_a_batch_that_fits():
    from mpo.generate import plan_batches
    from mpo.schema import GenerateConfig

    backbone, size = _tiny_on_gpu("sdxl")
    gen = GenerateConfig(
        num_inference_steps=4, num_candidates=2, batch_size="auto", prompts_per_shard=8, **size
    )
    plan = plan_batches(
        backbone, gen, PROMPTS[0], backbone.encode_negative(), torch.device("cuda"), torch.bfloat16
    )
    assert plan.auto and plan.prompts == 8  # the tiny model fits a whole shard
