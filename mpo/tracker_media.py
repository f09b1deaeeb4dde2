"""Eval samples as tracker media: one captioned image or video per sample, in each tracker's own type.

- wandb: a list of ``wandb.Image`` (``eval/samples``) captioned "<prompt> (step n, reward r)", and for
  video backbones a list of ``wandb.Video`` (``eval/videos``) made from MP4 files written here
  (``wandb.Video`` needs moviepy only to encode raw arrays, not for a file).
- tensorboard: ``add_image`` per sample (tag ``eval/<prompt_id>-<sample>``) with the prompt as
  ``add_text``, and for videos the animated-GIF image summary that ``SummaryWriter.add_video``
  writes; it is encoded here with PIL, since ``add_video``'s own encoder needs moviepy 1.x.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def caption(preview: dict[str, Any], step: int) -> str:
    total = preview.get("total")
    reward = "" if total is None or total != total else f", reward {total:.4f}"
    return f"{preview['prompt']} (step {step}{reward})"


def write_mp4(path: Path | str, frames: np.ndarray, fps: float) -> None:
    """uint8 [T, H, W, 3] frames as an H.264 MP4 (imageio's ffmpeg), playable in browsers."""
    import imageio.v2 as imageio

    with imageio.get_writer(
        str(path), format="FFMPEG", mode="I", fps=max(fps, 1.0), macro_block_size=1
    ) as writer:
        for frame in frames:
            writer.append_data(frame)


def log_wandb(tracker: Any, previews: list[dict[str, Any]], step: int) -> None:
    import wandb

    images = [wandb.Image(x["image"], caption=caption(x, step)) for x in previews]
    values: dict[str, Any] = {"eval/samples": images}
    videos = [x for x in previews if "video" in x]
    with tempfile.TemporaryDirectory() as folder:
        if videos:
            clips = []
            for x in videos:
                path = Path(folder) / f"{x['prompt_id']}-{x['sample_idx']}.mp4"
                write_mp4(path, x["video"], x["fps"])
                clips.append(wandb.Video(str(path), caption=caption(x, step), format="mp4"))
            values["eval/videos"] = clips
        tracker.log(values, step=step)  # wandb copies the files into the run while logging


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    from PIL import Image

    pictures = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    duration = round(1000 / max(fps, 1.0))
    pictures[0].save(
        buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=duration, loop=0
    )
    return buffer.getvalue()


def log_tensorboard(tracker: Any, previews: list[dict[str, Any]], step: int) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    writer = tracker.tracker  # the SummaryWriter
    for x in previews:
        tag = f"eval/{x['prompt_id']}-{x['sample_idx']}"
        writer.add_text(f"{tag}/prompt", caption(x, step), global_step=step)
        if "video" in x:
            frames = x["video"]
            image = Summary.Image(
                height=frames.shape[1],
                width=frames.shape[2],
                colorspace=3,
                encoded_image_string=gif_bytes(frames, x["fps"]),
            )
            writer._get_file_writer().add_summary(
                Summary(value=[Summary.Value(tag=f"{tag}/video", image=image)]), step
            )
        else:
            writer.add_image(tag, x["image"], global_step=step, dataformats="HWC")
    writer.flush()
