"""A transformers vision-language model answering checklist questions with p(yes).

The released reward asks each question with its own greedy ``generate()`` over the full prompt, so
the image (or video) is encoded and the whole prompt is run once per question: 30 full passes per
image. Here, per batch of samples:

1. every question of a sample is rendered through the processor's chat template and tokenised; the
   longest token prefix that all of a sample's questions share (system turn, user turn start, the
   visual placeholders, whatever text precedes the question) is the *shared prefix*;
2. the visuals of the batch are encoded once and the prefixes run once, right-padded, into a
   ``DynamicCache``;
3. the cache is copied along the batch (``batch_repeat_interleave``), one copy per question, and all
   question suffixes (question text, the template's turn closing, the assistant turn start) run as one
   right-padded batch over it;
4. p(yes) is read from the logits at each row's last real token. Only the answer tokens' rows of the
   output projection are applied, so no ``[rows, vocabulary]`` logits tensor is ever built.

Positions. Qwen2-VL-style models use 3D rotary positions (time, height, width) for visual tokens, and
text after a visual continues from a position the model derives from the visual's grid, not from the
token count. The prefix positions and the first suffix position are computed by the model's own
``get_rope_index`` over the prefix plus one text token, exactly what a full forward would compute,
and passed explicitly; suffix token j sits at that first position + j on all three axes. Models
without ``get_rope_index`` get ordinary 1D positions (real tokens counted).

Answer tokens. "yes" and "no" have several spellings in a vocabulary ("yes", "Yes", " yes", ...).
Every spelling that is a single token is a candidate. ``answer_reduce="max"`` (default) compares
the best yes-spelling with the best no-spelling: p(yes) = softmax([max yes, max no])[0], so
``p(yes) >= 0.5`` is exactly "greedy decoding restricted to yes/no spellings starts with a yes",
the release's hard answer. ``"logsumexp"`` pools each side's probability over its spellings (the
total chance of answering yes in any spelling); its hard answer can differ from greedy decoding when
the spellings split the mass. Tokens that are neither yes nor no are ignored: the reward wants a
binary answer, and a trained checkpoint puts almost all its mass on these tokens.

Video. Frames are sampled one per second up to ``max_frames`` (:func:`reward.media.frames_per_second`)
and handed to the processor as one video whose frames are 1 s apart.

Without torchvision. Transformers builds Qwen2-VL's processor only with its torchvision-backed video
processor, and CPU-only installs often lack torchvision (the PyPI wheel does not load against a CPU
torch). For Qwen2-VL checkpoints, :func:`load_processor` then assembles :class:`Qwen2VLParts`: the
checkpoint's tokenizer and (PIL) image processor, videos through :class:`FrameVideoProcessor`, and the
same placeholder expansion as the library processor. Other model types need torchvision.

``answer_naive`` is the release's way (one full pass per question, the visual re-encoded every time);
it exists to check the fast path against and to benchmark it. In float32 both give the same p(yes)
to ~1e-6; in bfloat16 they differ by up to ~0.01 (different kernels, same answers but near 0.5).
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from reward.media import frames_per_second
from reward.types import Answers, Sample

YES_SPELLINGS = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO_SPELLINGS = ("no", "No", "NO", " no", " No", " NO")
AnswerReduce = Literal["max", "logsumexp"]
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
# Processor outputs that describe the visuals (everything but the text tensors).
_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class VLMError(ValueError):
    """A model, processor or input the VLM backend cannot use; the message names the path or sample."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise VLMError(f"reward dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def answer_token_ids(tokenizer: Any, spellings: Sequence[str]) -> list[int]:
    """Ids of the spellings that are one token in this vocabulary (order kept, duplicates dropped)."""
    ids: list[int] = []
    for word in spellings:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


