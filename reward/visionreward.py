"""The frozen reward as one object: a checklist, a backend that answers it, and the scoring rule.

The trainer and the score stage receive a built :class:`VisionReward` and call :meth:`score`; they
never load a VLM themselves (one reward contract).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from reward.checklist import Checklist, ChecklistError, load_checklist
from reward.model import ChecklistScorer, RewardScores
from reward.types import AnswerBackend, Sample


class VisionReward:
    def __init__(self, checklist: Checklist, backend: AnswerBackend, batch_size: int = 8) -> None:
        self.checklist = checklist
        self.backend = backend
        self.batch_size = max(1, int(batch_size))
        self.scorer = ChecklistScorer(checklist)

    @classmethod
    def from_config(cls, cfg, device: str | torch.device | None = None) -> VisionReward:
        """From a recipe's ``reward`` section (mpo.schema.RewardConfig) or anything with its fields;
        ``device`` places a VLM (default: CUDA when available)."""
        from reward.backends import MODEL_BACKENDS, build_backend

        checklist = load_checklist(cfg.checklist, weights=cfg.weights)
        kwargs = {}
        if cfg.backend in MODEL_BACKENDS:
            kwargs = {
                "dtype": cfg.dtype,
                "batch_size": cfg.batch_size,
                "max_frames": cfg.max_frames,
                "question_chunk": getattr(cfg, "question_chunk", None),
                "device": device,
            }
        if getattr(cfg, "alignment_model_path", None):  # VQAScore (CLIP-FlanT5) or a VLM's p(yes)
            kwargs["alignment_model_path"] = cfg.alignment_model_path
            kwargs.update({"dtype": cfg.dtype, "batch_size": cfg.batch_size, "device": device})
        backend = build_backend(cfg.backend, model_path=cfg.model_path, **kwargs)
        return cls(checklist, backend, batch_size=cfg.batch_size)

    @property
    def modality(self) -> str:
        return self.checklist.modality

    @torch.no_grad()
    def score(self, samples: list[Sample]) -> RewardScores:
        """Ask every question about every sample (in batches) and score the answers."""
        if not samples:
            raise ValueError("no samples to score")
        for s in samples:
            if s.modality != self.checklist.modality:
                raise ChecklistError(
                    f"sample {s.id or '?'} is {'an image' if s.modality == 'image' else 'a video'} "
                    f"but checklist {self.checklist.name!r} is for {self.checklist.modality}s"
                )
        p_parts, a_parts, source = [], [], ""
        for batch in _batches(samples, self.batch_size):
            questions = [self.checklist.question_texts(s.prompt) for s in batch]
            align_q = (
                [self.checklist.alignment_text(s.prompt) for s in batch]
                if self.checklist.alignment_question
                else None
            )
            answers = self.backend.answer(batch, questions, align_q)
            p_parts.append(answers.p_yes.float().cpu())
            if answers.alignment is not None:
                a_parts.append(answers.alignment.float().cpu())
            source = answers.source
        p_yes = torch.cat(p_parts)
        alignment = torch.cat(a_parts) if len(a_parts) == len(p_parts) and a_parts else None
        return self.scorer(p_yes, alignment, source=source)


def _batches(items: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
