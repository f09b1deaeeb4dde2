"""Procedurally drawn images whose checklist answers the pixels decide: data for the tiny recipes.

::

    python -m reward.synthetic runs/_data/shapes            # 160 images, their checklist, annotations

Each image is a gray background, bright (level 0.6-0.9) or dark (0.1-0.4), with one square, red or
blue, somewhere in it. Four questions, two per property and of opposite polarity::

    Is the image bright?   Is the image dark?   Is there a red square?   Is there a blue square?

The opposite pairs make the test of learning honest: an untrained model's p(yes) moves with the
pixels in some direction (a random network's output still depends on the mean brightness), but it
cannot move the right way for both questions of a pair, so its held-out accuracy is near chance;
only a model that reads the question and the image answers both. Each sample is annotated on 2 to 4
of its questions (as real annotations skip questions), one row per answer, so the trainer sees
samples with different numbers of questions.

The folder holds ``checklist.yaml`` (the four questions), ``images/*.png`` and ``annotations.jsonl``;
:func:`write_shapes` returns their paths, and :func:`draw` the pixels and answers of one image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

QUESTIONS = {
    "bright": "Is the image bright?",
    "dark": "Is the image dark?",
    "red_square": "Is there a red square?",
    "blue_square": "Is there a blue square?",
}
CHECKLIST = """\
# Four questions the pixels of reward.synthetic's images decide (a demo and test checklist).
name: shapes
modality: image
scoring: {answers: soft, gates: soft, reduction: sum}
default_weight: equal
dimensions:
  - name: shapes
    sub_dimensions:
      - name: brightness
        options: [bright, dark]
        questions:
          - {id: bright, text: "Is the image bright?", option: bright}
          - {id: dark, text: "Is the image dark?", option: dark}
      - name: colour
        options: [red, blue]
        questions:
          - {id: red_square, text: "Is there a red square?", option: red}
          - {id: blue_square, text: "Is there a blue square?", option: blue}
"""
_RED = torch.tensor([0.9, 0.1, 0.1])
_BLUE = torch.tensor([0.1, 0.15, 0.9])


def draw(index: int, seed: int = 0, size: int = 56) -> tuple[torch.Tensor, dict[str, bool]]:
    """Image ``index`` of the set (``[3, size, size]`` in [0, 1]) and its four answers. Brightness and
    colour alternate with the index, so any run of 4 consecutive images is balanced."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    bright, red = index % 2 == 0, (index // 2) % 2 == 0
    low = 0.6 if bright else 0.1
    level = low + 0.3 * torch.rand((), generator=gen)
    image = level + 0.04 * torch.randn(3, size, size, generator=gen)
    side = int(torch.randint(size * 3 // 8, size // 2 + 1, (), generator=gen))
    y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=gen))
    colour = _RED if red else _BLUE
    image[:, y : y + side, x : x + side] = colour[:, None, None] + 0.03 * torch.randn(
        3, side, side, generator=gen
    )
    answers = {"bright": bright, "dark": not bright, "red_square": red, "blue_square": not red}
    return image.clamp(0, 1), answers


def write_shapes(folder: str | Path, count: int = 160, seed: int = 0, size: int = 56) -> dict[str, Path]:
    """Write the checklist, ``count`` images and their annotations into ``folder``."""
    from reward.media import save_image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "checklist.yaml").write_text(CHECKLIST)
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for index in range(count):
        image, answers = draw(index, seed, size)
        name = f"images/{index:05d}.png"
        save_image(folder / name, image)
        keep = torch.randperm(4, generator=gen)[: int(torch.randint(2, 5, (), generator=gen))].tolist()
        for q in sorted(keep):
            qid = list(QUESTIONS)[q]
            answer = "yes" if answers[qid] else "no"
            lines.append(
                json.dumps({"image": name, "prompt": "", "question": QUESTIONS[qid], "answer": answer})
            )
    (folder / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "checklist": folder / "checklist.yaml",
        "annotations": folder / "annotations.jsonl",
        "images": folder / "images",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=56, help="pixels (square)")
    args = parser.parse_args(argv)
    paths = write_shapes(args.folder, args.count, args.seed, args.size)
    print(f"{args.count} images -> {paths['annotations']} (checklist {paths['checklist']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
