"""The training options users of the diffusers training scripts expect, each in one small function.

- ``train.allow_tf32``: TF32 matmuls and cuDNN convolutions (Ampere and newer; no effect on CPU).
- ``train.optimizer``: ``adamw`` (torch, fused/foreach as torch picks) or ``adamw_8bit``
  (bitsandbytes' AdamW8bit: 8-bit optimizer state, a quarter of AdamW's memory; optional extra
  ``pip install 'mpo-trainer[bnb]'``; the recipe loader refuses it when bitsandbytes is missing).
- ``train.ema``: an exponential moving average of the trainable weights (diffusers' ``EMAModel``),
  stepped after every optimizer step, checkpointed with the run (resume restores it) and written
  beside the raw weights as ``weights_ema/`` in each checkpoint, which the export ships when
  ``export.ema`` (default). Not with DeepSpeed ZeRO-3, whose parameters are partitioned.
- ``train.resume_from``: ``latest`` (this run's newest checkpoint), ``none`` (start from the base
  model; existing checkpoints are replaced as new ones are written) or a checkpoint folder (e.g.
  another run's ``checkpoints/step-500``; its settings must match).
- every diffusers lr schedule: :func:`mpo.train.setup_scheduler` passes ``lr_num_cycles``,
  ``lr_power`` and ``lr_step_rules``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpo.logs import get_logger
from mpo.schema import RESUME_LATEST, RESUME_NONE
from mpo.train_state import CheckpointPart

EMA_WEIGHTS = "weights_ema"
EMA_TENSORS = "ema.safetensors"
EMA_VALUES = "ema.json"
log = get_logger(__name__)


class OptionError(ValueError):
    """A training option that cannot be used here; the message names the recipe key."""


def apply_tf32(recipe: Any) -> None:
    enabled = bool(recipe.train.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def make_optimizer(
    recipe: Any, params: list[nn.Parameter], lr: float, fused: bool = False
) -> torch.optim.Optimizer:
    """``train.optimizer``: torch's AdamW (``fused``: the one-kernel one where the device has it, which
    also takes the device-side ``found_inf`` skip of :mod:`mpo.finite`) or bitsandbytes' AdamW8bit."""
    cfg = recipe.train
    kwargs = {
        "lr": lr,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "eps": cfg.adam_epsilon,
        "weight_decay": cfg.weight_decay,
    }
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise OptionError(
                "train.optimizer='adamw_8bit' needs bitsandbytes: pip install 'mpo-trainer[bnb]' (or use adamw)"
            ) from err
        return bnb.optim.AdamW8bit(params, **kwargs)
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
            pass
    return torch.optim.AdamW(params, **kwargs)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_ema(recipe: Any, model: nn.Module, zero_stage: int | None) -> Any:
    """diffusers' EMAModel over the trainable parameters (None without ``train.ema``)."""
    if not recipe.train.ema:
        return None
    if zero_stage == 3:
        raise OptionError(
            "train.ema=true does not work with DeepSpeed ZeRO-3 (partitioned weights); use ZeRO-2 or DDP"
        )
    from diffusers.training_utils import EMAModel

    return EMAModel(trainable(model), decay=float(recipe.train.ema_decay), foreach=True)


@contextlib.contextmanager
def ema_weights(ema: Any, model: nn.Module) -> Iterator[None]:
    """The model holds the EMA weights for the duration, its own ones again afterwards."""
    params = trainable(model)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def starts_over(resume_from: str, latest: tuple[int, Path], force: bool) -> bool:
    """``train.resume_from=none`` in a run with checkpoints: True with ``force`` (the caller discards
    them and eval.parquet); without it, refused: ``none`` never discards work unasked."""
    if resume_from != RESUME_NONE:
        return False
    if not force:
        raise OptionError(
            f"train.resume_from=none: {latest[1]} exists (this run trained to step {latest[0]}); add "
            "--force to discard its checkpoints and eval.parquet and train from step 0, or use a new "
            "output_dir"
        )
    return True


