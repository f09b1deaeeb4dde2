"""Everything distributed, in one place: the Accelerator every stage builds, how work is split, and
how the processes agree on what happened.

Each stage (generate, score, train, eval) calls :func:`make_accelerator` and nothing else to learn
its rank; models stay single-device. Launch the same command on one process or many::

    mpo generate recipes/tiny/sdxl.yaml                                  # one process
    accelerate launch --num_processes 8 -m mpo.cli generate RECIPE       # 8 GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m mpo.cli generate RECIPE

On a machine without CUDA the process group must be gloo, and accelerate only picks it reliably
(notably under DeepSpeed) when told so through ``InitProcessGroupKwargs(backend="gloo")``.

An error on one process stops every process with the same message, never a hang. Every point where
the stages wait for each other (:func:`wait_for_everyone`, :func:`gather`, :func:`main_process_first`)
is an *exchange*: each process sends its status along (all-gathered over a small CPU group of its own),
and a process whose stage raised sends its error at the next exchange instead of its data
(:func:`errors_reach_every_rank`, around every stage). All processes then raise
:class:`RankFailure` with the failing rank's message and exit status. Work between two exchanges runs
no other collective on the way, except inside the training step (gradient all-reduce, ZeRO); an
error there ends that process, and the others stop when the launcher ends them or at the collective
timeout (:data:`COLLECTIVE_TIMEOUT_MINUTES`), the backstop. The exchanges have their own, longer
timeout: a fast rank may wait there for as long as a slow rank needs for its last shard.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from mpo.errors import errors_reach_every_rank, exit_status  # noqa: F401  (re-exported for the stages)

T = TypeVar("T")

# Generation and scoring are split by shard, so a fast rank can wait at an exchange for as long as a
# slow rank needs for its last shard (torch's default, 10-30 min, is too short for video models). Every
# other collective runs in lockstep, so its timeout only has to catch a peer that died: the backstop.
SYNC_TIMEOUT_MINUTES = 180
COLLECTIVE_TIMEOUT_MINUTES = 30


def make_accelerator(
    recipe: Any = None,
    *,
    training: bool = False,
    timeout_minutes: float = COLLECTIVE_TIMEOUT_MINUTES,
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
    accelerator = Accelerator(kwargs_handlers=handlers, **kwargs)
    check_process_group(accelerator.num_processes, accelerator.distributed_type)
    return accelerator


class LaunchError(ValueError):
    """The processes a launcher started do not form one training group; the message says how to
    launch them."""


def check_process_group(
    num_processes: int, distributed_type: DistributedType, env: dict[str, str] | None = None
) -> None:
    """Refuse processes that a launcher started together but that accelerate does not run as one
    distributed group. accelerate's multi-GPU launcher on a machine without GPUs and without
    ``ACCELERATE_USE_CPU=true`` gives, with the gloo backend set here, ranks 0..N-1 of N under
    ``DistributedType.NO``: the data is split across the processes but the model is not wrapped for
    DDP, so gradients are never averaged and each process takes its own steps (LoRA weights one
    Adam step apart after one step, and no error); without the backend, N processes that each see
    one and write one run directory. Both are refused here, before anything is read or written."""
    env = os.environ if env is None else env
    size = env.get("WORLD_SIZE", "")
    launched = int(size) if size.isdigit() else 1
    if launched > 1 and (num_processes == 1 or distributed_type == DistributedType.NO):
        cpu = "" if torch.cuda.is_available() else "; on a machine without GPUs set ACCELERATE_USE_CPU=true"
        raise LaunchError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate does not run "
            f"them as one distributed group ({distributed_type.value}, {num_processes} process(es)): "
            f"gradients would not be averaged{cpu} (DeepSpeed: leave it unset; see launch/README.md)"
        )


def make_training_accelerator(recipe: Any) -> Accelerator:
    """The training Accelerator (mixed precision, accumulation, the recipe's tracker, logs under the
    run directory). ``mpo run`` builds it once for every stage: accelerate's state cannot change mixed
    precision later."""
    from accelerate.utils import ProjectConfiguration

    tracker = recipe.tracking.tracker
    root = Path(recipe.output_dir)
    return make_accelerator(
        recipe,
        training=True,
        log_with=None if tracker == "none" else tracker,
        project_config=ProjectConfiguration(project_dir=str(root), logging_dir=str(root / "logs")),
    )


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


class RankFailure(RuntimeError):
    """Raised on every process when one of them failed; the message names the failing rank."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@dataclass(frozen=True)
class _Failure:
    rank: int
    world: int
    status: int
    message: str
    own: bool  # the project's own error (one clear line); otherwise a bug with a traceback on its rank

    def text(self, others: int) -> str:
        more = f" and {others} other rank{'s' if others > 1 else ''}" if others else ""
        return f"{self.message} (rank {self.rank} of {self.world}{more})"


