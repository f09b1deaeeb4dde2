"""The ``cogvlm2`` answer backend: the official VisionReward checkpoints, asked the release's way, fast.

The release asks each checklist question with its own ``generate()`` over the whole prompt, so the
image (or the 24 video frames) goes through the vision tower and the full prompt through the decoder
once per question: 30 (image) or 29 (video) full passes per sample. Here, per batch of samples:

1. every question of a sample is tokenised in the release's layout (``inputs.py``); the longest run of
   text tokens that all its questions share ("Question:") joins ``[bos]`` and the vision block as the
   sample's *prefix*;
2. the vision tower runs once over all images / frames of the batch and the prefixes run once,
   right-padded, keeping each layer's keys and values;
3. the question *suffixes* of a sample are packed into one sequence after its prefix, with a mask that
   lets each suffix token see the prefix and the earlier tokens of its own question only, and
   positions that restart for every question where a lone full pass would put them. So no copy of the
   prefix keys/values per question is ever made (the usual way, repeating the cache per question,
   costs ~0.3 GB per question per image at full size), and every sample of the batch is one row;
4. p(yes) is read from the logits at each question's last token.

Answer rule (``answer_rule``):

- ``"official"`` (default): the release's hard answer is "the first greedy token is the release's yes"
  (video: a token that decodes to exactly ``yes``; image: one whose decoded text stripped is ``yes``,
  since the image release compares the stripped response). p(yes) is ``sigmoid(best yes logit - best
  logit of any other token)``, so ``p >= 0.5`` is exactly that hard answer, and the value stays soft.
  The image release also wants end-of-text as the second token; that second step is not taken here (a
  fine-tuned VisionReward checkpoint answers one word).
- ``"yes-no"``: ``sigmoid(best yes spelling - best no spelling)`` over "yes"/"Yes"/" yes"/... and the
  same for no, as the ``vlm`` backend does (a binary answer even from a model that would say "Maybe").

Queries (``query_format="release"``, default): the video release reads its question file with
``readlines()``, so every question but the file's last keeps its trailing newline ("...?\\n Answer:");
dropping it moves the yes/no gap. The image release strips each line. The checklist's order stands for
the file's order (exact for the released ``*-official`` lists). ``"plain"`` asks the texts as given.

``answer_naive`` is the release's way on the same port (one full forward per question, the visual
re-encoded every time, full-vocabulary logits at the answer position): the reference for the tests
and the baseline of ``benchmarks/reward_scoring.py``. In float32 both paths agree to ~1e-6.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from reward.backends.cogvlm2.config import CogVLM2Error
from reward.backends.cogvlm2.inputs import PromptBuilder
from reward.backends.cogvlm2.modeling import LANGUAGE, position_ids
from reward.backends.yes_no import (
    NO_SPELLINGS,
    YES_SPELLINGS,
    answer_token_ids,
    check_question_lists,
    p_yes_of,
    shared_prefix_length,
)
from reward.types import Answers, Sample

AnswerRule = Literal["official", "yes-no"]
QueryFormat = Literal["release", "plain"]


@dataclass(frozen=True)
class ReleaseRule:
    """How the released inference script of a variant asks and reads its questions."""

    template: str  # prompt template passed to build_conversation_input_ids
    newlines: str  # "readlines": all but the last question keep "\n"; "strip": none do
    yes_match: str  # "exact": decode(token) == "yes"; "strip": decode(token).strip() == "yes"


RELEASE_RULES = {
    "video": ReleaseRule(template="chat", newlines="readlines", yes_match="exact"),
    "image": ReleaseRule(template="vqa", newlines="strip", yes_match="strip"),
}
_YES_CANDIDATES = ("yes", " yes", "yes ", " yes ", "\nyes")


def release_yes_ids(tokenizer: Any, yes_match: str) -> list[int]:
    """Single-token spellings that the release reads as a yes."""
    ids: list[int] = []
    for text in _YES_CANDIDATES:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1 or encoded[0] in ids:
            continue
        decoded = tokenizer.decode(encoded)
        if decoded == "yes" or (yes_match == "strip" and decoded.strip() == "yes"):
            ids.append(encoded[0])
    return ids


def release_queries(questions: Sequence[str], newlines: str) -> list[str]:
    """The checklist's questions as the release's script would read them from its question file."""
    if newlines == "readlines":
        return [q + "\n" for q in questions[:-1]] + list(questions[-1:])
    return [q.strip() for q in questions]


@dataclass
class _Split:
    """One sample's questions cut into the shared text prefix and per-question suffix ids."""

    prefix_text: list[int]
    suffixes: list[list[int]]


