"""Reading images and videos into :class:`reward.types.Sample`, and per-second frame sampling.

The released video checkpoints see up to 24 frames, one per second of video: for each whole second
s = 0, 1, 2, ... the frame whose timestamp is closest to s (:func:`frame_indices_per_second`, the
release's rule to the tie). :func:`frames_per_second` applies it to an in-memory frame tensor, so
generated videos never need to be written to a file to be scored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reward.errors import RewardInputError
from reward.types import Sample

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"}


class MediaError(RewardInputError):
    """A file that cannot be read as an image or a video; the message names the path."""


def frame_indices_per_second(num_frames: int, fps: float, max_frames: int = 24) -> list[int]:
    """The release's frame rule: for each whole second s, the frame whose timestamp is closest to s.

    Frame i starts at i / fps. Seconds run s = 0, 1, ..., round(last timestamp) (Python's rounding, half
    to even, as the release computes it), at most ``max_frames`` of them; a tie between two frames goes
    to the earlier one, and a frame closest to two seconds (clips under 1 fps) is taken twice, as the
    release does. A clip shorter than half a second yields its first frame.
    """
    if num_frames <= 0:
        return []
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    timestamps = np.arange(num_frames) / float(fps)
    seconds = np.arange(min(round(float(timestamps[-1])) + 1, max(int(max_frames), 0)))
    # argmin takes the first of equal distances: the earlier frame, like the release's min() + index()
    return np.abs(timestamps[None, :] - seconds[:, None]).argmin(axis=1).tolist()


def frames_per_second(pixels: torch.Tensor, fps: float, max_frames: int = 24) -> torch.Tensor:
    """``[T,3,H,W]`` -> the per-second subset ``[T',3,H,W]`` used by the video reward."""
    return pixels[frame_indices_per_second(pixels.shape[0], fps, max_frames)]


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] -> the 8-bit values a decoder or image file would hold (on the CPU)."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """HWC / THWC uint8 (or float) array -> float CHW / TCHW in [0, 1]."""
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] == 4:
        array = array[..., :3]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    tensor = torch.from_numpy(np.array(array, copy=True))
    tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float().clamp(0, 1)
    return tensor.movedim(-1, -3)


def load_image(path: str | Path, prompt: str = "") -> Sample:
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise MediaError(f"{path}: cannot read image ({err})") from err
    return Sample(pixels=_to_tensor(array), prompt=prompt, id=str(path))


def load_video(path: str | Path, prompt: str = "", max_frames: int | None = None) -> Sample:
    """Read every frame (or only the per-second ones when ``max_frames`` is given)."""
    import imageio.v3 as iio

    path = Path(path)
    try:
        meta = iio.immeta(path, plugin="pyav") if _has_pyav() else iio.immeta(path)
        frames = iio.imread(path, plugin="pyav") if _has_pyav() else iio.imread(path, index=None)
    except Exception as err:  # imageio raises a zoo of backend-specific errors
        raise MediaError(f"{path}: cannot read video ({type(err).__name__}: {err})") from err
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise MediaError(f"{path}: not a video (decoded shape {frames.shape})")
    fps = float(meta.get("fps") or (1000.0 / meta["duration"] if meta.get("duration") else 8.0))
    pixels = _to_tensor(frames)
    if max_frames is not None:
        pixels = frames_per_second(pixels, fps, max_frames)
        fps = 1.0
    return Sample(pixels=pixels, prompt=prompt, fps=fps, id=str(path))


def load_media(path: str | Path, prompt: str = "") -> Sample:
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return load_video(path, prompt)
    if suffix in IMAGE_SUFFIXES:
        return load_image(path, prompt)
    raise MediaError(
        f"{path}: unknown media suffix {suffix!r}; images: {sorted(IMAGE_SUFFIXES)}, videos: {sorted(VIDEO_SUFFIXES)}"
    )


def save_video(path: str | Path, pixels: torch.Tensor, fps: float) -> None:
    """``[T,3,H,W]`` in [0,1] -> an MP4 (H.264 through imageio-ffmpeg)."""
    import imageio.v2 as iio2

    frames = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()
    # macro_block_size=1 keeps tiny test videos at their size instead of padding to 16.
    iio2.mimwrite(str(path), list(frames), fps=fps, codec="libx264", macro_block_size=1, quality=8)


def save_image(path: str | Path, pixels: torch.Tensor) -> None:
    from PIL import Image

    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()
    Image.fromarray(array).save(path)


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True
