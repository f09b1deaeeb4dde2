"""Who answers the checklist questions: a registry of answer backends, built by name.

``vlm``: a transformers vision-language model (the real reward). ``pixel-stats``: pixel heuristics
for demos and tests, which answer only what pixel statistics can judge and say "unknown" otherwise.
``cogvlm2``: the native port of the official VisionReward checkpoints; ``vlm`` picks it by itself when
the checkpoint's config is a CogVLM2 one (in any released layout).

The alignment term (image checklists) can come from a separate model, ``alignment_model_path``: a
CLIP-FlanT5 checkpoint (``model_type: clip_t5``, e.g. ``zhiqiulin/clip-flant5-xxl``) gives the release's
VQAScore (:mod:`reward.backends.vqascore`); any supported VLM gives its p(yes) to the same question, an
approximation of it. Without one, the checklist's backend answers the alignment question itself.
"""

from __future__ import annotations

from typing import Any

from reward.errors import RewardInputError
from reward.types import AnswerBackend

BACKENDS = ("vlm", "pixel-stats", "cogvlm2")
MODEL_BACKENDS = ("vlm", "cogvlm2")  # the backends that answer with a model (reward.model_path)


class BackendError(RewardInputError):
    """A backend that cannot be built or used as asked; the message names the model, key or sample."""


def build_backend(name: str, model_path: str | None = None, **kwargs: Any) -> AnswerBackend:
    """Build a backend by name. ``model_path`` (local folder or hub id) is required for ``vlm``;
    ``alignment_model_path`` adds a separate alignment model (module doc)."""
    alignment_path = kwargs.pop("alignment_model_path", None)
    backend = _answer_backend(name, model_path, kwargs)
    if alignment_path:
        from reward.backends.alignment import AlignedBackend, build_alignment

        backend = AlignedBackend(backend, build_alignment(alignment_path, **kwargs))
    return backend


def _answer_backend(name: str, model_path: str | None, kwargs: dict[str, Any]) -> AnswerBackend:
    if name == "pixel-stats":
        from reward.backends.pixel_stats import PixelStatsBackend

        return PixelStatsBackend()
    if name in MODEL_BACKENDS:
        if not model_path:
            raise BackendError(
                f"reward backend {name!r} needs a model path or hub id (reward.model_path / --model)"
            )
        from reward.backends.cogvlm2 import is_cogvlm2_checkpoint

        if name == "cogvlm2" or is_cogvlm2_checkpoint(model_path):  # the backend follows the model
            from reward.backends.cogvlm2.backend import CogVLM2Backend

            return CogVLM2Backend.from_pretrained(model_path, **kwargs)
        from reward.backends.vlm import VLMBackend

        return VLMBackend.from_pretrained(model_path, **kwargs)
    raise BackendError(f"unknown reward backend {name!r}; known: {list(BACKENDS)}")
