"""Checkpoints of a training run: atomic folders, safe resume, pruning and the best-checkpoint pointer.

::

    checkpoints/
      step-<n>/                 one complete checkpoint (after <n> optimizer steps)
        weights/                the trainable weights in export format (mpo.weights)
        optimizer.safetensors   optimizer state tensors (not under DeepSpeed) ...
        optimizer.json          ... and its plain values (param groups, counters)
        trainer.json            LR scheduler, loss scaler, accelerate's micro-step counter
        rng-<rank>.safetensors  every RNG of process <rank> (torch, CUDA; python / numpy as metadata)
        pytorch_model/          DeepSpeed only: the engine's own files (sharded optimizer state)
        progress.json           step, pairs consumed, the settings the run depends on, a unique id
        ema.safetensors, ema.json, weights_ema/   train.ema: the EMA's state and weights (CheckpointPart)
      step-<n>.tmp/             a checkpoint being written (never trusted; deleted on the next start)
      best                      JSON pointer {"checkpoint", "step", "total"} to the best validated one

A checkpoint is written into ``step-<n>.tmp`` by every process, and only once all of them are done
does the main process add progress.json and rename the folder. A folder named ``step-<n>`` is
therefore always complete, and a resume takes the highest one. A write that fails (disk full) removes
the temporary folder on every process and stops the run with the path and the reason; the checkpoints
already written stay as they are.

Resuming never executes code from the run directory: nothing here is a pickle. Tensors are safetensors
and everything else is JSON, parsed by parsers that cannot run code (accelerate's ``save_state``
would pickle the scheduler and load it with ``weights_only=False``). DeepSpeed's own files are
pickles; before DeepSpeed reads them, each is loaded with ``torch.load(weights_only=True)`` and only
the few DeepSpeed classes such a checkpoint holds allowed, and the engine reads through the same
restricted loader. Every file a resume reads is checked this way first, on every process, so a
damaged or planted file stops all processes with its name before any state changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mpo.distributed import RankFailure, is_main, wait_for_everyone
from mpo.errors import is_environment_error
from mpo.store import RunDir, cannot_write_reason, describe_changes, write_text

PREFIX = "step-"
TMP_SUFFIX = ".tmp"
PROGRESS = "progress.json"
BEST = "best"
WEIGHTS = "weights"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_VALUES = "optimizer.json"
TRAINER = "trainer.json"
DEEPSPEED_TAG = "pytorch_model"
FORMAT = "mpo-checkpoint/2"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed from; the message names the folder or file."""


@dataclass
class TrainProgress:
    """Where training stands: optimizer steps taken and pairs consumed from the data stream."""

    step: int = 0
    pairs_seen: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    id: str = ""  # unique per written checkpoint: what an export or eval row was made from
    format: str = FORMAT


class CheckpointPart:
    """More state a checkpoint carries beside the model's (e.g. an EMA of the weights), in the same
    safe formats (safetensors and JSON). ``save`` is called on every process (it may gather),
    ``load`` on every process after the model's own state; ``files`` are the names a resume reads,
    which :func:`verify_checkpoint` checks first."""

    files: tuple[str, ...] = ()

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        raise NotImplementedError


@dataclass
class Resumable:
    """What a checkpoint saves besides the progress, as the trainer built it.

    save_weights(folder, state_dict): writes ``weights/`` on the main process from a state dict that
        every process helped gather (ZeRO-3); load_weights(folder): restores them in place.
    """

    accelerator: Accelerator
    model: Any  # the prepared policy
    optimizer: Any  # the prepared optimizer
    scheduler: Any
    save_weights: Callable[[Path, dict[str, torch.Tensor]], Any]
    load_weights: Callable[[Path], Any]
    extras: list[CheckpointPart] = field(default_factory=list)  # e.g. the EMA (mpo.train_options)


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def fill_deepspeed_config(recipe: Any, acc: Accelerator) -> None:
    """Give DeepSpeed the micro batch and clipping of the recipe (the launch JSONs say "auto"): both
    trainers draw their batches from their own samplers, not from a dataloader that ``prepare``
    could read them from."""
    if not is_deepspeed(acc):
        return
    config = acc.state.deepspeed_plugin.deepspeed_config
    for key, value in (
        ("train_micro_batch_size_per_gpu", recipe.train.batch_size),
        ("gradient_clipping", recipe.train.max_grad_norm),
    ):
        if config.get(key, "auto") == "auto":
            config[key] = value


