"""The reward's data contract: what a backend is given and what it answers.

A *sample* is one image or one video with the prompt that produced it. Pixels are float tensors in
[0, 1], channels first, so the generate stage can hand decoded latents over without re-encoding them
to files:

- image: ``[3, H, W]``
- video: ``[T, 3, H, W]`` plus the frame rate, so that frames can be sampled per second the way the
  released checkpoints were trained.

A backend answers every question of a checklist for a batch of samples with p(yes). ``NaN`` means
"this backend cannot judge this question": the scorer excludes it, it is never read as 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

Modality = Literal["image", "video"]


@dataclass
class Sample:
    """One visual sample to be judged.

    pixels: float tensor in [0, 1]; ``[3, H, W]`` for an image, ``[T, 3, H, W]`` for a video.
    fps: frames per second of a video (ignored for images).
    """

    pixels: torch.Tensor
    prompt: str = ""
    fps: float = 8.0
    id: str = ""

    @property
    def modality(self) -> Modality:
        return "video" if self.pixels.ndim == 4 else "image"

    def __post_init__(self) -> None:
        if self.pixels.ndim not in (3, 4) or self.pixels.shape[-3] != 3:
            raise ValueError(
                f"sample {self.id or '?'}: pixels must be [3,H,W] or [T,3,H,W], got {tuple(self.pixels.shape)}"
            )


@dataclass
class Answers:
    """Per-question answers for a batch.

    p_yes: ``[B, Q]`` probability of "yes" for each checklist question, NaN where unknown.
    alignment: ``[B]`` image-text alignment probability for checklists with an alignment term
        (VQAScore-style), or None.
    source: which backend produced these answers (carried into outputs so that a demo backend is
        never mistaken for a trained reward).
    """

    p_yes: torch.Tensor
    alignment: torch.Tensor | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class AnswerBackend(Protocol):
    """Who answers the checklist questions.

    ``questions`` are the final question texts (prompt already substituted), one list per sample,
    all of the same length Q. ``alignment_question`` is the per-sample alignment query (or None when
    the checklist has no alignment term).
    """

    name: str

    def answer(
        self,
        samples: list[Sample],
        questions: list[list[str]],
        alignment_questions: list[str] | None = None,
    ) -> Answers: ...