class FrameVideoProcessor:
    """Qwen2-VL video inputs built from the checkpoint's image processor, without torchvision.

    Each frame is resized and normalised by the image processor, which returns, per 14x14 patch, the
    frame repeated ``temporal_patch_size`` times. A video patch instead holds ``temporal_patch_size``
    consecutive frames, so frames are taken in groups (the last one repeated to fill a group, as the
    library's video processor does) and the groups stacked along time: rows ordered (time, merged-row,
    merged-column, 2x2 merge window), the layout of ``pixel_values_videos``. Frames are sized by the
    image processor's pixel limits (the library's video processor has its own, usually similar).
    """

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self.patch_size = int(image_processor.patch_size)

    def __call__(self, videos: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        patches, grids = [], []
        tps = self.temporal_patch_size
        for video in videos:
            frames = list(video)
            frames += [frames[-1]] * (-len(frames) % tps)
            out = self.image_processor(images=frames, return_tensors="pt")
            grid = out["image_grid_thw"][0]
            n = int(grid[1] * grid[2])
            # [frames * n, C * tps * p * p] -> [frames, n, C, tps, p*p], keep one temporal copy
            per_frame = out["pixel_values"].reshape(len(frames), n, -1, tps, self.patch_size**2)[:, :, :, 0]
            groups = per_frame.reshape(len(frames) // tps, tps, n, -1, self.patch_size**2)
            patches.append(groups.permute(0, 2, 3, 1, 4).reshape(len(frames) // tps * n, -1))
            grids.append([len(frames) // tps, int(grid[1]), int(grid[2])])
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}


class Qwen2VLParts:
    """What ``Qwen2VLProcessor`` does, assembled from parts that load without torchvision.

    Images go through the checkpoint's image processor, videos through :class:`FrameVideoProcessor`;
    each ``<|image_pad|>`` / ``<|video_pad|>`` placeholder is repeated once per merged visual token
    (grid size / merge_size^2), as the library processor does, and ``mm_token_type_ids`` mark them.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video_processor = FrameVideoProcessor(image_processor)
        self.chat_template = chat_template
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    def __call__(
        self,
        text: list[str],
        images: list[torch.Tensor] | None = None,
        videos: list[torch.Tensor] | None = None,
        padding_side: str = "right",
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        data: dict[str, torch.Tensor] = {}
        merge = self.video_processor.merge_size**2
        counts = {self.image_token: iter(()), self.video_token: iter(())}
        if images:
            data.update(self.image_processor(images=images, return_tensors="pt"))
            counts[self.image_token] = iter((data["image_grid_thw"].prod(-1) // merge).tolist())
        if videos:
            data.update(self.video_processor(videos))
            counts[self.video_token] = iter((data["video_grid_thw"].prod(-1) // merge).tolist())
        pattern = re.compile(f"{re.escape(self.image_token)}|{re.escape(self.video_token)}")
        expanded = [pattern.sub(lambda m: m.group(0) * next(counts[m.group(0)]), t) for t in text]
        enc = self.tokenizer(expanded, padding=True, padding_side=padding_side, return_tensors="pt")
        ids = enc["input_ids"]
        enc["mm_token_type_ids"] = (ids == self.image_token_id).long() + 2 * (
            ids == self.video_token_id
        ).long()
        return {**enc, **data}


def load_processor(path: str) -> Any:
    """AutoProcessor, or :class:`Qwen2VLParts` for a Qwen2-VL checkpoint when torchvision is missing."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError as err:
        if "torchvision" not in str(err).lower():
            raise
        model_type = getattr(AutoConfig.from_pretrained(path), "model_type", "")
        if model_type != "qwen2_vl":
            raise VLMError(
                f"{path}: the processor of this {model_type!r} model needs torchvision ({err}); install the "
                "torchvision build that matches your torch"
            ) from err
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Qwen2VLParts(tokenizer, AutoImageProcessor.from_pretrained(path), tokenizer.chat_template)


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
        alignment_model: VLMBackend | None = None,
        answer_reduce: AnswerReduce = "max",
        question_chunk: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.chat_template = chat_template_of(processor, source)
        if answer_reduce not in ("max", "logsumexp"):
            raise VLMError(f"answer_reduce must be 'max' or 'logsumexp', got {answer_reduce!r}")
        self.source = source
        self.batch_size = max(1, int(batch_size))
        self.max_frames = int(max_frames)
        self.alignment_model = alignment_model
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
        base = model.base_model
        self._rope_index = getattr(base, "get_rope_index", None)
        self._rope_params = set(inspect.signature(self._rope_index).parameters) if self._rope_index else set()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device | None = None,
        batch_size: int = 8,
        max_frames: int = 24,
        alignment_model: VLMBackend | None = None,
        answer_reduce: AnswerReduce = "max",
        attn_implementation: str = "sdpa",
        question_chunk: int | None = None,
    ) -> VLMBackend:
        """Load a checkpoint (local folder or hub id) and its processor."""
        from transformers import AutoModelForImageTextToText

        path = str(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        processor = load_processor(path)
        chat_template_of(processor, path)  # fail before loading the weights
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=parse_dtype(dtype), attn_implementation=attn_implementation, device_map=str(device)
        )
        return cls(
            model,
            processor,
            source=path,
            batch_size=batch_size,
            max_frames=max_frames,
            alignment_model=alignment_model,
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
            pixels = frames_per_second(pixels, sample.fps, self.max_frames)
        return (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()

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
        images = [self.visual_input(s) for s in samples if s.modality == "image"]
        videos = [self.visual_input(s) for s in samples if s.modality == "video"]
        kwargs: dict[str, Any] = {}
        if videos:  # per-second frames: 1 frame per second (Qwen2.5-VL's time axis reads this)
            kwargs["video_metadata"] = [{"total_num_frames": len(v), "fps": 1.0} for v in videos]
        enc = self.processor(
            text=texts,
            images=images or None,
            videos=videos or None,
            padding=True,
            padding_side=padding_side,
            return_tensors="pt",
            **kwargs,
        )
        return dict(enc)

    # ----------------------------------------------------------------------------------- answers
    def answer(
        self,
        samples: list[Sample],
        questions: list[list[str]],
        alignment_questions: list[str] | None = None,
    ) -> Answers:
        """p(yes) ``[B,Q]`` over a shared prefix per sample (see module doc); alignment ``[B]`` or None."""
        return self._answer(samples, questions, alignment_questions, self._score_shared_prefix, naive=None)

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

        return self._answer(samples, questions, alignment_questions, score, naive=use_generate)

    def p_yes(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` answer-position logits -> ``[N]`` p(yes) (module doc: the yes/no rule)."""
        return self._p_from_candidates(logits[:, self.yes_ids + self.no_ids])

    def _p_from_candidates(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        yes, no = logits[:, : len(self.yes_ids)], logits[:, len(self.yes_ids) :]
        if self.answer_reduce == "max":
            y, n = yes.max(-1).values, no.max(-1).values
        else:
            y, n = yes.logsumexp(-1), no.logsumexp(-1)
        return torch.sigmoid(y - n)  # = softmax([y, n])[0]

    def _answer(self, samples, questions, alignment_questions, score, naive: bool | None) -> Answers:
        """Shared by both paths: rows per sample (alignment appended), batches, the alignment term.

        ``naive`` is None for the fast path, else ``use_generate`` of the naive one (a separate
        alignment model is asked the same way as the questions).
        """
        q_count = _check_inputs(samples, questions, alignment_questions)
        if not samples:
            return Answers(p_yes=torch.empty(0, 0), source=f"vlm:{self.source}")
        ask_alignment_here = alignment_questions is not None and self.alignment_model is None
        rows = [
            list(qs) + ([alignment_questions[i]] if ask_alignment_here else [])
            for i, qs in enumerate(questions)
        ]
        parts = []
        with torch.inference_mode():
            for start in range(0, len(samples), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                if rows[0]:
                    parts.append(score(samples[chunk], rows[chunk]).cpu())
                else:
                    parts.append(torch.empty(len(samples[chunk]), 0))
        p = torch.cat(parts).float()
        notes: list[str] = []
        alignment = None
        if ask_alignment_here:
            alignment = p[:, q_count]
        elif alignment_questions is not None:
            single = [[q] for q in alignment_questions]
            if naive is None:
                aligned = self.alignment_model.answer(samples, single)
            else:
                aligned = self.alignment_model.answer_naive(samples, single, use_generate=naive)
            alignment = aligned.p_yes[:, 0]
            notes.append(f"alignment answered by {aligned.source}")
        return Answers(
            p_yes=p[:, :q_count].contiguous(), alignment=alignment, source=f"vlm:{self.source}", notes=notes
        )

    # ----------------------------------------------------------------------------------- naive
    def _score_naive(self, samples: list[Sample], rows: list[list[str]], use_generate: bool) -> torch.Tensor:
        out = torch.empty(len(samples), len(rows[0]))
        for i, sample in enumerate(samples):
            for j, question in enumerate(rows[i]):
                inputs = self.encode([sample], [self.render(sample, question)])
                if use_generate:
                    gen = self.model.generate(
                        **inputs,
                        max_new_tokens=1,
                        do_sample=False,
                        output_logits=True,
                        return_dict_in_generate=True,
                    )
                    logits = gen.logits[0]
                else:
                    logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]
                out[i, j] = self.p_yes(logits)[0]
        return out

    # ----------------------------------------------------------------------------------- fast
    def _split_rows(self, modality: str, rows: tuple[str, ...]) -> tuple[str, int, list[list[int]]]:
        """Full text of row 0, and per row the suffix token ids after the shared token prefix.

        The prefix is the longest run of tokens all rows start with (at least one token is left to
        each row, whose last token is where the answer is read). Suffixes are cut from each row's own
        tokenisation, so they are exactly the tokens a full pass over that row would see. Cached
        (``_split_cached``): the N candidates of a prompt are asked the same rows.
        """
        texts = [self.render(modality, q) for q in rows]
        ids = self.tokenizer(texts)["input_ids"]
        shared = min(len(r) for r in ids) - 1
        first = ids[0]
        for r in ids[1:]:
            k = 0
            while k < shared and r[k] == first[k]:
                k += 1
            shared = k
        config = self.model.config
        visual_ids = {getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)} - {
            None
        }
        suffixes = [r[shared:] for r in ids]
        if any(t in visual_ids for s in suffixes for t in s):
            raise VLMError(
                "the chat template puts question text before the visual; the questions share no prefix "
                "that holds it (use answer_naive)"
            )
        return texts[0], len(first) - shared, suffixes

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
        types = torch.zeros_like(ids)
        has_types = "mm_token_type_ids" in enc
        for i, (n, p, o) in enumerate(zip(lengths, prefix_lengths, starts)):
            row = enc["input_ids"][i, o : o + n]
            if row[p:].tolist() != list(suffixes[i][0]):
                raise VLMError(
                    f"sample {samples[i].id or '?'}: the processor tokenised the prompt differently from "
                    "the tokenizer; cannot split it into a shared prefix and question suffixes"
                )
            ids[i, :p] = row[:p]
            mask[i, :p] = 1
            if has_types:
                types[i, :p] = torch.as_tensor(enc["mm_token_type_ids"][i][o : o + p])
        visual = _to({k: v for k, v in enc.items() if k not in _TEXT_KEYS}, self.device)
        ids, mask, types = ids.to(self.device), mask.to(self.device), types.to(self.device)
        return ids, mask, types if has_types else None, visual, suffixes

    def _positions(self, ids, mask, types, visual) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix position ids and the first suffix position per sample (``[3,B]`` or ``[B]``)."""
        if self._rope_index is None:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            return positions, mask.sum(-1)
        one = torch.ones_like(ids[:, :1])
        kwargs = {k: v for k, v in visual.items() if k in self._rope_params}
        positions, _ = self._rope_index(
            input_ids=torch.cat([ids, ids[:, -1:]], 1),
            mm_token_type_ids=torch.cat([types, 0 * one], 1),
            attention_mask=torch.cat([mask, one], 1),
            **kwargs,
        )
        return positions[..., :-1], positions[..., -1]

    def prefix_cache(self, samples: list[Sample], rows: list[list[str]]):
        """The shared-prefix pass: ``(cache, prefix mask, first suffix position, suffix ids per sample)``.

        One forward over every sample's right-padded prefix (visuals included) fills the cache, one row
        per sample. Gradients flow through it when grad mode is on (the reward's trainer uses it so).
        """
        ids, mask, types, visual, suffixes = self._prefix_inputs(samples, rows)
        prefix_pos, start = self._positions(ids, mask, types, visual)
        extra = {"mm_token_type_ids": types} if types is not None else {}
        prefix = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=prefix_pos,
            use_cache=True,
            logits_to_keep=1,
            **visual,
            **extra,
        )
        return prefix.past_key_values, mask, start, suffixes

    def _score_shared_prefix(self, samples: list[Sample], rows: list[list[str]]) -> torch.Tensor:
        cache, mask, start, suffixes = self.prefix_cache(samples, rows)
        per_sample = len(rows[0])
        chunk = self.question_chunk or per_sample
        parts = []
        for first in range(0, per_sample, chunk):
            last = min(per_sample, first + chunk)
            # The last chunk may consume the prefix cache itself; earlier ones work on copies.
            rows_cache = cache if last == per_sample else copy.deepcopy(cache)
            rows_cache.batch_repeat_interleave(last - first)
            chunk_suffixes = [sample_suffixes[first:last] for sample_suffixes in suffixes]
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
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        return hidden[torch.arange(len(flat), device=self.device), lengths - 1]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_inputs(
    samples: list[Sample], questions: list[list[str]], alignment_questions: list[str] | None
) -> int:
    """Number of questions per sample, after checking the lists line up."""
    if len(questions) != len(samples):
        raise VLMError(f"{len(samples)} samples but {len(questions)} question lists")
    if alignment_questions is not None and len(alignment_questions) != len(samples):
        raise VLMError(f"{len(samples)} samples but {len(alignment_questions)} alignment questions")
    counts = {len(q) for q in questions}
    if len(counts) > 1:
        bad = next(
            s.id or str(i) for i, (s, q) in enumerate(zip(samples, questions)) if len(q) != len(questions[0])
        )
        raise VLMError(
            f"sample {bad}: every sample must get the same number of questions, got {sorted(counts)}"
        )
    return counts.pop() if counts else 0