def checkpoint_dir(run: RunDir, step: int) -> Path:
    return run.checkpoints / f"{PREFIX}{step}"


def list_checkpoints(run: RunDir) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not run.checkpoints.is_dir():
        return []
    found = []
    for path in run.checkpoints.iterdir():
        digits = path.name[len(PREFIX) :]
        if path.is_dir() and path.name.startswith(PREFIX) and digits.isdigit() and (path / PROGRESS).exists():
            found.append((int(digits), path))
    return sorted(found)


def latest_checkpoint(run: RunDir) -> tuple[int, Path] | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def read_progress(path: Path) -> TrainProgress:
    try:
        data = json.loads((path / PROGRESS).read_text())
        progress = TrainProgress(**data)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path / PROGRESS}: unreadable ({err})") from err
    if progress.format != FORMAT:
        raise CheckpointError(
            f"{path}: written in format {progress.format!r}, this trainer reads {FORMAT!r}; train into a "
            "new output_dir"
        )
    return progress


def check_settings(path: Path, stored: dict[str, Any], now: dict[str, Any], force: bool = False) -> bool:
    """True when a checkpoint was made with the settings of this run; else refuse naming each changed
    key, or (``force``) return False: the caller starts over."""
    changes = describe_changes(stored, now)
    if not changes:
        return True
    if force:
        return False
    raise CheckpointError(
        f"{path} was trained with other settings ({'; '.join(changes)}); restore them, train into a new "
        "output_dir, or add --force to train again from step 0 (its checkpoints, eval.parquet and export "
        "are replaced)"
    )


def remove_incomplete(run: RunDir) -> None:
    """Delete ``*.tmp`` checkpoint folders of killed runs. Main process, before anything is written."""
    if run.checkpoints.is_dir():
        for path in run.checkpoints.glob(f"{PREFIX}*{TMP_SUFFIX}"):
            shutil.rmtree(path, ignore_errors=True)


def discard_training(run: RunDir) -> None:
    """Remove every checkpoint, the best pointer and eval.parquet (``--force`` with changed settings)."""
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        run.eval_parquet.unlink()


# ---- saving -------------------------------------------------------------------------------------
def save_checkpoint(r: Resumable, run: RunDir, progress: TrainProgress) -> Path:
    """Write checkpoint ``step-<progress.step>`` atomically; every process must call this."""
    acc, main = r.accelerator, is_main(r.accelerator)
    final = checkpoint_dir(run, progress.step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    try:
        try:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            wait_for_everyone(acc)
            if is_deepspeed(acc):
                r.model.save_checkpoint(str(tmp), DEEPSPEED_TAG)  # collective: each rank its partition
            state = acc.get_state_dict(r.model)  # collective under ZeRO-3 (gathers the shards)
            _save_rng(tmp, acc.process_index)
            if main:
                r.save_weights(tmp / WEIGHTS, state)
                if not is_deepspeed(acc):
                    _save_optimizer(tmp, r.optimizer)
                _save_trainer(tmp, r)
            for part in r.extras:
                part.save(tmp)
        except Exception as err:
            raise _write_error(run, tmp, progress.step, err) from err
        wait_for_everyone(acc)
        if main:
            progress.id = uuid.uuid4().hex
            try:
                write_text(tmp / PROGRESS, json.dumps(asdict(progress), indent=2))
                if final.exists():  # the same step saved again (e.g. after a resume): the new one wins
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except Exception as err:
                raise _write_error(run, tmp, progress.step, err) from err
        progress.id = _agreed_id(acc, progress.id)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what a failed write took
        raise
    return final


def _agreed_id(acc: Accelerator, mine: str) -> str:
    from mpo.distributed import gather

    return gather(acc, mine)[0]


def _write_error(run: RunDir, tmp: Path, step: int, err: BaseException) -> BaseException:
    if isinstance(err, (CheckpointError, RankFailure)) or not is_environment_error(err):
        return err
    latest = latest_checkpoint(run)
    kept = (
        f"the last complete checkpoint, {latest[1]}, is kept" if latest else "no checkpoint was written yet"
    )
    return CheckpointError(
        f"{tmp}: cannot write checkpoint {PREFIX}{step} ({cannot_write_reason(err)}); {kept}; free space "
        "and rerun the same command to resume from it"
    )


def _save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    metadata = {
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]),
    }
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"), metadata=metadata)


