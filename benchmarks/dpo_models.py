"""Denoisers and pipelines for the DPO step benchmarks, built from configs in code (no hub).

Three sizes of the two released architectures:

- ``mid``: what a 2-core CPU steps through in seconds: an SDXL-architecture UNet of 33 M parameters
  at 128 px (16 x 16 latents; the real 2048-wide text and 2816-wide time conditioning) and a 4-layer
  CogVideoX-2B-architecture transformer (8 heads of 64, 28 M) at 9 frames of 128 px;
- ``full``: SDXL base 1.0's UNet (2.57 B parameters) at 1024 px and CogVideoX-2B's transformer
  (1.69 B) at 49 frames of 480 x 720, as in the released ``unet/config.json`` and
  ``transformer/config.json``;

The pipelines around them hold tiny text encoders and VAEs with the real downsampling factors: the
training step never runs either (embeddings and latents come from the candidate cache), but the
backbone adapters read their configs (time ids, scale factors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_MID_UNET = {
    **SDXL_UNET,
    "attention_head_dim": [2, 4, 8],  # heads of 32 channels
    "block_out_channels": [64, 128, 256],
    "transformer_layers_per_block": [1, 1, 1],
    "sample_size": 16,
}
COGVIDEOX_2B = {  # THUDM/CogVideoX-2b, transformer/config.json
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 64,
    "dropout": 0.0,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 16,
    "max_text_seq_length": 226,
    "norm_elementwise_affine": True,
    "norm_eps": 1e-05,
    "num_attention_heads": 30,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": 2,
    "sample_frames": 49,
    "sample_height": 60,
    "sample_width": 90,
    "spatial_interpolation_scale": 1.875,
    "temporal_compression_ratio": 4,
    "temporal_interpolation_scale": 1.0,
    "text_embed_dim": 4096,
    "time_embed_dim": 512,
    "timestep_activation_fn": "silu",
    "use_learned_positional_embeddings": False,
    "use_rotary_positional_embeddings": False,
}
COGVIDEOX_MID = {
    **COGVIDEOX_2B,
    "num_attention_heads": 8,
    "num_layers": 4,
    "sample_frames": 9,  # 3 latent frames
    "sample_height": 16,  # latent pixels: 128 px video
    "sample_width": 16,
}


@dataclass(frozen=True)
class Spec:
    """One benchmark model: its family, denoiser config, per-sample latent shape and text shapes."""

    family: str
    config: dict[str, Any]
    latent_shape: tuple[int, ...]
    embeds: dict[str, tuple[int, ...]]  # per-sample shape of every cached embedding
    lora_rank: int
    label: str


def spec(family: str, size: str) -> Spec:
    if family == "sdxl":
        config = SDXL_UNET if size == "full" else SDXL_MID_UNET
        side = config["sample_size"]
        embeds = {"prompt_embeds": (77, 2048), "pooled_prompt_embeds": (1280,)}
        label = "SDXL UNet 1024 px" if size == "full" else "SDXL-architecture UNet 128 px"
        return Spec("sdxl", config, (4, side, side), embeds, 8, label)
    if family == "cogvideox":
        config = COGVIDEOX_2B if size == "full" else COGVIDEOX_MID
        frames = (config["sample_frames"] - 1) // 4 + 1
        shape = (frames, config["in_channels"], config["sample_height"], config["sample_width"])
        embeds = {"prompt_embeds": (config["max_text_seq_length"], config["text_embed_dim"])}
        label = (
            "CogVideoX-2B 49 x 480 x 720"
            if size == "full"
            else "CogVideoX-2B-architecture, 4 layers, 9 x 128 px"
        )
        return Spec("cogvideox", config, shape, embeds, 64, label)
    raise ValueError(f"unknown family {family!r} (sdxl, cogvideox)")


def denoiser(s: Spec, seed: int = 0) -> torch.nn.Module:
    """The denoiser with seeded random weights (on the meta device when created under it)."""
    from diffusers import CogVideoXTransformer3DModel, UNet2DConditionModel

    cls = UNet2DConditionModel if s.family == "sdxl" else CogVideoXTransformer3DModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls.from_config(s.config)


def pipeline(s: Spec, module: torch.nn.Module):
    """A diffusers pipeline around ``module`` with the released scheduler and downsampling factors."""
    from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, CogVideoXPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from mpo.backbones.registry import get_backbone_class

    device = next(module.parameters()).device
    if s.family == "sdxl":
        tiny = get_backbone_class("sdxl").tiny_pipeline()  # on the CPU: schedulers hold CPU tensors
        text = tiny.text_encoder_2.config.to_dict()
        with torch.device(device):
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text, "projection_dim": 1280}))
            vae = AutoencoderKL(  # factor 8, as SDXL's
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 8, 8, 8),
                norm_num_groups=8,
                layers_per_block=1,
            )
        parts = {**tiny.components, "unet": module, "text_encoder_2": text_2, "vae": vae}
        return StableDiffusionXLPipeline(**parts)
    tiny = get_backbone_class("cogvideox").tiny_pipeline()
    with torch.device(device):
        vae = AutoencoderKLCogVideoX(  # space x8, time x4, as CogVideoX's
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=16,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
        )
    return CogVideoXPipeline(**{**tiny.components, "transformer": module, "vae": vae})


def batches(s: Spec, batch_size: int, count: int, device: torch.device | str, seed: int = 1) -> list[dict]:
    """``count`` micro-batches shaped like the trainer's (PairDataset, collated), seeded."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(count):

        def randn(*shape):
            return (
                torch.randn(batch_size, *shape, generator=gen)
                if str(device) != "meta"
                else torch.empty(batch_size, *shape, device="meta")
            )

        batch = {
            "latents_w": randn(*s.latent_shape),
            "latents_l": randn(*s.latent_shape),
            "noise": randn(*s.latent_shape),
            "timestep": torch.randint(0, 1000, (batch_size,), generator=gen),
            "embeds": {name: randn(*shape) for name, shape in s.embeds.items()},
            "pair": torch.stack(
                [torch.arange(batch_size), torch.zeros(batch_size), torch.ones(batch_size)], 1
            ).long(),
            "position": torch.arange(k * batch_size, (k + 1) * batch_size),
        }
        if str(device) == "meta":
            batch["timestep"] = batch["timestep"].to("meta")
        elif torch.device(device).type == "cuda":
            for key in ("latents_w", "latents_l", "noise", "timestep"):
                batch[key] = batch[key].pin_memory()
            batch["embeds"] = {n: v.pin_memory() for n, v in batch["embeds"].items()}
        out.append(batch)
    return out
