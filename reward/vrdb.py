"""The released VisionRewardDB annotations -> annotation files that ``reward train`` reads.

::

    reward import-vrdb data/train-*.parquet --questions meta_qa_en.txt --out vrdb/annotations.jsonl
    reward import-vrdb train/*.parquet --questions meta_qa_en.txt --video-root VisionRewardDB-Video \
        --checklist my_video_checklist.yaml --out vrdb-video/annotations.jsonl

The release (VisionRewardDB-Image / -Video on the Hugging Face hub, as its dataset cards describe it)
stores one row per image or video: ``internal_id``, ``prompt``, the media (``image``: the encoded
image bytes, or a datasets ``Image`` struct ``{"bytes", "path"}``; ``video_path``: a path into the
video archive), ``annotation`` (the per-sub-dimension ratings the checklist was derived from) and
the checklist itself, flattened: ``meta_result``, one binary answer per question of the release's
question file ``meta_qa_en.txt`` in that file's order, and ``meta_mask``, 1 where the question applies
to this sample (0, e.g., for hand questions on an image without hands). Here every applicable answer
becomes ``"yes"`` (1) or ``"no"`` (0) under its question's text, one output row per sample::

    {"image": "media/000123.png", "prompt": "...", "internal_id": "000123",
     "answers": {"Is the image symmetrical?": "yes", ...}}

Images are written once into ``--media-dir`` (default: ``media/`` beside the output), named by
``internal_id``; paths in the output are relative to the output file, so the folder moves as a whole.
The question texts must be questions of the checklist training will use (``image-full`` /
``video-full`` by default); a text it does not know is an error naming the line, never a silent drop.
Any other problem (a missing field, a result list of the wrong length, an answer that is not 0 / 1)
is an error naming the file and row.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reward.answers import read_table
from reward.checklist import Checklist, load_checklist
from reward.train_data import DataError

_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}


def read_questions(path: str | Path, checklist: Checklist) -> list[str]:
    """The release's question file (one question a line), each checked against the checklist."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such question file")
    known = {q.text for q in checklist.questions}
    questions = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text not in known:
            raise DataError(
                f"{path}:{line_no}: question {text!r} is not in checklist {checklist.name!r}; pass "
                "--checklist with a checklist whose question texts are the release's"
            )
        questions.append(text)
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def _image_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes | bytearray) and value:
        return bytes(value)
    raise DataError(f"{where}: 'image' holds no encoded image bytes")


def _write_image(data: bytes, folder: Path, stem: str, where: str) -> Path:
    from PIL import Image, UnidentifiedImageError

    from mpo.store import atomic_write

    try:
        with Image.open(io.BytesIO(data)) as image:
            suffix = _FORMATS.get(image.format or "", ".png")
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{where}: 'image' is not a readable image ({err})") from err
    target = folder / f"{stem}{suffix}"
    if not (target.exists() and target.stat().st_size == len(data)):
        with atomic_write(target) as tmp:
            tmp.write_bytes(data)
    return target


def _answer(value: Any, where: str) -> str:
    if isinstance(value, bool) or value in (0, 1):
        return "yes" if int(value) == 1 else "no"
    raise DataError(f"{where}: answer {value!r} is not 0 or 1")


def convert_rows(
    sources: Sequence[str | Path],
    questions: list[str],
    out: str | Path,
    media_dir: str | Path | None = None,
    video_root: str | Path | None = None,
) -> dict[str, int]:
    """Convert release rows into one annotation JSONL at ``out``; returns counts."""
    out = Path(out)
    media = Path(media_dir) if media_dir else out.parent / "media"
    lines, counts = [], {"samples": 0, "answers": 0, "masked": 0}
    for source in sources:
        for where, row in read_table(source, DataError):
            if "internal_id" not in row or "meta_result" not in row:
                raise DataError(f"{where}: needs 'internal_id' and 'meta_result' (a VisionRewardDB row)")
            results = list(row["meta_result"])
            mask = list(row.get("meta_mask") or [1] * len(results))
            if len(results) != len(questions) or len(mask) != len(questions):
                raise DataError(
                    f"{where}: meta_result has {len(results)} answers and meta_mask {len(mask)}, but the "
                    f"question file has {len(questions)} questions"
                )
            sid = str(row["internal_id"])
            record: dict[str, Any] = {}
            if row.get("image") is not None:
                path = _write_image(_image_bytes(row["image"], where), media, sid, where)
                record["image"] = _relative(path, out.parent)
            elif row.get("video_path"):
                video = Path(str(row["video_path"]))
                if video_root and not video.is_absolute():
                    video = Path(video_root) / video
                record["video"] = _relative(video, out.parent)
            else:
                raise DataError(f"{where}: neither 'image' nor 'video_path'")
            answers = {}
            for i, (text, value, keep) in enumerate(zip(questions, results, mask)):
                if keep not in (0, 1, True, False):
                    raise DataError(f"{where}: meta_mask[{i}]={keep!r} is not 0 or 1")
                if not keep:
                    counts["masked"] += 1
                    continue
                answers[text] = _answer(value, f"{where}: meta_result[{i}] ({text!r})")
            record.update({"prompt": str(row.get("prompt") or ""), "internal_id": sid, "answers": answers})
            lines.append(json.dumps(record))
            counts["samples"] += 1
            counts["answers"] += len(answers)
    if not lines:
        raise DataError(f"{', '.join(map(str, sources))}: no rows")
    from mpo.store import write_text

    write_text(out, "\n".join(lines) + "\n")
    return counts


def _relative(path: Path, start: Path) -> str:
    import os

    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return str(path)


def default_checklist(sources: Sequence[str | Path]) -> Checklist:
    """``image-full``, or ``video-full`` when the first source has a ``video_path`` field."""
    first = Path(sources[0])
    if first.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = set(pq.read_schema(first).names)
    else:
        rows = read_table(first, DataError)
        names = set(rows[0][1]) if rows else set()
    return load_checklist("video-full" if "video_path" in names else "image-full")