class CogVLM2Backend:
    """Answers checklist questions with a native CogVLM2 (see the module doc)."""

    name = "cogvlm2"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        source: str,
        batch_size: int = 8,
        max_frames: int = 24,
        answer_rule: AnswerRule = "official",
        query_format: QueryFormat = "release",
        question_chunk: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.source = source
        self.rule = RELEASE_RULES[self.config.variant]
        self.builder = PromptBuilder(self.config, tokenizer, self.rule.template, max_frames)
        self.batch_size = max(1, int(batch_size))
        if answer_rule not in ("official", "yes-no"):
            raise CogVLM2Error(f"answer_rule must be 'official' or 'yes-no', got {answer_rule!r}")
        if query_format not in ("release", "plain"):
            raise CogVLM2Error(f"query_format must be 'release' or 'plain', got {query_format!r}")
        self.answer_rule = answer_rule
        self.query_format = query_format
        self.question_chunk = int(question_chunk) if question_chunk else None
        if answer_rule == "official":
            self.yes_ids = release_yes_ids(tokenizer, self.rule.yes_match)
            self.no_ids: list[int] = []
        else:
            self.yes_ids = answer_token_ids(tokenizer, YES_SPELLINGS)
            self.no_ids = answer_token_ids(tokenizer, NO_SPELLINGS)
        if not self.yes_ids or (answer_rule == "yes-no" and not self.no_ids):
            raise CogVLM2Error(f"{source}: 'yes' / 'no' are not single tokens of this tokenizer")
        self._split_cached = functools.lru_cache(maxsize=256)(self._split)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> CogVLM2Backend:
        """Load a CogVLM2 checkpoint in any released layout (``loading.py``) and its tokenizer."""
        from reward.backends.cogvlm2.loading import load_config, load_model, load_tokenizer
        from reward.backends.vlm import parse_dtype

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        load_config(path)  # an unknown family or an unconverted SAT release fails here, by name
        tokenizer = load_tokenizer(path)
        model = load_model(path, dtype=parse_dtype(dtype), device=device)
        return cls(model, tokenizer, source=str(path), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------ the contract
    def answer(
        self,
        samples: list[Sample],
        questions: list[list[str]],
        alignment_questions: list[str] | None = None,
    ) -> Answers:
        """p(yes) ``[B, Q]`` over a shared prefix per sample (module doc); alignment ``[B]`` or None."""
        return self._answer(samples, questions, alignment_questions, self._score_fast)

    def answer_naive(
        self,
        samples: list[Sample],
        questions: list[list[str]],
        alignment_questions: list[str] | None = None,
    ) -> Answers:
        """The release's way: one full forward per question, the visual re-encoded every time."""
        return self._answer(samples, questions, alignment_questions, self._score_naive)

    def queries(self, questions: Sequence[str]) -> list[str]:
        """The texts that are put into the template for these checklist questions."""
        if self.query_format == "release":
            return release_queries(questions, self.rule.newlines)
        return list(questions)

    def p_yes(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, vocab]`` answer-position logits -> ``[N]`` p(yes) under the answer rule."""
        logits = logits.float()
        if self.answer_rule == "official":
            yes = logits[:, self.yes_ids].max(-1).values
            other = logits.index_fill(1, torch.tensor(self.yes_ids, device=logits.device), float("-inf"))
            return torch.sigmoid(yes - other.max(-1).values)
        return self._p_yes_no(logits[:, self.yes_ids + self.no_ids])

    def _p_yes_no(self, candidates: torch.Tensor) -> torch.Tensor:
        """``[N, yes + no]`` logits of the yes and no spellings -> ``[N]`` p(yes) (best spelling each)."""
        n_yes = len(self.yes_ids)
        return p_yes_of(candidates[:, :n_yes], candidates[:, n_yes:], "max")

    def _answer(self, samples, questions, alignment_questions, score) -> Answers:
        q_count = check_question_lists(samples, questions, alignment_questions, CogVLM2Error)
        if not samples:
            return Answers(p_yes=torch.empty(0, 0), source=f"cogvlm2:{self.source}")
        rows = [
            self.queries(qs) + ([alignment_questions[i]] if alignment_questions is not None else [])
            for i, qs in enumerate(questions)
        ]
        parts = []
        with torch.inference_mode():
            for start in range(0, len(samples), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                if rows[0]:
                    parts.append(score(samples[chunk], rows[chunk]).float().cpu())
                else:
                    parts.append(torch.empty(len(samples[chunk]), 0))
        p = torch.cat(parts)
        if alignment_questions is None:
            return Answers(p_yes=p, source=f"cogvlm2:{self.source}")
        return Answers(
            p_yes=p[:, :q_count].contiguous(),
            alignment=p[:, q_count],
            source=f"cogvlm2:{self.source}",
            notes=["alignment asked of the CogVLM2 checkpoint itself (the image release uses VQAScore)"],
        )

    # ------------------------------------------------------------------------------ naive
    @torch.no_grad()
    def first_token_logits(
        self, sample: Sample, query: str, pixels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full-vocabulary logits ``[vocab]`` at the answer position of one question, by one full
        forward over the release's prompt (what the release's greedy generate reads its first token
        from)."""
        pixels = self.builder.pixels(sample) if pixels is None else pixels
        ids, types = self.builder.row(pixels.shape[0], sample.modality, query)
        self.builder.check_length(sample, len(ids))
        device = self.device
        logits = self.model(
            input_ids=torch.tensor([ids], device=device),
            token_type_ids=torch.tensor([types], device=device),
            images=pixels.to(device),
            last_only=True,
        )
        return logits[0, -1]

    def _score_naive(self, samples: list[Sample], rows: list[list[str]]) -> torch.Tensor:
        out = torch.empty(len(samples), len(rows[0]))
        for i, sample in enumerate(samples):
            for j, query in enumerate(rows[i]):
                out[i, j] = self.p_yes(self.first_token_logits(sample, query)[None])[0]
        return out

    # ------------------------------------------------------------------------------ fast
    def _split(self, rows: tuple[str, ...]) -> _Split:
        """Longest text-token prefix shared by all rows (one token at least is left to each row)."""
        texts = [self.builder.text_ids(q) for q in rows]
        shared = shared_prefix_length(texts)
        return _Split(prefix_text=texts[0][:shared], suffixes=[t[shared:] for t in texts])

    def _score_fast(self, samples: list[Sample], rows: list[list[str]]) -> torch.Tensor:
        device = self.device
        model = self.model.model
        pixels = [self.builder.pixels(s) for s in samples]
        splits = [self._split_cached(tuple(r)) for r in rows]
        prefixes = []
        for sample, pix, split in zip(samples, pixels, splits):
            ids, types = self.builder.vision_block(pix.shape[0], sample.modality)
            ids = [self.builder.bos, *ids, *split.prefix_text]
            types = [LANGUAGE, *types, *[LANGUAGE] * len(split.prefix_text)]
            self.builder.check_length(sample, len(ids) + max(len(s) for s in split.suffixes))
            prefixes.append((ids, types))

        # Prefix pass: right-padded, vision tower once over every image / frame of the batch.
        width = max(len(ids) for ids, _ in prefixes)
        batch = len(samples)
        ids = torch.full((batch, width), self.builder.placeholder, dtype=torch.long)
        types = torch.zeros_like(ids)
        positions = torch.zeros_like(ids)
        real = torch.zeros(batch, width, dtype=torch.bool)
        for b, (row_ids, row_types) in enumerate(prefixes):
            n = len(row_ids)
            ids[b, :n] = torch.tensor(row_ids)
            types[b, :n] = torch.tensor(row_types)
            positions[b, :n] = position_ids(types[b, :n])
            real[b, :n] = True
        start = positions.gather(1, real.sum(1, keepdim=True) - 1)[:, 0] + 1  # first suffix position
        ids, types, positions, real = ids.to(device), types.to(device), positions.to(device), real.to(device)
        mask = None
        if not bool(real.all()):
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            mask = causal[None, None] & real[:, None, None, :]
        embeds = model.embed(ids, types, torch.cat(pixels).to(device))
        _, cache = model(embeds, positions, types, mask)

        per_sample = len(rows[0])
        chunk = self.question_chunk or per_sample
        parts = [
            self._score_suffixes(cache, real, start, [s.suffixes[first : first + chunk] for s in splits])
            for first in range(0, per_sample, chunk)
        ]
        return torch.cat(parts, dim=1)

    def _score_suffixes(
        self, cache: list, prefix_real: torch.Tensor, start: torch.Tensor, suffixes: list[list[list[int]]]
    ) -> torch.Tensor:
        """Every sample's question suffixes packed into one row after its cached prefix -> ``[B, Q]``."""
        device = self.device
        batch, questions = len(suffixes), len(suffixes[0])
        lengths = [sum(len(s) for s in row) for row in suffixes]
        width = max(lengths)
        ids = torch.full((batch, width), self.builder.placeholder, dtype=torch.long)
        question = torch.full((batch, width), -1, dtype=torch.long)  # which question a token belongs to
        offset = torch.zeros(batch, width, dtype=torch.long)  # its index within that question
        last = torch.zeros(batch, questions, dtype=torch.long)  # where each question's answer is read
        for b, row in enumerate(suffixes):
            at = 0
            for q, tokens in enumerate(row):
                n = len(tokens)
                ids[b, at : at + n] = torch.tensor(tokens)
                question[b, at : at + n] = q
                offset[b, at : at + n] = torch.arange(n)
                last[b, q] = at + n - 1
                at += n
        ids, question, offset, last = ids.to(device), question.to(device), offset.to(device), last.to(device)
        same = (question[:, :, None] == question[:, None, :]) & (question[:, None, :] >= 0)
        own = same & (offset[:, None, :] <= offset[:, :, None])
        mask = torch.cat([prefix_real[:, None, :].expand(-1, width, -1), own], dim=2)[:, None]
        positions = start.to(device)[:, None] + offset
        model = self.model.model
        hidden, _ = model(model.embed_tokens(ids), positions, None, mask, past=cache)
        answer = hidden.gather(1, last[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, Q, hidden]
        answer = answer.reshape(batch * questions, -1)
        head = self.model.lm_head
        if self.answer_rule == "official":  # the best non-yes token is needed: the whole vocabulary
            p = self.p_yes(head(answer))
        else:  # only the yes / no spellings' rows of the output projection
            p = self._p_yes_no(torch.nn.functional.linear(answer, head.weight[self.yes_ids + self.no_ids]))
        return p.view(batch, questions)
