"""The one interface the generic stages call; everything model-specific lives behind it.

generate, score, train, evaluate and export never branch on a model family: they call these methods.
A new family (Wan, SD3, FLUX) is one new file implementing :class:`Backbone` plus a
``@register_backbone("name")`` decorator, and a recipe.

Tensor conventions
- Prompt embeddings are a ``dict[str, Tensor]``, batch first, so that one prompt's row can be cached
  in a safetensors shard and batches can be rebuilt by concatenation.
- Latents are ``[B, *latent_shape]`` in the denoiser's own layout (SDXL: ``[C, h, w]``; CogVideoX:
  ``[F, C, h, w]``), already scaled by the VAE scaling factor (what the denoiser sees at t = 0).
- Decoded pixels are float in [0, 1]: images ``[B, 3, H, W]``, videos ``[B, T, 3, H, W]``.
- Timesteps are integer indices into the training schedule, ``[B]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn


class ModelPathError(ValueError):
    """``model.path`` names no loadable model of the family; the message says what was found."""


if TYPE_CHECKING:
    from mpo.schema import GenerateConfig, ModelConfig

PredictionType = Literal["epsilon", "v_prediction", "flow"]
Embeddings = dict[str, torch.Tensor]


class Backbone(ABC):
    """A text-to-image or text-to-video diffusion model, seen by the generic loop."""

    family: ClassVar[str]
    modality: ClassVar[Literal["image", "video"]]
    # The values of train.weighting this family's schedule defines (see loss_weighting).
    supported_weightings: ClassVar[tuple[str, ...]] = ("none",)

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> Backbone:
        """Load from ``cfg.path`` (local folder or hub id) with ``from_pretrained``."""

    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The network that DPO trains (UNet or transformer)."""

    @abstractmethod
    def set_denoiser(self, module: nn.Module) -> None:
        """Swap in a (trained / wrapped) denoiser, e.g. for eval sampling or export."""

    @property
    @abstractmethod
    def prediction_type(self) -> PredictionType:
        """What the denoiser predicts: the training target (epsilon, v or flow velocity)."""

    @property
    def lora_target_modules(self) -> list[str]:
        """Default module names that receive LoRA adapters."""
        return ["to_q", "to_k", "to_v", "to_out.0"]

    @classmethod
    def check_generate_config(cls, gen: GenerateConfig) -> list[tuple[str, str]]:
        """Family-specific checks of the generate section, as (key, message) pairs; the recipe loader
        turns them into one error naming the key, the value and what is allowed."""
        return []

    # ---- conditioning ----------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Embeddings:
        """Text encoders on a batch of prompts. The result is cached: the training step never runs
        a text encoder. The empty prompt's embedding is the unconditional branch of guidance."""

    # ---- latents -----------------------------------------------------------------------------------
    @abstractmethod
    def latent_shape(self, gen: GenerateConfig) -> tuple[int, ...]:
        """Per-sample latent shape for the requested resolution (and frames)."""

    @abstractmethod
    def sample(
        self, embeds: Embeddings, negative: Embeddings, noise: torch.Tensor, gen: GenerateConfig
    ) -> torch.Tensor:
        """Denoise ``noise`` ([B, *latent_shape], initial latents) to clean latents with classifier-free
        guidance. Deterministic given ``noise`` (no hidden random draws), so a candidate is fixed by
        its seed whatever the batch it is in."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to pixels in [0, 1] (images [B,3,H,W], videos [B,T,3,H,W])."""

    # ---- training ---------------------------------------------------------------------------------
    @property
    @abstractmethod
    def num_train_timesteps(self) -> int: ...

    @abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0) of the training schedule."""

    @abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Regression target for ``prediction_type`` (epsilon: noise; v: alpha*eps - sigma*x0; flow:
        noise - x0)."""

    @abstractmethod
    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: Embeddings
    ) -> torch.Tensor:
        """One denoiser forward on cached embeddings (``denoiser`` may be wrapped by accelerate)."""

    def loss_weighting(self, timesteps: torch.Tensor, scheme: str, gamma: float) -> torch.Tensor | None:
        """Per-pair weight ``omega_t`` of the squared errors (``train.weighting``), ``[B]`` float32, or
        None for a constant weight. A family with another schedule (flow matching: its density
        weight) overrides this and lists its schemes in ``supported_weightings``."""
        if scheme == "none":
            return None
        raise ValueError(
            f"train.weighting={scheme!r} is not defined for model.family={self.family!r} "
            f"(it supports {list(self.supported_weightings)})"
        )

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
    """What every diffusers-pipeline backbone shares: loading through ``from_pretrained`` (building the
    tiny model first when the recipe asks for it), the denoiser as a pipeline attribute, the
    prediction type from the scheduler config. A family sets ``pipeline_class`` and ``denoiser_attr``
    and implements the conditioning, sampling and schedule methods."""

    pipeline_class: ClassVar[type]
    denoiser_attr: ClassVar[str]  # "unet" or "transformer"
    supported_weightings: ClassVar[tuple[str, ...]] = ("none", "min_snr")

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

    @classmethod
    def load(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> DiffusersBackbone:
        from mpo.backbones.tiny import ensure_tiny

        ensure_tiny(cfg)
        return cls(load_pipeline(cls.pipeline_class, cfg), device)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self._pipe, self.denoiser_attr)

    def set_denoiser(self, module: nn.Module) -> None:
        # The pipeline reads the denoiser's config and submodules, which DDP / compile wrappers hide.
        from accelerate.utils import extract_model_from_parallel

        setattr(self._pipe, self.denoiser_attr, extract_model_from_parallel(module))

    @property
    def prediction_type(self) -> PredictionType:
        kind = self._pipe.scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type={kind!r} is not supported (epsilon, v_prediction)")
        return kind

    def pipeline(self):
        return self._pipe

    # Training schedule: a family sets ``self._train_scheduler`` (a diffusers scheduler with
    # ``add_noise`` and ``get_velocity`` over the checkpoint's training alphas) in its __init__.
    @property
    def num_train_timesteps(self) -> int:
        return self._train_scheduler.config.num_train_timesteps

    def _schedule_on(self, device: torch.device):
        """The training scheduler with its ``alphas_cumprod`` on ``device``: diffusers copies it there
        on every call otherwise (CogVideoX's scheduler), a host-to-device copy that syncs each step."""
        scheduler = self._train_scheduler
        if scheduler.alphas_cumprod.device != device:
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        return scheduler

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        # float32 arithmetic: alphas_cumprod near 1 is not representable in bfloat16.
        scheduler = self._schedule_on(latents.device)
        noisy = scheduler.add_noise(latents.float(), noise.float(), timesteps.to(latents.device))
        return noisy.to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        scheduler = self._schedule_on(latents.device)
        velocity = scheduler.get_velocity(latents.float(), noise.float(), timesteps.to(latents.device))
        return velocity.to(latents.dtype)

    def loss_weighting(self, timesteps: torch.Tensor, scheme: str, gamma: float) -> torch.Tensor | None:
        if scheme == "min_snr":
            from mpo.loss import min_snr_weight

            scheduler = self._schedule_on(timesteps.device)
            return min_snr_weight(scheduler.alphas_cumprod, timesteps, gamma, self.prediction_type)
        return super().loss_weighting(timesteps, scheme, gamma)


_REGISTRY: dict[str, type[Backbone]] = {}


def register_backbone(name: str):
    def wrap(cls: type[Backbone]) -> type[Backbone]:
        cls.family = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_backbone_class(name: str) -> type[Backbone]:
    # Import the built-in families so that they register themselves.
    from mpo.backbones import cogvideox, sdxl  # noqa: F401

    if name not in _REGISTRY:
        raise KeyError(f"model.family={name!r} is not a known backbone; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def load_backbone(cfg: ModelConfig, device: torch.device | str = "cpu") -> Backbone:
    return get_backbone_class(cfg.family).load(cfg, device)


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


def load_pipeline(pipeline_cls: type, cfg: ModelConfig):
    """``pipeline_cls.from_pretrained(cfg.path, ...)`` with errors that name ``model.path``.

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
    try:
        return pipeline_cls.from_pretrained(
            cfg.path, revision=cfg.revision, variant=cfg.variant, **{dtype_key: dtype}
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
