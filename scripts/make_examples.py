"""Writes the small example images and videos in examples/ (procedural, a few KB each).

They exist so that `reward score` has something to score on a fresh machine: bright vs dark, sharp vs
blurred, rich vs empty, symmetric, and a moving vs a static clip.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from reward.media import save_image, save_video

SIZE = 96


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    y, x = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    return y, x


def _blur(img: torch.Tensor, k: int = 9) -> torch.Tensor:
    kernel = torch.ones(3, 1, k, k) / (k * k)
    return F.conv2d(F.pad(img[None], (k // 2,) * 4, mode="replicate"), kernel, groups=3)[0]


def examples() -> dict[str, tuple[torch.Tensor, str]]:
    gen = torch.Generator().manual_seed(0)
    y, x = _grid()
    sky = torch.stack([0.55 + 0.3 * (1 - y), 0.75 + 0.2 * (1 - y), 0.95 * torch.ones_like(y)])
    sand = torch.stack([0.95 * torch.ones_like(y), 0.85 * torch.ones_like(y), 0.6 * torch.ones_like(y)])
    beach = torch.where((y > 0.6)[None], sand, sky)
    sun = ((x - 0.75) ** 2 + (y - 0.2) ** 2 < 0.01).float()
    beach = (beach + sun[None] * torch.tensor([0.1, 0.1, -0.3])[:, None, None]).clamp(0, 1)
    cave = (0.08 + 0.05 * torch.rand(3, SIZE, SIZE, generator=gen)) * torch.tensor([1.0, 0.9, 1.2])[
        :, None, None
    ]
    checker = (torch.div(x * 12, 1, rounding_mode="floor") + torch.div(y * 12, 1, rounding_mode="floor")) % 2
    checker = torch.stack([checker, 0.6 * checker + 0.2, 1 - checker]).clamp(0, 1)
    flat = torch.full((3, SIZE, SIZE), 0.5)
    butterfly = torch.exp(-(((x - 0.5).abs() - 0.22) ** 2 + (y - 0.5) ** 2) / 0.01)
    butterfly = torch.stack([butterfly, 0.4 * butterfly, 0.8 * (1 - butterfly)]).clamp(0, 1)
    return {
        "bright_beach.png": (beach, "a bright sunny beach"),
        "dark_cave.png": (cave.clamp(0, 1), "a dark cave at night"),
        "sharp_checkerboard.png": (checker, "a colourful checkerboard"),
        "blurred_checkerboard.png": (_blur(checker), "a colourful checkerboard"),
        "empty_grey.png": (flat, "an empty grey wall"),
        "symmetric_butterfly.png": (butterfly, "a symmetric butterfly"),
    }


def videos() -> dict[str, tuple[torch.Tensor, str]]:
    frames = 24
    y, x = _grid()
    moving = []
    for t in range(frames):
        cx = 0.2 + 0.6 * t / (frames - 1)
        ball = (((x - cx) ** 2 + (y - 0.5) ** 2) < 0.012).float()
        moving.append(torch.stack([0.2 + 0.8 * ball, 0.3 + 0.5 * ball, 0.6 * (1 - ball)]))
    static = [moving[0]] * frames
    return {
        "moving_ball.mp4": (torch.stack(moving), "a red ball rolling to the right"),
        "static_ball.mp4": (torch.stack(static), "a red ball lying still"),
    }


def main(out: str = "examples") -> None:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    prompts = {}
    for name, (pixels, prompt) in examples().items():
        save_image(root / name, pixels)
        prompts[name] = prompt
    for name, (pixels, prompt) in videos().items():
        save_video(root / name, pixels, fps=8)
        prompts[name] = prompt
    (root / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
    print(f"wrote {len(prompts)} examples to {root}")


if __name__ == "__main__":
    main()
