"""Sampling the tiny families in memory, as the generate stage does: shared by the sampling tests."""

from __future__ import annotations

import torch

from mpo.backbones.base import repeat_rows
from mpo.backbones.registry import get_backbone_class
from mpo.schema import GenerateConfig
from mpo.seeds import candidate_noise

PROMPTS = ["a photo of a cat", "a red car in the city", "the blue sea"]
STEPS = 4


class TinyBackbones(dict):
    """Each family's tiny backbone (random weights, in memory) and its size, built on first use."""

    def __missing__(self, family: str) -> tuple:
        cls = get_backbone_class(family)
        self[family] = (cls(cls.tiny_pipeline()), cls.tiny_size)
        return self[family]


def sample(backbone, size, prompts, seeds_per_prompt: int = 2, **sampling) -> torch.Tensor:
    """All prompts' candidates in one batch, each from its own seeded noise (seed 100 * the prompt's
    index in :data:`PROMPTS` + its number)."""
    gen = GenerateConfig(**{"num_inference_steps": STEPS, **size, **sampling})
    shape = backbone.latent_shape(gen)
    embeds = [repeat_rows(backbone.encode_prompts([p]), seeds_per_prompt, "e") for p in prompts]
    rows = {key: torch.cat([e[key] for e in embeds]) for key in embeds[0]}
    noise = torch.stack(
        [candidate_noise(shape, 100 * PROMPTS.index(p) + i) for p in prompts for i in range(seeds_per_prompt)]
    )
    return backbone.sample(rows, backbone.encode_negative(), noise, gen)
