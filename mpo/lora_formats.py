"""LoRA files for other tools: the denoiser's adapter in the key layout of the original checkpoints.

The export writes ``lora/pytorch_lora_weights.safetensors`` in diffusers' layout (what
``pipe.load_lora_weights`` reads). ``export.lora_formats: [diffusers, comfyui]`` adds
``lora/pytorch_lora_weights_comfyui.safetensors`` with the same adapter under the module names of the
family's original checkpoint, as ComfyUI and kohya's trainers write and read LoRA files:
``lora_down.weight`` (= peft's lora_A), ``lora_up.weight`` (= lora_B) and ``alpha`` (scale = alpha /
rank) per layer. diffusers reads each of these layouts back through its own non-diffusers converter
(``diffusers.loaders.lora_conversion_utils``), which is how the tests check every mapping: the file,
loaded with ``load_lora_weights`` into a fresh pipeline, predicts what the policy predicts.

A family names its layout in ``Backbone.comfyui_lora`` (None: no convention, and the recipe loader
refuses ``comfyui`` for it). One :class:`Layout` per convention says, for every diffusers module, where
its adapter goes (a :class:`Slot`):

- ``sgm-unet``: diffusers' ``UNet2DConditionModel`` (SDXL, SD 1.x/2.x) <-> the sgm UNet of the
  original checkpoints, keys ``lora_unet_<sgm path, dots as underscores>``: ``down_blocks.b.{resnets,
  attentions}.l`` is ``input_blocks.(1 + b*(L+1) + l).{0,1}``, ``mid_block`` is ``middle_block.{0,1,2}``,
  ``up_blocks.b.{resnets,attentions}.l`` is ``output_blocks.(b*(L+1) + l).{0,1}`` (L =
  layers_per_block), with the resnet's inner names renamed (``conv1`` = ``in_layers.2``, ``conv2`` =
  ``out_layers.3``, ``time_emb_proj`` = ``emb_layers.1``, ``conv_shortcut`` = ``skip_connection``).
- ``bfl-flux``: diffusers' ``FluxTransformer2DModel`` <-> Black Forest Labs' FLUX.1 model, keys
  ``lora_unet_<BFL path, dots as underscores>`` (kohya sd-scripts' FLUX LoRA layout):
  ``transformer_blocks.i`` is ``double_blocks.i`` (``attn.to_{q,k,v}`` fused into ``img_attn.qkv``,
  ``attn.add_{q,k,v}_proj`` into ``txt_attn.qkv``, ``attn.to_out.0`` / ``to_add_out`` =
  ``{img,txt}_attn.proj``, ``ff{,_context}.net.{0.proj,2}`` = ``{img,txt}_mlp.{0,2}``,
  ``norm1{,_context}.linear`` = ``{img,txt}_mod.lin``), ``single_transformer_blocks.i`` is
  ``single_blocks.i`` (``attn.to_{q,k,v}`` and ``proj_mlp`` fused into ``linear1``, ``proj_out`` =
  ``linear2``, ``norm.linear`` = ``modulation.lin``), and the embedders / final layer (``x_embedder`` =
  ``img_in``, ``context_embedder`` = ``txt_in``, ``time_text_embed.{timestep,text,guidance}_embedder.
  linear_{1,2}`` = ``{time,vector,guidance}_in.{in,out}_layer``, ``norm_out.linear`` =
  ``final_layer.adaLN_modulation.1`` with its shift / scale halves in the other order, ``proj_out`` =
  ``final_layer.linear``). A fused layer's LoRA equals the separate ones exactly: lora_down is their
  downs stacked along the rank, lora_up is block-diagonal (a zero block for a part the policy did not
  adapt), so the rank is the parts' sum and alpha is scaled with it (alpha / rank unchanged).
  diffusers splits such a block-diagonal file back into the separate adapters. Two limits of
  diffusers' reader (0.42), not of the file, which ComfyUI reads whole: it assumes FLUX.1's widths
  for ``linear1`` (3 x 3072 + 12288), and it converts the embedders' and final layer's keys but loads
  only the blocks' (the default targets adapt block layers only).
- ``wan``: diffusers' ``WanTransformer3DModel`` <-> the original Wan 2.1 / 2.2 model, keys
  ``diffusion_model.<Wan path>`` (ComfyUI's layout for Wan LoRAs): ``blocks.i.attn1.{to_q,to_k,to_v,
  to_out.0}`` = ``blocks.i.self_attn.{q,k,v,o}``, ``attn2`` = ``cross_attn`` (``add_{k,v}_proj`` =
  ``{k,v}_img``), ``ffn.net.{0.proj,2}`` = ``ffn.{0,2}``, ``condition_embedder.{text,time}_embedder.
  linear_{1,2}`` = ``{text,time}_embedding.{0,2}``, ``condition_embedder.time_proj`` =
  ``time_projection.1``, ``proj_out`` = ``head.head``.

Where a reader ignores ``alpha`` (diffusers on FLUX's final layer and Wan's non-block layers) the scale
is multiplied into lora_up and the key left out, which every reader takes as scale 1.

SD3 / SD3.5 has no such layout: diffusers' SD3 loader reads no layout but its own (its
``lora_state_dict`` converts nothing), so no conversion could be checked against it, and ComfyUI reads
diffusers' SD3 LoRA file (``transformer.*`` keys) as it is: the diffusers file is the one to use.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"
UNET_PREFIX = "lora_unet_"


class LoraFormatError(ValueError):
    """An adapter that cannot be written in the asked-for layout; the message names the module."""


@dataclass(frozen=True)
class Slot:
    """Where one diffusers module's adapter goes in an original checkpoint's layout."""

    module: str  # the original module path, with dots
    part: int = 0  # the output block of a fused layer this module is
    parts: tuple[int, ...] = ()  # a fused layer's output widths in order (empty: not fused)
    halves_swapped: bool = False  # the original orders the two halves of the output the other way
    reads_alpha: bool = True  # False: a reader ignores .alpha here (the scale goes into lora_up)


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


# ---- diffusers FluxTransformer2DModel -> the BFL FLUX.1 model ---------------------------------------
_FLUX_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
_FLUX_DOUBLE_QKV = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
_FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_FLUX_SINGLE_LINEAR1 = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}
_FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
FLUX_MLP_RATIO = 4  # FluxSingleTransformerBlock's MLP width / model width (not a config entry)


def bfl_flux_slot(module: str, config: Any) -> Slot:
    """The BFL FLUX.1 place of a diffusers FluxTransformer2DModel module (``transformer_blocks.3.attn.
    to_k`` -> part 1 of ``double_blocks.3.img_attn.qkv``)."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if match:
        blocks, i, inner = match.groups()
        if blocks == "transformer_blocks":
            if inner in _FLUX_DOUBLE_QKV:
                fused, part = _FLUX_DOUBLE_QKV[inner]
                return Slot(f"double_blocks.{i}.{fused}", part, (width,) * 3)
            if inner in _FLUX_DOUBLE:
                return Slot(f"double_blocks.{i}.{_FLUX_DOUBLE[inner]}")
        else:
            if inner in _FLUX_SINGLE_LINEAR1:
                parts = (width, width, width, FLUX_MLP_RATIO * width)
                return Slot(f"single_blocks.{i}.linear1", _FLUX_SINGLE_LINEAR1[inner], parts)
            if inner in _FLUX_SINGLE:
                return Slot(f"single_blocks.{i}.{_FLUX_SINGLE[inner]}")
    elif module in _FLUX_TOP:
        return Slot(_FLUX_TOP[module])
    elif module == "norm_out.linear":
        return Slot("final_layer.adaLN_modulation.1", halves_swapped=True, reads_alpha=False)
    elif module == "proj_out":
        return Slot("final_layer.linear", reads_alpha=False)
    raise LoraFormatError(f"{module}: not a FluxTransformer2DModel layer the FLUX.1 LoRA layout names")