def starting_checkpoint(
    run: Any, resume_from: str, latest: tuple[int, Path] | None, max_steps: int
) -> tuple[int, Path] | None:
    """The checkpoint training continues from, as ``train.resume_from`` says, given this run's
    ``latest`` one. A folder starts a run that has no checkpoints yet; once the run has its own, a
    restart continues from them (going back to an earlier one of this run means deleting the later
    ones, which this refuses to do by itself)."""
    from mpo.train_state import read_progress

    if resume_from in (RESUME_LATEST, RESUME_NONE):
        return latest
    path = Path(resume_from).expanduser().absolute()
    if not (path / "progress.json").is_file():
        raise OptionError(f"train.resume_from={resume_from!r}: not a checkpoint folder (no progress.json)")
    if latest is None:
        step = read_progress(path).step
        if step >= max_steps:
            raise OptionError(
                f"train.resume_from={resume_from!r}: that checkpoint is at step {step}, train.max_steps="
                f"{max_steps}: nothing to train; raise train.max_steps"
            )
        return step, path
    if is_own(run, path) and path.name != latest[1].name:
        raise OptionError(
            f"train.resume_from={resume_from!r}: this run has later checkpoints (up to {latest[1]}); "
            f"delete the ones after {path.name} to go back to it, or use a new output_dir"
        )
    if not is_own(run, path):
        log.info(
            "train.resume_from=%s: the run has checkpoints of its own; continuing from %s",
            resume_from,
            latest[1],
        )
    return latest


def is_own(run: Any, checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is one of this run's (not another run's, named by train.resume_from)."""
    return checkpoint.absolute().parent == run.checkpoints.absolute()


def checkpoint_files(recipe: Any) -> tuple[str, ...]:
    """The files a resume reads beside the model's own (verified before any model is built)."""
    return EMACheckpoint.files if recipe.train.ema else ()


class EMACheckpoint(CheckpointPart):
    """The EMA in a checkpoint: its state for a resume (``ema.safetensors``: the shadow weights;
    ``ema.json``: decay and step counters), and the EMA weights in the export format
    (``weights_ema/``, what the export ships with ``export.ema``)."""

    files = (EMA_TENSORS, EMA_VALUES)

    def __init__(self, ema: Any, accelerator: Any, model: nn.Module, save_weights: Any) -> None:
        self.ema, self.accelerator, self.model, self.save_weights = ema, accelerator, model, save_weights

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        acc = self.accelerator
        with ema_weights(self.ema, acc.unwrap_model(self.model)):
            state = acc.get_state_dict(self.model)  # collective under DeepSpeed
            if acc.is_main_process:
                self.save_weights(folder / EMA_WEIGHTS, state)
        if acc.is_main_process:
            values = self.ema.state_dict()
            shadow = values.pop("shadow_params")
            save_file(
                {str(i): p.detach().cpu().contiguous() for i, p in enumerate(shadow)},
                str(folder / EMA_TENSORS),
            )
            (folder / EMA_VALUES).write_text(json.dumps(values, indent=1))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(folder / EMA_TENSORS))
        values = json.loads((folder / EMA_VALUES).read_text())
        if len(tensors) != len(self.ema.shadow_params):
            raise OptionError(
                f"{folder / EMA_TENSORS}: {len(tensors)} EMA tensors, the model trains {len(self.ema.shadow_params)}"
            )
        values["shadow_params"] = [tensors[str(i)] for i in range(len(tensors))]
        self.ema.load_state_dict(values)
        self.ema.to(device=self.accelerator.device)


def exported_weights(recipe: Any, checkpoint: Path) -> Path:
    """``weights_ema/`` when the run kept an EMA and the export asks for it, else ``weights/``."""
    if recipe.train.ema and recipe.export.ema:
        ema = checkpoint / EMA_WEIGHTS
        if not ema.is_dir():
            raise OptionError(
                f"{checkpoint}: no {EMA_WEIGHTS}/ (trained without train.ema?); set export.ema=false"
            )
        return ema
    return checkpoint / "weights"
