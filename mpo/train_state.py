"""Checkpoints of a training run: atomic folders, resume, pruning and the best-checkpoint pointer.

::

    checkpoints/
      step-<n>/                 one complete checkpoint (after <n> optimizer steps)
        weights/                the trainable weights in export format (mpo.weights)
        progress.json           step, pairs consumed, the settings the run depends on
        ...                     accelerate / DeepSpeed state: optimizer, scheduler, RNG of every process
      step-<n>.tmp/             a checkpoint being written (never trusted; deleted on the next start)
      best                      JSON pointer {"checkpoint", "step", "total"} to the best validated one

A checkpoint is written into ``step-<n>.tmp`` by every process (``accelerator.save_state``; DeepSpeed
writes its shards there too), and only once all of them are done does the main process add
progress.json and rename the folder. A folder named ``step-<n>`` is therefore always complete, and a
resume takes the highest one. Without DeepSpeed, accelerate's own model file is replaced by
``weights/`` (save / load hooks): a LoRA checkpoint of a 2.6 B UNet is the adapter, not 10 GB.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

from mpo.store import RunDir, write_text

PREFIX = "step-"
TMP_SUFFIX = ".tmp"
PROGRESS = "progress.json"
BEST = "best"
WEIGHTS = "weights"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder and the setting."""


@dataclass
class TrainProgress:
    """Where training stands: optimizer steps taken and pairs consumed from the data stream."""

    step: int = 0
    pairs_seen: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


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
        return TrainProgress(**json.loads((path / PROGRESS).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path / PROGRESS}: unreadable ({err})") from err


def check_settings(path: Path, stored: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint made with settings that change what it means."""
    changed = {k: (stored.get(k), v) for k, v in now.items() if stored.get(k) != v}
    if changed:
        details = "; ".join(f"{k}: checkpoint {a!r}, recipe now {b!r}" for k, (a, b) in changed.items())
        raise CheckpointError(
            f"{path} was written with other settings ({details}); restore them, or train into a new "
            "output_dir (or delete the checkpoints folder to start over)"
        )


def remove_incomplete(run: RunDir) -> None:
    """Delete ``*.tmp`` checkpoint folders of killed runs. Main process, before anything is written."""
    if run.checkpoints.is_dir():
        for path in run.checkpoints.glob(f"{PREFIX}*{TMP_SUFFIX}"):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator,
    run: RunDir,
    progress: TrainProgress,
    write_weights: Any,
) -> Path:
    """Write checkpoint ``step-<progress.step>`` atomically; every process must call this.

    write_weights(folder): writes ``weights/``; called on every process under DeepSpeed (ZeRO-3
    gathers the parameters collectively), otherwise by the save hook of :func:`register_hooks`.
    """
    final = checkpoint_dir(run, progress.step)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if is_deepspeed(accelerator):
        write_weights(tmp / WEIGHTS)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text(tmp / PROGRESS, json.dumps(asdict(progress), indent=2))
        if final.exists():  # the same step saved again (e.g. after a resume): the new one wins
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def register_hooks(accelerator: Accelerator, save_weights: Any, load_weights: Any) -> None:
    """Without DeepSpeed, checkpoint the policy as ``weights/`` instead of accelerate's model file.

    save_weights(folder) / load_weights(folder) act on the one prepared model; the hooks take it off
    accelerate's lists so that accelerate neither saves nor loads it itself.
    """
    if is_deepspeed(accelerator):
        return

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_weights(Path(output_dir) / WEIGHTS)
        while weights:
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        load_weights(Path(input_dir) / WEIGHTS)
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


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
    return json.loads(path.read_text())


def write_best(run: RunDir, step: int, total: float) -> None:
    """Point ``checkpoints/best`` at ``step-<step>`` (a small JSON file, replaced atomically)."""
    record = {"checkpoint": checkpoint_dir(run, step).name, "step": int(step), "total": float(total)}
    write_text(run.checkpoints / BEST, json.dumps(record, indent=2))


def chosen_checkpoint(run: RunDir, which: str) -> tuple[int, Path]:
    """The checkpoint ``export.which`` names: ``best`` (falling back to the last when no evaluated
    checkpoint beat the others, e.g. eval was off) or ``last``."""
    if which not in ("best", "last"):
        raise CheckpointError(f"export.which={which!r}: expected 'best' or 'last'")
    if which == "best":
        best = read_best(run)
        if best is not None and (run.checkpoints / best["checkpoint"] / PROGRESS).exists():
            return int(best["step"]), run.checkpoints / best["checkpoint"]
    latest = latest_checkpoint(run)
    if latest is None:
        raise CheckpointError(f"{run.checkpoints}: no complete checkpoint; run the train stage first")
    return latest
