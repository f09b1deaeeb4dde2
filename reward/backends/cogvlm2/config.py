"""The CogVLM2 configuration, and the translation from the release's remote-code ``config.json``.

One config class covers both released variants:

- ``variant="image"`` (CogVLM2-Llama3-19B, VisionReward-Image): a *visual expert* in every decoder
  layer (separate QKV / output / MLP weights for vision-token positions), one 1344 px image of
  (1344 / 14 / 2)^2 + 2 = 2306 vision tokens.
- ``variant="video"`` (CogVLM2-Video-Llama3, VisionReward-Video): no visual expert (every position uses
  the language weights), one 224 px frame per second, each frame 8 x 8 + 2 = 66 vision tokens followed,
  in the ``chat`` template, by its time index written as text ("0", "1", ...).

Both: a Llama-3 decoder (RMSNorm, SwiGLU, grouped-query attention with ``num_multi_query_heads``
key/value heads, rotary base 500000) over an EVA2-CLIP vision tower (post-sublayer LayerNorm, no final
norm), a 2x2 stride-2 convolution and a GLU projector. ``adapter_width`` is the convolution's output
width: the transformers release maps straight to the language width (4096); the SAT code keeps the
vision width (1792) and lets the GLU's first projection widen it, so the converter reads it off the
convolution weight.

The remote-code ``config.json`` (``CogVLMConfig``, ``auto_map`` to modeling_cogvlm.py) has no
``model_type``; :func:`config_from_remote` reads its fields into this class without running any of its
code. A converted or natively saved folder has ``model_type: cogvlm2``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from reward.backends.vlm import VLMError

IMAGE_ARCHITECTURE = "CogVLMForCausalLM"
VIDEO_ARCHITECTURE = "CogVLMVideoForCausalLM"
REMOTE_ARCHITECTURES = {IMAGE_ARCHITECTURE: "image", VIDEO_ARCHITECTURE: "video"}
TEMPLATES = ("base", "vqa", "chat")
# Remote-code fields that describe the vision tower (everything this port reads from vision_config).
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1792,
    "num_hidden_layers": 63,
    "num_heads": 16,
    "intermediate_size": 15360,
    "patch_size": 14,
    "image_size": 1344,
    "in_channels": 3,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "num_positions": None,  # (image_size / patch_size)^2 + 1 (the class token)
}


class CogVLM2Error(VLMError):
    """A checkpoint, layout or input the CogVLM2 port cannot use; the message names the file or sample."""


class CogVLM2Config(PretrainedConfig):
    model_type = "cogvlm2"

    def __init__(
        self,
        variant: str = "image",
        vocab_size: int = 128256,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_multi_query_heads: int = 8,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 500000.0,
        initializer_range: float = 0.02,
        template_version: str = "chat",
        vision_expert: bool | None = None,
        vision_config: dict[str, Any] | None = None,
        adapter_width: int | None = None,
        pad_token_id: int | None = 128002,
        bos_token_id: int | None = 128000,
        eos_token_id: int | list[int] | None = 128001,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        if variant not in ("image", "video"):
            raise CogVLM2Error(f"cogvlm2 config: variant must be 'image' or 'video', got {variant!r}")
        if template_version not in TEMPLATES:
            raise CogVLM2Error(
                f"cogvlm2 config: template_version must be one of {TEMPLATES}, got {template_version!r}"
            )
        self.variant = variant
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_multi_query_heads = num_multi_query_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.template_version = template_version
        self.vision_expert = (variant == "image") if vision_expert is None else bool(vision_expert)
        vision = {**_VISION_DEFAULTS, **(vision_config or {})}
        if vision["num_positions"] is None:
            vision["num_positions"] = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
        self.vision_config = vision
        self.adapter_width = int(adapter_width or hidden_size)
        if hidden_size % num_attention_heads or num_attention_heads % num_multi_query_heads:
            raise CogVLM2Error(
                f"cogvlm2 config: hidden_size {hidden_size}, {num_attention_heads} heads and "
                f"{num_multi_query_heads} key/value heads do not divide"
            )
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of one image / frame."""
        return self.vision_config["image_size"] // self.vision_config["patch_size"]

    @property
    def tokens_per_image(self) -> int:
        """Vision tokens of one image or frame: the 2x2-merged patch grid plus begin/end of image."""
        return (self.grid_size // 2) ** 2 + 2


def config_from_remote(data: dict[str, Any], source: str) -> CogVLM2Config:
    """A remote-code ``config.json`` (as a dict) -> :class:`CogVLM2Config`; no code from it is run."""
    architectures = list(data.get("architectures") or [])
    variants = {REMOTE_ARCHITECTURES[a] for a in architectures if a in REMOTE_ARCHITECTURES}
    if len(variants) != 1:
        raise CogVLM2Error(
            f"{source}: not a CogVLM2 checkpoint (architectures {architectures}); known: "
            f"{sorted(REMOTE_ARCHITECTURES)} in the transformers layout, VisualLlamaEVA in the SAT layout"
        )
    variant = variants.pop()
    vision = data.get("vision_config")
    if not isinstance(vision, dict):
        raise CogVLM2Error(f"{source}: config.json has no vision_config")
    fields = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_multi_query_heads",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "initializer_range",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
    )
    kwargs = {k: data[k] for k in fields if k in data}
    template = data.get("template_version") or "chat"
    return CogVLM2Config(
        variant=variant,
        template_version=template if template in TEMPLATES else "chat",
        vision_config={k: vision[k] for k in _VISION_DEFAULTS if k in vision},
        **kwargs,
    )
