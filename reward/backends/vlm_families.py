"""The VLM families the ``vlm`` backend supports, what differs between them, and loading their processors.

Everything family-specific the backend needs is one row of :data:`FAMILIES`; the backend itself never
branches on a family name. A row says:

- ``video``: the torchvision-free video processor for the family's frame layout
  (:mod:`reward.backends.video_frames`), or None for a family that takes no video (Idefics3, Gemma 3):
  a video for such a model is refused, never scored from its text alone;
- ``equal_frames``: the model takes videos as one ``[videos, frames, ...]`` tensor, so the videos of one
  forward pass must have the same number of frames (the backend groups them).

Loading. With torchvision, ``AutoProcessor`` builds the library's processor. Without it (CPU installs:
the registry's torchvision wheel does not load beside a CPU torch), only the video processors are
missing: :func:`load_processor` builds the same processor class from the checkpoint's tokenizer, its
image processor (transformers picks the PIL backend when torchvision is absent) and the family's video
processor from :mod:`reward.backends.video_frames`, with the processor settings and chat template the
library reads for it (``processor_config.json``, ``chat_template.jinja``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from reward.backends import BackendError
from reward.backends.video_frames import (
    FixedSizeFramesProcessor,
    FramesProcessor,
    Glm4vFramesProcessor,
    Qwen3FramesProcessor,
    QwenFramesProcessor,
    SmolVLMFramesProcessor,
)


class VLMError(BackendError):
    """A model, processor or input the VLM backend cannot use; the message names the path or sample."""


@dataclass(frozen=True)
class VLMFamily:
    name: str
    model_types: tuple[str, ...]
    video: type[FramesProcessor] | None
    equal_frames: bool = False


FAMILIES = (
    VLMFamily("Qwen2-VL", ("qwen2_vl",), QwenFramesProcessor),
    VLMFamily("Qwen2.5-VL", ("qwen2_5_vl",), QwenFramesProcessor),
    VLMFamily("Qwen3-VL", ("qwen3_vl",), Qwen3FramesProcessor),
    VLMFamily("GLM-4.1V", ("glm4v",), Glm4vFramesProcessor),
    VLMFamily("LLaVA-OneVision", ("llava_onevision",), FixedSizeFramesProcessor, equal_frames=True),
    VLMFamily("InternVL", ("internvl",), FixedSizeFramesProcessor, equal_frames=True),
    VLMFamily("SmolVLM", ("smolvlm",), SmolVLMFramesProcessor, equal_frames=True),
    VLMFamily("Idefics3", ("idefics3",), None),
    VLMFamily("Gemma 3", ("gemma3",), None),
)
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(model_type: str, source: str = "") -> VLMFamily:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    where = f"{source}: " if source else ""
    raise VLMError(
        f"{where}model type {model_type!r} is not supported by the vlm backend; supported: "
        f"{', '.join(f'{f.name} ({t})' for f in FAMILIES for t in f.model_types)}"
    )


def model_type_of(path: str) -> str:
    """The checkpoint's ``model_type`` (local folder or hub id), without importing its model code."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except OSError as err:
        raise VLMError(f"{path}: cannot read the model config ({err})") from err
    return str(config.get("model_type", ""))


def torchvision_available() -> bool:
    """Whether transformers will use torchvision; a torchvision that is installed but does not load
    (the registry's wheel beside a CPU torch) is an error that says so, not a traceback later."""
    import transformers.utils

    if not transformers.utils.is_torchvision_available():
        return False
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # a broken install raises RuntimeError / OSError / ImportError
        import torch

        raise VLMError(
            f"torchvision is installed but does not load beside torch {torch.__version__} ({err}); uninstall "
            "it (the vlm backend works without it) or install the torchvision build that matches your torch"
        ) from err
    return True


def load_processor(path: str) -> Any:
    """The checkpoint's processor: ``AutoProcessor`` with torchvision, the same class built with a
    torchvision-free video processor without it (module doc). Errors name the path and what is missing."""
    family = family_of(model_type_of(path), path)
    try:
        if torchvision_available():
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(path)
        return _processor_without_torchvision(path, family)
    except ImportError as err:
        missing = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VLMError(
            f"{path}: the {family.name} processor cannot be built here: {missing} (install what is named; "
            "torchvision, if named, must be the build that matches your torch)"
        ) from err


def _processor_without_torchvision(path: str, family: VLMFamily) -> Any:
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.processing_utils import ProcessorMixin

    # processor_config.json settings and the chat template, read the way the library reads them
    settings, extra = ProcessorMixin.get_processor_dict(path)
    class_name = settings.get("processor_class") or PROCESSOR_MAPPING_NAMES.get(model_type_of(path))
    cls = getattr(transformers, str(class_name), None)
    if cls is None:
        raise VLMError(f"{path}: unknown processor class {class_name!r}")
    parts: list[Any] = []
    for attribute in cls.get_attributes():
        if attribute == "tokenizer":
            parts.append(AutoTokenizer.from_pretrained(path))
        elif attribute == "image_processor":
            parts.append(AutoImageProcessor.from_pretrained(path))
        elif attribute == "video_processor":
            if family.video is None:
                raise VLMError(
                    f"{path}: {cls.__name__} expects a video processor, but {family.name} takes none"
                )
            parts.append(family.video.from_checkpoint(path))
        else:
            raise VLMError(f"{path}: {cls.__name__} needs a {attribute!r}, which this backend cannot build")
    return _with_frames(cls).from_args_and_dict(parts, settings, **extra)


@functools.cache
def _with_frames(cls: type) -> type:
    """The library's processor class, accepting a :class:`FramesProcessor` as its video processor.

    The library checks each part against its base class by name, and without torchvision the video
    processors' base is not importable by that name; nothing else about the class changes.
    """

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, FramesProcessor):
            return FramesProcessor
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class})
