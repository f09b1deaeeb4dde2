"""The run directory: its layout, atomic writes, the prompt split and the candidate shards.

::

    runs/<name>/
      recipe.yaml                       the resolved recipe (written once, by the first run)
      prompts.parquet                   prompt_id (int), prompt, split ("train" / "val")
      candidates/
        shard-<g>.safetensors           global shard g (5 digits): latents + prompt embeddings
        score-<g>.parquet               the reward's scores for shard g (the score stage's resume unit)
        negative.safetensors            the empty prompt's embeddings (guidance), stored once
      previews/                         <prompt_id>-<sample_idx>.png / .mp4
      candidates.parquet                prompt_id, sample_idx, seed, shard, offset
      scores.parquet                    prompt_id, sample_idx, split, total, dim.*, sub.*, q.*, source
      pairs.parquet, checkpoints/, eval.parquet, export/
      rounds/round-<r>/                 iterative runs (rounds.count >= 1): round r's own candidates/,
                                        previews/, candidates.parquet, scores.parquet, pairs.parquet and
                                        recipe.yaml (:meth:`RunDir.round_dir`); prompts.parquet,
                                        checkpoints/, eval.parquet and export/ stay at the run's root

Shards are named by their *global* index (prompts [g*P, (g+1)*P) of prompts.parquet, P =
``generate.prompts_per_shard``), not by the rank that wrote them: so the set of shard files, their
content and the manifest are the same for any number of processes, and a run may be resumed with a
different number of processes.

Every file is written under a temporary name in its own folder (``.<name>.tmp-<pid>-<random><suffix>``),
fsynced and renamed into place, so a file with its final name is always complete: a killed job leaves
at most a temporary file, which no reader trusts and the next run deletes.

Shard format (safetensors): ``latents`` [n, *latent_shape] in candidate order; ``embeds.<key>``
[p, ...] one row per prompt of the shard; string metadata ``format``, ``candidates`` (JSON list of
[prompt_id, sample_idx, seed], one per latent row), ``prompt_index`` (JSON {prompt_id: embeds row})
``fingerprint`` (JSON of the settings that produced it, checked on resume) and ``content_hash``
(sha256 over every tensor's name, dtype, shape and bytes and the other metadata), verified when a
stage reads the shard: a bit flip or a truncated copy is refused, naming the shard, instead of
turning into NaN scores. Every parquet file the stages write carries a ``content_hash`` of its table
in its schema metadata, verified by :func:`read_parquet` in the same way.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import mmap
import os
import struct
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mpo.errors import is_environment_error

SHARD_FORMAT = "mpo-candidates/1"
ROUNDS_DIR = "rounds"
TMP_MARK = ".tmp-"
SPLITS = ("train", "val")
HASH_KEY = "content_hash"
# safetensors' dtype codes, as its header spells them
_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class StoreError(ValueError):
    """A run directory that cannot be used as it is; the message names the file."""


KEPT = "nothing half-written was kept and finished work is intact: fix it and rerun to resume"


def cannot_write_reason(err: BaseException) -> str:
    """Why a write failed, in words (disk full, read-only, ...), from an OSError or a library's text."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    for needle, words in (
        ("No space left", "No space left on device"),
        ("StorageFull", "No space left on device"),
        ("quota", "Disk quota exceeded"),
        ("Read-only", "Read-only file system"),
        ("ReadOnly", "Read-only file system"),
        ("ermission", "Permission denied"),
    ):
        if needle in text:
            return words
    return text.splitlines()[0] if text else type(err).__name__


