"""A lower bound on the memory of one batch, checked against the device before a stage starts.

A recipe with ``generate.num_candidates=1000000`` or ``generate.height=100000`` would otherwise run
for minutes (or hours, after the stages before it) and die inside an allocator with a traceback. The
bounds here count only tensors a batch cannot do without (its latents, noise and guidance copies,
its prompt embeddings, its decoded pixels), never the activations, so they refuse only what cannot
fit, never a recipe that would have run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

GiB = 1 << 30


class MemoryEstimateError(ValueError):
    """A batch that cannot fit on the device; the message names the keys that size it."""


def device_memory(device: torch.device | str) -> int:
    """Bytes of memory of ``device`` (a GPU's total, or the machine's RAM for the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def check_fits(needed: int, what: str, keys: Sequence[str], device: torch.device | str) -> None:
    """Raise :class:`MemoryEstimateError` when ``needed`` bytes exceed the device's memory."""
    total = device_memory(device)
    if needed > total:
        raise MemoryEstimateError(
            f"{what} needs at least {needed / GiB:,.1f} GiB, more than the {total / GiB:,.1f} GiB of "
            f"{torch.device(device)}; lower {' / '.join(keys)}"
        )


def generation_bytes(
    num_candidates: int, latent_shape: Sequence[int], dtype: torch.dtype, embeds: Any
) -> int:
    """One prompt's sampling batch: noise, latents and the doubled (guided) model input and output of
    its N candidates, and their conditional and unconditional prompt embeddings."""
    latent = math.prod(latent_shape) * dtype.itemsize
    embed = sum(v[0].numel() * v.element_size() for v in embeds.values())
    return num_candidates * (6 * latent + 2 * embed)


def pixel_bytes(batch: int, height: int, width: int, frames: int = 1) -> int:
    """Decoded float32 RGB pixels of ``batch`` samples (what previews and the reward decode)."""
    return batch * 3 * height * width * frames * 4


def check_generate_and_score(
    recipe: Any, latent_shape: Sequence[int], dtype: torch.dtype, embeds: Any, video: bool, device: Any
) -> None:
    """Before any candidate is made: the sampling batch, and the decoded batches of the previews and
    of the score stage, fit the device."""
    g = recipe.generate
    frames = g.num_frames if video else 1
    size = getattr(g, "batch_size", None)
    fixed = size if isinstance(size, int) else g.num_candidates  # auto: at least one prompt's
    batch = g.num_candidates * max(1, fixed // g.num_candidates)
    check_fits(
        generation_bytes(batch, latent_shape, dtype, embeds),
        f"one generation batch ({batch} candidates)",
        ["generate.batch_size", "generate.num_candidates", "generate.height / width / num_frames"],
        device,
    )
    decoded = min(g.num_candidates, g.previews)
    if decoded:
        check_fits(
            pixel_bytes(decoded, g.height, g.width, frames),
            "decoding one prompt's previews",
            ["generate.previews", "generate.height / width / num_frames"],
            device,
        )
    check_fits(
        pixel_bytes(recipe.reward.batch_size, g.height, g.width, frames),
        "decoding one batch for the reward",
        ["reward.batch_size", "generate.height / width / num_frames"],
        device,
    )
