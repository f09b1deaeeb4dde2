"""The one interface the generic stages call; everything model-specific lives behind it.

generate, score, train, evaluate and export never branch on a model family: they call these methods.
A new family (Wan, SD3, FLUX, or one in a user's own package) is one file implementing
:class:`Backbone` with ``@register_backbone("name")`` (see :mod:`mpo.backbones.registry`), and a
recipe. This module imports no family and builds no tiny model.

Tensor conventions
- Prompt embeddings are a ``dict[str, Tensor]``, batch first, so that one prompt's row can be cached
  in a safetensors shard and batches can be rebuilt by concatenation.
- Latents are ``[B, *latent_shape]`` in the family's own layout (SDXL: ``[C, h, w]``; CogVideoX:
  ``[F, C, h, w]``; Wan: ``[C, F, h, w]``), already normalised as the denoiser sees them at t = 0.
- Decoded pixels are float in [0, 1]: images ``[B, 3, H, W]``, videos ``[B, T, 3, H, W]``.
- Training timesteps are integer indices into the training schedule, ``[B]``, larger = noisier
  (:mod:`mpo.backbones.schedules`); :meth:`Backbone.call_denoiser` takes the timestep the pipeline's
  own loop passes instead (DDPM: the same integers; flow matching: ``sigma * 1000``).

Hooks with defaults, for what differs between families without the generic code knowing: the negative
prompt (or none, e.g. FLUX.1's embedded guidance), the generation settings a training forward must
repeat, timestep sampling and the per-sample loss weight (both the schedule's).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from mpo.backbones.schedules import PredictionType, TimestepSampler, TrainingSchedule
from mpo.sampling import (
    SamplingSettings,
    SamplingState,
    SamplingSupport,
    attention_kernel,
    channels_last_input,
    check_sampling,
    reset_cache,
)

if TYPE_CHECKING:
    from mpo.schema import GenerateConfig, ModelConfig, TrainConfig

__all__ = [
    "Backbone",
    "DiffusersBackbone",
    "Embeddings",
    "ImagePipelineBackbone",
    "ModelPathError",
    "PredictionType",
    "VideoPipelineBackbone",
]


class ModelPathError(ValueError):
    """``model.path`` names no loadable model of the family; the message says what was found."""


Embeddings = dict[str, torch.Tensor]


class Backbone(ABC):
    """A text-to-image or text-to-video diffusion model, seen by the generic loop."""

    family: ClassVar[str]  # set by @register_backbone
    modality: ClassVar[Literal["image", "video"]]
    # The kohya / ComfyUI LoRA convention of this family's denoiser (mpo.lora_formats): {"layout":
    # a layout name, "architecture": the modelspec id, "implementation": the original code's URL,
    # "tools": what loads it (the model card says)}; None where there is none.
    comfyui_lora: ClassVar[dict[str, str] | None] = None
    no_comfyui_lora_reason: ClassVar[str] = ""  # why there is none, where known (the refusal says)
    # The schedule kind the family trains with, known before any weight is loaded (recipe checks).
    schedule_class: ClassVar[type[TrainingSchedule] | None] = None
    channel_dim: ClassVar[int] = 0  # the channel axis of one latent ([C, h, w]: 0; [F, C, h, w]: 1)
    # Names ``model.expert`` may take (a model with several denoisers, e.g. Wan 2.2 A14B); () for one.
    experts: ClassVar[tuple[str, ...]] = ()
    # generate.* keys the training forward depends on (what use_generation_settings keeps): part of
    # what a precomputed reference's errors depend on.
    training_generation_keys: ClassVar[tuple[str, ...]] = ()
    # generate.* sizes of the tiny variant (what its denoiser was pretrained at); None: no tiny variant.
    tiny_size: ClassVar[dict[str, int] | None] = None

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> Backbone:
        """Load from ``cfg.path`` (local folder or hub id) with ``from_pretrained``."""

    @classmethod
    def build_tiny(cls, path: str | Path) -> Path:
        """Build the family's tiny random-initialised variant and save it at ``path`` in the release's
        own layout, for ``model.tiny: true`` (called by the registry, never by :meth:`load`)."""
        raise NotImplementedError(f"model.family={cls.family!r} has no tiny variant (model.tiny=true)")

    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The network that DPO trains (UNet or transformer)."""

    @abstractmethod
    def set_denoiser(self, module: nn.Module) -> None:
        """Swap in a (trained / wrapped) denoiser, e.g. for eval sampling or export."""

    @property
    def lora_target_modules(self) -> list[str]:
        """Default module names that receive LoRA adapters."""
        return ["to_q", "to_k", "to_v", "to_out.0"]

    @property
    def lora_component(self) -> str | None:
        """The pipeline component the saved LoRA keys are prefixed with (None: the one holding the
        denoiser; Wan 2.2's low-noise expert is saved under ``transformer``, as diffusers does)."""
        return None

    @property
    def lora_load_kwargs(self) -> dict[str, object]:
        """What ``pipe.load_lora_weights`` needs to put this denoiser's adapter back."""
        return {}

    @classmethod
    def check_model_config(cls, model: ModelConfig) -> list[tuple[str, str]]:
        """Family-specific checks of the model section; by default that ``model.expert`` names one of
        the family's denoisers (or is unset)."""
        expert = getattr(model, "expert", None)
        if expert is not None and expert not in cls.experts:
            allowed = (
                f"one of {list(cls.experts)} or null" if cls.experts else "null: this family has one denoiser"
            )
            return [("model.expert", f"must be {allowed}")]
        return []

    @classmethod
    def check_generate_config(cls, gen: GenerateConfig) -> list[tuple[str, str]]:
        """Family-specific checks of the generate section, as (key, message) pairs; the recipe loader
        turns them into one error naming the key, the value and what is allowed."""
        return []

    @classmethod
    def check_train_config(cls, train: TrainConfig) -> list[tuple[str, str]]:
        """Family-specific checks of the train section; by default that ``train.loss_weighting`` is
        one the family's schedule defines."""
        scheme = getattr(train, "loss_weighting", "none")
        allowed = cls.schedule_class.loss_weightings if cls.schedule_class is not None else ("none",)
        if scheme not in allowed:
            kind = cls.schedule_class.__name__ if cls.schedule_class is not None else "schedule"
            return [
                (
                    "train.loss_weighting",
                    f"is not defined for this family's {kind}; it supports {list(allowed)}",
                )
            ]
        return []

    # ---- conditioning ----------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Embeddings:
        """Text encoders on a batch of prompts. The result is cached: the training step never runs
        a text encoder."""

    @property
    def negative_prompt(self) -> str | None:
        """The unconditional branch of classifier-free guidance (the empty prompt), or None for a
        family that samples without one (FLUX.1's guidance is an input of the transformer)."""
        return ""

    def encode_negative(self) -> Embeddings:
        """The cached negative prompt's embeddings (one row); empty when there is no negative."""
        prompt = self.negative_prompt
        return {} if prompt is None else self.encode_prompts([prompt])

    def use_generation_settings(self, gen: GenerateConfig) -> None:
        """The generate settings the candidates were made with, given to the trainer's backbone
        before the first step: a family whose denoiser is conditioned on one of them (FLUX.1-dev's
        embedded guidance scale) repeats it in every training forward. Default: nothing to keep."""
        return None

    # ---- latents -----------------------------------------------------------------------------------
    @abstractmethod
    def latent_shape(self, gen: GenerateConfig) -> tuple[int, ...]:
        """Per-sample latent shape for the requested resolution (and frames)."""

    @abstractmethod
    def sample(
        self, embeds: Embeddings, negative: Embeddings, noise: torch.Tensor, gen: GenerateConfig
    ) -> torch.Tensor:
        """Denoise ``noise`` ([B, *latent_shape], initial latents) to clean latents with the
        pipeline's own sampler and guidance (``negative`` is empty when :attr:`negative_prompt` is
        None). Deterministic given ``noise`` (no hidden random draws), so a candidate is fixed by its
        seed whatever the batch it is in."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to pixels in [0, 1] (images [B,3,H,W], videos [B,T,3,H,W])."""

    @classmethod
    def load_decoder(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> Backbone:
        """What the score stage needs: a backbone whose ``decode`` works. A family may load less than
        everything (the VAE alone); by default this is :meth:`load`."""
        return cls.load(cfg, device)

    # ---- training ---------------------------------------------------------------------------------
    @property
    @abstractmethod
    def schedule(self) -> TrainingSchedule:
        """The training noise schedule (built from the checkpoint's scheduler config)."""

    @property
    def prediction_type(self) -> PredictionType:
        """What the denoiser predicts: the training target (epsilon, v or flow velocity)."""
        return self.schedule.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0) of the training schedule."""
        return self.schedule.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Regression target for ``prediction_type`` (epsilon: noise; v: alpha*eps - sigma*x0; flow:
        noise - x0)."""
        return self.schedule.target(latents, noise, timesteps)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of the training schedule at ``timesteps`` (for SNR-based weights)."""
        return self.schedule.snr(timesteps)

    def loss_weight(
        self, timesteps: torch.Tensor, scheme: str = "none", gamma: float = 5.0
    ) -> torch.Tensor | None:
        """Per-pair weight ``omega_t`` of the squared errors at ``timesteps`` (``train.loss_weighting``,
        ``train.snr_gamma``), ``[B]`` float32, or None for a constant weight."""
        return self.schedule.loss_weight(timesteps, scheme, gamma)

    def timestep_sampler(self, train: TrainConfig) -> TimestepSampler:
        """How the trainer draws timesteps (``train.timestep_range`` / ``timestep_sampling``)."""
        return self.schedule.timestep_sampler(train)

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: Embeddings
    ) -> torch.Tensor:
        """One denoiser forward at training indices ``timesteps`` on cached embeddings (``denoiser``
        may be wrapped by accelerate)."""
        return self.call_denoiser(denoiser, noisy, self.schedule.model_timesteps(timesteps), embeds)

    @abstractmethod
    def call_denoiser(
        self, denoiser: nn.Module, noisy: torch.Tensor, model_timesteps: torch.Tensor, embeds: Embeddings
    ) -> torch.Tensor:
        """The denoiser call of the pipeline's own loop, at the timestep that loop passes."""

    # ---- export -----------------------------------------------------------------------------------
    @abstractmethod
    def pipeline(self):  # -> diffusers.DiffusionPipeline
        """The diffusers pipeline holding the current denoiser (for export / sampling by users)."""

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()

    def set_attention(self, kind: str) -> None:
        """SDPA is diffusers' default; 'xformers' switches to memory-efficient attention."""
        if kind == "xformers":
            self.denoiser.enable_xformers_memory_efficient_attention()


