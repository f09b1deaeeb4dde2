"""Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo): three text encoders, the joint (MM-DiT)
transformer, flow matching.

Everything goes through diffusers' :class:`~diffusers.StableDiffusion3Pipeline`
(``stabilityai/stable-diffusion-3.5-medium``, ``-large``): loading, the three-encoder prompt encoding
and the flow-matching Euler sampler are the pipeline's, so this adapter samples what users of the
releases sample.

Conventions that the generate and train stages rely on
- Conditioning is ``{"prompt_embeds": [B, 77 + L, 4096], "pooled_prompt_embeds": [B, 2048]}``: the two
  CLIP encoders' penultimate states side by side, zero-padded to the T5 width, then T5-XXL's L = 256
  tokens (the pipeline's default length); the pooled outputs of both CLIPs. The negative prompt is
  the empty one, encoded by all three encoders, as the pipeline does.
- Latents are ``[B, 16, H/8, W/8]``, ``(z - shift_factor) * scaling_factor`` of the VAE, as the
  transformer sees them.
- Training is rectified flow with the scheduler's ``shift`` (3.0 for SD3.5); the transformer receives
  ``sigma * 1000``, as the pipeline's sampler passes its timesteps.

Departure from the model card: skip-layer guidance (SD3.5 Medium's optional ``skip_guidance_layers``)
is not used; sampling is plain classifier-free guidance, the pipeline's default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from torch import nn

from mpo.backbones.base import Embeddings, ImagePipelineBackbone
from mpo.backbones.registry import register_backbone
from mpo.backbones.schedules import FlowMatchSchedule
from mpo.sampling import FLOW_RENAMED, FLOW_SCHEDULER_ALIASES, SamplingSupport

if TYPE_CHECKING:
    from mpo.schema import GenerateConfig

# The released VAEs downsample by 8 and the transformers use 2 x 2 patches.
SPATIAL_MULTIPLE = 8 * 2
T5_LENGTH = 256  # the pipeline's default max_sequence_length


@register_backbone("sd3")
class SD3Backbone(ImagePipelineBackbone):
    pipeline_class = StableDiffusion3Pipeline
    denoiser_attr = "transformer"
    no_comfyui_lora_reason: ClassVar[str] = (
        "ComfyUI loads the diffusers file, transformer.* keys, as it is; diffusers reads no other SD3 layout"
    )
    # The joint transformer has no diffusers cache hooks; its blocks compile one by one.
    sampling_support: ClassVar[SamplingSupport] = SamplingSupport(
        schedulers=FLOW_SCHEDULER_ALIASES, renamed=FLOW_RENAMED, compile_blocks=("JointTransformerBlock",)
    )
    schedule_class = FlowMatchSchedule
    size_multiple: ClassVar[int] = SPATIAL_MULTIPLE
    size_reason: ClassVar[str] = "VAE factor 8 x patch size 2"
    # The tiny VAE downsamples by 2: 16 x 16 pixels are 8 x 8 latents, 16 patches of 2 x 2.
    tiny_size: ClassVar[dict[str, int]] = {"height": 16, "width": 16}
    tiny_pretrain_steps: ClassVar[int] = 200

    def __init__(self, pipe: StableDiffusion3Pipeline, device: torch.device | str = "cpu") -> None:
        """Sampling with the flow-matching Euler sampler (deterministic); the VAE decodes per image."""
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        super().__init__(pipe, device)
        if pipe.vae is not None:  # None: a training-only load (``from_pretrained(..., vae=None)``)
            pipe.vae.enable_slicing()
        self._schedule = FlowMatchSchedule.from_scheduler_config(pipe.scheduler.config)

    # ---- the tiny variant ------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """An SD3.5-shaped pipeline: two 16-wide CLIP encoders with projections, a 2-layer T5 (width 32,
        16 text positions), a 2-layer MM-DiT with SD3.5 Medium's dual attention in its first block and
        RMS q/k norms (2 heads of 8), and a two-level VAE without quant convs (factor 2, a shift
        factor, its decoder fitted briefly so that decoded colour follows the latents)."""
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel

        from mpo.backbones.tiny import clip_tokenizer, t5_tokenizer, tiny_flow_vae, tiny_t5_config

        tokenizer = clip_tokenizer()
        t5_length = 16
        tokenizer_3 = t5_tokenizer(t5_length)
        clip = {
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,  # SD3 reads the penultimate hidden state
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "projection_dim": 16,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
            # Width 32 = the two CLIP widths side by side, as 4096 >= 768 + 1280 in the release.
            text_encoder_3 = T5EncoderModel(tiny_t5_config(tokenizer_3))
            transformer = SD3Transformer2DModel(
                sample_size=cls.tiny_size["height"] // 2,
                patch_size=2,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=32,
                caption_projection_dim=16,  # = heads x head dim
                pooled_projection_dim=32,  # the two CLIP projections side by side
                pos_embed_max_size=16,
                dual_attention_layers=(0,),
                qk_norm="rms_norm",
            )
            vae = tiny_flow_vae(cls.tiny_size["height"], shift_factor=0.0609, seed=seed)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # the release's
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )

    @property
    def lora_target_modules(self) -> list[str]:
        """Both streams of every joint attention (image: to_*, text: add_*_proj / to_add_out), and the
        second attention of SD3.5 Medium's dual-attention blocks; diffusers' SD3 LoRA defaults."""
        return ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

    # ---- conditioning ----------------------------------------------------------------------------
    @property
    def max_text_length(self) -> int:
        tokenizer = self._pipe.tokenizer_3
        return T5_LENGTH if tokenizer is None else min(T5_LENGTH, tokenizer.model_max_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Embeddings:
        embeds, _, pooled, _ = self._pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self._device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_text_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    # ---- latents -----------------------------------------------------------------------------------
    def latent_shape(self, gen: GenerateConfig) -> tuple[int, ...]:
        multiple = self.vae_scale_factor * self._pipe.patch_size
        for key in ("height", "width"):
            if getattr(gen, key) % multiple:
                raise ValueError(
                    f"generate.{key}={getattr(gen, key)} must be a multiple of {multiple} (VAE factor "
                    f"{self.vae_scale_factor} x patch size {self._pipe.patch_size})"
                )
        factor = self.vae_scale_factor
        return (self._pipe.transformer.config.in_channels, gen.height // factor, gen.width // factor)

    # ---- training ---------------------------------------------------------------------------------
    def call_denoiser(
        self, denoiser: nn.Module, noisy: torch.Tensor, model_timesteps: torch.Tensor, embeds: Embeddings
    ) -> torch.Tensor:
        """The transformer call of the pipeline's loop (the Euler sampler does not rescale inputs)."""
        return denoiser(
            hidden_states=noisy,
            timestep=model_timesteps,
            encoder_hidden_states=embeds["prompt_embeds"].to(noisy.dtype),
            pooled_projections=embeds["pooled_prompt_embeds"].to(noisy.dtype),
            return_dict=False,
        )[0]