# ---- diffusers WanTransformer3DModel -> the original Wan model --------------------------------------
_WAN_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_WAN_TOP = {  # diffusers reads these without their alpha
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}


def wan_slot(module: str, config: Any) -> Slot:
    """The original Wan place of a diffusers WanTransformer3DModel module (``blocks.2.attn2.to_out.0``
    -> ``blocks.2.cross_attn.o``)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if match and match.group(2) in _WAN_BLOCK:
        return Slot(f"blocks.{match.group(1)}.{_WAN_BLOCK[match.group(2)]}")
    if module in _WAN_TOP:
        return Slot(_WAN_TOP[module], reads_alpha=False)
    raise LoraFormatError(f"{module}: not a WanTransformer3DModel layer the Wan LoRA layout names")


# ---- layouts ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """One original checkpoint's LoRA key convention."""

    slot: Callable[[str, Any], Slot]  # diffusers module, denoiser config -> its place
    key: Callable[[str], str]  # original module path -> the file's key stem
    description: str  # for the model card
    # The modelspec architecture for a denoiser config, when it is not the family's declared one.
    architecture: Callable[[Any, str | None], str | None] = lambda config, declared: declared


def _kohya_key(path: str) -> str:
    return UNET_PREFIX + path.replace(".", "_")


def _flux_architecture(config: Any, declared: str | None) -> str | None:
    """FLUX.1-schnell is the one without the guidance embedder (as kohya's tools tell them apart)."""
    return declared if config.get("guidance_embeds", True) else "flux-1-schnell/lora"