class DiffusersBackbone(Backbone):
    """What every diffusers-pipeline backbone shares: loading through ``from_pretrained``, the
    denoiser as a pipeline attribute, the tiny variant built from :meth:`tiny_pipeline`. A family sets
    ``pipeline_class`` and ``denoiser_attr``, builds ``self._schedule`` in its ``__init__``, and
    implements the conditioning, sampling and denoiser-call methods."""

    pipeline_class: ClassVar[type]
    denoiser_attr: str  # "unet" or "transformer" (a family may pick another per instance: transformer_2)
    tiny_pretrain_steps: ClassVar[int] = 100
    # Scheduler names, cache hooks and compile blocks this family offers (mpo.sampling).
    sampling_support: ClassVar[SamplingSupport] = SamplingSupport()
    # What generate.height / width / num_frames must be: a multiple of ``size_multiple`` (and why,
    # with a size the released model samples at); video: ``frame_compression``k + 1 frames.
    size_multiple: ClassVar[int] = 8
    size_reason: ClassVar[str] = "VAE factor 8"
    size_example: ClassVar[str] = "1024"
    frame_compression: ClassVar[int | None] = None
    frames_example: ClassVar[int] = 49

    def __init__(self, pipe, device: torch.device | str = "cpu") -> None:
        """Wrap a loaded pipeline: move it to ``device`` and freeze it.

        Every weight starts frozen and in eval mode; the trainer unfreezes (or adds LoRA to) what it
        trains and switches the denoiser to train mode itself. A family makes its sampler
        deterministic before calling this, and sets up its VAE and training schedule after.
        """
        pipe.to(device)
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval()
        pipe.set_progress_bar_config(disable=True)  # the stages draw their own progress bars
        self._pipe = pipe
        self._device = torch.device(device)
        self._sampling = SamplingState(pipe.scheduler)

    @classmethod
    def check_generate_config(cls, gen: GenerateConfig) -> list[tuple[str, str]]:
        """The sampling keys (scheduler, cache, compile) against what this family supports, and the
        sizes against what its VAE and patching accept."""
        problems = check_sampling(gen, cls.sampling_support)
        compression = cls.frame_compression
        if compression and (gen.num_frames < 1 or (gen.num_frames - 1) % compression):
            problems.append(
                (
                    "generate.num_frames",
                    f"must be {compression}k+1 (the VAE's temporal compression), e.g. {cls.frames_example}",
                )
            )
        for key in ("height", "width"):
            if getattr(gen, key) <= 0 or getattr(gen, key) % cls.size_multiple:
                problems.append(
                    (
                        f"generate.{key}",
                        f"must be a positive multiple of {cls.size_multiple} ({cls.size_reason}), e.g. "
                        f"{cls.size_example}",
                    )
                )
        return problems

    @contextmanager
    def sampling(self, gen: GenerateConfig) -> Iterator[None]:
        """The recipe's sampler around one pipeline call: its scheduler, cache hooks and compilation
        put on the pipeline (nothing to do when they are already there), the cache hooks' state
        cleared (every batch starts fresh, even after a call that an error cut short, which leaves
        the hooks holding another batch's tensors), and the attention kernel and input layout for
        the length of the call. A family's ``sample`` runs its pipeline inside this."""
        denoiser = self.denoiser
        settings = SamplingSettings.from_generate(gen)
        self._sampling.apply(
            settings, self._pipe, denoiser, self.sampling_support, lambda: self._pipe.current_timestep
        )
        reset_cache(denoiser)
        with (
            attention_kernel(settings.attention, self._device),
            channels_last_input(denoiser, settings.channels_last),
        ):
            yield

    def run_pipeline(
        self,
        embeds: Embeddings,
        negative: Embeddings,
        latents: torch.Tensor,
        gen: GenerateConfig,
        **extra: Any,
    ) -> torch.Tensor:
        """One sampling call of the family's pipeline, made the way every family makes it: each
        embedding ``<key>`` (and, where there is a negative prompt, ``negative_<key>``) repeated to
        the batch and cast to the denoiser's dtype; the recipe's steps and guidance; ``latents`` (the
        caller's seeded noise, in the layout and dtype its pipeline takes) as the initial latents;
        latents out. The generator is private and only stochastic schedulers would consult it (none
        is used here): the global RNG that training resumes stays untouched whatever the scheduler.
        ``extra``: the family's own arguments (sizes, frames)."""
        batch = latents.shape[0]
        dtype = self.denoiser.dtype
        kwargs = {k: v.to(self._device, dtype) for k, v in repeat_rows(embeds, batch, "embeds").items()}
        if negative:
            negative = repeat_rows(negative, batch, "negative")
            kwargs.update({f"negative_{k}": v.to(self._device, dtype) for k, v in negative.items()})
        with self.sampling(gen):
            return self._pipe(
                **kwargs,
                **extra,
                num_inference_steps=gen.num_inference_steps,
                guidance_scale=gen.guidance_scale,
                latents=latents,
                generator=torch.Generator(device="cpu").manual_seed(0),
                output_type="latent",
                return_dict=False,
            )[0]

    @classmethod
    def load(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> DiffusersBackbone:
        return cls(load_pipeline(cls.pipeline_class, cfg), device)

    @classmethod
    def load_decoder(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> DiffusersBackbone:
        """The pipeline with its VAE (and scheduler config) only: every other component is passed as
        None to ``from_pretrained``, so the denoiser and text encoders are never read from disk.
        ``decode`` is the very method of a full load, with the family's slicing / tiling."""
        modules, _ = cls.pipeline_class._get_signature_keys(cls.pipeline_class)
        skip = {name: None for name in modules if name not in ("vae", "scheduler")}
        return cls(load_pipeline(cls.pipeline_class, cfg, **skip), device)

    # ---- the tiny variant ------------------------------------------------------------------------
    @classmethod
    def tiny_pipeline(cls, seed: int = 0):
        """The family's tiny random-initialised pipeline, in memory (configs in code, local
        tokenizers); :meth:`build_tiny` pretrains and saves it."""
        raise NotImplementedError(f"model.family={cls.family!r} has no tiny variant (model.tiny=true)")

    @classmethod
    def build_tiny(cls, path: str | Path, pretrain_steps: int | None = None, seed: int = 0) -> Path:
        from mpo.backbones.tiny import build_tiny_pipeline

        steps = cls.tiny_pretrain_steps if pretrain_steps is None else pretrain_steps
        return build_tiny_pipeline(cls, path, steps, seed)

    # ---- the denoiser ------------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return getattr(self._pipe, self.denoiser_attr)

    def set_denoiser(self, module: nn.Module) -> None:
        # The pipeline reads the denoiser's config and submodules, which DDP / compile wrappers hide.
        from accelerate.utils import extract_model_from_parallel

        setattr(self._pipe, self.denoiser_attr, extract_model_from_parallel(module))

    @property
    def schedule(self) -> TrainingSchedule:
        return self._schedule

    def pipeline(self):
        return self._pipe


class ImagePipelineBackbone(DiffusersBackbone):
    """An image family over a pipeline that takes ``[B, C, h, w]`` initial latents at the VAE's scale
    and decodes with its scaling and shift factors (SDXL, SD3, FLUX; SDXL decodes with its own
    latent statistics, FLUX packs its latents and samples its own way)."""

    modality: ClassVar[Literal["image", "video"]] = "image"

    @property
    def vae_scale_factor(self) -> int:
        return self._pipe.vae_scale_factor

    @torch.no_grad()
    def sample(
        self, embeds: Embeddings, negative: Embeddings, noise: torch.Tensor, gen: GenerateConfig
    ) -> torch.Tensor:
        # Unit noise: the pipeline's prepare_latents scales it by the scheduler's initial sigma itself
        # (1 for the flow families: the initial latents are the noise).
        return self.run_pipeline(
            embeds,
            negative,
            noise.to(self._device, self.denoiser.dtype),
            gen,
            height=noise.shape[-2] * self.vae_scale_factor,
            width=noise.shape[-1] * self.vae_scale_factor,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._pipe.vae
        latents = latents.to(self._device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


class VideoPipelineBackbone(DiffusersBackbone):
    """A video family over a pipeline with one T5-family text encoder (CogVideoX, Wan): prompts are
    encoded by the pipeline itself, up to the family's ``max_text_length`` tokens."""

    modality: ClassVar[Literal["image", "video"]] = "video"

    @property
    @abstractmethod
    def max_text_length(self) -> int:
        """Tokens per prompt (the pipeline's ``max_sequence_length``)."""

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Embeddings:
        embeds, _ = self._pipe.encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            num_videos_per_prompt=1,
            max_sequence_length=self.max_text_length,
            device=self._device,
        )
        return {"prompt_embeds": embeds}

    def latent_frames(self, gen: GenerateConfig) -> int:
        """Latent frames of ``generate.num_frames`` (which must be ``temporal``k+1 for the VAE)."""
        temporal = self._pipe.vae_scale_factor_temporal
        if gen.num_frames < 1 or (gen.num_frames - 1) % temporal:
            raise ValueError(f"generate.num_frames={gen.num_frames} must be {temporal}k+1 for this VAE")
        return (gen.num_frames - 1) // temporal + 1


def repeat_rows(embeds: Embeddings, batch: int, name: str) -> Embeddings:
    """Broadcast one-row embeddings (e.g. the cached negative prompt) to ``batch`` rows."""
    out = {}
    for key, value in embeds.items():
        if value.shape[0] == batch:
            out[key] = value
        elif value.shape[0] == 1:
            out[key] = value.expand(batch, *value.shape[1:])
        else:
            raise ValueError(f"{name}[{key!r}] has {value.shape[0]} rows; expected 1 or {batch}")
    return out


def torch_dtype(name: str) -> torch.dtype:
    """``model.dtype`` (a string in the recipe) to a torch dtype, with an error naming the key."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"model.dtype={name!r} is not a floating-point torch dtype (e.g. float32, bfloat16)")
    return dtype


def load_pipeline(pipeline_cls: type, cfg: ModelConfig, **components):
    """``pipeline_cls.from_pretrained(cfg.path, ...)`` with errors that name ``model.path``;
    ``components`` are passed on (None skips loading that component).

    A local folder holding another family's pipeline is refused before any weight is read, so a
    recipe pointing an SDXL adapter at a CogVideoX folder fails with one clear line, not a stack of
    missing-component errors from inside diffusers.
    """
    import json
    from pathlib import Path

    from diffusers.utils import deprecation_utils

    dtype = torch_dtype(cfg.dtype)
    index = Path(cfg.path) / "model_index.json"
    if index.is_file():
        found = json.loads(index.read_text()).get("_class_name")
        if found != pipeline_cls.__name__:
            raise ModelPathError(
                f"model.path={cfg.path!r} holds a {found} but model.family={cfg.family!r} needs a "
                f"{pipeline_cls.__name__}"
            )
    # diffusers renamed `torch_dtype` to `dtype` (the old name warns on every load); older releases
    # only know the old one.
    dtype_key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    components = dict(components)
    if getattr(cfg, "vae_path", None):  # model.vae_path: e.g. an fp16-safe SDXL VAE
        components["vae"] = load_vae_override(cfg.vae_path, dtype, dtype_key)
    try:
        return pipeline_cls.from_pretrained(
            cfg.path, revision=cfg.revision, variant=cfg.variant, **{dtype_key: dtype}, **components
        )
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and Path(cfg.path).is_dir():
            # a local folder that was found but is broken: diffusers' message says how
            raise ModelPathError(
                f"model.path={cfg.path!r}: a broken {pipeline_cls.__name__} folder: {err}"
            ) from err
        hint = "" if cfg.tiny else "; set model.tiny=true to build the tiny test model there"
        raise ModelPathError(
            f"model.path={cfg.path!r}: cannot load a {pipeline_cls.__name__} (not a local diffusers folder, "
            f"and not a reachable hub id{hint}): {err}"
        ) from err


def load_vae_override(path: str, dtype: torch.dtype, dtype_key: str) -> nn.Module:
    """``model.vae_path``: a VAE folder or hub id (its own config names the class), or a ``vae/``
    subfolder of a pipeline folder."""
    from pathlib import Path

    from diffusers import AutoModel

    subfolder = "vae" if (Path(path) / "vae" / "config.json").is_file() else None
    try:
        return AutoModel.from_pretrained(path, subfolder=subfolder, **{dtype_key: dtype})
    except (OSError, ValueError) as err:
        raise OSError(f"model.vae_path={path!r}: cannot load a VAE there ({err})") from err
