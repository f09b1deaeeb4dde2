"""CogVideoX (2B / 5B / 1.5): T5 text encoder, 3D causal VAE, v-prediction, 3D rotary embeddings.

Everything goes through diffusers' :class:`~diffusers.CogVideoXPipeline`: loading, prompt encoding,
the rotary position embeddings and the sampling loop are the pipeline's own, so this adapter agrees
with what users of the released checkpoints run.

Conventions that the generate and train stages rely on
- Conditioning is ``{"prompt_embeds": [B, L, 4096]}`` with L = the transformer's
  ``max_text_seq_length`` (226 for the released models); the empty prompt's embedding is the
  unconditional branch, as in the pipeline.
- Latents are ``[B, F, C, h, w]`` (frames before channels, the transformer's layout), already
  multiplied by the VAE scaling factor. F = (num_frames - 1) / temporal compression + 1.
- The rotary embeddings are rebuilt from the latent size in ``sample`` and ``predict`` alike (cached
  per size), so the training step sees the positions the candidates were generated with.
- The training schedule is the checkpoint's CogVideoXDDIMScheduler (SNR-shifted, zero terminal
  SNR): ``add_noise`` and the v-target ``alpha_t * noise - sigma_t * x0`` come from its
  ``alphas_cumprod``. Sampling uses the same scheduler, deterministic (eta = 0); the DPM variant of
  the CogVideoX scheduler is stochastic and is replaced by DDIM built from the same config.

Departure from the official inference script: classifier-free guidance has a constant scale
(``use_dynamic_cfg=False``): the dynamic schedule goes with the DPM sampler, not with DDIM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline
from torch import nn

from mpo.backbones.base import Embeddings, VideoPipelineBackbone
from mpo.backbones.registry import register_backbone
from mpo.backbones.schedules import DDPMSchedule
from mpo.sampling import SCHEDULER_ALIASES, SamplingSupport

if TYPE_CHECKING:
    from mpo.schema import GenerateConfig

# Every released CogVideoX VAE compresses time by 4, space by 8, and the transformers use 2 x 2
# patches: the recipe check runs before any model is loaded, so it uses these; latent_shape()
# re-checks against the loaded model's own config.
TEMPORAL_COMPRESSION = 4
SPATIAL_MULTIPLE = 8 * 2


@register_backbone("cogvideox")
class CogVideoXBackbone(VideoPipelineBackbone):
    pipeline_class = CogVideoXPipeline
    denoiser_attr = "transformer"
    schedule_class = DDPMSchedule
    size_multiple: ClassVar[int] = SPATIAL_MULTIPLE
    size_reason: ClassVar[str] = "VAE factor 8 x patch size 2"
    size_example: ClassVar[str] = "480 x 720"
    frame_compression: ClassVar[int | None] = TEMPORAL_COMPRESSION
    channel_dim: ClassVar[int] = 1  # latents are [F, C, h, w]
    # The tiny VAE compresses space by 4 and time by 4: 3 latent frames of 8 x 8.
    tiny_size: ClassVar[dict[str, int]] = {"height": 32, "width": 32, "num_frames": 9}
    tiny_pretrain_steps: ClassVar[int] = 150
    # ddim is the CogVideoX variant (the trailing, SNR-shifted schedule it was trained on). The
    # transformer supports diffusers' cache hooks; FasterCache reads its [B, F, C, H, W] latents.
    sampling_support: ClassVar[SamplingSupport] = SamplingSupport(
        schedulers={**SCHEDULER_ALIASES, "ddim": ("CogVideoXDDIMScheduler", {})},
        caches={
            "first_block": {"threshold": 0.05},
            "faster": {"tensor_format": "BFCHW"},
            "pab": {"spatial_attention_block_skip_range": 2},
        },
        compile_blocks=("CogVideoXBlock",),
    )

    def __init__(self, pipe: CogVideoXPipeline, device: torch.device | str = "cpu") -> None:
        """Sampling with DDIM (deterministic); the VAE decodes in slices and tiles."""
        if not isinstance(pipe.scheduler, CogVideoXDDIMScheduler):
            pipe.scheduler = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)
        super().__init__(pipe, device)
        # Decode one video at a time, in spatial tiles when larger than the VAE's tile size, as the
        # official inference does: the 3D VAE is what runs out of memory at 49 x 480 x 720.
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
        # The checkpoint's own alphas (SNR-shifted, zero terminal SNR) and v-target.
        self._schedule = DDPMSchedule(CogVideoXDDIMScheduler.from_config(pipe.scheduler.config))
        self._rotary: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- the tiny variant ------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """A CogVideoX pipeline: a 2-layer T5 (width 32, 16 text positions), a 2-layer transformer with
        3D rotary embeddings (2 heads of 16), and a 3-level causal 3D VAE (space x4, time x4)."""
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
        from transformers import T5EncoderModel

        from mpo.backbones.tiny import t5_tokenizer, tiny_t5_config

        text_length = 16
        tokenizer = t5_tokenizer(text_length)
        latent_size = cls.tiny_size["height"] // 4
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = T5EncoderModel(tiny_t5_config(tokenizer))
            transformer = CogVideoXTransformer3DModel(
                num_attention_heads=2,
                attention_head_dim=16,  # split 4 / 6 / 6 between time, height and width by the 3D rotary
                in_channels=4,
                out_channels=4,
                time_embed_dim=32,
                text_embed_dim=32,
                num_layers=2,
                sample_width=latent_size,
                sample_height=latent_size,
                sample_frames=cls.tiny_size["num_frames"],
                patch_size=2,
                temporal_compression_ratio=4,
                max_text_seq_length=text_length,
                use_rotary_positional_embeddings=True,
            )
            vae = AutoencoderKLCogVideoX(
                in_channels=3,
                out_channels=3,
                down_block_types=("CogVideoXDownBlock3D",) * 3,
                up_block_types=("CogVideoXUpBlock3D",) * 3,
                block_out_channels=(16, 32, 32),
                latent_channels=4,
                layers_per_block=1,
                norm_num_groups=4,
                temporal_compression_ratio=4,
                # Tiling starts above half this size: the tiny videos are decoded whole.
                sample_height=2 * cls.tiny_size["height"],
                sample_width=2 * cls.tiny_size["width"],
                scaling_factor=1.15258426,
            )
        scheduler = CogVideoXDDIMScheduler(  # the released 2B / 5B scheduler config
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=True,
            steps_offset=0,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            rescale_betas_zero_snr=True,
            snr_shift_scale=3.0,
        )
        return CogVideoXPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )

    # ---- conditioning ----------------------------------------------------------------------------
    @property
    def max_text_length(self) -> int:
        return self._pipe.transformer.config.max_text_seq_length

    # ---- latents -----------------------------------------------------------------------------------
    def latent_shape(self, gen: GenerateConfig) -> tuple[int, ...]:
        pipe = self._pipe
        temporal, spatial = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        config = pipe.transformer.config
        frames = self.latent_frames(gen)
        if config.patch_size_t is not None and frames % config.patch_size_t:
            good = (frames + config.patch_size_t - frames % config.patch_size_t - 1) * temporal + 1
            raise ValueError(
                f"generate.num_frames={gen.num_frames} gives {frames} latent frames, not a multiple of the "
                f"transformer's temporal patch size {config.patch_size_t}; use e.g. {good}"
            )
        for key in ("height", "width"):
            if getattr(gen, key) % (spatial * config.patch_size):
                raise ValueError(
                    f"generate.{key}={getattr(gen, key)} must be a multiple of {spatial * config.patch_size} "
                    f"(VAE factor {spatial} x patch size {config.patch_size})"
                )
        return (frames, config.in_channels, gen.height // spatial, gen.width // spatial)

    def _rotary_embeddings(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pipeline's 3D rotary (cos, sin) tables for this latent size, or None without rotary."""
        if not self._pipe.transformer.config.use_rotary_positional_embeddings:
            return None
        frames, height, width = latents.shape[1], latents.shape[-2], latents.shape[-1]
        key = (frames, height, width, latents.device)
        if key not in self._rotary:
            spatial = self._pipe.vae_scale_factor_spatial
            self._rotary[key] = self._pipe._prepare_rotary_positional_embeddings(
                height * spatial, width * spatial, frames, latents.device
            )
        return self._rotary[key]

    @torch.no_grad()
    def sample(
        self, embeds: Embeddings, negative: Embeddings, noise: torch.Tensor, gen: GenerateConfig
    ) -> torch.Tensor:
        spatial, temporal = self._pipe.vae_scale_factor_spatial, self._pipe.vae_scale_factor_temporal
        # [B, F, C, h, w] unit noise: prepare_latents multiplies by init_noise_sigma itself.
        return self.run_pipeline(
            embeds,
            negative,
            noise.to(self._device, self.denoiser.dtype),
            gen,
            height=noise.shape[-2] * spatial,
            width=noise.shape[-1] * spatial,
            num_frames=(noise.shape[1] - 1) * temporal + 1,
            use_dynamic_cfg=False,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._pipe.vae
        latents = latents.to(self._device, vae.dtype).permute(0, 2, 1, 3, 4)  # -> [B, C, F, h, w]
        video = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]  # [B, 3, T, H, W]
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)

    # ---- training ---------------------------------------------------------------------------------
    def call_denoiser(
        self, denoiser: nn.Module, noisy: torch.Tensor, model_timesteps: torch.Tensor, embeds: Embeddings
    ) -> torch.Tensor:
        """The transformer call of the pipeline's loop (DDIM's scale_model_input is the identity)."""
        return denoiser(
            hidden_states=noisy,
            encoder_hidden_states=embeds["prompt_embeds"].to(noisy.dtype),
            timestep=model_timesteps,
            image_rotary_emb=self._rotary_embeddings(noisy),
            return_dict=False,
        )[0]
