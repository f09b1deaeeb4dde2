"""The policy at a round boundary of an iterative run, as the models that use it.

A round of :mod:`mpo.rounds` starts from the weights of the checkpoint the previous round ended on.
They are kept in the round's own ``policy/`` folder (hard links to the checkpoint's ``weights/``, so
no bytes are copied and pruning the checkpoint later does not take them away) and used twice:

- for generation: loaded *in place* into the one sampling model that an ``mpo run`` keeps across its
  rounds (full fine-tuning: the denoiser's weights; LoRA: an adapter attached once, its weights
  replaced each round), so that no round reads the base model from disk again;
- as the reference of the round's Diffusion-DPO (``rounds.reference=previous``): a frozen model of
  those weights (full: the frozen base copy the trainer already holds, overwritten; LoRA: a copy of
  the policy holding the round's adapter).

Nothing here names a model family: the weights are the checkpoint's own format (:mod:`mpo.weights`).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpo.backbones.base import Backbone
from mpo.weights import (
    ADAPTER,
    LORA_DIR,
    LORA_FILE,
    WeightsError,
    add_lora,
    denoiser_component,
    load_weights_into,
)

WEIGHTS = "weights"


def link_tree(source: Path, target: Path) -> None:
    """``target`` as a tree of hard links to ``source``'s files (copies where the file system
    refuses links); ``target`` must not exist."""
    for folder, _, files in os.walk(source):
        out = target / Path(folder).relative_to(source)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(folder) / name, out / name)
            except OSError:
                shutil.copy2(Path(folder) / name, out / name)


def load_policy(backbone: Backbone, model_cfg: Any, finetune: str, weights: Path) -> None:
    """Put the trained ``weights`` (a checkpoint's ``weights/``) into ``backbone``'s denoiser in place,
    for sampling: the base stays in memory, only what training changes is replaced."""
    denoiser = backbone.denoiser
    if finetune == "lora" and not getattr(denoiser, "_hf_peft_config_loaded", False):
        with torch.random.fork_rng(devices=[]):  # the adapter's initial draw leaves the global RNG alone
            add_lora(denoiser, model_cfg, backbone.lora_target_modules)
    load_weights_into(backbone, denoiser, finetune, weights)
    denoiser.requires_grad_(False).eval()


def reference_from_weights(
    backbone: Backbone, policy: nn.Module, reference: nn.Module | None, finetune: str, weights: Path
) -> nn.Module:
    """A frozen reference model holding the trained ``weights``.

    backbone: the trainer's, whose pipeline holds ``policy`` (the unwrapped trained denoiser).
    reference: the trainer's frozen base copy (full fine-tuning), overwritten in place; None for LoRA,
        whose reference is then a copy of ``policy`` (the same layers and dtypes, so at the round's
        first step it computes the policy's very function) given the adapter of ``weights``: one
        denoiser's memory more.
    """
    if finetune == "full":
        if reference is None:
            raise WeightsError("full fine-tuning without a frozen reference copy to load the weights into")
        load_weights_into(backbone, reference, "full", weights)
        return reference.requires_grad_(False).eval()
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = weights / LORA_DIR / LORA_FILE
    if not path.exists():
        raise WeightsError(f"{path}: missing")
    prefix = (
        backbone.lora_component or denoiser_component(backbone.pipeline(), policy)
    ) + "."  # not the copy's
    state = {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    frozen = copy.deepcopy(policy)
    result = set_peft_model_state_dict(frozen, convert_unet_state_dict_to_peft(state), adapter_name=ADAPTER)
    if not state or getattr(result, "unexpected_keys", None):
        raise WeightsError(f"{path}: does not match the model's adapter")
    return frozen.requires_grad_(False).eval()
