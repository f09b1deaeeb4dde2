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

if TYPE_CHECKING:
    from mpo.config import GenerateConfig, ModelConfig

PredictionType = Literal["epsilon", "v_prediction", "flow"]
Embeddings = dict[str, torch.Tensor]


class Backbone(ABC):
    """A text-to-image or text-to-video diffusion model, seen by the generic loop."""

    family: ClassVar[str]
    modality: ClassVar[Literal["image", "video"]]

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
