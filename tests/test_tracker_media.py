"""Eval samples reach wandb and tensorboard as captioned media, videos included (no model needed)."""

from __future__ import annotations

import json
import subprocess

import numpy as np

from mpo.tracker_media import caption, log_tensorboard, log_wandb


def _previews() -> list[dict]:
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    return [
        {
            "prompt_id": 3,
            "sample_idx": 0,
            "prompt": "a red car",
            "total": 0.25,
            "image": video[0],
            "video": video,
            "fps": 4.0,
        },
        {"prompt_id": 7, "sample_idx": 1, "prompt": "a blue sea", "total": float("nan"), "image": video[1]},
    ]


class _Tracker:
    def __init__(self, run) -> None:
        self.run = run

    def log(self, values, step=None):
        self.run.log(values, step=step)


def test_wandb_gets_captioned_images_and_videos(tmp_path):
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="t")
    log_wandb(_Tracker(run), _previews(), step=5)
    run.finish()
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run(
        ["wandb", "leet", "inspect", "--json", str(log)], capture_output=True, text=True, check=True
    )
    (row,) = [json.loads(x)["history"]["item"] for x in out.stdout.splitlines() if '"history"' in x]
    assert row["eval/samples.captions"] == ["a red car (step 5, reward 0.2500)", "a blue sea (step 5)"]
    assert row["eval/videos._type"] == "videos" and row["eval/videos.captions"] == [
        "a red car (step 5, reward 0.2500)"
    ]
    (video,) = tmp_path.glob("wandb/offline-run-*/files/media/videos/eval/*.mp4")
    assert video.stat().st_size > 0


def test_tensorboard_gets_images_gif_videos_and_prompts(tmp_path):
    from accelerate.tracking import TensorBoardTracker
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = TensorBoardTracker("t", str(tmp_path))
    tracker.start()  # what Accelerator.init_trackers does
    log_tensorboard(tracker, _previews(), step=2)
    tracker.finish()
    (folder,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"eval/3-0/video", "eval/7-1"}
    (gif,) = acc.Images("eval/3-0/video")
    import io

    frames = Image.open(io.BytesIO(gif.encoded_image_string))
    assert frames.format == "GIF" and frames.n_frames == 5 and gif.step == 2
    assert "eval/3-0/prompt/text_summary" in acc.Tags()["tensors"]
    assert caption(_previews()[0], 2) == "a red car (step 2, reward 0.2500)"
