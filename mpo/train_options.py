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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpo.logs import get_logger
from mpo.schema import RESUME_LATEST, RESUME_NONE

EMA_WEIGHTS = "weights_ema"
log = get_logger(__name__)


class OptionError(ValueError):
    """A training option that cannot be used here; the message names the recipe key."""


def apply_tf32(recipe: Any) -> None:
    enabled = bool(recipe.train.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def make_optimizer(recipe: Any, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    cfg = recipe.train
    kwargs = {"lr": lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise OptionError(
                "train.optimizer='adamw_8bit' needs bitsandbytes: pip install 'mpo-trainer[bnb]' (or use adamw)"
            ) from err
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_ema(recipe: Any, model: nn.Module, zero_stage: int | None) -> Any:
    """diffusers' EMAModel over the trainable parameters (None without ``train.ema``)."""
    if not recipe.train.ema:
        return None
    if zero_stage == 3:
        raise OptionError("train.ema=true does not work with DeepSpeed ZeRO-3 (partitioned weights); use ZeRO-2 or DDP")
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


def resume_checkpoint(run: Any, resume_from: str) -> Path | None:
    """The checkpoint folder a run continues from, as ``train.resume_from`` says."""
    from mpo.train_state import latest_checkpoint

    if resume_from == RESUME_NONE:
        return None
    if resume_from == RESUME_LATEST:
        latest = latest_checkpoint(run)
        return latest[1] if latest else None
    path = Path(resume_from)
    if not (path / "progress.json").is_file():
        raise OptionError(f"train.resume_from={resume_from!r}: not a checkpoint folder (no progress.json)")
    return path


def exported_weights(recipe: Any, checkpoint: Path) -> Path:
    """``weights_ema/`` when the run kept an EMA and the export asks for it, else ``weights/``."""
    if recipe.train.ema and recipe.export.ema:
        ema = checkpoint / EMA_WEIGHTS
        if not ema.is_dir():
            raise OptionError(f"{checkpoint}: no {EMA_WEIGHTS}/ (trained without train.ema?); set export.ema=false")
        return ema
    return checkpoint / "weights"
