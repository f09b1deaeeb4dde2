"""A transformers vision-language model answering checklist questions with p(yes).

The released reward asks each question with its own greedy ``generate()`` over the full prompt, so
the image (or video) is encoded and the whole prompt is run once per question: 30 full passes per
image. Here, per batch of samples:

1. every question of a sample is rendered through the checkpoint's chat template and tokenised; the
   longest token prefix that all of a sample's questions share (system turn, user turn start, the
   visual placeholders, whatever text precedes the question) is the *shared prefix*;
2. the visuals of the batch are encoded once and the prefixes run once, right-padded, into a
   ``DynamicCache``;
3. the cache is copied along the batch (``batch_repeat_interleave``), one copy per question, and all
   question suffixes (question text, the template's turn closing, the assistant turn start) run as one
   right-padded batch over it;
4. p(yes) is read from the logits at each row's last real token. Only the answer tokens' rows of the
   output projection are applied, so no ``[rows, vocabulary]`` logits tensor is ever built (the
   supported models' heads are that projection alone: Gemma 3's vision-language head does not
   soft-cap its logits, unlike the text-only Gemma heads).

Families. The supported ones (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V, LLaVA-OneVision, InternVL,
SmolVLM, Idefics3, Gemma 3) and what differs between them are rows of
:data:`reward.backends.vlm_families.FAMILIES`; any other model type is refused with the list. The
library's processor of each family does the placeholder expansion; images are handed over one list per
sample. The rendered template is tokenised with ``add_special_tokens=False``: templates write their own
BOS, and a tokenizer that adds one too would start the prompt with two. Per-token type ids the
processor returns (``mm_token_type_ids``; Gemma 3's ``token_type_ids``, which make image tokens attend
to each other both ways) go with the prefix pass. Every encoded sample is checked to hold visual
placeholder tokens and pixel inputs: a model never silently answers from the text alone.

Positions. Qwen-style models (3D rotary positions) get the model's own ``get_rope_index`` over the
prefix plus one text token, exactly what a full forward computes, passed explicitly; suffix token j sits
at that first position + j on all three axes. Other models get ordinary 1D positions (real tokens
counted). Sliding-window layers (Gemma 3) index the window by cache slot, so a right-padded prefix would
shift it: when a prompt is longer than the window, prefixes run one sample at a time (no padding).

Answer tokens. "yes" and "no" have several spellings in a vocabulary ("yes", "Yes", " yes", ...).
Every spelling that is a single token is a candidate. ``answer_reduce="max"`` (default) compares
the best yes-spelling with the best no-spelling: p(yes) = softmax([max yes, max no])[0], so
``p(yes) >= 0.5`` is exactly "greedy decoding restricted to yes/no spellings starts with a yes",
the release's hard answer. ``"logsumexp"`` pools each side's probability over its spellings (the
total chance of answering yes in any spelling); its hard answer can differ from greedy decoding when
the spellings split the mass. Tokens that are neither yes nor no are ignored: the reward wants a
binary answer, and a trained checkpoint puts almost all its mass on these tokens.

Video. Frames are sampled one per second up to ``max_frames`` (:func:`reward.media.frame_indices_per_second`,
the release's rule) and handed to the processor with their metadata (original frame indices and frame
rate), so the timestamps a family writes into the prompt (Qwen3-VL, GLM-4.1V, SmolVLM) or its rotary
time axis (Qwen2.5-VL) are the frames' true times. Families without video input refuse videos.

Without torchvision, :func:`reward.backends.vlm_families.load_processor` builds each family's processor
with a torchvision-free video processor (:mod:`reward.backends.video_frames`).

``answer_naive`` is the release's way (one full pass per question, the visual re-encoded every time);
it exists to check the fast path against and to benchmark it. In float32 both give the same p(yes)
to ~1e-6; in bfloat16 they differ by up to ~0.01 (different kernels, same answers but near 0.5).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from reward.backends.vlm_families import (
    FAMILIES,
    SUPPORTED_MODEL_TYPES,
    VLMError,
    family_of,
    load_processor,
    model_type_of,
)
from reward.backends.yes_no import (
    NO_SPELLINGS,
    YES_SPELLINGS,
    AnswerReduce,
    answer_token_ids,
    check_question_lists,
    p_yes_of,
    shared_prefix_length,
)
from reward.media import frame_indices_per_second, to_uint8
from reward.types import Answers, Sample

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "VLMBackend",
    "VLMError",
    "chat_template_of",
    "checked_processor",
    "load_processor",
    "parse_dtype",
]

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
# Processor outputs aligned with the tokens (sliced with them); everything else describes the visuals.
_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")
_TEXT_KEYS = ("input_ids", "attention_mask", *_TOKEN_KEYS)
_PIXEL_KEYS = ("pixel_values", "pixel_values_videos")
_PLACEHOLDER_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise VLMError(f"reward dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def chat_template_of(processor: Any, source: str) -> str:
    """The processor's chat template (or its tokenizer's); questions are asked in that format only."""
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not template:
        raise VLMError(
            f"{source}: the processor has no chat template (chat_template.jinja or 'chat_template' in "
            "the processor/tokenizer config); the questions cannot be put into the model's prompt format"
        )
    return template


def checked_processor(path: str) -> Any:
    """The processor of a checkpoint this backend can answer with, checked before any weight is read:
    a supported family (else the error lists them) and a chat template."""
    family_of(model_type_of(path), path)
    processor = load_processor(path)
    chat_template_of(processor, path)
    return processor


class VLMBackend:
    """Answers checklist questions with a transformers image-text-to-text model (see module doc)."""

    name = "vlm"

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        source: str,
        batch_size: int = 8,
        max_frames: int = 24,
        answer_reduce: AnswerReduce = "max",
        question_chunk: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.family = family_of(getattr(model.config, "model_type", ""), source)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.chat_template = chat_template_of(processor, source)
        if answer_reduce not in ("max", "logsumexp"):
            raise VLMError(f"answer_reduce must be 'max' or 'logsumexp', got {answer_reduce!r}")
        self.source = source
        self.batch_size = max(1, int(batch_size))
        self.max_frames = int(max_frames)
        self.answer_reduce = answer_reduce
        # Questions per suffix batch: the prefix cache is copied once per question row, so at 1024 px,
        # 8 images and the 59-question full checklist the copies alone take ~19 GB for a 2B model;
        # a chunk bounds that at the cost of one extra cache copy per chunk. None: all at once.
        self.question_chunk = int(question_chunk) if question_chunk else None
        self.yes_ids = answer_token_ids(self.tokenizer, YES_SPELLINGS)
        self.no_ids = answer_token_ids(self.tokenizer, NO_SPELLINGS)
        if not self.yes_ids or not self.no_ids:
            raise VLMError(
                f"{source}: no single-token spelling of 'yes' ({self.yes_ids}) or 'no' ({self.no_ids}) "
                "in the vocabulary"
            )
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._split_cached = functools.lru_cache(maxsize=256)(self._split_rows)
        config = model.config
        self._visual_ids = sorted(
            {int(v) for a in _PLACEHOLDER_ATTRS if isinstance(v := getattr(config, a, None), int)}
        )
        text_config = config.get_text_config()
        sliding = "sliding_attention" in (getattr(text_config, "layer_types", None) or [])
        self._window = getattr(text_config, "sliding_window", None) if sliding else None
        self._forward_params = set(inspect.signature(model.forward).parameters)
        base = model.base_model
        self._rope_index = getattr(base, "get_rope_index", None)
        self._rope_params = set(inspect.signature(self._rope_index).parameters) if self._rope_index else set()
        decoder_params = set(inspect.signature(model.get_decoder().forward).parameters)
        self._cache_kwarg = "cache" if "cache" in decoder_params else "past_key_values"

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device | None = None,
        batch_size: int = 8,
        max_frames: int = 24,
        answer_reduce: AnswerReduce = "max",
        attn_implementation: str = "sdpa",
        question_chunk: int | None = None,
    ) -> VLMBackend:
        """Load a checkpoint (local folder or hub id) and its processor."""
        from transformers import AutoModelForImageTextToText

        path = str(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        processor = checked_processor(path)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=parse_dtype(dtype), attn_implementation=attn_implementation, device_map=str(device)
        )
        return cls(
            model,
            processor,
            source=path,
            batch_size=batch_size,
            max_frames=max_frames,
            answer_reduce=answer_reduce,
            question_chunk=question_chunk,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------------------------- inputs
    def visual_input(self, sample: Sample) -> torch.Tensor:
        """What the processor sees: ``[3,H,W]`` uint8 for an image, per-second frames for a video."""
        pixels = sample.pixels
        if sample.modality == "video":
            pixels = pixels[self.frame_indices(sample)]
        return to_uint8(pixels)

    def frame_indices(self, sample: Sample) -> list[int]:
        """The video frames the model sees (one per second, the release's rule)."""
        return frame_indices_per_second(sample.pixels.shape[0], sample.fps, self.max_frames)

    def video_metadata(self, sample: Sample) -> dict[str, Any]:
        """Where the processor's frames came from: original frame indices and rate (for timestamps)."""
        total = int(sample.pixels.shape[0])
        return {
            "total_num_frames": total,
            "fps": float(sample.fps),
            "frames_indices": self.frame_indices(sample),
            "duration": total / float(sample.fps),
        }

    def render(self, sample: Sample | str, question: str) -> str:
        """The full prompt text (visual placeholder unexpanded) asking ``question`` about a sample.

        ``sample`` may also be just the modality ("image" / "video"): the text depends on nothing else.
        """
        modality = sample if isinstance(sample, str) else sample.modality
        content = [{"type": modality}, {"type": "text", "text": question}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )

    def encode(self, samples: list[Sample], texts: list[str], padding_side: str = "right") -> dict:
        """Processor call for one text per sample, on the model's device."""
        return _to(self._process(samples, texts, padding_side), self.device)

    def _process(self, samples: list[Sample], texts: list[str], padding_side: str = "right") -> dict:
        self._check_modalities(samples)
        images = [[self.visual_input(s)] for s in samples if s.modality == "image"]
        videos = [s for s in samples if s.modality == "video"]
        kwargs: dict[str, Any] = {}
        if videos:  # frames already sampled: the processor must not sample again
            kwargs = {"video_metadata": [self.video_metadata(s) for s in videos], "do_sample_frames": False}
        enc = self.processor(
            text=texts,
            images=images or None,
            videos=[self.visual_input(s) for s in videos] or None,
            padding=True,
            padding_side=padding_side,
            return_tensors="pt",
            add_special_tokens=False,
            **kwargs,
        )
        enc = dict(enc)
        self._check_visuals(samples, enc)
        return enc

    def _check_modalities(self, samples: list[Sample]) -> None:
        if self.family.video is None:
            for sample in samples:
                if sample.modality == "video":
                    takes_video = ", ".join(f.name for f in FAMILIES if f.video is not None)
                    raise VLMError(
                        f"sample {sample.id or '?'}: {self.source} is a {self.family.name} model, which takes no "
                        f"video input; score videos with a family that does ({takes_video})"
                    )

    def _check_visuals(self, samples: list[Sample], enc: dict) -> None:
        """Every sample's prompt must hold visual placeholders and the batch pixel inputs, or the model
        would answer from the text alone."""
        ids = enc["input_ids"]
        placeholders = torch.isin(ids, torch.tensor(self._visual_ids, dtype=ids.dtype)).sum(-1)
        has_pixels = any(isinstance(enc.get(k), torch.Tensor) and enc[k].numel() for k in _PIXEL_KEYS)
        for sample, count in zip(samples, placeholders.tolist()):
            if count == 0 or not has_pixels:
                raise VLMError(
                    f"sample {sample.id or '?'}: the {sample.modality} did not reach {self.source} (the processor "
                    f"returned {'no visual placeholder tokens' if count == 0 else 'no pixel inputs'}); it would "
                    "answer from the text alone"
                )

    def _model_kwargs(self, enc: dict) -> dict:
        """Processor outputs the model's forward takes (the rest, e.g. ``video_metadata``, stay here)."""
        return {k: v for k, v in enc.items() if k in self._forward_params}

    # ----------------------------------------------------------------------------------- answers
    def answer(
        self,
        samples: list[Sample],
        questions: list[list[str]],
        alignment_questions: list[str] | None = None,
    ) -> Answers:
        """p(yes) ``[B,Q]`` over a shared prefix per sample (see module doc); alignment ``[B]`` or None."""
        return self._answer(samples, questions, alignment_questions, self._score_shared_prefix)

    def answer_naive(
        self,
        samples: list[Sample],
        questions: list[list[str]],
        alignment_questions: list[str] | None = None,
        use_generate: bool = False,
    ) -> Answers:
        """The release's way: one full pass per question, the visual re-encoded each time.

        ``use_generate=True`` runs ``generate(max_new_tokens=1)`` and reads its first-step logits,
        as the release does (with the soft read-out added); otherwise a plain forward.
        """

        def score(batch: list[Sample], rows: list[list[str]]) -> torch.Tensor:
            return self._score_naive(batch, rows, use_generate)

        return self._answer(samples, questions, alignment_questions, score)

    def p_yes(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` answer-position logits -> ``[N]`` p(yes) (module doc: the yes/no rule)."""
        return self._p_from_candidates(logits[:, self.yes_ids + self.no_ids])

    def _p_from_candidates(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, yes + no]`` logits of the yes and no spellings -> ``[N]`` p(yes)."""
        n_yes = len(self.yes_ids)
        return p_yes_of(logits[:, :n_yes], logits[:, n_yes:], self.answer_reduce)

    def _batch_key(self, sample: Sample) -> tuple:
        """Samples that may share a forward pass: one modality, and for families that take videos as one
        ``[videos, frames, ...]`` tensor, one frame count."""
        if sample.modality == "video" and self.family.equal_frames:
            return ("video", len(self.frame_indices(sample)))
        return (sample.modality,)

    def _answer(
        self,
        samples: list[Sample],
        questions: list[list[str]],
        alignment_questions: list[str] | None,
        score: Callable[[list[Sample], list[list[str]]], torch.Tensor],
    ) -> Answers:
        """Shared by both paths: rows per sample (the alignment question appended), batches."""
        q_count = check_question_lists(samples, questions, alignment_questions, VLMError)
        if not samples:
            return Answers(p_yes=torch.empty(0, 0), source=f"vlm:{self.source}")
        self._check_modalities(samples)
        rows = [
            list(qs) + ([alignment_questions[i]] if alignment_questions is not None else [])
            for i, qs in enumerate(questions)
        ]
        p = torch.empty(len(samples), len(rows[0]))
        groups: dict[tuple, list[int]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault(self._batch_key(sample), []).append(i)
        with torch.inference_mode():
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    index = members[start : start + self.batch_size]
                    if rows[0]:
                        p[index] = score([samples[i] for i in index], [rows[i] for i in index]).cpu().float()
        alignment = p[:, q_count] if alignment_questions is not None else None
        return Answers(p_yes=p[:, :q_count].contiguous(), alignment=alignment, source=f"vlm:{self.source}")

    # ----------------------------------------------------------------------------------- naive
    def _score_naive(self, samples: list[Sample], rows: list[list[str]], use_generate: bool) -> torch.Tensor:
        out = torch.empty(len(samples), len(rows[0]))
        for i, sample in enumerate(samples):
            for j, question in enumerate(rows[i]):
                out[i, j] = self.p_yes(self.full_pass_logits(sample, question, use_generate))[0]
        return out

    def full_pass_logits(self, sample: Sample, question: str, use_generate: bool = False) -> torch.Tensor:
        """``[1, V]`` answer-position logits of one question in its own full pass over the whole prompt,
        the visual encoded again (the release's way, and the reference of the fast paths). With
        ``use_generate``, the first-step logits of ``generate(max_new_tokens=1)``, as the release reads
        them; otherwise a plain forward (gradients flow when grad mode is on)."""
        inputs = self._model_kwargs(self.encode([sample], [self.render(sample, question)]))
        if use_generate:
            gen = self.model.generate(
                **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            return gen.logits[0]
        return self.model(**inputs, logits_to_keep=1).logits[:, -1]

    # ----------------------------------------------------------------------------------- fast
    def _split_rows(self, modality: str, rows: tuple[str, ...]) -> tuple[str, int, list[list[int]]]:
        """Full text of row 0, and per row the suffix token ids after the shared token prefix.

        The prefix is the longest run of tokens all rows start with (at least one token is left to
        each row, whose last token is where the answer is read). Suffixes are cut from each row's own
        tokenisation, so they are exactly the tokens a full pass over that row would see. Cached
        (``_split_cached``): the N candidates of a prompt are asked the same rows.
        """
        texts = [self.render(modality, q) for q in rows]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        shared = shared_prefix_length(ids)
        suffixes = [r[shared:] for r in ids]
        if any(t in self._visual_ids for s in suffixes for t in s):
            raise VLMError(
                "the chat template puts question text before the visual; the questions share no prefix "
                "that holds it (use answer_naive)"
            )
        return texts[0], len(ids[0]) - shared, suffixes

    def _prefix_inputs(self, samples: list[Sample], rows: list[list[str]]):
        """Right-padded prefix batch (visual inputs included) and each sample's suffix token ids.

        Right padding keeps every query row of the prefix pass attending to at least one real token
        (left padding gives fully masked rows, which some attention kernels turn into NaN); the padded
        slots stay in the cache, masked out for the suffixes.
        """
        full_texts, cut, suffixes = [], [], []
        for sample, sample_rows in zip(samples, rows):
            try:
                text, n_suffix, sfx = self._split_cached(sample.modality, tuple(sample_rows))
            except VLMError as err:
                raise VLMError(f"sample {sample.id or '?'}: {err}") from None
            full_texts.append(text)
            cut.append(n_suffix)
            suffixes.append(sfx)
        enc = self._process(samples, full_texts, padding_side="right")
        real = enc["attention_mask"].bool()
        lengths = real.sum(-1).tolist()
        starts = real.long().argmax(-1).tolist()  # 0 unless the processor padded on the left anyway
        prefix_lengths = [n - c for n, c in zip(lengths, cut)]
        width = max(prefix_lengths)
        ids = torch.full((len(samples), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        token_types = {k: torch.zeros_like(ids) for k in _TOKEN_KEYS if k in enc}
        for i, (n, p, o) in enumerate(zip(lengths, prefix_lengths, starts)):
            row = enc["input_ids"][i, o : o + n]
            if row[p:].tolist() != list(suffixes[i][0]):
                raise VLMError(
                    f"sample {samples[i].id or '?'}: the processor tokenised the prompt differently from "
                    "the tokenizer; cannot split it into a shared prefix and question suffixes"
                )
            ids[i, :p] = row[:p]
            mask[i, :p] = 1
            for key, types in token_types.items():
                types[i, :p] = torch.as_tensor(enc[key][i][o : o + p])
        visual = _to({k: v for k, v in enc.items() if k not in _TEXT_KEYS}, self.device)
        ids, mask = ids.to(self.device), mask.to(self.device)
        token_types = {k: v.to(self.device) for k, v in token_types.items()}
        return ids, mask, token_types, visual, suffixes

    def _positions(self, ids, mask, token_types, visual) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix position ids and the first suffix position per sample (``[3,B]`` or ``[B]``)."""
        if self._rope_index is None:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            return positions, mask.sum(-1)
        one = torch.ones_like(ids[:, :1])
        kwargs = {k: v for k, v in visual.items() if k in self._rope_params}
        types = token_types.get("mm_token_type_ids", torch.zeros_like(ids))
        positions, _ = self._rope_index(
            input_ids=torch.cat([ids, ids[:, -1:]], 1),
            mm_token_type_ids=torch.cat([types, 0 * one], 1),
            attention_mask=torch.cat([mask, one], 1),
            **kwargs,
        )
        return positions[..., :-1], positions[..., -1]

    def prefix_passes(
        self, samples: list[Sample], rows: list[list[str]], agree: Callable[[bool], bool] | None = None
    ) -> Iterator[tuple]:
        """The shared-prefix passes, each ``(cache, prefix mask, first suffix position, suffix ids per
        sample)``, for the scorer and the reward's trainer alike.

        One forward over every sample's right-padded prefix (visuals included) fills the cache, one row
        per sample. Where a right-padded prefix would shift a sliding window (module doc), there is one
        pass per sample instead, in order. ``agree`` (sliding-window models only, called with this
        batch's answer) lets processes that must run their forwards in lockstep (DeepSpeed ZeRO-3) take
        that decision together. Gradients flow through the passes when grad mode is on (the trainer).
        """
        inputs = self._prefix_inputs(samples, rows)
        if self._window is not None:
            ids, suffixes = inputs[0], inputs[4]
            longest = ids.shape[1] + max(len(s) for sample_suffixes in suffixes for s in sample_suffixes)
            one_each = len(samples) > 1 and longest > self._window
            if agree is not None:
                one_each = agree(one_each)
            if one_each and len(samples) > 1:
                for sample, sample_rows in zip(samples, rows):
                    yield self._prefix_forward(self._prefix_inputs([sample], [sample_rows]))
                return
        yield self._prefix_forward(inputs)

    def _prefix_forward(self, inputs: tuple) -> tuple:
        ids, mask, token_types, visual, suffixes = inputs
        prefix_pos, start = self._positions(ids, mask, token_types, visual)
        extra = {k: v for k, v in {**visual, **token_types}.items() if k in self._forward_params}
        prefix = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=prefix_pos,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        return _cache_of(prefix), mask, start, suffixes

    def _score_shared_prefix(self, samples: list[Sample], rows: list[list[str]]) -> torch.Tensor:
        return torch.cat([self._score_prefix(*passed) for passed in self.prefix_passes(samples, rows)])

    def _score_prefix(
        self, cache: Any, mask: torch.Tensor, start: torch.Tensor, suffixes: list[list[Sequence[int]]]
    ) -> torch.Tensor:
        """Every question of one prefix pass, ``question_chunk`` questions at a time -> ``[samples, questions]``."""
        per_sample = len(suffixes[0])
        chunk = self.question_chunk or per_sample
        parts = []
        for first in range(0, per_sample, chunk):
            last = min(per_sample, first + chunk)
            # The last chunk may consume the prefix cache itself; earlier ones work on copies.
            rows_cache = cache if last == per_sample else copy.deepcopy(cache)
            chunk_suffixes = [sample_suffixes[first:last] for sample_suffixes in suffixes]
            repeat_cache_rows(rows_cache, [last - first] * len(suffixes))
            parts.append(self._score_suffixes(rows_cache, mask, start, chunk_suffixes))
        return torch.cat(parts, dim=1)

    def _score_suffixes(
        self, cache: Any, mask: torch.Tensor, start: torch.Tensor, suffixes: list[list[Sequence[int]]]
    ) -> torch.Tensor:
        """All question suffixes of every sample as one right-padded batch over the repeated prefix
        cache; p(yes) read at each row's last real token. -> ``[samples, questions]``."""
        per_sample = len(suffixes[0])
        last = self.suffix_states(cache, mask, start, suffixes)
        head = self.model.get_output_embeddings()
        candidates = self.yes_ids + self.no_ids
        bias = head.bias[candidates] if getattr(head, "bias", None) is not None else None
        logits = torch.nn.functional.linear(last, head.weight[candidates], bias)
        return self._p_from_candidates(logits).view(len(suffixes), per_sample)

    def suffix_states(
        self, cache: Any, mask: torch.Tensor, start: torch.Tensor, suffixes: list[list[Sequence[int]]]
    ) -> torch.Tensor:
        """Final hidden states at the answer position of every question row -> ``[rows, hidden]``.

        ``cache`` holds one row per question row (sample i's prefix repeated ``len(suffixes[i])``
        times, in order); samples may have different numbers of questions. The suffixes run as one
        right-padded batch over it; each row's answer position is its last real token.
        """
        counts = [len(s) for s in suffixes]
        # an int when every sample has as many questions (the scorer's case); output_size: no host sync
        repeats = counts[0] if len(set(counts)) == 1 else torch.tensor(counts, device=self.device)
        flat = [s for sample_suffixes in suffixes for s in sample_suffixes]
        width = max(len(s) for s in flat)
        suffix_ids = torch.tensor([list(s) + [self._pad_id] * (width - len(s)) for s in flat])
        suffix_ids = suffix_ids.to(self.device)
        lengths = torch.tensor([len(s) for s in flat], device=self.device)
        steps = torch.arange(width, device=self.device)
        suffix_mask = (steps[None, :] < lengths[:, None]).long()
        full_mask = torch.cat([mask.repeat_interleave(repeats, 0, output_size=len(flat)), suffix_mask], 1)
        start = start.repeat_interleave(repeats, dim=-1, output_size=len(flat))
        positions = start[..., None] + steps  # [3, rows, width] or [rows, width]

        hidden = self.model.get_decoder()(
            input_ids=suffix_ids,
            attention_mask=full_mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: cache},
        ).last_hidden_state
        return hidden[torch.arange(len(flat), device=self.device), lengths - 1]


def repeat_cache_rows(cache: Any, counts: list[int]) -> None:
    """Repeat sample i's cache row ``counts[i]`` times, in order (public cache methods only): the layout
    :meth:`VLMBackend.suffix_states` reads."""
    most = max(counts)
    cache.batch_repeat_interleave(most)
    if any(c != most for c in counts):
        keep = [i * most + j for i, c in enumerate(counts) for j in range(c)]
        cache.batch_select_indices(torch.tensor(keep, device=_cache_device(cache)))


def _cache_device(cache: Any) -> torch.device:
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor):
            return keys.device
    return torch.device("cpu")


def _cache_of(output: Any) -> Any:
    """The KV cache of a forward's output (``cache`` in current transformers, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