# ---- layout -------------------------------------------------------------------------------------
class RunDir:
    """Paths of one run directory. Creating the object touches nothing on disk."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.recipe_yaml = self.root / "recipe.yaml"
        self.prompts_parquet = self.root / "prompts.parquet"
        self.candidates_dir = self.root / "candidates"
        self.previews_dir = self.root / "previews"
        self.candidates_parquet = self.root / "candidates.parquet"
        self.scores_parquet = self.root / "scores.parquet"
        self.pairs_parquet = self.root / "pairs.parquet"
        self.checkpoints = self.root / "checkpoints"
        self.eval_parquet = self.root / "eval.parquet"
        self.export = self.root / "export"
        self.negative = self.candidates_dir / "negative.safetensors"
        self.folder = self.root  # where this view's candidates, scores and pairs live

    @classmethod
    def from_recipe(cls, recipe: Any) -> RunDir:
        return cls(recipe.output_dir)

    def round_dir(self, index: int) -> RunDir:
        """Round ``index`` of an iterative run, as the stages see it: its candidates, previews, scores,
        pairs and recipe.yaml in ``rounds/round-<index>/`` (``folder``); the prompt table, checkpoints,
        eval curve and export those of the run, so that one training state runs across the rounds."""
        view = copy.copy(self)
        view.folder = self.root / ROUNDS_DIR / f"round-{index:03d}"
        view.recipe_yaml = view.folder / "recipe.yaml"
        view.candidates_dir = view.folder / "candidates"
        view.previews_dir = view.folder / "previews"
        view.candidates_parquet = view.folder / "candidates.parquet"
        view.scores_parquet = view.folder / "scores.parquet"
        view.pairs_parquet = view.folder / "pairs.parquet"
        view.negative = view.candidates_dir / "negative.safetensors"
        return view

    def shard(self, index: int) -> Path:
        return self.candidates_dir / shard_name(index)

    def score_shard(self, index: int) -> Path:
        return self.candidates_dir / f"score-{index:05d}.parquet"

    def make_dirs(self) -> None:
        for folder in (self.root, self.candidates_dir, self.previews_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def shard_index(name: str | os.PathLike) -> int:
    """``shard-00012.safetensors`` (or its stem, or a path to it) -> 12."""
    stem = Path(name).name.split(".")[0]
    prefix, _, digits = stem.partition("-")
    if prefix != "shard" or not digits.isdigit():
        raise StoreError(f"{name}: not a shard name (expected shard-<index>.safetensors)")
    return int(digits)


# ---- atomic writes ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``.

    The temporary file is in the same folder (a rename across file systems is not atomic) and starts
    with a dot, so globs for final names never see it. On an exception it is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    # The original suffix is repeated at the end so that writers that infer the format from the name
    # (PIL, imageio) still can.
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if not tmp.exists():
            raise StoreError(f"{path}: nothing was written to the temporary file {tmp.name}")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as err:
        if is_environment_error(err) and not isinstance(err, StoreError):
            raise StoreError(f"{path}: cannot write ({cannot_write_reason(err)}); {KEPT}") from err
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_files(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Temporary files left in ``folder`` by killed writers (only those for ``name`` if given)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{name}{TMP_MARK}*" if name else f".*{TMP_MARK}*"
    return sorted(folder.glob(pattern))


def remove_temp_files(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete what :func:`temp_files` finds. Call only where no live writer can own them (before a
    stage starts, or for files that only this process writes)."""
    removed = temp_files(folder, name)
    for tmp in removed:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return removed


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def frame_hash(frame: pd.DataFrame) -> str:
    """sha256 of a table's column names, dtypes and values (row order included, index not)."""
    digest = hashlib.sha256(json.dumps([[str(c), str(t)] for c, t in frame.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def write_parquet(
    frame: pd.DataFrame, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``frame`` (index dropped); ``metadata`` goes into the parquet schema, with the
    table's :func:`frame_hash` (of the frame as it will read back), which :func:`read_parquet` checks."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    merged = dict(table.schema.metadata or {})
    merged.update({k.encode(): v.encode() for k, v in (metadata or {}).items()})
    merged[HASH_KEY.encode()] = frame_hash(table.to_pandas()).encode()
    table = table.replace_schema_metadata(merged)
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | os.PathLike) -> pd.DataFrame:
    """A parquet file as a frame; one written by :func:`write_parquet` must match its content hash."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: not found")
    try:
        table = pq.read_table(path)
        frame = table.to_pandas()
    except Exception as err:  # pyarrow's errors for a damaged file are of several types
        raise StoreError(f"{path}: cannot read parquet ({str(err).splitlines()[0]})") from err
    stored = (table.schema.metadata or {}).get(HASH_KEY.encode())
    if stored is not None and stored.decode() != frame_hash(frame):
        raise StoreError(
            f"{path}: its content does not match its content hash (the file is damaged); delete it "
            "and rerun the stage that writes it"
        )
    return frame


def parquet_hash(path: str | os.PathLike) -> str | None:
    """The content hash stored in a parquet file's metadata (header only), or None."""
    try:
        raw = pq.read_schema(path).metadata or {}
    except Exception as err:
        raise StoreError(f"{path}: cannot read parquet ({str(err).splitlines()[0]})") from err
    value = raw.get(HASH_KEY.encode())
    return value.decode() if value is not None else None


def parquet_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata written by :func:`write_parquet` (pandas' own entry left out)."""
    try:
        raw = pq.read_schema(path).metadata or {}
    except Exception as err:
        raise StoreError(f"{path}: cannot read parquet ({str(err).splitlines()[0]})") from err
    return {k.decode(): v.decode() for k, v in raw.items() if k != b"pandas"}


# ---- prompts ------------------------------------------------------------------------------------
def read_prompt_file(path: str | os.PathLike, column: str = "prompt", split: str = "train") -> list[str]:
    """Prompts from a .txt / .jsonl / .csv / .parquet file, a datasets folder or a hub dataset id
    (:mod:`mpo.prompts`; ``column`` names the prompt column of every format but .txt)."""
    from mpo.prompts import read_prompts

    return read_prompts(path, column, split)


def split_prompts(
    prompts: Sequence[str], val_fraction: float, val_count: int | None, split_seed: int
) -> pd.DataFrame:
    """prompt_id (position in the file), prompt and a seeded train / val split.

    The split is drawn over the *unique* prompt texts: a prompt that appears several times in the file
    lands in one split with all its copies, so the held-out prompts are really held out. Fractions
    and counts are of unique prompts. With two or more of them and a positive val_fraction at least
    one is held out (the eval curves need one) and at least one is kept for training.
    """
    texts = list(dict.fromkeys(prompts))  # unique, in order of first appearance
    n = len(texts)
    if val_count is not None:
        if not 0 <= val_count < max(n, 1):
            raise StoreError(
                f"prompts.val_count={val_count}: must be in [0, {max(n - 1, 0)}] for {n} unique prompts"
            )
        n_val = val_count
    else:
        if not 0.0 <= val_fraction < 1.0:
            raise StoreError(f"prompts.val_fraction={val_fraction}: must be in [0, 1)")
        n_val = round(val_fraction * n)
        if n >= 2 and val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng(split_seed).permutation(n)
    held_out = {texts[i] for i in order[:n_val]}
    split = np.array(["val" if p in held_out else "train" for p in prompts], dtype=object)
    return pd.DataFrame(
        {
            "prompt_id": np.arange(len(prompts), dtype=np.int64),
            "prompt": list(prompts),
            "split": split.astype(str),
        }
    )


def prepare_prompts(recipe: Any, write: bool = True, force: bool = False) -> pd.DataFrame:
    """The run's prompt table, written to prompts.parquet on first use.

    Later runs read it back; if the recipe would now give a different table (another file, limit,
    split seed or fraction) this raises instead of silently changing which prompts are held out, or
    with ``force`` replaces it (every later stage then sees new inputs). Every process may call this;
    pass ``write=False`` on all but one.
    """
    cfg = recipe.prompts
    if not cfg.file or cfg.file == "???":
        raise StoreError("prompts.file is not set")
    prompts = read_prompt_file(cfg.file, cfg.column, cfg.dataset_split)
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    if not prompts:
        raise StoreError(f"prompts.file={cfg.file!r}: no prompts")
    frame = split_prompts(prompts, cfg.val_fraction, cfg.val_count, cfg.split_seed)
    path = RunDir.from_recipe(recipe).prompts_parquet
    if path.exists():
        existing = read_parquet(path)
        difference = _describe_difference(existing, frame)
        if not difference:
            return existing
        if not force:
            raise StoreError(
                f"{path} exists and differs from what the recipe gives now ({difference}); the split "
                "of a run cannot change: use a new output_dir, restore the recipe's prompts section, or "
                "add --force to generate again from the new prompts"
            )
    if write:
        write_parquet(frame, path)
    return frame


def _describe_difference(old: pd.DataFrame, new: pd.DataFrame) -> str:
    if list(old.columns) != list(new.columns):
        return f"columns {list(old.columns)} vs {list(new.columns)}"
    if len(old) != len(new):
        return f"{len(old)} prompts vs {len(new)}"
    for column in new.columns:
        unequal = np.flatnonzero(old[column].to_numpy() != new[column].to_numpy())
        if len(unequal):
            row = int(unequal[0])
            return f"prompt_id {new['prompt_id'].iloc[row]}: {column} {old[column].iloc[row]!r} vs {new[column].iloc[row]!r}"
    return ""


def describe_changes(stored: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: stored -> now`` for every leaf where two (nested) settings dicts differ."""
    changes = []
    for key in sorted(set(stored) | set(now)):
        a, b = stored.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += describe_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


# ---- shards -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    """What a shard's metadata says, without reading its tensors."""

    path: Path
    candidates: list[tuple[int, int, int]]  # (prompt_id, sample_idx, seed), one per latents row
    prompt_index: dict[int, int]  # prompt_id -> row of embeds.*
    fingerprint: dict[str, Any]

    @property
    def index(self) -> int:
        return shard_index(self.path)


def write_shard(
    path: str | os.PathLike,
    latents: torch.Tensor,
    embeds: dict[str, torch.Tensor],
    prompt_ids: Sequence[int],
    candidates: Sequence[tuple[int, int, int]],
    fingerprint: dict[str, Any],
) -> None:
    """Atomically write one shard. ``embeds`` rows follow ``prompt_ids``; ``latents`` rows follow
    ``candidates``."""
    if latents.shape[0] != len(candidates):
        raise StoreError(f"{path}: {latents.shape[0]} latents for {len(candidates)} candidates")
    tensors = {"latents": latents.detach().cpu().contiguous()}
    for key, value in embeds.items():
        if value.shape[0] != len(prompt_ids):
            raise StoreError(f"{path}: embeds.{key} has {value.shape[0]} rows for {len(prompt_ids)} prompts")
        tensors[f"embeds.{key}"] = value.detach().cpu().contiguous()
    metadata = {
        "format": SHARD_FORMAT,
        "candidates": json.dumps([[int(p), int(s), int(seed)] for p, s, seed in candidates]),
        "prompt_index": json.dumps({str(int(p)): row for row, p in enumerate(prompt_ids)}),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    metadata[HASH_KEY] = _tensors_hash(
        {
            k: (_DTYPE_CODES[v.dtype], list(v.shape), v.view(-1).view(torch.uint8).numpy())
            for k, v in tensors.items()
        },
        metadata,
    )
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _tensors_hash(tensors: dict[str, tuple[str, list[int], Any]], metadata: dict[str, str]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, by name, then the metadata but the hash."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        digest.update(json.dumps([name, dtype, shape]).encode())
        digest.update(data)
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != HASH_KEY}, sort_keys=True).encode())
    return f"sha256:{digest.hexdigest()}"


def verify_shard(path: str | os.PathLike) -> None:
    """Check a shard's bytes against the content hash in its metadata; raise :class:`StoreError`
    naming the shard if they differ or the file is cut short. Reads the whole file once."""
    path = Path(path)
    damaged = f"{path}: damaged"
    remedy = "delete it and rerun the generate stage to make it again"
    if not path.is_file():
        raise StoreError(f"{path}: missing; rerun the generate stage to make it again")
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if len(data) < 8:
                raise StoreError(f"{damaged} (only {len(data)} bytes); {remedy}")
            (length,) = struct.unpack("<Q", data[:8])
            if 8 + length > len(data):
                raise StoreError(f"{damaged} (cut short inside its header); {remedy}")
            header = json.loads(bytes(data[8 : 8 + length]))
            metadata = header.pop("__metadata__", None) or {}
            start, view, tensors = 8 + length, memoryview(data), {}
            try:
                for name, entry in header.items():
                    begin, end = (start + int(x) for x in entry["data_offsets"])
                    if end > len(data):
                        raise StoreError(f"{damaged} (cut short: tensor {name!r} is incomplete); {remedy}")
                    tensors[name] = (entry["dtype"], list(entry["shape"]), view[begin:end])
                stored = metadata.get(HASH_KEY)
                if stored is None:
                    raise StoreError(f"{path}: has no {HASH_KEY} in its metadata; {remedy}")
                if _tensors_hash(tensors, metadata) != stored:
                    raise StoreError(
                        f"{damaged}: its content does not match its content hash (bit flip or a bad "
                        f"copy); {remedy}"
                    )
            finally:
                tensors.clear()
                view.release()
    except StoreError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{damaged} ({err}); {remedy}") from err


def read_shard_info(path: str | os.PathLike, verify: bool = False) -> ShardInfo:
    """Parse a shard's metadata (header only; with ``verify``, the whole shard is checked against its
    content hash first). Raises :class:`StoreError` naming the file if it is not a complete, intact
    shard of this format."""
    path = Path(path)
    if verify:
        verify_shard(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            keys = set(handle.keys())
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise StoreError(
            f"{path}: damaged, not a readable safetensors shard ({err}); delete it and rerun the generate "
            "stage to make it again"
        ) from err
    if meta.get("format") != SHARD_FORMAT or "latents" not in keys:
        raise StoreError(
            f"{path}: not a candidate shard (format {meta.get('format')!r}, want {SHARD_FORMAT})"
        )
    try:
        candidates = [(int(p), int(s), int(seed)) for p, s, seed in json.loads(meta["candidates"])]
        prompt_index = {int(p): int(row) for p, row in json.loads(meta["prompt_index"]).items()}
        fingerprint = json.loads(meta.get("fingerprint", "{}"))
    except (KeyError, ValueError, TypeError) as err:
        raise StoreError(f"{path}: malformed shard metadata ({err})") from err
    return ShardInfo(path, candidates, prompt_index, fingerprint)


def shard_hash(path: str | os.PathLike) -> str:
    """The content hash a shard's header records (cheap: the header only)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return (handle.metadata() or {}).get(HASH_KEY, "")
    except Exception as err:  # safetensors' own error type for a damaged header
        raise StoreError(
            f"{path}: damaged, not a readable safetensors shard ({err}); delete it and rerun the generate "
            "stage to make it again"
        ) from err


def candidates_hash(run: RunDir) -> str:
    """One hash for the whole candidate cache: the manifest's content hash and every shard's (read
    from the shard headers, so cheap); what training and its checkpoints were made from."""
    digest = hashlib.sha256(str(parquet_hash(run.candidates_parquet)).encode())
    for name in sorted(read_parquet(run.candidates_parquet)["shard"].unique()):
        digest.update(f"{name}={shard_hash(run.candidates_dir / f'{name}.safetensors')};".encode())
    return f"sha256:{digest.hexdigest()}"


def build_manifest(infos: Sequence[ShardInfo]) -> pd.DataFrame:
    """candidates.parquet's table from shard metadata, sorted by (prompt_id, sample_idx)."""
    rows = [
        (p, s, seed, info.path.stem, offset)
        for info in infos
        for offset, (p, s, seed) in enumerate(info.candidates)
    ]
    frame = pd.DataFrame(rows, columns=["prompt_id", "sample_idx", "seed", "shard", "offset"])
    frame = frame.astype({"prompt_id": "int64", "sample_idx": "int64", "seed": "int64", "offset": "int64"})
    duplicated = frame.duplicated(["prompt_id", "sample_idx"])
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        raise StoreError(f"candidate ({row.prompt_id}, {row.sample_idx}) is in more than one shard")
    return frame.sort_values(["prompt_id", "sample_idx"], kind="stable").reset_index(drop=True)


# ---- reading candidates -------------------------------------------------------------------------
class CandidateStore:
    """Random access to cached latents and prompt embeddings, for the trainer and the score stage.

    Lookups go through candidates.parquet (loaded once into a dict) to a (shard, row) and read only
    that row's bytes (``safe_open(...).get_slice``: the shard is memory-mapped, never loaded whole).
    At most ``max_open_shards`` shards stay open, least recently used closed first, so pairs drawn
    from many shards do not exhaust file handles. The handles are dropped when the store is pickled
    (DataLoader workers reopen their own).
    """

    def __init__(
        self,
        run_dir: RunDir | str | os.PathLike,
        max_open_shards: int = 16,
        verified: Sequence[str] = (),
    ) -> None:
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.max_open_shards = max(1, int(max_open_shards))
        # Shards already checked against their content hash (by name); the others are checked the
        # first time this store opens them.
        self.verified = set(verified)
        self.manifest = read_parquet(self.run_dir.candidates_parquet)
        m = self.manifest
        self._where = {
            (int(p), int(s)): (shard, int(o))
            for p, s, shard, o in zip(m["prompt_id"], m["sample_idx"], m["shard"], m["offset"])
        }
        self._prompt_shard = dict(zip(m["prompt_id"].astype(int), m["shard"]))
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._prompt_rows: dict[str, dict[int, int]] = {}
        self._negative: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self._where)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _handle(self, shard: str) -> Any:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self.run_dir.candidates_dir / f"{shard}.safetensors"
        if not path.exists():
            raise StoreError(f"{path}: listed in {self.run_dir.candidates_parquet} but missing")
        if shard not in self.verified:
            verify_shard(path)
            self.verified.add(shard)
        handle = safe_open(str(path), framework="pt", device="cpu")
        self._open[shard] = handle
        if shard not in self._prompt_rows:
            meta = handle.metadata() or {}
            self._prompt_rows[shard] = {int(p): r for p, r in json.loads(meta["prompt_index"]).items()}
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return handle

    def locate(self, prompt_id: int, sample_idx: int) -> tuple[str, int]:
        try:
            return self._where[(int(prompt_id), int(sample_idx))]
        except KeyError:
            raise StoreError(
                f"candidate (prompt_id={prompt_id}, sample_idx={sample_idx}) is not in {self.run_dir.candidates_parquet}"
            ) from None

    def latents(self, prompt_ids: Sequence[int], sample_idxs: Sequence[int]) -> torch.Tensor:
        """``[B, *latent_shape]`` for the candidates (prompt_ids[i], sample_idxs[i])."""
        if len(prompt_ids) != len(sample_idxs):
            raise ValueError(f"{len(prompt_ids)} prompt_ids for {len(sample_idxs)} sample_idxs")
        rows = []
        for p, s in zip(prompt_ids, sample_idxs):
            shard, offset = self.locate(p, s)
            rows.append(self._handle(shard).get_slice("latents")[offset : offset + 1])
        return torch.cat(rows)

    def embeddings(self, prompt_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Each prompt's cached embeddings, batch rows in ``prompt_ids`` order."""
        parts: dict[str, list[torch.Tensor]] = {}
        for p in prompt_ids:
            shard = self._prompt_shard.get(int(p))
            if shard is None:
                raise StoreError(f"prompt_id {p} has no candidates in {self.run_dir.candidates_parquet}")
            handle = self._handle(shard)
            row = self._prompt_rows[shard][int(p)]
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if key.startswith("embeds."):
                    parts.setdefault(key[len("embeds.") :], []).append(handle.get_slice(key)[row : row + 1])
        return {key: torch.cat(values) for key, values in parts.items()}

    def negative_embeddings(self) -> dict[str, torch.Tensor]:
        """The empty prompt's embeddings (one row each), the unconditional branch of guidance."""
        if self._negative is None:
            path = self.run_dir.negative
            if not path.exists():
                raise StoreError(f"{path}: missing (run the generate stage)")
            try:
                self._negative = load_file(str(path))
            except Exception as err:  # safetensors' own error type for a damaged file
                raise StoreError(f"{path}: damaged ({err}); delete it and rerun the generate stage") from err
        return {key: value.clone() for key, value in self._negative.items()}
