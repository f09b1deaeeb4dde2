"""``generate.batch_size: auto``: the largest denoising batch of whole prompts that fits, found by trying.

The memory a sampling batch needs is the denoiser's activations at that batch (twice the rows under
classifier-free guidance), which no formula of the recipe predicts well across families, attention
kernels and compilers; the allocator knows. So the search asks it: a probe is a two-step sample of
``k`` prompts' candidates (the peak of a sampling call is the peak of one denoising step, and two
steps also hold a multistep solver's history), and ``k`` fits when the probe raises no
``torch.OutOfMemoryError``. The largest ``k`` that fits, up to ``generate.prompts_per_shard`` (a batch
never spans two shards) and to the lower bound of :mod:`mpo.memory`, is found with one probe when
the whole shard fits and with about log2(prompts_per_shard) probes otherwise.

A batch can still run out of memory later (fragmentation, a longer prompt encoding, a preview
decode beside it): :class:`BatchPlan` then halves the prompts per batch and the stage redoes that
batch from its noise; the cache hooks' state, which an interrupted call leaves behind, is cleared at
the start of every sampling call.

What it costs in reproducibility: candidates are a function of their seed and of the batch they are
denoised in to the batch invariance of the kernels (bitwise on CPU at one thread, rounding on GPUs;
tests/test_sampling.py), so runs on machines that find different sizes agree to that tolerance, not
bit for bit. Fix ``generate.batch_size`` for bitwise repeatability across machines.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mpo.memory import MemoryEstimateError, device_memory

log = logging.getLogger(__name__)


def is_out_of_memory(err: BaseException) -> bool:
    """The allocator's refusal (CUDA, or a CPU allocator that raises the same class)."""
    return isinstance(err, torch.OutOfMemoryError)


def free_memory(device: torch.device) -> None:
    """Release what a failed allocation left cached, so the next try starts from a clean pool."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_fitting(cap: int, fits: Callable[[int], bool]) -> int:
    """The largest ``k`` in [1, cap] with ``fits(k)``, assuming that every smaller ``k`` fits too;
    0 when not even one fits. Tries ``cap`` first (the common case: everything fits), then bisects."""
    if cap < 1:
        return 0
    if fits(cap):
        return cap
    good, bad = 0, cap
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


@dataclass
class BatchPlan:
    """Whole prompts per denoising batch for the rest of this process's shards. ``auto``: found by
    :func:`find_prompts_per_batch`, and halved when a batch runs out of memory anyway."""

    prompts: int
    auto: bool = False

    def shrink_after(self, err: BaseException, device: torch.device) -> bool:
        """After ``err`` in a batch: True when the batch should be redone with fewer prompts."""
        if not (self.auto and is_out_of_memory(err) and self.prompts > 1):
            return False
        self.prompts = max(1, self.prompts // 2)
        free_memory(device)
        log.warning(
            "generate.batch_size=auto: a batch ran out of memory; going on with %d prompts per batch",
            self.prompts,
        )
        return True


def find_prompts_per_batch(
    probe: Callable[[int], None],
    prompts_per_shard: int,
    bytes_per_prompt: int,
    device: torch.device,
) -> int:
    """The largest number of whole prompts per batch whose ``probe`` does not run out of memory.

    ``bytes_per_prompt`` is :func:`mpo.memory.generation_bytes` of one prompt's candidates: no more
    prompts are tried than that lower bound allows on ``device``."""
    bound = max(1, device_memory(device) // max(1, bytes_per_prompt))
    cap = min(prompts_per_shard, bound)

    def fits(k: int) -> bool:
        try:
            probe(k)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            free_memory(device)
            log.info("generate.batch_size=auto: %d prompts per batch do not fit", k)
            return False
        return True

    found = largest_fitting(cap, fits)
    if found == 0:
        raise MemoryEstimateError(
            f"generate.batch_size=auto: not even one prompt's candidates fit on {device}; lower "
            "generate.num_candidates / height / width / num_frames"
        )
    log.info("generate.batch_size=auto: %d prompts per batch (of at most %d)", found, cap)
    return found
