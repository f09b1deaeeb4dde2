"""VisionReward: questions rendered per prompt, batching invisible in the scores, modality checked."""

from __future__ import annotations

import zlib

import pytest
import torch

from reward.checklist import ChecklistError, load_checklist
from reward.types import Answers, Sample
from reward.visionreward import VisionReward


class RecordingBackend:
    """Answers from (question text, sample brightness) deterministically and records what it was asked."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[list[str]], list[str] | None]] = []

    def answer(self, samples, questions, alignment_questions=None) -> Answers:
        self.calls.append((len(samples), questions, alignment_questions))
        rows = []
        for sample, qs in zip(samples, questions):
            level = float(sample.pixels.mean())
            rows.append([((zlib.crc32(q.encode()) % 1000) / 1000 + level) % 1.0 for q in qs])
        alignment = None
        if alignment_questions is not None:
            alignment = torch.tensor([(zlib.crc32(a.encode()) % 100) / 100 for a in alignment_questions])
        return Answers(p_yes=torch.tensor(rows), alignment=alignment, source=self.name)


def _images(n: int) -> list[Sample]:
    gen = torch.Generator().manual_seed(0)
    return [
        Sample(torch.rand(3, 8, 8, generator=gen) * (i + 1) / n, prompt=f"prompt {i}", id=str(i))
        for i in range(n)
    ]


def test_prompts_are_filled_in_and_alignment_is_asked():
    backend = RecordingBackend()
    reward = VisionReward(load_checklist("video-official"), backend, batch_size=4)
    video = Sample(torch.rand(9, 3, 8, 8), prompt="a cat surfing", fps=8)
    reward.score([video])
    _, questions, alignment = backend.calls[0]
    assert 'Does the video meet all the requirements stated in the text "a cat surfing"?' in questions[0]
    assert alignment is None  # video checklists judge alignment with their own questions
    image_backend = RecordingBackend()
    VisionReward(load_checklist("image-official"), image_backend).score(_images(2))
    assert image_backend.calls[0][2] == [
        'Does this figure show "prompt 0"? Please answer yes or no.',
        'Does this figure show "prompt 1"? Please answer yes or no.',
    ]


def test_batch_size_does_not_change_scores():
    samples = _images(7)
    one = VisionReward(load_checklist("image-full"), RecordingBackend(), batch_size=1).score(samples)
    three_backend = RecordingBackend()
    three = VisionReward(load_checklist("image-full"), three_backend, batch_size=3).score(samples)
    assert [c[0] for c in three_backend.calls] == [3, 3, 1]
    torch.testing.assert_close(one.total, three.total)
    torch.testing.assert_close(one.dimensions, three.dimensions)
    assert three.source == "recording"


def test_modality_mismatch_names_the_sample():
    reward = VisionReward(load_checklist("video-full"), RecordingBackend())
    with pytest.raises(ChecklistError, match="sample 3 is an image"):
        reward.score([_images(4)[3]])