def _is_distributed() -> bool:
    """Several processes with a live group. Several processes whose group is gone is a bug (someone
    tore it down before the command's end, as accelerate's ``end_training`` does): it raises rather
    than let the processes go on unsynchronised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    if PartialState._shared_state and PartialState().num_processes > 1:
        raise RuntimeError(
            "the process group was torn down before the command ended (end_training or "
            "destroy_process_group called by a stage); the processes cannot wait for each other"
        )
    return False


def _group_alive() -> bool:
    """Several processes with a live group (never raises: for the error paths)."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


_CONTROL: dict[str, Any] = {}


def _control_group() -> Any:
    """A gloo group of all processes for the exchanges: CPU-only (no GPU sync, whatever the backend of
    the training group) and with the long timeout. Created on first use, which every process reaches
    at the same exchange; remade if the default group was replaced (tests start several in one process)."""
    default = torch.distributed.distributed_c10d._get_default_group()
    if _CONTROL.get("default") is not default:
        _CONTROL["group"] = torch.distributed.new_group(
            backend="gloo", timeout=timedelta(minutes=SYNC_TIMEOUT_MINUTES)
        )
        _CONTROL["default"] = default
    return _CONTROL["group"]


def _exchange(payload: Any, error: BaseException | None) -> list[Any]:
    """All-gather ``(failure or None, payload)``; raise on every process if any process failed."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = None
    if error is not None:
        status = exit_status(error)
        mine = _Failure(rank, world, status or 1, str(error) or type(error).__name__, status is not None)
        if not mine.own:
            mine = _Failure(rank, world, 1, f"{type(error).__name__}: {mine.message}", False)
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, (mine, payload), group=_control_group())
    failures = [f for f, _ in gathered if f is not None]
    if not failures:
        return [p for _, p in gathered]
    first = min(failures, key=lambda f: f.rank)
    if error is not None:
        error.mpo_reported = True  # type: ignore[attr-defined]
        if first.rank == rank and not first.own:
            raise error  # a bug: its own traceback on the rank where it happened
    raise RankFailure(first.text(len(failures) - 1), first.status) from error


def gather(accelerator: Accelerator | None, obj: T) -> list[T]:
    """Every process's ``obj``, in rank order (an exchange: raises if a process failed)."""
    if not _is_distributed():
        return [obj]
    return _exchange(obj, None)


def wait_for_everyone(accelerator: Accelerator | None = None) -> None:
    """A barrier across all processes (an exchange; a no-op on one process)."""
    if _is_distributed():
        _exchange(None, None)


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (an exchange on the CPU group: host-side
    only, no GPU sync; cheap enough for every optimizer step)."""
    return any(gather(None, bool(flag)))


def report_failure(error: BaseException) -> None:
    """Send ``error`` to the other processes at their next exchange, and raise what they agree on.

    Called by the handler around a stage (:func:`errors_reach_every_rank`) on the process that failed;
    a :class:`RankFailure` (the others already know) or a failure outside a process group is
    re-raised as it is."""
    if isinstance(error, RankFailure) or getattr(error, "mpo_reported", False) or not _group_alive():
        raise error
    _post(error)
    _exchange(None, error)


def _post(error: BaseException) -> None:
    """Leave the error in the process group's store, where a process that dies of a broken
    collective instead of an exchange (the peer is gone) can still find the first cause."""
    with contextlib.suppress(Exception):
        store = torch.distributed.distributed_c10d._get_default_store()
        status = exit_status(error) or 1
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        store.set("mpo/failure", f"{status}\n{error} (rank {rank} of {world})")


def posted_failure() -> RankFailure | None:
    """The failure another process left in the store (None when there is none or no store)."""
    with contextlib.suppress(Exception):
        if not torch.distributed.is_initialized():
            return None
        store = torch.distributed.distributed_c10d._get_default_store()
        if store.check(["mpo/failure"]):
            status, _, message = store.get("mpo/failure").decode().partition("\n")
            return RankFailure(message, int(status))
    return None


@contextlib.contextmanager
def main_process_first(accelerator: Accelerator | None = None) -> Iterator[None]:
    """The main process runs the block first (e.g. a load that may build and save a tiny model), then
    the others. Unlike accelerate's, an error on any process reaches all of them: the main process's
    error stops the others before they enter the block, another process's stops the main one at the
    second exchange."""
    main = is_main(accelerator)
    if not main:
        wait_for_everyone(accelerator)
    try:
        yield
    except Exception as err:
        if not _group_alive():
            raise
        _exchange(None, err)  # the main process: first exchange; the others: second
        raise
    if main:
        wait_for_everyone(accelerator)
    wait_for_everyone(accelerator)


def end_session(accelerator: Accelerator | None = None) -> None:
    """Tear the process group down, once, when the command is done: a last exchange (a failure that
    happened after every other exchange still reaches all processes), then destroy the groups."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if _is_distributed():
        wait_for_everyone(accelerator)
    _CONTROL.clear()
    PartialState().destroy_process_group()


def is_main(accelerator: Accelerator | None = None) -> bool:
    """True on the one process that writes run-level files (manifests, recipe.yaml, summaries)."""
    if accelerator is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
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
