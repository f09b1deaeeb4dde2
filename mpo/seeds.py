"""Per-candidate seeds and initial noise.

A candidate is fixed by ``(recipe seed, prompt_id, sample_idx)`` alone: not by the process that draws
it, the batch it sits in or how many candidates came before it. That is what makes the generate stage
give the same candidates on 1 process or 64, and lets a killed run resume without drawing anything
twice.
"""

from __future__ import annotations

import hashlib

import torch

_SEED_BITS = 63  # fits torch.Generator.manual_seed and a signed int64 parquet column


def candidate_seed(seed: int, prompt_id: int | str, sample_idx: int) -> int:
    """A stable 63-bit seed for one candidate.

    blake2b rather than Python's ``hash``: ``hash`` of a string changes between interpreter runs
    (PYTHONHASHSEED), and the seed must be the same in every process and on every restart.
    """
    key = f"{int(seed)}|{prompt_id}|{int(sample_idx)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << _SEED_BITS) - 1)


def candidate_noise(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` from ``seed``.

    Drawn in float32 on the CPU, then moved: CUDA generators give different numbers from CPU ones
    (and differ between GPU models), so drawing on the CPU is what makes a GPU run reproduce a CPU run.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device="cpu")
    return noise.to(device=device, dtype=dtype)
