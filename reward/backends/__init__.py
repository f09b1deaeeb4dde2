"""Who answers the checklist questions: a registry of answer backends, built by name.

``vlm``: a transformers vision-language model (the real reward). ``pixel-stats``: pixel heuristics
for demos and tests, which answer only what pixel statistics can judge and say "unknown" otherwise.
``cogvlm2``: the native port of the official VisionReward checkpoints; ``vlm`` picks it by itself when
the checkpoint's config is a CogVLM2 one (in any released layout).
"""

from __future__ import annotations

from typing import Any

from reward.types import AnswerBackend

BACKENDS = ("vlm", "pixel-stats", "cogvlm2")
MODEL_BACKENDS = ("vlm", "cogvlm2")  # the backends that answer with a model (reward.model_path)


def build_backend(name: str, model_path: str | None = None, **kwargs: Any) -> AnswerBackend:
    """Build a backend by name. ``model_path`` (local folder or hub id) is required for ``vlm``."""
    if name == "pixel-stats":
        from reward.backends.pixel_stats import PixelStatsBackend

        return PixelStatsBackend()
    if name in MODEL_BACKENDS:
        if not model_path:
            raise ValueError(
                f"reward backend {name!r} needs a model path or hub id (reward.model_path / --model)"
            )
        from reward.backends.vlm import VLMBackend

        alignment_path = kwargs.pop("alignment_model_path", None)
        alignment_model = VLMBackend.from_pretrained(alignment_path, **kwargs) if alignment_path else None
        from reward.backends.cogvlm2 import is_cogvlm2_checkpoint

        if name == "cogvlm2" or is_cogvlm2_checkpoint(model_path):  # the backend follows the model
            from reward.backends.cogvlm2.backend import CogVLM2Backend

            return CogVLM2Backend.from_pretrained(model_path, alignment_model=alignment_model, **kwargs)
        return VLMBackend.from_pretrained(model_path, alignment_model=alignment_model, **kwargs)
    raise ValueError(f"unknown reward backend {name!r}; known: {list(BACKENDS)}")