def _save_optimizer(folder: Path, optimizer: Any) -> None:
    """The optimizer's state dict split into tensors (safetensors) and plain values (JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[name] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    plain = {"param_groups": state["param_groups"], "values": values}
    (folder / OPTIMIZER_VALUES).write_text(json.dumps(plain, indent=1))


def _save_trainer(folder: Path, r: Resumable) -> None:
    acc = r.accelerator
    scaler = getattr(acc, "scaler", None)
    record = {
        "scheduler": r.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "accelerator_step": int(acc.step),
    }
    (folder / TRAINER).write_text(json.dumps(record, indent=1))


# ---- resuming -----------------------------------------------------------------------------------
def load_checkpoint(r: Resumable, path: Path, verified: bool = False) -> None:
    """Restore weights, optimizer, scheduler, scaler and every RNG from ``path``; every process must
    call this. Every file is checked first (:func:`verify_checkpoint`, unless the caller did), on
    every process, and the processes agree on the result before any state changes."""
    acc = r.accelerator
    if not verified:
        verify_checkpoint(path, acc.process_index, is_deepspeed(acc))
        wait_for_everyone(acc)
    try:
        if is_deepspeed(acc):
            _use_safe_deepspeed_loader(r.model)
            loaded, _ = r.model.load_checkpoint(
                str(path), DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if loaded is None:
                raise CheckpointError(f"{path / DEEPSPEED_TAG}: DeepSpeed found no checkpoint to load")
        else:
            r.load_weights(path / WEIGHTS)
            _load_optimizer(path, r.optimizer)
        _load_trainer(path, r)
        for part in r.extras:
            part.load(path)
        _load_rng(path, acc.process_index)
    except (CheckpointError, RankFailure):
        raise
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be resumed from ({err})") from err
    wait_for_everyone(acc)


def _load_optimizer(path: Path, optimizer: Any) -> None:
    tensors = load_file(str(path / OPTIMIZER_TENSORS))
    plain = json.loads((path / OPTIMIZER_VALUES).read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, entries in plain["values"].items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def _load_trainer(path: Path, r: Resumable) -> None:
    record = json.loads((path / TRAINER).read_text())
    r.scheduler.load_state_dict(record["scheduler"])
    scaler = getattr(r.accelerator, "scaler", None)
    if scaler is not None and record.get("scaler") is not None:
        scaler.load_state_dict(record["scaler"])
    r.accelerator.step = int(record["accelerator_step"])


def _load_rng(path: Path, rank: int) -> None:
    file = path / f"rng-{rank}.safetensors"
    if not file.exists():
        raise CheckpointError(
            f"{file}: missing (the checkpoint was written by fewer processes); resume with the number of "
            "processes it was written with"
        )
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        torch.set_rng_state(handle.get_tensor("torch"))
        cuda = sorted(k for k in handle.keys() if k.startswith("cuda."))  # noqa: SIM118
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([handle.get_tensor(k) for k in cuda])
    version, internal, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- checking before reading --------------------------------------------------------------------
# The classes a DeepSpeed ZeRO checkpoint pickles besides tensors and plain containers (the loss
# scalers in the optimizer partitions, the ZeRO stage, bf16's fragment addresses): plain data holders.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_globals() -> list[Any]:
    import importlib

    found = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), attr))
    return found


def safe_torch_load(file: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load`` that cannot execute code: weights_only, with DeepSpeed's few classes allowed."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(file, map_location=map_location, weights_only=True)


def _use_safe_deepspeed_loader(engine: Any) -> None:
    """Make the DeepSpeed engine read its checkpoint files through :func:`safe_torch_load`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(
            f"DeepSpeed checkpoint engine {type(current).__name__}: only the torch engine's files can be "
            "resumed from safely"
        )

    def load(path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)

    current.load = load


def _files_read_by(path: Path, rank: int, deepspeed: bool) -> list[Path]:
    files = [path / PROGRESS, path / TRAINER, path / f"rng-{rank}.safetensors"]
    weights = path / WEIGHTS
    files += sorted(p for p in weights.rglob("*") if p.is_file()) if weights.is_dir() else [weights]
    if deepspeed:
        # The module's states (whole, or this rank's ZeRO-3 partition) and this rank's optimizer partition.
        folder = path / DEEPSPEED_TAG
        mine = sorted(
            p
            for p in folder.glob("*.pt")
            if p.name.startswith("mp_rank_") or f"zero_pp_rank_{rank}_mp" in p.name
        )
        files += mine or [folder / "mp_rank_00_model_states.pt"]
    else:
        files += [path / OPTIMIZER_TENSORS, path / OPTIMIZER_VALUES]
    return files


