"""FLUX.1 (dev, schnell): CLIP + T5 text encoders, the MM-DiT / single-stream transformer on packed
2 x 2 latent patches, embedded guidance instead of classifier-free guidance, flow matching.

Everything goes through diffusers' :class:`~diffusers.FluxPipeline` (``black-forest-labs/FLUX.1-dev``,
``FLUX.1-schnell``): loading, prompt encoding, latent packing, the position ids and the sampler
with its resolution-dependent shift are the pipeline's.

Conventions that the generate and train stages rely on
- Conditioning is ``{"prompt_embeds": [B, L, 4096], "pooled_prompt_embeds": [B, 768]}``: T5-XXL's L =
  512 tokens (schnell: 256, its tokenizer's length) and CLIP's pooled output. There is no negative
  prompt (:attr:`negative_prompt` is None): FLUX.1-dev is guidance-distilled and takes
  ``generate.guidance_scale`` (3.5 in the model card) as an input of the transformer, schnell takes no
  guidance at all (``guidance_scale: 0``).
- Latents are stored unpacked, ``[B, 16, H/8, W/8]``, ``(z - shift_factor) * scaling_factor`` of the
  VAE; sampling and the training forward pack them into the transformer's ``[B, (H/16)(W/16), 64]``
  sequence (and back) with the pipeline's own ``_pack_latents`` / ``_unpack_latents``. The squared
  error is a mean over elements, so the layout does not change the loss.
- The training forward repeats the generation's embedded guidance scale (given to the trainer's
  backbone by :meth:`use_generation_settings`), so it conditions the transformer as the candidates
  were conditioned.
- Training is rectified flow. The released scheduler shifts its sigmas by resolution at sampling time
  (``use_dynamic_shifting``: ``shift = exp(mu)``, mu linear in the image's token count); training uses
  the same shift, computed for ``generate.height`` x ``generate.width``, so the trained noise levels
  are those the pipeline samples that resolution with (1024 x 1024: shift 3.16). The transformer
  receives ``sigma`` (the pipeline passes ``timestep / 1000``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import nn

from mpo.backbones.base import Embeddings, ImagePipelineBackbone
from mpo.backbones.registry import register_backbone
from mpo.backbones.schedules import FlowMatchSchedule
from mpo.sampling import FLOW_TRANSFORMER_SUPPORT, SamplingSupport

if TYPE_CHECKING:
    from mpo.schema import GenerateConfig

# The released VAE downsamples by 8 and the transformer packs 2 x 2 latent patches.
SPATIAL_MULTIPLE = 8 * 2
MAX_TEXT_LENGTH = 512
DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev's model card, and the pipeline's default


@register_backbone("flux")
class FluxBackbone(ImagePipelineBackbone):
    pipeline_class = FluxPipeline
    denoiser_attr = "transformer"
    comfyui_lora: ClassVar[dict[str, str] | None] = {  # schnell (no guidance embedder): flux-1-schnell
        "layout": "bfl-flux",
        "architecture": "flux-1-dev/lora",
        "implementation": "https://github.com/black-forest-labs/flux",
        "tools": "ComfyUI / kohya",
    }
    sampling_support: ClassVar[SamplingSupport] = FLOW_TRANSFORMER_SUPPORT
    schedule_class = FlowMatchSchedule
    size_multiple: ClassVar[int] = SPATIAL_MULTIPLE
    size_reason: ClassVar[str] = "VAE factor 8 x 2 x 2 packing"
    # The tiny VAE downsamples by 2: 16 x 16 pixels are 8 x 8 latents, packed to 16 tokens.
    tiny_size: ClassVar[dict[str, int]] = {"height": 16, "width": 16}
    tiny_pretrain_steps: ClassVar[int] = 200
    # The training forward repeats the embedded guidance; the sampling shift depends on the resolution.
    training_generation_keys: ClassVar[tuple[str, ...]] = ("guidance_scale", "height", "width")

    def __init__(self, pipe: FluxPipeline, device: torch.device | str = "cpu") -> None:
        """Sampling with the flow-matching Euler sampler (deterministic); the VAE decodes per image."""
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        super().__init__(pipe, device)
        if pipe.vae is not None:  # None: a training-only load (``from_pretrained(..., vae=None)``)
            pipe.vae.enable_slicing()
        self._schedule = FlowMatchSchedule.from_scheduler_config(pipe.scheduler.config)
        self._guidance = DEFAULT_GUIDANCE

    # ---- the tiny variant ------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """A FLUX.1-dev-shaped pipeline: a 32-wide CLIP (pooled), a 2-layer T5 (width 32, 16 text
        positions), a transformer with one double-stream and one single-stream block (2 heads of 16,
        3-axis rotary 4 / 6 / 6, guidance embedding), a two-level VAE without quant convs (factor 2,
        a shift factor, its decoder fitted briefly so that decoded colour follows the latents) and
        the release's dynamic-shift scheduler."""
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

        from mpo.backbones.tiny import clip_tokenizer, t5_tokenizer, tiny_flow_vae, tiny_t5_config

        tokenizer = clip_tokenizer()
        tokenizer_2 = t5_tokenizer(16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    max_position_embeddings=77,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
            text_encoder_2 = T5EncoderModel(tiny_t5_config(tokenizer_2))
            transformer = FluxTransformer2DModel(
                patch_size=1,
                in_channels=4 * 4,  # 4 latent channels x a 2 x 2 patch
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),  # sums to the head dim, as (16, 56, 56) does to 128
            )
            vae = tiny_flow_vae(cls.tiny_size["height"], shift_factor=0.1159, seed=seed)
        scheduler = FlowMatchEulerDiscreteScheduler(  # the released FLUX.1-dev scheduler config
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )

    @property
    def lora_target_modules(self) -> list[str]:
        """Both streams of the double-stream blocks' attention (image: to_*, text: add_*_proj /
        to_add_out) and the single-stream blocks' q / k / v (diffusers' FLUX LoRA attention set)."""
        return ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

    # ---- conditioning ----------------------------------------------------------------------------
    @property
    def negative_prompt(self) -> str | None:
        return None  # guidance is an input of the transformer (dev) or absent (schnell)

    @property
    def max_text_length(self) -> int:
        return min(MAX_TEXT_LENGTH, self._pipe.tokenizer_2.model_max_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Embeddings:
        embeds, pooled, _ = self._pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self._device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_text_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def use_generation_settings(self, gen: GenerateConfig) -> None:
        """Keep the embedded guidance scale, and train with the shift the pipeline samples this
        resolution with (dynamic-shift schedulers)."""
        self._guidance = float(gen.guidance_scale)
        config = self._pipe.scheduler.config
        if config.get("use_dynamic_shifting", False):
            _, height, width = self.latent_shape(gen)
            mu = calculate_shift(
                (height // 2) * (width // 2),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
            self._schedule = FlowMatchSchedule(config.num_train_timesteps, shift=math.exp(mu))

    # ---- latents -----------------------------------------------------------------------------------
    def latent_shape(self, gen: GenerateConfig) -> tuple[int, ...]:
        multiple = self.vae_scale_factor * 2
        for key in ("height", "width"):
            if getattr(gen, key) % multiple:
                raise ValueError(
                    f"generate.{key}={getattr(gen, key)} must be a multiple of {multiple} (VAE factor "
                    f"{self.vae_scale_factor} x 2 x 2 packing)"
                )
        factor = self.vae_scale_factor
        return (self._pipe.transformer.config.in_channels // 4, gen.height // factor, gen.width // factor)

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self._pipe._pack_latents(latents, b, c, h, w)

    def _unpack(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        factor = self.vae_scale_factor
        return self._pipe._unpack_latents(packed, height * factor, width * factor, factor)

    @torch.no_grad()
    def sample(
        self, embeds: Embeddings, negative: Embeddings, noise: torch.Tensor, gen: GenerateConfig
    ) -> torch.Tensor:
        """The pipeline's sampler with embedded guidance (``negative`` is empty and unused)."""
        _, _, height, width = noise.shape
        # sigma_max = 1: the latents are the noise, packed into the transformer's tokens.
        packed = self.run_pipeline(
            embeds,
            {},
            self._pack(noise.to(self._device, self.denoiser.dtype)),
            gen,
            height=height * self.vae_scale_factor,
            width=width * self.vae_scale_factor,
        )
        return self._unpack(packed, height, width)

    # ---- training ---------------------------------------------------------------------------------
    def call_denoiser(
        self, denoiser: nn.Module, noisy: torch.Tensor, model_timesteps: torch.Tensor, embeds: Embeddings
    ) -> torch.Tensor:
        """The transformer call of the pipeline's loop, on packed latents, with its position ids and
        embedded guidance; the prediction is unpacked to the stored layout."""
        batch, _, height, width = noisy.shape
        text = embeds["prompt_embeds"]
        guidance = None
        if self._pipe.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self._guidance, device=noisy.device, dtype=torch.float32)
        packed = denoiser(
            hidden_states=self._pack(noisy),
            timestep=model_timesteps.to(noisy.dtype) / 1000,
            guidance=guidance,
            pooled_projections=embeds["pooled_prompt_embeds"].to(noisy.dtype),
            encoder_hidden_states=text.to(noisy.dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=self._pipe._prepare_latent_image_ids(
                batch, height // 2, width // 2, noisy.device, noisy.dtype
            ),
            return_dict=False,
        )[0]
        return self._unpack(packed, height, width)
