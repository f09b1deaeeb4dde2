"""LoRA files for other tools: the kohya / ComfyUI / A1111 key layout, converted from diffusers'.

The export writes ``lora/pytorch_lora_weights.safetensors`` in diffusers' layout (what
``pipe.load_lora_weights`` reads). ``export.lora_formats: [diffusers, comfyui]`` adds
``lora/pytorch_lora_weights_comfyui.safetensors`` in the layout ComfyUI's LoraLoader, A1111 and
kohya's sd-scripts read: one ``lora_unet_<module>`` prefix per adapted layer (the module path in the
original Stability "sgm" UNet, dots as underscores) with ``.lora_down.weight`` (= peft's lora_A),
``.lora_up.weight`` (= lora_B) and ``.alpha`` (the adapter's lora_alpha; scale = alpha / rank).
diffusers reads that layout back through its own non-diffusers converter, which is how the tests
check the mapping.

A family says which layout its denoiser has in ``Backbone.comfyui_lora`` (None: no convention, and
the recipe loader refuses ``comfyui`` for it):

- ``sgm-unet``: diffusers' ``UNet2DConditionModel`` (SDXL, SD 1.x/2.x) <-> the sgm UNet of the
  original checkpoints: ``down_blocks.b.{resnets,attentions}.l`` is ``input_blocks.(1 + b*(L+1) + l).{0,1}``,
  ``mid_block`` is ``middle_block.{0,1,2}``, ``up_blocks.b.{resnets,attentions}.l`` is
  ``output_blocks.(b*(L+1) + l).{0,1}`` (L = layers_per_block), with the resnet's inner names
  renamed (``conv1`` = ``in_layers.2``, ``conv2`` = ``out_layers.3``, ``time_emb_proj`` =
  ``emb_layers.1``, ``conv_shortcut`` = ``skip_connection``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"
UNET_PREFIX = "lora_unet_"


class LoraFormatError(ValueError):
    """An adapter that cannot be written in the asked-for layout; the message names the module."""


# ---- diffusers UNet2DConditionModel -> sgm UNet module paths ----------------------------------------
_RESNET_INNER = {
    "conv1": "in_layers.2",
    "norm1": "in_layers.0",
    "conv2": "out_layers.3",
    "norm2": "out_layers.0",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _resnet(inner: str, module: str) -> str:
    head, _, rest = inner.partition(".")
    if head not in _RESNET_INNER or rest:
        raise LoraFormatError(f"{module}: no sgm name for resnet layer {inner!r}")
    return _RESNET_INNER[head]


def sgm_unet_module(module: str, config: Any) -> str:
    """The sgm UNet path of a diffusers UNet2DConditionModel module (``down_blocks.1.attentions.0.
    transformer_blocks.0.attn1.to_q`` -> ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` for SDXL)."""
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise LoraFormatError(
            f"layers_per_block={per_block!r}: the sgm layout needs one number for every block"
        )
    up_types = list(config["up_block_types"])
    match = re.fullmatch(
        r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?",
        module,
    )
    if match:
        blocks, b, kind, layer, inner = match.groups()
        b, layer, inner = int(b), int(layer), inner or ""
        if blocks == "down_blocks":
            if kind == "downsamplers":
                if inner != "conv":
                    raise LoraFormatError(f"{module}: no sgm name for downsampler layer {inner!r}")
                return f"input_blocks.{(b + 1) * (per_block + 1)}.0.op"
            index = 1 + b * (per_block + 1) + layer
        else:
            if kind == "upsamplers":
                if inner != "conv":
                    raise LoraFormatError(f"{module}: no sgm name for upsampler layer {inner!r}")
                has_attention = "CrossAttn" in up_types[b]
                return f"output_blocks.{b * (per_block + 1) + per_block}.{2 if has_attention else 1}.conv"
            index = b * (per_block + 1) + layer
        root = "input_blocks" if blocks == "down_blocks" else "output_blocks"
        if kind == "resnets":
            return f"{root}.{index}.0.{_resnet(inner, module)}"
        return f"{root}.{index}.1" + (f".{inner}" if inner else "")
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?", module)
    if match:
        kind, layer, inner = match.groups()
        inner = inner or ""
        if kind == "attentions":
            return "middle_block.1" + (f".{inner}" if inner else "")
        return f"middle_block.{0 if layer == '0' else 2}.{_resnet(inner, module)}"
    raise LoraFormatError(f"{module}: not a UNet2DConditionModel module the sgm layout names")


# ---- conversion -------------------------------------------------------------------------------------
_LAYOUTS: dict[str, Callable[[str, Any], str]] = {"sgm-unet": sgm_unet_module}


def _adapters(layers: dict[str, torch.Tensor], component: str) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {"down": A, "up": B} from a diffusers / peft LoRA state dict of ``component``."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    pattern = re.compile(rf"{re.escape(component)}\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight")
    for key, value in layers.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise LoraFormatError(f"{key}: not a {component} LoRA weight (lora_A / lora_B)")
        module, which = match.groups()
        found.setdefault(module, {})["down" if which in ("lora_A", "lora.down") else "up"] = value
    for module, pair in found.items():
        if set(pair) != {"down", "up"}:
            raise LoraFormatError(f"{component}.{module}: has {sorted(pair)} of the two LoRA matrices")
    return found


def to_comfyui(
    layers: dict[str, torch.Tensor], component: str, layout: str, config: Any, alpha: float
) -> dict[str, torch.Tensor]:
    """The kohya / ComfyUI state dict of a diffusers LoRA ``layers`` dict (keys ``<component>.<module>
    .lora_A.weight``) for a denoiser with ``config`` (its diffusers config) and ``layout``."""
    if layout not in _LAYOUTS:
        raise LoraFormatError(f"no ComfyUI LoRA layout {layout!r}; known: {sorted(_LAYOUTS)}")
    name_of = _LAYOUTS[layout]
    out: dict[str, torch.Tensor] = {}
    for module, pair in sorted(_adapters(layers, component).items()):
        name = UNET_PREFIX + name_of(module, config).replace(".", "_")
        out[f"{name}.lora_down.weight"] = pair["down"].contiguous()
        out[f"{name}.lora_up.weight"] = pair["up"].contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=pair["down"].dtype)
    return out


def comfyui_metadata(rank: int, alpha: float, architecture: str | None, title: str) -> dict[str, str]:
    """safetensors metadata the kohya / ComfyUI ecosystem reads to know what a LoRA file is."""
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": title,
    }
    if architecture:
        meta["modelspec.architecture"] = architecture
    return meta
