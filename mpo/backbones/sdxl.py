"""Stable Diffusion XL: two CLIP text encoders, micro-conditioning time ids, epsilon prediction.

Everything goes through diffusers' :class:`~diffusers.StableDiffusionXLPipeline`, so a checkpoint that
works there works here (local folder or hub id, ``revision`` / ``variant``), and sampling is the
pipeline's own loop.

Conventions that the generate and train stages rely on
- Conditioning is ``{"prompt_embeds": [B, 77, 2048], "pooled_prompt_embeds": [B, 1280]}`` (the two
  encoders' penultimate hidden states concatenated; the second encoder's projected pooled output).
- The empty prompt encodes to zeros when the checkpoint sets ``force_zeros_for_empty_prompt`` (SDXL
  base does): that is the unconditional branch the pipeline itself uses when no negative prompt is
  given, so guidance against ``encode_prompts([""])`` reproduces the pipeline's default sampling.
- ``add_time_ids`` (original size, crop top-left, target size) are rebuilt from the latent size times
  the VAE downsampling factor, in ``sample`` and in ``predict`` alike: the training step sees exactly
  the micro-conditioning the candidates were generated with, with nothing extra to cache.
- Training uses the DDPM forward process of the checkpoint's scheduler config (``alphas_cumprod``);
  sampling uses the checkpoint's Euler scheduler, whose inputs are the same latents up to the
  ``scale_model_input`` factor that the pipeline applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from torch import nn

from mpo.backbones.base import Embeddings, ImagePipelineBackbone
from mpo.backbones.registry import register_backbone
from mpo.backbones.schedules import DDPMSchedule
from mpo.sampling import SamplingSupport

if TYPE_CHECKING:
    from mpo.schema import GenerateConfig

# Schedulers whose step() is a deterministic function of (model output, t, sample). Anything else
# (ancestral, SDE samplers) is replaced by Euler built from the same config: a candidate must be
# fixed by its initial noise alone.
_DETERMINISTIC_SCHEDULERS = {
    "EulerDiscreteScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "UniPCMultistepScheduler",
}


@register_backbone("sdxl")
class SDXLBackbone(ImagePipelineBackbone):
    pipeline_class = StableDiffusionXLPipeline
    denoiser_attr = "unet"
    comfyui_lora: ClassVar[dict[str, str] | None] = {
        "layout": "sgm-unet",
        "architecture": "stable-diffusion-xl-v1-base/lora",
        "implementation": "https://github.com/Stability-AI/generative-models",
        "tools": "ComfyUI / A1111 / kohya",
    }
    schedule_class = DDPMSchedule
    sampling_support: ClassVar[SamplingSupport] = SamplingSupport(channels_last=True)
    # The tiny VAE downsamples by 2: 16 x 16 pixels are the 8 x 8 latents its UNet was pretrained at.
    tiny_size: ClassVar[dict[str, int]] = {"height": 16, "width": 16}
    tiny_pretrain_steps: ClassVar[int] = 200

    def __init__(self, pipe: StableDiffusionXLPipeline, device: torch.device | str = "cpu") -> None:
        """A stochastic sampler is replaced by Euler from the same config; the VAE decodes per image."""
        if pipe.scheduler.__class__.__name__ not in _DETERMINISTIC_SCHEDULERS:
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        super().__init__(pipe, device)
        pipe.vae.enable_slicing()  # decode one image at a time: bounded memory, batch-independent
        # The DDPM forward process of the checkpoint's training alphas.
        self._schedule = DDPMSchedule(DDPMScheduler.from_config(pipe.scheduler.config))
        self._time_id_cache: dict[tuple, torch.Tensor] = {}

    # ---- the tiny variant ------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """An SDXL pipeline of about 1M UNet parameters: 32-wide CLIP encoders (concatenated to 64),
        a two-level UNet (32, 64) and a two-level VAE (factor 2, 8 channels per norm group: with one
        channel per group, decoded brightness barely varies between candidates)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from mpo.backbones.tiny import clip_tokenizer

        tokenizer = clip_tokenizer()
        text = {
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,  # SDXL reads the penultimate hidden state
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "projection_dim": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(CLIPTextConfig(**text))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
            unet = UNet2DConditionModel(
                sample_size=cls.tiny_size["height"] // 2,
                in_channels=4,
                out_channels=4,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 1),
                use_linear_projection=True,
                cross_attention_dim=64,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled projection
                norm_num_groups=8,
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                block_out_channels=(32, 64),
                latent_channels=4,
                layers_per_block=1,
                norm_num_groups=8,
                sample_size=cls.tiny_size["height"],
                scaling_factor=0.13025,
                force_upcast=False,
            )
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            timestep_spacing="leading",
            steps_offset=1,
        )
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )

    # ---- conditioning ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Embeddings:
        embeds, _, pooled, _ = self._pipe.encode_prompt(
            prompt=list(prompts),
            device=self._device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        if self._pipe.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    # ---- latents -----------------------------------------------------------------------------------
    def latent_shape(self, gen: GenerateConfig) -> tuple[int, ...]:
        factor = self.vae_scale_factor
        for key in ("height", "width"):
            if getattr(gen, key) % factor:
                raise ValueError(
                    f"generate.{key}={getattr(gen, key)} is not a multiple of this VAE's downsampling "
                    f"factor {factor}"
                )
        return (self._pipe.unet.config.in_channels, gen.height // factor, gen.width // factor)

    def _time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL micro-conditioning for an uncropped image of the latents' pixel size, ``[B, 6]``.
        Cached per size, dtype and device: building it copies a host list to the device (a sync)."""
        size = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        key = (size, latents.dtype, latents.device)
        if key not in self._time_id_cache:
            encoder_2 = self._pipe.text_encoder_2
            time_ids = self._pipe._get_add_time_ids(
                size,
                (0, 0),
                size,
                dtype=latents.dtype,
                text_encoder_projection_dim=encoder_2.config.projection_dim,
            )
            self._time_id_cache[key] = time_ids.to(latents.device)
        return self._time_id_cache[key].expand(latents.shape[0], -1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._pipe.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)  # the SDXL VAE overflows in float16; kept upcast from now on
        latents = latents.to(self._device, vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ---- training ---------------------------------------------------------------------------------
    def call_denoiser(
        self, denoiser: nn.Module, noisy: torch.Tensor, model_timesteps: torch.Tensor, embeds: Embeddings
    ) -> torch.Tensor:
        """The UNet call of the pipeline's loop, on DDPM-scaled inputs (what ``scale_model_input`` gives
        the UNet during sampling)."""
        return denoiser(
            noisy,
            model_timesteps,
            encoder_hidden_states=embeds["prompt_embeds"].to(noisy.dtype),
            added_cond_kwargs={
                "text_embeds": embeds["pooled_prompt_embeds"].to(noisy.dtype),
                "time_ids": self._time_ids(noisy),
            },
            return_dict=False,
        )[0]
