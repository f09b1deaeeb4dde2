"""Wan 2.1 / 2.2 text-to-video: UMT5 text encoder, Wan 3D causal VAE, flow-matching transformer.

Everything goes through diffusers' :class:`~diffusers.WanPipeline` (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``,
``Wan2.1-T2V-14B``, ``Wan2.2-T2V-A14B``, ``Wan2.2-TI2V-5B``): loading, prompt encoding (with the
pipeline's own prompt cleaning), the sampler (the release's UniPC with flow sigmas) and the two-expert
switch of A14B are the pipeline's, so this adapter samples what users of the releases sample.

Conventions that the generate and train stages rely on
- Conditioning is ``{"prompt_embeds": [B, L, 4096]}``, L = 512 (the release's text length; the
  tokenizer's maximum when that is shorter), zero past each prompt's own tokens as in the pipeline.
  The negative prompt is the empty one (the pipeline's default when none is given).
- Latents are ``[B, C, F, h, w]`` (channels before frames, the transformer's layout), normalised with
  the VAE's per-channel ``latents_mean`` / ``latents_std`` as the pipeline does before decoding.
  F = (num_frames - 1) / 4 + 1, h, w = size / 8 (Wan 2.2 TI2V-5B: / 16).
- Training is rectified flow (:class:`~mpo.backbones.schedules.FlowMatchSchedule`) with the scheduler's
  ``flow_shift`` (3.0 for the 480p releases); the transformer receives ``sigma * 1000`` as the
  pipeline's sampler passes its timesteps (TI2V-5B, ``expand_timesteps``: one per latent token).
- Two experts (Wan 2.2 A14B): the pipeline samples with ``transformer`` at timesteps at or above the
  boundary (``boundary_ratio * 1000``, high noise) and ``transformer_2`` below it. A run trains the
  expert ``model.expert`` names (``high_noise`` or ``low_noise``; required for such a checkpoint) and
  draws its training timesteps from that expert's side of the boundary only, where it is the one that
  samples; both experts are two runs on the same candidates. The low-noise expert's LoRA is saved the
  way diffusers' Wan 2.2 LoRAs are (``transformer.`` keys) and loads back with
  ``pipe.load_lora_weights(folder, load_into_transformer_2=True)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from diffusers import UniPCMultistepScheduler, WanPipeline
from torch import nn

from mpo.backbones.base import Embeddings, VideoPipelineBackbone, load_pipeline
from mpo.backbones.registry import register_backbone
from mpo.backbones.schedules import FlowMatchSchedule, TimestepSampler
from mpo.sampling import FLOW_TRANSFORMER_SUPPORT, SamplingSupport

if TYPE_CHECKING:
    from mpo.schema import GenerateConfig, ModelConfig, TrainConfig

# Every Wan VAE compresses time by 4; space by 8 (2.1, 2.2 A14B) or 16 (2.2 TI2V-5B), and the
# transformers use 1 x 2 x 2 patches. The recipe check runs before any model is loaded, so it uses
# the smaller multiple; latent_shape() re-checks against the loaded model's own config.
TEMPORAL_COMPRESSION = 4
SPATIAL_MULTIPLE = 8 * 2
MAX_TEXT_LENGTH = 512
# Samplers whose step() is a deterministic function of (model output, t, sample); anything else is
# replaced by the release's UniPC built from the same config.
_DETERMINISTIC_SCHEDULERS = {
    "UniPCMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
}
# model.expert -> the pipeline component it names (Wan 2.2 A14B: high noise first, as the pipeline).
EXPERTS = {"high_noise": "transformer", "low_noise": "transformer_2"}


@register_backbone("wan")
class WanBackbone(VideoPipelineBackbone):
    pipeline_class = WanPipeline
    denoiser_attr = "transformer"
    comfyui_lora: ClassVar[dict[str, str] | None] = {  # musubi-tuner's modelspec id for every Wan
        "layout": "wan",
        "architecture": "wan2.1/lora",
        "implementation": "https://github.com/Wan-Video/Wan2.1",
        "tools": "ComfyUI",
    }
    sampling_support: ClassVar[SamplingSupport] = FLOW_TRANSFORMER_SUPPORT
    schedule_class = FlowMatchSchedule
    size_multiple: ClassVar[int] = SPATIAL_MULTIPLE
    size_reason: ClassVar[str] = "VAE factor 8 x patch size 2"
    size_example: ClassVar[str] = "480 x 832"
    frame_compression: ClassVar[int | None] = TEMPORAL_COMPRESSION
    frames_example: ClassVar[int] = 81
    channel_dim: ClassVar[int] = 0  # latents are [C, F, h, w]
    # The tiny VAE compresses space by 4 and time by 4: 3 latent frames of 8 x 8.
    tiny_size: ClassVar[dict[str, int]] = {"height": 32, "width": 32, "num_frames": 9}
    tiny_pretrain_steps: ClassVar[int] = 150
    experts: ClassVar[tuple[str, ...]] = tuple(EXPERTS)

    def __init__(
        self, pipe: WanPipeline, device: torch.device | str = "cpu", expert: str | None = None
    ) -> None:
        """A stochastic sampler is replaced by UniPC; the VAE decodes per video, in tiles when large.
        ``expert`` picks the trained transformer of a two-expert model (default: the high-noise one)."""
        expert = expert or "high_noise"
        if expert not in EXPERTS:
            raise ValueError(f"model.expert={expert!r}: must be one of {list(EXPERTS)}")
        if expert == "low_noise" and not self.has_two_experts(pipe):
            raise ValueError(
                "model.expert='low_noise' needs a two-expert Wan 2.2 checkpoint (transformer_2 and "
                "boundary_ratio); this one has a single transformer"
            )
        self.expert = expert
        self.denoiser_attr = EXPERTS[expert]
        if pipe.scheduler.__class__.__name__ not in _DETERMINISTIC_SCHEDULERS:
            pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
        super().__init__(pipe, device)
        if pipe.vae is not None:  # None: a training-only load (``from_pretrained(..., vae=None)``)
            pipe.vae.enable_slicing()
            pipe.vae.enable_tiling()  # 81 x 480 x 832 decodes in spatial tiles, as the release's code does
        self._schedule = FlowMatchSchedule.from_scheduler_config(pipe.scheduler.config)

    @classmethod
    def load(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> WanBackbone:
        pipe = load_pipeline(cls.pipeline_class, cfg)
        if cls.has_two_experts(pipe) and cfg.expert is None:
            raise ValueError(
                f"model.path={cfg.path!r} is a two-expert Wan 2.2 model (transformer: high noise, "
                "transformer_2: low noise); set model.expert to the one this run trains: high_noise or low_noise"
            )
        return cls(pipe, device, cfg.expert)

    @staticmethod
    def has_two_experts(pipe: WanPipeline) -> bool:
        return (
            pipe.config.get("boundary_ratio") is not None and getattr(pipe, "transformer_2", None) is not None
        )

    # ---- the tiny variant ------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """A Wan pipeline: a 2-layer UMT5 (width 32, 16 text positions), a 2-layer transformer (2 heads
        of 16, 1 x 2 x 2 patches, 3D rotary) and a 3-level causal VAE (space x4, time x4, 4 latent
        channels with non-trivial normalisation statistics, its decoder fitted briefly so that decoded
        colour follows the latents), sampled with the release's UniPC."""
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from mpo.backbones.tiny import fit_tiny_decoder, t5_tokenizer, tiny_t5_config

        text_length = 16
        tokenizer = t5_tokenizer(text_length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = UMT5EncoderModel(tiny_t5_config(tokenizer, UMT5Config))
            transformer = WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=16,  # rotary: 8 for time, 4 each for height and width
                in_channels=4,
                out_channels=4,
                text_dim=32,
                freq_dim=32,
                ffn_dim=64,
                num_layers=2,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                rope_max_seq_len=64,
            )
            vae = AutoencoderKLWan(
                base_dim=8,
                z_dim=4,
                dim_mult=[1, 2, 2],
                num_res_blocks=1,
                attn_scales=[],
                temperal_downsample=[True, True],
                latents_mean=[0.1, -0.2, 0.3, 0.0],
                latents_std=[1.5, 0.8, 1.2, 1.0],
                scale_factor_temporal=4,
                scale_factor_spatial=4,
            )
            with torch.enable_grad():
                fit_tiny_decoder(vae, (4, 2, 4, 4), seed=seed)  # 5 frames of 16 x 16: seconds
        scheduler = UniPCMultistepScheduler(  # the released Wan 2.1 T2V scheduler config
            num_train_timesteps=1000,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
            timestep_spacing="linspace",
        )
        return WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )

    @property
    def lora_target_modules(self) -> list[str]:
        """Self- and cross-attention projections of every block (what the public Wan LoRAs adapt)."""
        return ["to_q", "to_k", "to_v", "to_out.0"]

    @property
    def lora_component(self) -> str:
        return "transformer"  # diffusers' Wan 2.2 layout: either expert's adapter has transformer. keys

    @property
    def lora_load_kwargs(self) -> dict[str, object]:
        return {"load_into_transformer_2": True} if self.expert == "low_noise" else {}

    # ---- conditioning ----------------------------------------------------------------------------
    @property
    def max_text_length(self) -> int:
        return min(MAX_TEXT_LENGTH, self._pipe.tokenizer.model_max_length)

    # ---- latents -----------------------------------------------------------------------------------
    def latent_shape(self, gen: GenerateConfig) -> tuple[int, ...]:
        pipe = self._pipe
        spatial, config = pipe.vae_scale_factor_spatial, pipe.transformer.config
        frames = self.latent_frames(gen)
        multiple = spatial * config.patch_size[1]
        for key in ("height", "width"):
            if getattr(gen, key) % multiple:
                raise ValueError(
                    f"generate.{key}={getattr(gen, key)} must be a multiple of {multiple} "
                    f"(VAE factor {spatial} x patch size {config.patch_size[1]})"
                )
        return (config.in_channels, frames, gen.height // spatial, gen.width // spatial)

    @torch.no_grad()
    def sample(
        self, embeds: Embeddings, negative: Embeddings, noise: torch.Tensor, gen: GenerateConfig
    ) -> torch.Tensor:
        spatial, temporal = self._pipe.vae_scale_factor_spatial, self._pipe.vae_scale_factor_temporal
        # [B, C, F, h, w] unit noise in float32, as the pipeline draws its own.
        return self.run_pipeline(
            embeds,
            negative,
            noise.to(self._device, torch.float32),
            gen,
            height=noise.shape[-2] * spatial,
            width=noise.shape[-1] * spatial,
            num_frames=(noise.shape[2] - 1) * temporal + 1,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._pipe.vae
        latents = latents.to(self._device, vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        video = vae.decode(latents * std + mean, return_dict=False)[0]  # [B, 3, T, H, W]
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)

    # ---- training ---------------------------------------------------------------------------------
    def timestep_sampler(self, train: TrainConfig) -> TimestepSampler:
        """Two experts: only the trained expert's side of the boundary, where it is the one that samples."""
        if not self.has_two_experts(self._pipe):
            return self._schedule.timestep_sampler(train)
        n = self._schedule.num_train_timesteps
        boundary = self._pipe.config.boundary_ratio * n  # the pipeline runs `transformer` for t >= boundary
        first = int((self._schedule.model_timesteps(torch.arange(n)) >= boundary).nonzero()[0])
        bounds = (first, n) if self.expert == "high_noise" else (0, first)
        return self._schedule.timestep_sampler(train, bounds=bounds)

    def call_denoiser(
        self, denoiser: nn.Module, noisy: torch.Tensor, model_timesteps: torch.Tensor, embeds: Embeddings
    ) -> torch.Tensor:
        """The transformer call of the pipeline's loop (its sampler does not rescale the input)."""
        timestep = model_timesteps
        if self._pipe.config.get("expand_timesteps", False):  # Wan 2.2 TI2V: a timestep per token
            _, p_h, p_w = self._pipe.transformer.config.patch_size
            tokens = noisy.shape[2] * (noisy.shape[3] // p_h) * (noisy.shape[4] // p_w)
            timestep = timestep[:, None].expand(-1, tokens)
        return denoiser(
            hidden_states=noisy,
            timestep=timestep,
            encoder_hidden_states=embeds["prompt_embeds"].to(noisy.dtype),
            return_dict=False,
        )[0]
