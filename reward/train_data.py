"""Training data of the reward: checklist questions about images and videos, with their answers.

Two sources, one result (a :class:`QAData`: samples, and question rows that point at them):

- **annotation files** (``reward train``), JSONL or parquet, one row per answered question::

      {"image": "imgs/0007.png", "prompt": "a red bus", "question": "symmetrical", "answer": "yes"}

  or one row per sample with an ``answers`` mapping (the format ``reward score --answers`` reads, and
  what :mod:`reward.vrdb` writes from the released VisionRewardDB)::

      {"video": "clips/12.mp4", "prompt": "a cat", "answers": {"Is the video stable?": "no", "3": "yes"}}

  A question is named by its index, id or text in ``data.checklist`` (the template, or the text with the
  row's prompt filled in). Answers are yes / no (also true / false, 1 / 0): a human said one or the other.
- **a teacher's scores** (``reward distill``): the table ``reward score`` writes (``id`` = the media path,
  ``prompt``, ``q.<question id>`` = the teacher's p(yes)); every known p(yes) becomes a soft target,
  NaN (the teacher could not judge) is left out.

Relative media paths start at ``data.media_root`` or, without it, at the folder of the annotation
file that names them (a dataset moves as a whole); in a teacher's scores table, which ``reward score``
writes with the paths as given on its command line, at the current directory. A *sample* is one media file with one prompt; everything about samples is decided per sample,
never per row: the held-out split (a seeded hash order, so all questions of an image land on the same
side), and the training order (each stream position is one sample with all its questions, asked over
one shared prefix).

Balance (paper section 3.2: "a balanced sampling on each binary question ... a roughly equal number of
positive and negative instances"): ``downsample`` keeps, per question, as many yes rows as no rows
(the excess of the larger side is dropped by a seeded hash, so the choice is the same on every process
and every restart), ``weight`` keeps every row and weighs each answer of a question by
``rows / (2 * rows with that answer)``, ``none`` trains on what is there. Soft targets balance on the
teacher's hard answer (p >= 0.5).

Order (as :mod:`mpo.train_data` does for pairs): an endless stream of epochs, each a seeded permutation
of the training samples; global micro-step k takes stream positions [k*B*W, (k+1)*B*W) (B samples per
process, W processes) and process r takes B of them from k*B*W + r*B. The data position is one integer
saved with every checkpoint, so a resumed run reads exactly what an uninterrupted run would have read,
and 1 process with batch 2B reads the same samples per step as 2 processes with batch B.

Every error names the file and row (``annotations.jsonl:12``, ``scores.parquet: row 3``).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mpo.seeds import candidate_seed
from reward.answers import read_table
from reward.checklist import Checklist
from reward.errors import RewardInputError
from reward.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, MediaError, load_image, load_video
from reward.types import Sample

MEDIA_KEYS = ("image", "video", "path", "media")
SPLITS = ("train", "val")
_YES = {"yes", "y", "true", "1"}
_NO = {"no", "n", "false", "0"}


class DataError(RewardInputError):
    """Training data that cannot be used; the message names the file and the row."""


@dataclass(frozen=True)
class SampleRef:
    """One media file with one prompt. ``where`` is the first row that names it (for errors)."""

    media: Path
    prompt: str
    where: str
    split: str | None = None  # an explicit split from the data, else decided by the seeded hash
    name: str = ""  # the media path as the data wrote it (relative paths stay relative)

    @property
    def modality(self) -> str:
        return "video" if self.media.suffix.lower() in VIDEO_SUFFIXES else "image"

    @property
    def key(self) -> str:
        """Identity: the file itself (two spellings of one file are one sample)."""
        return f"{self.media}\0{self.prompt}"

    @property
    def portable_key(self) -> str:
        """What the split and the order hash: the path as written, so that moving the dataset folder
        (or reading it from another mount) keeps every sample on its side and in its place."""
        return f"{self.name or self.media}\0{self.prompt}"


@dataclass(frozen=True)
class QARow:
    """One question about one sample with its target p(yes) (1 / 0 for a human answer)."""

    sample: int  # index into QAData.samples
    question: int  # index into checklist.questions
    target: float
    where: str
    weight: float = 1.0


@dataclass
class QAData:
    checklist: Checklist
    samples: list[SampleRef]
    rows: list[QARow]
    soft: bool = False  # targets are a teacher's probabilities, not human answers

    def rows_of(self, sample_ids: Sequence[int]) -> list[QARow]:
        wanted = set(sample_ids)
        return [r for r in self.rows if r.sample in wanted]


# ---- reading --------------------------------------------------------------------------------------
def _media_path(row: dict[str, Any], where: str, base: Path) -> tuple[Path, str]:
    given = [k for k in MEDIA_KEYS if row.get(k) not in (None, "")]
    if len(given) != 1:
        raise DataError(
            f"{where}: needs exactly one media path ({' | '.join(MEDIA_KEYS)}), got {given or 'none'}"
        )
    media = Path(str(row[given[0]])).expanduser()
    suffix = media.suffix.lower()
    if suffix not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
        raise DataError(
            f"{where}: {media}: unknown media suffix {suffix!r}; images: {sorted(IMAGE_SUFFIXES)}, "
            f"videos: {sorted(VIDEO_SUFFIXES)}"
        )
    if given[0] == "image" and suffix not in IMAGE_SUFFIXES:
        raise DataError(f"{where}: 'image' names {media}, which is not an image file")
    if given[0] == "video" and suffix not in VIDEO_SUFFIXES:
        raise DataError(f"{where}: 'video' names {media}, which is not a video file")
    return (media if media.is_absolute() else base / media), str(row[given[0]])


class _QuestionIndex:
    """Question index, id, template text or prompt-filled text -> index in the checklist."""

    def __init__(self, checklist: Checklist) -> None:
        self.checklist = checklist
        self.fixed: dict[str, int] = {}
        for i, q in enumerate(checklist.questions):
            for key in (str(i), q.id, q.text):
                self.fixed.setdefault(key, i)

    def __call__(self, key: Any, prompt: str, where: str) -> int:
        text = str(key).strip()
        if text in self.fixed:
            return self.fixed[text]
        for i, q in enumerate(self.checklist.questions):
            if q.render(prompt) == text:
                return i
        raise DataError(
            f"{where}: unknown question {key!r}: not an index, id or text of checklist "
            f"{self.checklist.name!r} ({len(self.checklist.questions)} questions)"
        )


def parse_answer(value: Any, where: str) -> float:
    """A human answer: yes / no (true / false, 1 / 0) -> 1.0 / 0.0; anything else is an error."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (0, 1):
        return float(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _YES:
            return 1.0
        if low in _NO:
            return 0.0
    raise DataError(f"{where}: answer {value!r} is not yes or no")


class _Collector:
    """Samples by (media, prompt), in first-seen order, and their rows."""

    def __init__(self, checklist: Checklist) -> None:
        self.checklist = checklist
        self.index: dict[str, int] = {}
        self.samples: list[SampleRef] = []
        self.rows: list[QARow] = []

    def sample(self, media: tuple[Path, str], prompt: str, where: str, split: Any) -> int:
        if split is not None and split not in SPLITS:
            raise DataError(f"{where}: split {split!r} is not one of {list(SPLITS)}")
        ref = SampleRef(media[0], prompt, where, split, name=media[1])
        if ref.modality != self.checklist.modality:
            raise DataError(
                f"{where}: {media} is {'a video' if ref.modality == 'video' else 'an image'} but checklist "
                f"{self.checklist.name!r} is for {self.checklist.modality}s"
            )
        if ref.key not in self.index:
            self.index[ref.key] = len(self.samples)
            self.samples.append(ref)
        idx = self.index[ref.key]
        known = self.samples[idx].split
        if split is not None and known is not None and split != known:
            raise DataError(
                f"{where}: split {split!r}, but {self.samples[idx].where} put this sample in {known!r}"
            )
        if split is not None and known is None:
            self.samples[idx] = replace(self.samples[idx], split=split)
        return idx


def read_annotations(
    paths: Sequence[str | Path], checklist: Checklist, media_root: str | Path | None = None
) -> QAData:
    """Annotation files -> :class:`QAData` with hard targets (see the module docstring)."""
    questions = _QuestionIndex(checklist)
    out = _Collector(checklist)
    for path in paths:
        base = Path(media_root) if media_root else Path(path).parent
        table = read_table(path, DataError)
        if not table:
            raise DataError(f"{path}: no rows")
        for where, row in table:
            if not isinstance(row, dict):
                raise DataError(f"{where}: a row is a mapping, got {type(row).__name__}")
            prompt = str(row.get("prompt") or "")
            sample = out.sample(_media_path(row, where, base), prompt, where, row.get("split"))
            if "answers" in row and row["answers"] is not None:
                if "question" in row or "answer" in row:
                    raise DataError(f"{where}: give 'answers' or 'question' + 'answer', not both")
                answers = row["answers"]
                if not isinstance(answers, dict) or not answers:
                    raise DataError(f"{where}: 'answers' must be a non-empty mapping question -> yes/no")
                pairs = list(answers.items())
            elif "question" in row and "answer" in row:
                pairs = [(row["question"], row["answer"])]
            else:
                raise DataError(f"{where}: needs 'question' and 'answer' (or an 'answers' mapping)")
            for key, value in pairs:
                if value is None:
                    continue  # deliberately unanswered (e.g. a masked question)
                q = questions(key, prompt, where)
                out.rows.append(QARow(sample, q, parse_answer(value, f"{where}: question {key!r}"), where))
    return QAData(checklist, out.samples, out.rows, soft=False)


def read_teacher_scores(
    path: str | Path, checklist: Checklist, media_root: str | Path | None = None
) -> QAData:
    """A teacher's scores table -> :class:`QAData` with soft targets p(yes)."""
    table = read_table(path, DataError)
    if not table:
        raise DataError(f"{path}: no rows")
    # `reward score` records media paths as given on its command line: relative to where it ran.
    base = Path(media_root) if media_root else Path.cwd()
    ids = {q.id: i for i, q in enumerate(checklist.questions)}
    out = _Collector(checklist)
    columns = [c for c in table[0][1] if str(c).startswith("q.")]
    unknown = [c for c in columns if c[2:] not in ids]
    if unknown:
        raise DataError(
            f"{path}: unknown question column(s) {unknown[:5]} for checklist {checklist.name!r} "
            "(q.<question id>; was it scored with another checklist?)"
        )
    if not columns:
        raise DataError(f"{path}: no q.<question id> columns (a `reward score` output has them)")
    for where, row in table:
        media = dict(row)
        if not any(media.get(k) for k in MEDIA_KEYS):
            media["path"] = row.get("id")
        sample = out.sample(
            _media_path(media, where, base), str(row.get("prompt") or ""), where, row.get("split")
        )
        for column in columns:
            value = row.get(column)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            try:
                p = float(value)
            except (TypeError, ValueError):
                raise DataError(f"{where}: {column}={value!r} is not a probability") from None
            if not 0.0 <= p <= 1.0:
                raise DataError(f"{where}: {column}={p} is outside [0, 1]")
            out.rows.append(QARow(sample, ids[column[2:]], p, where))
    if not out.rows:
        raise DataError(f"{path}: no known p(yes) (every q.* value is NaN)")
    return QAData(checklist, out.samples, out.rows, soft=True)


# ---- checks ---------------------------------------------------------------------------------------
def check_media(samples: Sequence[SampleRef]) -> list[str]:
    """Problems found without decoding: missing files, unreadable image headers. One line each.

    Decoding every video up front would cost as much as an epoch; a file that is damaged inside (a
    truncated image, a video without frames) is found when it is first read, and the trainer stops
    there with the same kind of message, keeping every step already trained (see reward.train).
    """
    from PIL import Image, UnidentifiedImageError

    problems = []
    for ref in samples:
        if not ref.media.is_file():
            problems.append(f"{ref.where}: {ref.modality} {ref.media}: no such file")
            continue
        if ref.modality == "image":
            try:
                with Image.open(ref.media) as image:
                    image.size  # noqa: B018  (reads the header)
            except (OSError, UnidentifiedImageError, SyntaxError) as err:
                problems.append(f"{ref.where}: image {ref.media}: cannot be read ({err})")
    return problems


def load_sample(ref: SampleRef, max_frames: int) -> Sample:
    """Decode one sample's media; a failure names the file and the row that asked for it."""
    try:
        if ref.modality == "video":
            sample = load_video(ref.media, ref.prompt, max_frames=max_frames)
        else:
            sample = load_image(ref.media, ref.prompt)
    except MediaError as err:
        first = str(err).splitlines()[0]
        if ref.modality == "video":
            raise DataError(
                f"{ref.where}: video {ref.media}: cannot be used: shorter than one frame or unreadable ({first})"
            ) from None
        raise DataError(f"{ref.where}: image {ref.media}: cannot be decoded ({first})") from None
    sample.id = str(ref.media)
    return sample


# ---- split and balance ------------------------------------------------------------------------------
def _rank(seed: int, kind: str, key: str) -> int:
    return candidate_seed(seed, f"{kind}|{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}", 0)


def split_samples(
    samples: Sequence[SampleRef], val_fraction: float, val_count: int | None, seed: int
) -> list[str]:
    """Split per sample ("train" / "val"): explicit splits are kept; the rest are ordered by a seeded hash of
    (media, prompt) and the first ``val_count`` (or ``round(val_fraction * n)``) are held out."""
    split: list[str | None] = [s.split for s in samples]
    free = [i for i, s in enumerate(split) if s is None]
    n_val = val_count if val_count is not None else round(val_fraction * len(samples))
    n_val = max(0, min(len(free), n_val - sum(s == "val" for s in split)))
    order = sorted(free, key=lambda i: _rank(seed, "split", samples[i].portable_key))
    for rank, i in enumerate(order):
        split[i] = "val" if rank < n_val else "train"
    return [str(s) for s in split]


def balance_rows(
    rows: Sequence[QARow], mode: str, seed: int
) -> tuple[list[QARow], dict[int, dict[str, int]]]:
    """Balance yes against no per question (module docstring); returns the rows kept (with weights)
    and per question {"yes", "no", "kept"} counts."""
    by_question: dict[int, list[int]] = defaultdict(list)  # question -> indices into rows (data order)
    for i, row in enumerate(rows):
        by_question[row.question].append(i)
    kept: list[tuple[int, QARow]] = []
    report: dict[int, dict[str, int]] = {}
    for q, indices in sorted(by_question.items()):
        yes = [i for i in indices if rows[i].target >= 0.5]
        no = [i for i in indices if rows[i].target < 0.5]
        if mode == "downsample":
            n = min(len(yes), len(no))
            chosen = []
            for side in (yes, no):
                chosen += sorted(side, key=lambda i: _rank(seed, f"balance|{q}", str(i)))[:n]
            picked = [(i, rows[i]) for i in chosen]
        elif mode == "weight":
            weight = {
                True: len(indices) / (2 * max(len(yes), 1)),
                False: len(indices) / (2 * max(len(no), 1)),
            }
            picked = [(i, replace(rows[i], weight=weight[rows[i].target >= 0.5])) for i in indices]
        else:
            picked = [(i, rows[i]) for i in indices]
        report[q] = {"yes": len(yes), "no": len(no), "kept": len(picked)}
        kept += picked
    kept.sort(key=lambda pair: (pair[1].sample, pair[0]))
    return [row for _, row in kept], report


# ---- the training stream ---------------------------------------------------------------------------
@dataclass
class TrainSet:
    """The training samples (indices into QAData.samples) with their kept rows, and the stream order."""

    data: QAData
    samples: list[int]  # sample indices that have at least one kept row, in a fixed order
    rows: dict[int, list[QARow]]  # sample index -> its rows
    seed: int
    _epoch: tuple[int, torch.Tensor] | None = None

    @classmethod
    def build(cls, data: QAData, split: Sequence[str], balance: str, seed: int) -> TrainSet:
        train_ids = [i for i, s in enumerate(split) if s == "train"]
        kept, _ = balance_rows(data.rows_of(train_ids), balance, seed)
        rows: dict[int, list[QARow]] = defaultdict(list)
        for row in kept:
            rows[row.sample].append(row)
        samples = sorted(rows)
        if not samples:
            raise DataError(
                "no training rows left (every question answered only one way after the split, or every "
                "sample held out); add data, or set data.balance=none"
            )
        return cls(data, samples, dict(rows), seed)

    def sample_at(self, position: int) -> int:
        """The sample at stream position ``position`` (epochs of seeded permutations)."""
        epoch, offset = divmod(int(position), len(self.samples))
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(candidate_seed(self.seed, "reward-epoch", epoch))
            self._epoch = (epoch, torch.randperm(len(self.samples), generator=generator))
        return self.samples[int(self._epoch[1][offset])]

    def row_weight(self, position: int) -> float:
        """The summed weight of the question rows at a stream position (the loss normaliser's unit)."""
        return sum(r.weight for r in self.rows[self.sample_at(position)])


class SampleStream(Dataset):
    """Item ``i`` is stream position ``i``: the sample's pixels, its questions and targets."""

    def __init__(self, train: TrainSet, max_frames: int) -> None:
        self.train, self.max_frames = train, max_frames

    def __len__(self) -> int:  # the stream is endless; this is one epoch
        return len(self.train.samples)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.train.sample_at(position)
        ref = self.train.data.samples[index]
        rows = self.train.rows[index]
        checklist = self.train.data.checklist
        try:
            sample = load_sample(ref, self.max_frames)
        except DataError as err:
            return {"position": position, "error": str(err)}
        return {
            "position": position,
            "sample_index": index,
            "sample": sample,
            "questions": [checklist.questions[r.question].render(ref.prompt) for r in rows],
            "question_index": [r.question for r in rows],
            "target": torch.tensor([r.target for r in rows], dtype=torch.float32),
            "weight": torch.tensor([r.weight for r in rows], dtype=torch.float32),
        }


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def make_loader(
    train: TrainSet, max_frames: int, batch_size: int, rank: int, world: int, seen: int, workers: int
) -> DataLoader:
    """An endless loader of this process's samples, resuming after ``seen`` stream positions."""
    from mpo.train_data import StreamBatchSampler

    per_micro_step = batch_size * world
    if seen % per_micro_step:
        raise DataError(
            f"the checkpoint has consumed {seen} samples, not a multiple of train.batch_size x processes = "
            f"{per_micro_step}; resume with the batch size and process count it was written with"
        )
    sampler = StreamBatchSampler(batch_size, rank, world, start=seen // per_micro_step)
    return DataLoader(
        SampleStream(train, max_frames),
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(train.seed),
    )


def step_weight(train: TrainSet, step: int, per_step: int) -> float:
    """Total row weight of every position of optimizer step ``step`` (0-based), all processes and
    micro-steps together: the same number on every process, with no communication."""
    first = step * per_step
    return sum(train.row_weight(p) for p in range(first, first + per_step))


def iterate_val(data: QAData, split: Sequence[str], limit: int | None) -> list[int]:
    """Held-out sample indices (in data order), at most ``limit``."""
    ids = [i for i, s in enumerate(split) if s == "val"]
    return ids[:limit] if limit is not None else ids


def describe(data: QAData, split: Sequence[str], train: TrainSet) -> dict[str, Any]:
    """Counts for the summary table."""
    n_val = sum(s == "val" for s in split)
    val_rows = sum(1 for r in data.rows if split[r.sample] == "val")
    return {
        "samples (train / held out)": f"{len(train.samples)} / {n_val}",
        "question rows (train, kept / given)": (
            f"{sum(len(v) for v in train.rows.values())} / "
            f"{sum(1 for r in data.rows if split[r.sample] == 'train')}"
        ),
        "question rows (held out)": val_rows,
        "targets": "teacher p(yes) (soft)" if data.soft else "human yes / no",
    }
