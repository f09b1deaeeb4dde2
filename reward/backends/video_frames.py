"""Video inputs for the supported VLM families, built without torchvision.

transformers' video processors are torchvision-backed, and CPU-only installs often lack torchvision
(the registry's wheel does not load beside a CPU torch). The reward hands every processor frames it has
already sampled (one per second, :func:`reward.media.frame_indices_per_second`), so all a video
processor still has to do is resize, normalise and lay the frames out the way the family's vision tower
reads them. The classes here do that with PIL and torch, from the settings in the checkpoint's
``video_preprocessor_config.json`` (falling back to each family's defaults, which are the library's),
and plug into the library's own processor class, so placeholder expansion, frame timestamps and token
types stay the library's.

- :class:`QwenFramesProcessor` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V): frames resized to a multiple
  of patch x merge within the pixel budget (per frame for Qwen2-VL; over the whole clip for Qwen3-VL and
  GLM-4.1V), grouped ``temporal_patch_size`` at a time (the last frame repeated to fill a group) and cut
  into patches ordered (time, merged row, merged column, merge window): ``pixel_values_videos``
  ``[patches, C * temporal_patch_size * patch^2]`` and ``video_grid_thw``.
- :class:`FixedSizeFramesProcessor` (LLaVA-OneVision, InternVL): frames resized to the configured
  height x width: ``pixel_values_videos`` ``[videos, frames, C, H, W]``.
- :class:`SmolVLMFramesProcessor`: longest edge to ``size``, then to the square ``max_image_size``
  (the library's two steps), padded across the batch: ``pixel_values`` and ``pixel_attention_mask``.

Resizing is PIL's (bicubic, or Lanczos for SmolVLM), as the PIL image processors do; the torchvision
path interpolates slightly differently. Frame sampling is never done here (``do_sample_frames`` must
stay off): the metadata the reward passes (original frame indices and frame rate) is returned as given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata

from reward.media import to_uint8

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
CONFIG_NAMES = ("video_preprocessor_config.json", "preprocessor_config.json")


class FramesProcessor(VideoProcessorMixin):
    """Shared part: settings from the checkpoint, PIL resizing, normalisation, metadata pass-through."""

    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        merged = {**self.defaults, **{k: v for k, v in settings.items() if k in self.defaults}}
        for key, value in merged.items():
            setattr(self, key, value)
        if settings.get("do_sample_frames"):
            raise ValueError(
                f"{type(self).__name__}: do_sample_frames is set, but the reward passes frames it has already "
                "sampled one per second"
            )
        self.do_sample_frames = False

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> FramesProcessor:
        """Settings from the checkpoint's video (or, failing that, image) preprocessor config."""
        for name in CONFIG_NAMES:
            file = Path(path) / name
            if file.is_file():
                data = json.loads(file.read_text())
                data.pop("do_sample_frames", None)  # the reward samples frames itself
                return cls(**data)
        return cls()

    # -------------------------------------------------------------------------------- shared steps
    def _resize(self, frames: torch.Tensor, height: int, width: int) -> np.ndarray:
        """``[T, C, H, W]`` uint8 -> ``[T, C, height, width]`` float32 in 0..255 (PIL, per frame)."""
        resample = Image.Resampling(int(self.resample))
        out = []
        for frame in frames:
            picture = Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy())
            if picture.size != (width, height):
                picture = picture.resize((width, height), resample=resample)
            out.append(np.asarray(picture, dtype=np.float32).transpose(2, 0, 1))
        return np.stack(out)

    def _normalise(self, frames: np.ndarray) -> torch.Tensor:
        mean = np.asarray(self.image_mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[None, :, None, None]
        return torch.from_numpy((frames * np.float32(self.rescale_factor) - mean) / std)

    def __call__(
        self, videos: Sequence[Any], video_metadata: Sequence[Any] | None = None, **kwargs: Any
    ) -> BatchFeature:
        if kwargs.get("do_sample_frames"):
            raise ValueError(f"{type(self).__name__}: frames are sampled by the reward, not here")
        clips = [_as_uint8_frames(v) for v in videos]
        data = self.process(clips)
        if kwargs.get("return_metadata", self.return_metadata):
            data["video_metadata"] = _metadata(clips, video_metadata)
        return BatchFeature(data)

    def process(self, clips: list[torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError


class QwenFramesProcessor(FramesProcessor):
    """Qwen2-VL / Qwen2.5-VL layout (per-frame pixel budget); see the module doc."""

    defaults: ClassVar[dict[str, Any]] = {
        "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "rescale_factor": 1 / 255,
        "resample": int(Image.Resampling.BICUBIC),
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "return_metadata": False,
    }
    budget_over_clip = False  # Qwen3-VL and GLM-4.1V: the pixel budget covers all frames

    def __init__(self, **settings: Any) -> None:
        size = dict(settings.pop("size", None) or self.defaults["size"])
        if "min_pixels" in settings:
            size["shortest_edge"] = settings.pop("min_pixels")
        if "max_pixels" in settings:
            size["longest_edge"] = settings.pop("max_pixels")
        super().__init__(size=size, **settings)

    def target_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        lo, hi = self.size["shortest_edge"], self.size["longest_edge"]
        if self.budget_over_clip:
            return clip_resize(max(frames, self.temporal_patch_size), height, width, self.temporal_patch_size,
                               factor, lo, hi)  # fmt: skip
        return frame_resize(height, width, factor, lo, hi)

    def process(self, clips: list[torch.Tensor]) -> dict[str, Any]:
        patches, grids = [], []
        tps, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        for clip in clips:
            height, width = self.target_size(clip.shape[0], clip.shape[-2], clip.shape[-1])
            video = self._normalise(self._resize(clip, height, width))
            if pad := -video.shape[0] % tps:
                video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
            t, c = video.shape[0] // tps, video.shape[1]
            gh, gw = height // p, width // p
            grid = video.view(t, tps, c, gh // m, m, p, gw // m, m, p)
            grid = grid.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
            patches.append(grid.reshape(t * gh * gw, c * tps * p * p))
            grids.append([t, gh, gw])
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}


class Qwen3FramesProcessor(QwenFramesProcessor):
    defaults: ClassVar[dict[str, Any]] = {
        **QwenFramesProcessor.defaults,
        "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
        "image_mean": HALF,
        "image_std": HALF,
        "patch_size": 16,
    }
    budget_over_clip = True


class Glm4vFramesProcessor(QwenFramesProcessor):
    defaults: ClassVar[dict[str, Any]] = {
        **QwenFramesProcessor.defaults,
        "size": {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 2 * 30000},
    }
    budget_over_clip = True


class FixedSizeFramesProcessor(FramesProcessor):
    """LLaVA-OneVision / InternVL: every frame resized to ``size`` (height x width)."""

    defaults: ClassVar[dict[str, Any]] = {
        "size": {"height": 384, "width": 384},
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "rescale_factor": 1 / 255,
        "resample": int(Image.Resampling.BICUBIC),
        "return_metadata": False,
    }

    def process(self, clips: list[torch.Tensor]) -> dict[str, Any]:
        height, width = self.size["height"], self.size["width"]
        videos = [self._normalise(self._resize(clip, height, width)) for clip in clips]
        if len({v.shape[0] for v in videos}) > 1:
            raise ValueError(
                f"{type(self).__name__}: videos of one batch must have the same number of frames"
            )
        return {"pixel_values_videos": torch.stack(videos)}


class SmolVLMFramesProcessor(FramesProcessor):
    defaults: ClassVar[dict[str, Any]] = {
        "size": {"longest_edge": 4 * 364},
        "max_image_size": {"longest_edge": 364},
        "image_mean": HALF,
        "image_std": HALF,
        "rescale_factor": 1 / 255,
        "resample": int(Image.Resampling.LANCZOS),
        "return_metadata": False,
    }

    def process(self, clips: list[torch.Tensor]) -> dict[str, Any]:
        side = self.max_image_size["longest_edge"]
        videos = []
        for clip in clips:
            height, width = longest_edge_size(clip.shape[-2], clip.shape[-1], self.size["longest_edge"])
            first = self._resize(clip, height, width).round().clip(0, 255).astype(np.uint8)
            videos.append(self._normalise(self._resize(torch.from_numpy(first), side, side)))
        frames = max(v.shape[0] for v in videos)
        pixels = torch.zeros(len(videos), frames, 3, side, side)
        mask = torch.zeros(len(videos), frames, side, side, dtype=torch.long)
        for i, video in enumerate(videos):
            pixels[i, : len(video)] = video
            mask[i, : len(video)] = 1
        return {"pixel_values": pixels, "pixel_attention_mask": mask}


# ------------------------------------------------------------------------------------- size rules
def frame_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's rule: sides multiples of ``factor``, area within [min, max], aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (
            max(factor, math.floor(height / beta / factor) * factor),
            max(factor, math.floor(width / beta / factor) * factor),
        )
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def clip_resize(
    frames: int, height: int, width: int, temporal: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen3-VL / GLM-4.1V's rule: as :func:`frame_resize`, with the budget over frames x height x width."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(frames / temporal) * temporal
    if t * h * w > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h, w = (
            max(factor, math.floor(height / beta / factor) * factor),
            max(factor, math.floor(width / beta / factor) * factor),
        )
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """SmolVLM's first step: the longest edge to ``longest``, the other kept in ratio and made even."""
    longest = min(4096, longest)
    ratio = width / height
    if width >= height:
        width, height = longest, int(longest / ratio)
        height += height % 2
    else:
        height, width = longest, int(longest * ratio)
        width += width % 2
    return max(height, 1), max(width, 1)


# ------------------------------------------------------------------------------------- inputs
def _as_uint8_frames(video: Any) -> torch.Tensor:
    """A ``[T, C, H, W]`` uint8 tensor from a tensor / array in that layout."""
    frames = torch.as_tensor(np.asarray(video)) if not isinstance(video, torch.Tensor) else video
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected a [frames, 3, height, width] video, got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        return to_uint8(frames)
    return frames.cpu()


def _metadata(clips: list[torch.Tensor], given: Sequence[Any] | None) -> list[VideoMetadata]:
    if given is None:
        given = [{"total_num_frames": len(c), "frames_indices": list(range(len(c)))} for c in clips]
    if len(given) != len(clips):
        raise ValueError(f"{len(clips)} videos but {len(given)} video_metadata entries")
    out = []
    for clip, meta in zip(clips, given):
        meta = dict(meta) if not isinstance(meta, VideoMetadata) else {k: meta[k] for k in meta}
        meta.setdefault("height", int(clip.shape[-2]))
        meta.setdefault("width", int(clip.shape[-1]))
        out.append(VideoMetadata(**meta))
    return out
