"""Who answers the checklist questions: a registry of answer backends, built by name.

``vlm``: a transformers vision-language model (the real reward). ``pixel-stats``: pixel heuristics
for demos and tests, which answer only what pixel statistics can judge and say "unknown" otherwise.
"""

from __future__ import annotations

from typing import Any

from reward.types import AnswerBackend

BACKENDS = ("vlm", "pixel-stats")


class BackendError(ValueError):
    """A backend that cannot be built or used as asked; the message names the model, key or sample."""


def build_backend(name: str, model_path: str | None = None, **kwargs: Any) -> AnswerBackend:
    """Build a backend by name. ``model_path`` (local folder or hub id) is required for ``vlm``."""
    if name == "pixel-stats":
        from reward.backends.pixel_stats import PixelStatsBackend

        return PixelStatsBackend()
    if name == "vlm":
        if not model_path:
            raise BackendError(
                "reward backend 'vlm' needs a model path or hub id (reward.model_path / --model)"
            )
        from reward.backends.vlm import VLMBackend

        alignment_path = kwargs.pop("alignment_model_path", None)
        alignment_model = VLMBackend.from_pretrained(alignment_path, **kwargs) if alignment_path else None
        return VLMBackend.from_pretrained(model_path, alignment_model=alignment_model, **kwargs)
    raise BackendError(f"unknown reward backend {name!r}; known: {list(BACKENDS)}")