LAYOUTS: dict[str, Layout] = {
    "sgm-unet": Layout(lambda m, c: Slot(sgm_unet_module(m, c)), _kohya_key, "kohya key layout"),
    "bfl-flux": Layout(bfl_flux_slot, _kohya_key, "kohya key layout", _flux_architecture),
    "wan": Layout(wan_slot, lambda path: f"diffusion_model.{path}", "original Wan key layout"),
}


def layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise LoraFormatError(f"no ComfyUI LoRA layout {name!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[name]


# ---- conversion -------------------------------------------------------------------------------------
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


def _fused(
    target: str, parts: dict[int, tuple[str, Slot, dict[str, torch.Tensor]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of one original layer from the adapters of its parts: downs stacked along the rank,
    ups block-diagonal, a zero block for a part without an adapter."""
    (_, slot, first), *_ = parts.values()
    ranks = {pair["down"].shape[0] for _, _, pair in parts.values()}
    if len(ranks) > 1:
        names = ", ".join(module for _, (module, _, _) in sorted(parts.items()))
        raise LoraFormatError(f"{names}: fused into {target}, they need one rank (have {sorted(ranks)})")
    rank, width, n = ranks.pop(), first["down"].shape[1], len(slot.parts)
    down = first["down"].new_zeros(n * rank, width)
    up = first["up"].new_zeros(sum(slot.parts), n * rank)
    starts = [sum(slot.parts[:j]) for j in range(n)]
    for j, (module, _, pair) in parts.items():
        if pair["up"].shape[0] != slot.parts[j] or pair["down"].shape[1] != width:
            raise LoraFormatError(
                f"{module}: {tuple(pair['up'].shape[:1]) + tuple(pair['down'].shape[1:])} (out, in), but "
                f"part {j} of {target} is ({slot.parts[j]}, {width})"
            )
        down[j * rank : (j + 1) * rank] = pair["down"]
        up[starts[j] : starts[j] + slot.parts[j], j * rank : (j + 1) * rank] = pair["up"]
    return down, up


def to_comfyui(
    layers: dict[str, torch.Tensor], component: str, layout_name: str, config: Any, alpha: float
) -> dict[str, torch.Tensor]:
    """The original-layout state dict of a diffusers LoRA ``layers`` dict (keys ``<component>.<module>
    .lora_A.weight``) for a denoiser with ``config`` (its diffusers config) and layout ``layout_name``.
    ``alpha``: the adapter's lora_alpha (every layer's scale is alpha / its rank)."""
    spec = layout(layout_name)
    targets: dict[str, dict[int, tuple[str, Slot, dict[str, torch.Tensor]]]] = {}
    for module, pair in sorted(_adapters(layers, component).items()):
        slot = spec.slot(module, config)
        here = targets.setdefault(slot.module, {})
        if slot.part in here:
            raise LoraFormatError(f"{component}.{module}: {slot.module} already holds {here[slot.part][0]}")
        here[slot.part] = (module, slot, pair)
    out: dict[str, torch.Tensor] = {}
    for target, parts in sorted(targets.items()):
        (_, slot, pair), *_ = parts.values()
        if slot.parts:
            down, up = _fused(target, parts)
            scale_alpha = float(alpha) * len(slot.parts)  # rank x len(parts): alpha / rank unchanged
        else:
            down, up, scale_alpha = pair["down"], pair["up"], float(alpha)
        if slot.halves_swapped:
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first])
        stem = spec.key(target)
        if slot.reads_alpha:
            out[f"{stem}.alpha"] = torch.tensor(scale_alpha, dtype=down.dtype)
        else:
            up = up * (scale_alpha / down.shape[0])
        out[f"{stem}.lora_down.weight"] = down.contiguous()
        out[f"{stem}.lora_up.weight"] = up.contiguous()
    return out


def comfyui_architecture(convention: dict[str, str], config: Any) -> str | None:
    """The modelspec architecture of a family's LoRA for a denoiser with ``config``."""
    return layout(convention["layout"]).architecture(config, convention.get("architecture"))


def comfyui_metadata(
    rank: int, alpha: float, architecture: str | None, title: str, implementation: str | None = None
) -> dict[str, str]:
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
    if implementation:
        meta["modelspec.implementation"] = implementation
    return meta
