"""What training changes, in formats diffusers loads: LoRA adapters and full denoiser weights.

Every checkpoint holds the trainable weights under ``weights/`` in the format the export ships:

- LoRA: ``weights/lora/pytorch_lora_weights.safetensors``, written by the backbone pipeline class's own
  ``save_lora_weights`` (peft's ``lora_A`` / ``lora_B`` keys under the component's prefix, adapter config
  as metadata: the layout diffusers' transformer training scripts write and every loader reads), so
  ``pipe.load_lora_weights(folder)`` accepts it as it is;
- full fine-tuning: ``weights/denoiser/`` (the denoiser's config and one safetensors file), which the
  denoiser class's ``from_pretrained`` loads.

The adapter is attached with diffusers' ``add_adapter`` (peft underneath), so the reference model of a
LoRA run is the same network with its adapters off (:class:`LoraSwitch`). Nothing here names a model
family: the pipeline component that holds the denoiser is found by identity (``unet`` for SDXL,
``transformer`` for CogVideoX).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mpo.backbones.base import Backbone

LORA_DIR = "lora"
DENOISER_DIR = "denoiser"
LORA_FILE = "pytorch_lora_weights.safetensors"
DENOISER_FILE = "diffusion_pytorch_model.safetensors"
ADAPTER = "default"


class WeightsError(ValueError):
    """Trainable weights that cannot be saved or restored; the message names the folder."""


def add_lora(denoiser: nn.Module, model_cfg: Any, default_targets: list[str]) -> None:
    """Attach a trainable LoRA adapter (``model.lora_*``) to a frozen denoiser."""
    from peft import LoraConfig

    targets = list(model_cfg.lora_target_modules or default_targets)
    config = LoraConfig(
        r=model_cfg.lora_rank,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    try:
        denoiser.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as err:
        raise WeightsError(f"model.lora_target_modules={targets}: cannot attach LoRA ({err})") from err


class LoraSwitch:
    """Turns every LoRA layer of a denoiser off and on again, for the reference forward of a LoRA run.

    ``disable_adapters()`` / ``enable_adapters()`` walk every module of the network (7,500 in the SDXL
    UNet) and reset ``requires_grad`` on every adapter weight, twice per micro-step: 50-150 ms of
    host time per step on SDXL's structure. The layers are found once here, and switching flips each
    layer's own flag (peft's ``disable_adapters`` property reads it): ~2 ms for SDXL's 560 layers.
    ``requires_grad`` is left alone: the reference pass runs under ``no_grad`` anyway.
    """

    def __init__(self, denoiser: nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers:
            raise WeightsError(f"{type(denoiser).__name__} has no LoRA layers to switch off")
        # peft keeps the switch in `_disable_adapters` (read by its `disable_adapters` property);
        # layers of another kind fall back to the public, slower per-layer call.
        self._flag = all(hasattr(m, "_disable_adapters") for m in self.layers)
        self._states = [vars(m) for m in self.layers]

    def _set(self, disabled: bool) -> None:
        if self._flag:
            for state in self._states:  # the instance dicts: nn.Module.__setattr__ costs 10x more
                state["_disable_adapters"] = disabled
        else:
            for layer in self.layers:
                layer.enable_adapters(not disabled)

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """Adapters off for the duration, back on even when the reference forward raises (a policy
        left without its adapters would train nothing)."""
        self._set(True)
        try:
            yield
        finally:
            self._set(False)


def denoiser_component(pipe: Any, denoiser: nn.Module) -> str:
    """The name under which ``pipe`` holds ``denoiser`` (``unet``, ``transformer``, ...)."""
    for name, component in pipe.components.items():
        if component is denoiser:
            return name
    raise WeightsError(f"{type(pipe).__name__} does not hold the denoiser being trained")


def save_weights(
    backbone: Backbone, denoiser: nn.Module, state_dict: dict[str, torch.Tensor], finetune: str, folder: Path
) -> Path:
    """Write the trainable weights of ``denoiser`` (values from ``state_dict``, which may be a gathered
    ZeRO-3 state dict) under ``folder``; returns the sub-folder written."""
    folder = Path(folder)
    if finetune == "full":
        out = folder / DENOISER_DIR
        out.mkdir(parents=True, exist_ok=True)
        denoiser.save_config(out)
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(out / DENOISER_FILE))
        return out
    from peft.utils import get_peft_model_state_dict

    pipe = backbone.pipeline()
    name = backbone.lora_component or denoiser_component(pipe, denoiser)
    layers = get_peft_model_state_dict(denoiser, state_dict=state_dict)
    out = folder / LORA_DIR
    type(pipe).save_lora_weights(
        out,
        **{f"{name}_lora_layers": {k: v.detach().cpu().contiguous() for k, v in layers.items()}},
        **{f"{name}_lora_adapter_metadata": denoiser.peft_config[ADAPTER].to_dict()},
    )
    return out


def load_weights_into(backbone: Backbone, denoiser: nn.Module, finetune: str, folder: Path) -> None:
    """Restore saved trainable weights into the live (already adapted) ``denoiser``, in place: the
    optimizer keeps pointing at the same parameters. Used when a run resumes."""
    folder = Path(folder)
    if finetune == "full":
        files = sorted((folder / DENOISER_DIR).glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{folder / DENOISER_DIR}: no safetensors weights")
        state: dict[str, torch.Tensor] = {}
        for path in files:
            state.update(load_file(str(path)))
        result = denoiser.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(
                f"{folder / DENOISER_DIR}: does not match the model (missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]})"
            )
        return
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    path = folder / LORA_DIR / LORA_FILE
    if not path.exists():
        raise WeightsError(f"{path}: missing")
    prefix = (backbone.lora_component or denoiser_component(backbone.pipeline(), denoiser)) + "."
    state = {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(state), adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if not state or unexpected:
        raise WeightsError(
            f"{path}: does not match the model's adapter (unexpected keys {(unexpected or [])[:3]})"
        )


def load_trained(backbone: Backbone, finetune: str, folder: Path, dtype: torch.dtype) -> None:
    """Put saved weights into a freshly loaded backbone through diffusers' own loaders (what a user of
    the export does): ``from_pretrained`` for a full denoiser, ``load_lora_weights`` for an adapter."""
    folder = Path(folder)
    if finetune == "full":
        device = next(backbone.denoiser.parameters()).device
        trained = type(backbone.denoiser).from_pretrained(folder / DENOISER_DIR, torch_dtype=dtype)
        backbone.set_denoiser(trained.to(device).requires_grad_(False).eval())
        return
    if not (folder / LORA_DIR / LORA_FILE).exists():
        raise WeightsError(f"{folder / LORA_DIR / LORA_FILE}: missing")
    backbone.pipeline().load_lora_weights(folder / LORA_DIR, **backbone.lora_load_kwargs)
