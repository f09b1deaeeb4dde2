"""Prompt sources: text, JSON lines, CSV, parquet and Hugging Face datasets, read into one list.

``prompts.file`` names any of::

    prompts.txt                    one prompt a line (blank lines skipped)
    prompts.jsonl                  one JSON object a line; the prompt is field ``prompts.column``
    prompts.csv / prompts.parquet  a table; the prompt is column ``prompts.column``
    data/my-prompts/               a ``datasets`` folder written by ``save_to_disk`` (Dataset or
                                   DatasetDict: ``prompts.dataset_split`` picks the split)
    data/raw/                      any other folder ``datasets.load_dataset`` reads (csv/json/parquet files)
    owner/name                     a dataset on the Hugging Face Hub (``load_dataset``; split
                                   ``prompts.dataset_split``, column ``prompts.column``)

Every error is one line naming the file (or dataset) and, where it is the column that is wrong, the
column and the columns there are. Prompts are kept in the source's order: a prompt's position is its
``prompt_id``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

from mpo.store import StoreError

TABLE_SUFFIXES = (".csv", ".parquet")
SUFFIXES = (".txt", ".jsonl", *TABLE_SUFFIXES)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class PromptsError(StoreError):
    """Prompts that cannot be read; the message names the file or dataset and the column."""


def is_hub_dataset_id(value: str) -> bool:
    """``owner/name`` with no such local path and no file suffix: a dataset on the hub."""
    path = Path(value).expanduser()
    return (
        not path.exists()
        and path.suffix.lower() not in SUFFIXES
        and _HUB_ID.fullmatch(value) is not None
        and not value.startswith(("./", "../"))
    )


def read_prompts(source: str | os.PathLike, column: str = "prompt", split: str = "train") -> list[str]:
    """The prompts of ``source`` (see the module docstring), as strings, in order."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_dataset_folder(path, column, split)
    if path.is_file():
        suffix = path.suffix.lower()
        reader = {".txt": _from_txt, ".jsonl": _from_jsonl, ".csv": _from_csv, ".parquet": _from_parquet}
        if suffix not in reader:
            raise PromptsError(
                f"prompts.file={text!r}: unsupported suffix {suffix!r}; use {', '.join(SUFFIXES)}, a datasets "
                "folder or a hub dataset id"
            )
        try:
            return reader[suffix](path, column) if suffix != ".txt" else _from_txt(path)
        except UnicodeDecodeError as err:
            raise PromptsError(
                f"prompts.file={text!r}: not UTF-8 text (byte {err.start}: {err.reason})"
            ) from err
    if is_hub_dataset_id(text):
        return _from_hub(text, column, split)
    raise PromptsError(f"prompts.file={text!r}: no such file or folder (relative to {Path.cwd()})")


def _from_txt(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _from_jsonl(path: Path, column: str) -> list[str]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptsError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get(column), str):
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise PromptsError(
                f"{path}:{number}: expected an object with a string {column!r} field (prompts.column); "
                f"found {fields}"
            )
        prompts.append(record[column])
    return prompts


def _from_csv(path: Path, column: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        if column not in header:
            raise PromptsError(f"{path}: no column {column!r} (prompts.column); columns: {header}")
        return [_text(row[column], path, number, column) for number, row in enumerate(reader, start=2)]


def _from_parquet(path: Path, column: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as err:
        raise PromptsError(f"{path}: cannot read parquet ({err})") from err
    if column not in names:
        raise PromptsError(f"{path}: no column {column!r} (prompts.column); columns: {names}")
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return [_text(v, path, row, column) for row, v in enumerate(values)]


def _text(value: Any, where: Any, row: Any, column: str) -> str:
    if not isinstance(value, str):
        raise PromptsError(f"{where}: row {row}: column {column!r} holds {value!r}, not a prompt string")
    return value


def _from_dataset_folder(path: Path, column: str, split: str) -> list[str]:
    import datasets

    saved = (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
    try:
        data = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    except Exception as err:  # datasets raises many kinds; all mean "cannot read this folder"
        raise PromptsError(f"prompts.file={str(path)!r}: cannot read it as a dataset ({err})") from err
    return _column(data, str(path), column, split)


def _from_hub(repo_id: str, column: str, split: str) -> list[str]:
    import datasets

    try:
        data = datasets.load_dataset(repo_id, split=split)
    except Exception as err:  # offline, unknown repo, unknown split: one line naming them
        raise PromptsError(
            f"prompts.file={repo_id!r} (hub dataset, split {split!r}): cannot load it "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    return _column(data, repo_id, column, split)


def _column(data: Any, where: str, column: str, split: str) -> list[str]:
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise PromptsError(f"{where}: no split {split!r} (prompts.dataset_split); splits: {list(data)}")
        data = data[split]
    if column not in data.column_names:
        raise PromptsError(f"{where}: no column {column!r} (prompts.column); columns: {data.column_names}")
    return [_text(v, where, row, column) for row, v in enumerate(data[column])]
