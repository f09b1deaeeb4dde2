"""The ComfyUI LoRA file of the flow families (FLUX: kohya's layout of the BFL model, fused q/k/v;
Wan: the original Wan layout), each read back by diffusers' own loader for that layout into a fresh
pipeline, which must then predict what the policy predicts. (SDXL's is in test_ecosystem.)

The policies are the backbones' own denoisers with the trainer's adapter (``add_lora``) given random
non-zero weights, saved by the trainer's ``save_weights`` and converted by the export's
``write_comfyui_lora``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from mpo.backbones.flux import FluxBackbone
from mpo.backbones.wan import WanBackbone
from mpo.config import load_recipe
from mpo.export import write_comfyui_lora
from mpo.lora_formats import LoraFormatError, bfl_flux_slot, to_comfyui, wan_slot
from mpo.weights import add_lora, save_weights
from tests.scripts.tiny_runs import ROOT

RANK, ALPHA = 2, 6  # scale 3: a dropped or doubled alpha shows
# The tiny FLUX of FluxBackbone.tiny_pipeline: one double- and one single-stream block, width 32.
TINY_FLUX = {
    "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}  # fmt: skip
# FLUX.1's width (diffusers' reader of linear1 assumes 3 x 3072 + 12288), one single-stream block only.
WIDE_FLUX = {
    "patch_size": 1, "in_channels": 4, "num_layers": 0, "num_single_layers": 1, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 8, "pooled_projection_dim": 8, "guidance_embeds": False,
    "axes_dims_rope": (32, 48, 48),
}  # fmt: skip
FLUX_1_DEV = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
# The tiny Wan of WanBackbone.tiny_pipeline: two blocks.
TINY_WAN = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
    "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 64,
}  # fmt: skip


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _adapted(model: nn.Module) -> set[str]:
    """The modules a LoRA adapter was put on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def _recipe(family: str):
    overrides = [
        "model.finetune=lora", f"model.lora_rank={RANK}", f"model.lora_alpha={ALPHA}",
        "export.lora_formats=[diffusers,comfyui]",
    ]  # fmt: skip
    return load_recipe(str(ROOT / "recipes" / "tiny" / f"{family}.yaml"), overrides)


def _export(backbone, recipe, targets: list[str], tmp: Path) -> Path:
    """The policy: the trainer's adapter on ``targets`` with random non-zero weights; saved as a
    checkpoint saves it, then converted as the export converts it. Returns the ComfyUI file."""
    denoiser = backbone.denoiser
    add_lora(denoiser, recipe.model, targets)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    save_weights(backbone, denoiser, denoiser.state_dict(), "lora", tmp / "weights")
    return write_comfyui_lora(recipe, backbone, tmp / "weights", tmp / "export" / "lora")


def _same_predictions(policy: nn.Module, loaded: nn.Module, inputs: dict) -> None:
    with torch.no_grad():
        ours, theirs = policy(**inputs, return_dict=False)[0], loaded(**inputs, return_dict=False)[0]
        loaded.disable_lora()
        base = loaded(**inputs, return_dict=False)[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-2  # the adapter is not a no-op


def _flux_pipe(transformer: FluxTransformer2DModel) -> FluxPipeline:
    no = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer, **no)


def _flux_inputs(config: dict, tokens: int = 16, text: int = 4) -> dict:
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, tokens, config["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=generator),
        "timestep": torch.tensor([0.6]),
        "img_ids": torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(tokens / 4), indexing="ij"), -1
        ).reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
    }
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


def _flux(config: dict) -> FluxTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FluxTransformer2DModel(**config).eval()