def verify_checkpoint(path: Path, rank: int, deepspeed: bool, extra_files: tuple[str, ...] = ()) -> None:
    """Parse every file that resuming on process ``rank`` reads with a parser that cannot run code
    (JSON, safetensors headers, weights-only torch.load); raise :class:`CheckpointError` naming the
    first one that is missing, damaged, or holds anything but tensors and plain data.
    ``extra_files``: the names the :class:`CheckpointPart` s of this run read."""
    remedy = f"delete {path} to resume from the checkpoint before it"
    verify_weights(path, remedy)
    for file in _files_read_by(path, rank, deepspeed) + [path / name for name in extra_files]:
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint; {remedy}")
        if not file.is_relative_to(path / WEIGHTS):  # checked above
            _parse(file, remedy)


def verify_weights(path: Path, remedy: str) -> None:
    """The checkpoint's ``weights/`` (what eval and export load): present, and every file parses."""
    weights = path / WEIGHTS
    if not any(weights.rglob("*.safetensors")):
        raise CheckpointError(f"{weights}: no weights file in the checkpoint; {remedy}")
    for file in sorted(p for p in weights.rglob("*") if p.is_file()):
        _parse(file, remedy)


def _parse(file: Path, remedy: str) -> None:
    try:
        if file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
        elif file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                list(handle.keys())
        elif file.suffix == ".pt":
            safe_torch_load(file, map_location="cpu")
    except Exception as err:
        raise CheckpointError(
            f"{file}: refused, not a plain-data {file.suffix} file ({_reason(err)}); {remedy}"
        ) from err


def _reason(err: BaseException) -> str:
    """The useful part of a loader's message (torch's weights-only refusal names the global)."""
    import re

    text = str(err).strip()
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it would run or build {found.group(1)}, which is not allowed"
    return text.splitlines()[0] if text else type(err).__name__


# ---- pruning and the best pointer ---------------------------------------------------------------
def prune_checkpoints(run: RunDir, keep: int, protect: int | None) -> None:
    """Keep the ``keep`` most recent checkpoints and the best one (step ``protect``)."""
    found = list_checkpoints(run)
    for step, path in found[: max(len(found) - max(keep, 1), 0)]:
        if step != protect:
            shutil.rmtree(path, ignore_errors=True)


def read_best(run: RunDir) -> dict[str, Any] | None:
    path = run.checkpoints / BEST
    if not path.exists():
        return None
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
        int(best["step"]), float(best["total"]), str(best["checkpoint"])
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(
            f"{path}: unreadable ({err}); delete it (the best checkpoint is then picked again at the next "
            "eval, and export.which=last still works)"
        ) from err
    return best


def write_best(run: RunDir, step: int, total: float) -> None:
    """Point ``checkpoints/best`` at ``step-<step>`` (a small JSON file, replaced atomically)."""
    record = {"checkpoint": checkpoint_dir(run, step).name, "step": int(step), "total": float(total)}
    write_text(run.checkpoints / BEST, json.dumps(record, indent=2))


def chosen_checkpoint(run: RunDir, which: str) -> tuple[int, Path]:
    """The checkpoint ``export.which`` names: ``best`` (falling back to the last when no evaluated
    checkpoint beat the others, e.g. eval was off) or ``last``; it must hold its weights."""
    if which not in ("best", "last"):
        raise CheckpointError(f"export.which={which!r}: expected 'best' or 'last'")
    chosen = None
    if which == "best":
        best = read_best(run)
        if best is not None and (run.checkpoints / best["checkpoint"] / PROGRESS).exists():
            chosen = int(best["step"]), run.checkpoints / best["checkpoint"]
    chosen = chosen or latest_checkpoint(run)
    if chosen is None:
        raise CheckpointError(f"{run.checkpoints}: no complete checkpoint; run the train stage first")
    verify_weights(chosen[1], f"delete {chosen[1]} (and train again) or choose another with export.which")
    return chosen
