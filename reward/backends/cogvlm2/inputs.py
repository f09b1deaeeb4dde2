"""What the release feeds CogVLM2: the prompt templates, the token layout and the pixel preprocessing.

Token layout of one question (the release's ``build_conversation_input_ids``, no history)::

    [bos] [vision block] text_ids("Question: {query} Answer:")          template "chat"
    [bos] [vision block] text_ids("Question: {query} Short answer:")    template "vqa"
    [bos] [vision block] text_ids("{query}")                            template "base"

Vision block: an image is ``tokens_per_image`` VISION placeholders (begin-of-image, the merged patch
grid, end-of-image); a video in the ``chat`` template is, per frame, ``tokens_per_image`` VISION
placeholders followed by the frame's index as LANGUAGE text (``encode(str(i))``: "0", "1", ...); in
the other templates the frames' placeholders simply follow each other. The placeholder id is the
checkpoint's pad token (128002 in Llama-3); its embedding is replaced by the vision tower's output.

Pixels:

- image (the image release, SAT and transformers alike): bicubic resize to ``image_size`` x
  ``image_size`` (PIL, on the 8-bit image), scale to [0, 1], normalise with the CLIP mean / std;
- video (the video release): frames as 8-bit values / 255, normalised, the shorter side resized to
  ``image_size`` bilinearly (``F.interpolate``, no antialias; the longer side ``floor(long * S /
  short)``), then centre-cropped to ``image_size`` x ``image_size``.

Frames are chosen by :func:`reward.media.frames_per_second` (one per second, at most ``max_frames``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from reward.backends.cogvlm2.config import CogVLM2Config, CogVLM2Error
from reward.backends.cogvlm2.modeling import LANGUAGE, VISION
from reward.media import frames_per_second, to_uint8
from reward.types import Sample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ANSWER_FORMAT = {"chat": "Answer:", "vqa": "Short answer:"}


def prompt_text(template: str, query: str) -> str:
    """The release's ``_history_to_prompt`` without history."""
    if template == "base":
        return query
    return f"Question: {query} {ANSWER_FORMAT[template]}"


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(-1, 1, 1)
    std = torch.tensor(CLIP_STD).view(-1, 1, 1)
    return (x - mean) / std


def image_pixels(image: torch.Tensor, size: int) -> torch.Tensor:
    """``[3, H, W]`` uint8 -> ``[3, size, size]`` float, as the image release prepares it."""
    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    resized = pil.resize((size, size), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)
    return _normalise(array.float() / 255.0)


def video_pixels(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``[T, 3, H, W]`` uint8 -> ``[T, 3, size, size]`` float, as the video release prepares it."""
    x = _normalise(frames.float() / 255.0)
    height, width = x.shape[-2:]
    if width < height:
        new_h, new_w = math.floor(height / width * size), size
    else:
        new_h, new_w = size, math.floor(width / height * size)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # torchvision's centre crop
    return x[..., top : top + size, left : left + size]


class PromptBuilder:
    """Token ids, token types and pixels of CogVLM2 prompts for one checkpoint and template."""

    def __init__(self, config: CogVLM2Config, tokenizer: Any, template: str, max_frames: int = 24) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.template = template
        self.max_frames = int(max_frames)
        self.placeholder = config.pad_token_id if config.pad_token_id is not None else 0
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
        if bos is None:
            raise CogVLM2Error("cogvlm2: the tokenizer has no bos token")
        self.bos = int(bos)

    def pixels(self, sample: Sample) -> torch.Tensor:
        """Preprocessed ``[N, 3, S, S]`` for one sample (N = 1 for an image, frames for a video)."""
        size = self.config.vision_config["image_size"]
        if sample.modality == "image":
            if self.config.variant != "image":
                raise CogVLM2Error(
                    f"sample {sample.id or '?'}: an image, but this CogVLM2 checkpoint reads videos"
                )
            return image_pixels(to_uint8(sample.pixels), size)[None]
        if self.config.variant != "video":
            raise CogVLM2Error(
                f"sample {sample.id or '?'}: a video, but this CogVLM2 checkpoint reads images"
            )
        if sample.pixels.shape[0] == 0 or min(sample.pixels.shape[-2:]) == 0:
            raise CogVLM2Error(f"sample {sample.id or '?'}: the video has no frame to show the model")
        frames = frames_per_second(sample.pixels, sample.fps, self.max_frames)
        if frames.shape[0] == 0:
            raise CogVLM2Error(f"sample {sample.id or '?'}: the video is too short for one frame")
        return video_pixels(to_uint8(frames), size)

    def vision_block(self, frames: int, modality: str) -> tuple[list[int], list[int]]:
        """Ids and types of the vision placeholders (and video time indices) after ``bos``."""
        n = self.config.tokens_per_image
        if modality == "image":
            return [self.placeholder] * n, [VISION] * n
        ids: list[int] = []
        types: list[int] = []
        for index in range(frames):
            ids += [self.placeholder] * n
            types += [VISION] * n
            if self.template == "chat":  # the release adds time indices in the chat template only
                time = self.tokenizer.encode(str(index), add_special_tokens=False)
                ids += time
                types += [LANGUAGE] * len(time)
        return ids, types

    def text_ids(self, query: str) -> list[int]:
        return self.tokenizer.encode(prompt_text(self.template, query), add_special_tokens=False)

    def row(self, frames: int, modality: str, query: str) -> tuple[list[int], list[int]]:
        """The whole prompt of one question: ids and types."""
        ids, types = self.vision_block(frames, modality)
        text = self.text_ids(query)
        return [self.bos, *ids, *text], [LANGUAGE, *types, *[LANGUAGE] * len(text)]

    def check_length(self, sample: Sample, length: int) -> None:
        limit = self.config.max_position_embeddings
        if length > limit:
            raise CogVLM2Error(
                f"sample {sample.id or '?'}: the prompt is {length} tokens, more than the model's context of "
                f"{limit} (max_position_embeddings); use fewer frames (max_frames) or a shorter prompt"
            )