def test_flux_lora_in_kohya_layout_loads_in_diffusers_and_predicts_as_the_policy(tmp_path, one_thread):
    """Every block layer: the double blocks' fused q/k/v of both streams, projections, MLPs and
    modulations, the single blocks' linear2 and modulation (their linear1 diffusers reads at FLUX.1's
    width only: the next test). The embedders and the final layer diffusers 0.42 converts but does not
    load (it leaves their keys without the transformer prefix): the round trip further down checks
    those."""
    backbone = FluxBackbone(_flux_pipe(_flux(TINY_FLUX)))
    linear1 = ("single_transformer_blocks.0.attn.to_", "single_transformer_blocks.0.proj_mlp")
    targets = [
        n
        for n in _linear_names(backbone.denoiser)
        if "transformer_blocks." in n and not n.startswith(linear1)
    ]
    path = _export(backbone, _recipe("flux"), targets, tmp_path)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_network_alpha"] == str(ALPHA)
    assert all(k.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_")) for k in keys)
    state = load_file(str(path))
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert state[f"{qkv}.lora_down.weight"].shape == (3 * RANK, 32)  # q, k, v stacked along the rank
    assert state[f"{qkv}.lora_up.weight"].shape == (3 * 32, 3 * RANK)
    assert float(state[f"{qkv}.alpha"]) == 3 * ALPHA  # alpha / rank as in each part
    assert float(state["lora_unet_double_blocks_0_txt_mod_lin.alpha"]) == ALPHA

    fresh = _flux_pipe(_flux(TINY_FLUX))
    fresh.load_lora_weights(str(path))  # diffusers' kohya FLUX converter
    assert _adapted(fresh.transformer) == set(targets)
    _same_predictions(backbone.denoiser, fresh.transformer, _flux_inputs(TINY_FLUX))


def test_flux_single_block_linear1_fuses_q_k_v_with_a_zero_mlp_block(tmp_path, one_thread):
    """The default targets adapt the single blocks' q, k, v but not their MLP input: linear1 is q, k, v
    and a zero block for proj_mlp, rank 4 x r, and diffusers splits it back exactly."""
    from accelerate import init_empty_weights

    wide = _flux(WIDE_FLUX)
    with init_empty_weights():  # a second model on the same (frozen, never written) base weights
        fresh = FluxTransformer2DModel(**WIDE_FLUX).eval()
    fresh.load_state_dict(wide.state_dict(), assign=True)
    backbone = FluxBackbone(_flux_pipe(wide))
    path = _export(backbone, _recipe("flux"), backbone.lora_target_modules, tmp_path)
    state = load_file(str(path))
    stem = "lora_unet_single_blocks_0_linear1"
    down, up = state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"]
    assert down.shape == (4 * RANK, 3072) and up.shape == (3 * 3072 + 12288, 4 * RANK)
    assert float(state[f"{stem}.alpha"]) == 4 * ALPHA
    assert not down[3 * RANK :].any() and not up[3 * 3072 :].any() and up[:3072, :RANK].any()
    assert not up[:3072, RANK:].any()  # block-diagonal: q's rows see q's rank only
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-schnell/lora"  # no guidance embedder

    pipe = _flux_pipe(fresh)
    pipe.load_lora_weights(str(path))
    assert _adapted(fresh) == {
        f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    }
    _same_predictions(backbone.denoiser, fresh, _flux_inputs(WIDE_FLUX, tokens=4, text=2))


def test_every_flux_1_dev_layer_round_trips_through_diffusers_kohya_reader():
    """Every Linear of the full-size FLUX.1-dev transformer (built on the meta device: no weights), each
    with a rank-1 adapter, to the kohya layout and back through diffusers' converter: the same weight
    change on every layer (checked along its down vector), every block index, the final layer's halves."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = FluxTransformer2DModel(**FLUX_1_DEV)
    generator = torch.Generator().manual_seed(0)
    layers, names = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            names.append(name)
            layers[f"transformer.{name}.lora_A.weight"] = torch.randn(
                1, module.in_features, generator=generator
            )
            layers[f"transformer.{name}.lora_B.weight"] = torch.randn(
                module.out_features, 1, generator=generator
            )
    kohya = to_comfyui(layers, "transformer", "bfl-flux", model.config, alpha=3)
    assert len(names) == 19 * 14 + 38 * 6 + 10 and all(k.startswith("lora_unet_") for k in kohya)
    assert {"lora_unet_txt_in.alpha", "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"} <= set(kohya)
    assert "lora_unet_final_layer_linear.alpha" not in kohya  # diffusers ignores it there: scale baked in
    # diffusers prefixes the block layers with "transformer." only (and so loads only those).
    back = {k.removeprefix("transformer."): v for k, v in FluxPipeline.lora_state_dict(kohya).items()}
    assert {k.rsplit(".lora_", 1)[0] for k in back} == set(names)
    for name in names:
        a, b = layers[f"transformer.{name}.lora_A.weight"], layers[f"transformer.{name}.lora_B.weight"]
        a2, b2 = back[f"{name}.lora_A.weight"], back[f"{name}.lora_B.weight"]
        x = a[0]  # along the layer's own down vector: no cancellation, another layer's gives ~1/sqrt(width)
        torch.testing.assert_close(b2 @ (a2 @ x), 3 * (b @ (a @ x)), rtol=1e-5, atol=1e-3, msg=name)


def test_flux_layout_names_and_its_refusals():
    config = {"num_attention_heads": 24, "attention_head_dim": 128}
    slot = bfl_flux_slot("transformer_blocks.7.attn.add_v_proj", config)
    assert (slot.module, slot.part, slot.parts) == ("double_blocks.7.txt_attn.qkv", 2, (3072,) * 3)
    slot = bfl_flux_slot("single_transformer_blocks.37.proj_mlp", config)
    assert (slot.module, slot.part, slot.parts) == ("single_blocks.37.linear1", 3, (3072, 3072, 3072, 12288))
    assert bfl_flux_slot("single_transformer_blocks.2.proj_out", config).module == "single_blocks.2.linear2"
    assert bfl_flux_slot("proj_out", config).module == "final_layer.linear"
    with pytest.raises(
        LoraFormatError, match=r"transformer_blocks\.0\.attn\.norm_q: not a FluxTransformer2DModel"
    ):
        bfl_flux_slot("transformer_blocks.0.attn.norm_q", config)
    mixed = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 3072),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 2),
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(4, 3072),
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros(3072, 4),
    }
    with pytest.raises(
        LoraFormatError,
        match=r"0.attn.to_q, .*0.attn.to_k: fused into double_blocks.0.img_attn.qkv, .*one rank \(have \[2, 4\]\)",
    ):
        to_comfyui(mixed, "transformer", "bfl-flux", config, alpha=1)


# ---- Wan --------------------------------------------------------------------------------------------
def _wan(config: dict) -> WanTransformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return WanTransformer3DModel(**config).eval()


def _wan_pipe(transformer: WanTransformer3DModel) -> WanPipeline:
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler
    )


def test_wan_lora_in_the_original_layout_loads_in_diffusers_and_predicts_as_the_policy(tmp_path, one_thread):
    """Every Linear of the transformer: both attentions and the FFN of each block (alpha read per
    layer), the text / time embedders, the time projection and the head (scale baked in)."""
    backbone = WanBackbone(_wan_pipe(_wan(TINY_WAN)))
    targets = _linear_names(backbone.denoiser)
    path = _export(backbone, _recipe("wan"), targets, tmp_path)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["modelspec.architecture"] == "wan2.1/lora"
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert {
        "diffusion_model.blocks.1.self_attn.o.lora_up.weight", "diffusion_model.blocks.0.cross_attn.q.alpha",
        "diffusion_model.blocks.1.ffn.2.lora_down.weight", "diffusion_model.time_projection.1.lora_up.weight",
        "diffusion_model.head.head.lora_down.weight",
    } <= keys  # fmt: skip
    assert "diffusion_model.head.head.alpha" not in keys  # diffusers would refuse it: scale baked in

    fresh = _wan_pipe(_wan(TINY_WAN))
    fresh.load_lora_weights(str(path))  # diffusers' non-diffusers Wan converter
    assert _adapted(fresh.transformer) == set(targets)
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 4, 3, 8, 8, generator=generator),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 16, 32, generator=generator),
    }
    _same_predictions(backbone.denoiser, fresh.transformer, inputs)


def test_wan_layout_names():
    assert wan_slot("blocks.39.attn2.add_k_proj", {}).module == "blocks.39.cross_attn.k_img"
    assert wan_slot("blocks.0.attn1.to_out.0", {}).module == "blocks.0.self_attn.o"
    slot = wan_slot("condition_embedder.text_embedder.linear_2", {})
    assert slot.module == "text_embedding.2" and not slot.reads_alpha
    with pytest.raises(LoraFormatError, match=r"blocks\.0\.norm2: not a WanTransformer3DModel"):
        wan_slot("blocks.0.norm2", {})
