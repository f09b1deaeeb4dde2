"""A checklist backend paired with a separate model for the alignment term.

The release scores image-text alignment with VQAScore on CLIP-FlanT5, not with the checklist VLM: its
image score is that probability times 2.354 plus the gated answers. :func:`build_alignment` loads
CLIP-FlanT5 (:class:`reward.backends.vqascore.VQAScoreBackend`) when the checkpoint is one, and
otherwise any supported VLM, whose p(yes) to the same question is an approximation of VQAScore (another
model, another prompt format, a yes-vs-no read-out instead of the probability of the answer "Yes").
"""

from __future__ import annotations

from typing import Any

from reward.types import AnswerBackend, Answers, Sample


def build_alignment(path: str, **kwargs: Any) -> Any:
    """VQAScore for a CLIP-FlanT5 checkpoint, else a VLM backend (``kwargs``: the VLM's settings)."""
    from reward.backends.vqascore import VQAScoreBackend, is_clip_flant5

    if is_clip_flant5(path):
        keep = {k: kwargs[k] for k in ("dtype", "device", "batch_size") if k in kwargs}
        return VQAScoreBackend.from_pretrained(path, **keep)
    from reward.backends.vlm import VLMBackend

    return VLMBackend.from_pretrained(path, **kwargs)


class AlignedBackend:
    """Questions answered by ``backend``; the alignment question by ``alignment`` (see module doc)."""

    def __init__(self, backend: AnswerBackend, alignment: Any) -> None:
        self.backend = backend
        self.alignment = alignment
        self.name = backend.name

    def answer(
        self,
        samples: list[Sample],
        questions: list[list[str]],
        alignment_questions: list[str] | None = None,
    ) -> Answers:
        answers = self.backend.answer(samples, questions, None)
        if alignment_questions is None:
            return answers
        aligned = self.alignment.answer(samples, [[q] for q in alignment_questions])
        return Answers(
            p_yes=answers.p_yes,
            alignment=aligned.p_yes[:, 0],
            source=answers.source,
            notes=[*answers.notes, f"alignment answered by {aligned.source}"],
        )
