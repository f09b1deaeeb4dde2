"""Everything distributed, in one place: the Accelerator every stage builds, and how work is split.

Each stage (generate, score, train, eval) calls :func:`make_accelerator` and nothing else to learn
its rank; models stay single-device. Launch the same command on one process or many::

    mpo generate recipes/tiny/sdxl.yaml                                  # one process
    accelerate launch --num_processes 8 -m mpo.cli generate RECIPE       # 8 GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m mpo.cli generate RECIPE

On a machine without CUDA the process group must be gloo, and accelerate only picks it reliably
(notably under DeepSpeed) when told so through ``InitProcessGroupKwargs(backend="gloo")``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs

T = TypeVar("T")

# Generation and scoring are split by shard, so a fast rank can wait at the final barrier for as long
# as a slow rank needs for its last shard; torch's default (10-30 min) is too short for video models.
DEFAULT_TIMEOUT_MINUTES = 180


def make_accelerator(
    recipe: Any = None,
    *,
    training: bool = False,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
    **kwargs: Any,
) -> Accelerator:
    """The Accelerator used by every stage.

    recipe: a loaded recipe (mpo.schema.Recipe) or None.
    training: take ``mixed_precision`` and ``gradient_accumulation_steps`` from ``recipe.train``.
        Off for generate / score, which never autocast through accelerate (sampling runs in
        ``model.dtype``), so that e.g. an fp16 training recipe can still generate on a CPU.
    kwargs: passed to :class:`accelerate.Accelerator` and win over what the recipe says; an
        ``InitProcessGroupKwargs`` given in ``kwargs_handlers`` replaces the one made here.
    """
    if training and recipe is not None:
        kwargs.setdefault("mixed_precision", recipe.train.mixed_precision)
        kwargs.setdefault("gradient_accumulation_steps", recipe.train.gradient_accumulation_steps)
    handlers = list(kwargs.pop("kwargs_handlers", None) or [])
    if not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
        init = {"timeout": timedelta(minutes=timeout_minutes)}
        if not torch.cuda.is_available() and _started_by_launcher():
            init["backend"] = "gloo"
        handlers.append(InitProcessGroupKwargs(**init))
    return Accelerator(kwargs_handlers=handlers, **kwargs)


def _started_by_launcher() -> bool:
    """True under torchrun / accelerate launch / mpirun. A backend must not be named in a plain
    single process: accelerate would then look for a process group that nobody started."""
    env = os.environ
    sizes = (env.get(k) for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    return "LOCAL_RANK" in env or any(int(v) > 1 for v in sizes if v and v.isdigit())


def process_rank_and_count(accelerator: Accelerator | None = None) -> tuple[int, int]:
    """(process index, number of processes), from the accelerator or the launcher's environment."""
    state = accelerator if accelerator is not None else PartialState()
    return state.process_index, state.num_processes


def split_for_process(
    items: Sequence[T],
    accelerator: Accelerator | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> list[T]:
    """This process's share of ``items``: every ``world_size``-th item starting at ``rank``.

    ``items`` must be in an order that does not depend on the number of processes (e.g. shards by
    global index, prompts by prompt_id): then the union of all shares is ``items`` for any world
    size, and item i is handled the same way whoever handles it. Strided rather than contiguous so
    that the last process is not left with all the stragglers when items grow in cost along the list.
    """
    if rank is None or world_size is None:
        rank, world_size = process_rank_and_count(accelerator)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(items[rank::world_size])


def owner_of(index: int, world_size: int) -> int:
    """The rank that handles item ``index`` of a list split by :func:`split_for_process`."""
    return index % world_size


def wait_for_everyone(accelerator: Accelerator | None = None) -> None:
    """A barrier across all processes (a no-op on one process)."""
    (accelerator if accelerator is not None else PartialState()).wait_for_everyone()


def is_main(accelerator: Accelerator | None = None) -> bool:
    """True on the one process that writes run-level files (manifests, recipe.yaml, summaries)."""
    return (accelerator if accelerator is not None else PartialState()).is_main_process


@contextlib.contextmanager
def whole_model_loading() -> Iterator[None]:
    """Load models whole, even under a DeepSpeed ZeRO-3 launch.

    With a ZeRO-3 config, accelerate registers it with transformers (whatever ``zero3_init_flag`` says,
    in accelerate 1.15), and ``from_pretrained`` then partitions every parameter as it is created
    (``deepspeed.zero.Init``): a collective, so a load on one process only (or one after another,
    under ``main_process_first``) waits forever, and frozen parts (text encoders, VAE) end up sharded.
    Inside this context transformers does not see the config; the trained denoiser is partitioned
    later, by ``accelerator.prepare``.
    """
    from accelerate.state import AcceleratorState, is_initialized

    plugin = AcceleratorState().deepspeed_plugin if is_initialized() else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()
