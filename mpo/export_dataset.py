"""``mpo export-dataset``: the run's preference pairs as a Hugging Face ``datasets`` dataset.

::

    mpo export-dataset recipes/tiny/sdxl.yaml                        # -> <output_dir>/dataset/
    mpo export-dataset RECIPE --candidates --out data/prefs --push-to-hub me/tiny-prefs

A Pick-a-Pic-like preference dataset other tools can train on, saved with ``save_to_disk`` (Arrow;
``datasets.load_from_disk`` reads it back) as a ``DatasetDict``:

``pairs`` (one row per selected pair of pairs.parquet)
    prompt_id, prompt, split, win_idx, lose_idx, ``win`` / ``lose`` (decoded images, ``datasets.Image``;
    for video backbones the first frame, with the MP4 bytes in ``win_video`` / ``lose_video``),
    ``win_scores`` / ``lose_scores`` (total and every dimension, a struct), margin, rule, level,
    dominant, and ``label_0`` / ``label_1`` (1/0: image 0 is the winner) as Pick-a-Pic has them.
``candidates`` (with ``--candidates``: every scored candidate)
    prompt_id, prompt, split, sample_idx, seed, ``image`` (``video``), ``scores``.

Pixels come from the cached latents through the backbone's own VAE decode (the same pixels the
reward scored), in batches of ``reward.batch_size``. The folder is written under a temporary name
and renamed into place; the main process writes it, the others wait.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mpo.logs import get_logger
from mpo.store import CandidateStore, RunDir, StoreError, read_parquet

DATASET_DIR = "dataset"
log = get_logger(__name__)


def _score_columns(scores: pd.DataFrame) -> list[str]:
    return ["total", *[c for c in scores.columns if c.startswith("dim.")]]


def _scores_struct(row: pd.Series, columns: list[str]) -> dict[str, float | None]:
    out = {}
    for c in columns:
        value = float(row[c])
        out[c.removeprefix("dim.")] = None if value != value else value  # NaN: not judged
    return out


def decode_candidates(
    recipe: Any, run: RunDir, wanted: list[tuple[int, int]], backbone: Any = None
) -> tuple[dict[tuple[int, int], np.ndarray], str]:
    """(prompt_id, sample_idx) -> uint8 pixels ([H, W, 3] or [T, H, W, 3]) through the backbone's
    VAE (``backbone``, or one loaded on the CPU), and the backbone's modality."""
    import torch
    from tqdm.auto import tqdm

    from mpo.backbones.registry import load_backbone
    from mpo.distributed import whole_model_loading

    if backbone is None:
        with whole_model_loading():
            backbone = load_backbone(recipe.model, "cpu")
    device = next(backbone.denoiser.parameters()).device
    store = CandidateStore(run)
    batch = max(1, int(recipe.reward.batch_size))
    out: dict[tuple[int, int], np.ndarray] = {}
    for start in tqdm(range(0, len(wanted), batch), desc="decode", unit="batch"):
        chunk = wanted[start : start + batch]
        latents = store.latents([p for p, _ in chunk], [i for _, i in chunk])
        with torch.no_grad():
            pixels = backbone.decode(latents.to(device)).float().clamp(0, 1).cpu()
        channels_last = pixels.permute(0, 1, 3, 4, 2) if pixels.ndim == 5 else pixels.permute(0, 2, 3, 1)
        array = (channels_last.numpy() * 255).round().astype(np.uint8)
        for key, value in zip(chunk, array):
            out[key] = value
    return out, backbone.modality


def _media(pixels: np.ndarray, fps: float, video: bool) -> tuple[np.ndarray, bytes | None]:
    if not video:
        return pixels, None
    from mpo.tracker_media import write_mp4

    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"mpo-dataset-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        path = folder / "clip.mp4"
        write_mp4(path, pixels, fps)
        return pixels[0], path.read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def build_dataset(recipe: Any, run: RunDir, candidates: bool = False):
    """The DatasetDict (``pairs``, and ``candidates`` when asked)."""
    import datasets

    for path in (run.pairs_parquet, run.scores_parquet, run.prompts_parquet, run.candidates_parquet):
        if not path.exists():
            raise StoreError(f"{path}: missing; run the generate, score and select stages first")
    pairs = read_parquet(run.pairs_parquet)
    scores = read_parquet(run.scores_parquet).set_index(["prompt_id", "sample_idx"])
    prompts = read_parquet(run.prompts_parquet).set_index("prompt_id")
    manifest = read_parquet(run.candidates_parquet).set_index(["prompt_id", "sample_idx"])
    columns = _score_columns(scores)
    wanted = sorted(
        {(int(r.prompt_id), int(r.win)) for r in pairs.itertuples()}
        | {(int(r.prompt_id), int(r.lose)) for r in pairs.itertuples()}
    )
    if candidates:
        wanted = sorted(set(wanted) | {(int(p), int(i)) for p, i in scores.index})
    pixels, modality = decode_candidates(recipe, run, wanted)
    video = modality == "video"
    fps = float(recipe.generate.fps)
    media = {key: _media(value, fps, video) for key, value in pixels.items()}
    score_type = datasets.Features({c.removeprefix("dim."): datasets.Value("float64") for c in columns})

    rows = []
    for r in pairs.itertuples():
        p, w, lo = int(r.prompt_id), int(r.win), int(r.lose)
        row = {
            "prompt_id": p,
            "prompt": str(prompts.loc[p, "prompt"]),
            "split": str(prompts.loc[p, "split"]),
            "win_idx": w,
            "lose_idx": lo,
            "win": media[(p, w)][0],
            "lose": media[(p, lo)][0],
            "win_scores": _scores_struct(scores.loc[(p, w)], columns),
            "lose_scores": _scores_struct(scores.loc[(p, lo)], columns),
            "margin": float(r.margin),
            "rule": str(r.rule),
            "level": str(r.level),
            "dominant": bool(r.dominant),
            "label_0": 1.0,
            "label_1": 0.0,
        }
        if video:
            row["win_video"], row["lose_video"] = media[(p, w)][1], media[(p, lo)][1]
        rows.append(row)
    features = {
        "prompt_id": datasets.Value("int64"),
        "prompt": datasets.Value("string"),
        "split": datasets.Value("string"),
        "win_idx": datasets.Value("int64"),
        "lose_idx": datasets.Value("int64"),
        "win": datasets.Image(),
        "lose": datasets.Image(),
        "win_scores": dict(score_type),
        "lose_scores": dict(score_type),
        "margin": datasets.Value("float64"),
        "rule": datasets.Value("string"),
        "level": datasets.Value("string"),
        "dominant": datasets.Value("bool"),
        "label_0": datasets.Value("float64"),
        "label_1": datasets.Value("float64"),
    }
    if video:
        features |= {"win_video": datasets.Value("binary"), "lose_video": datasets.Value("binary")}
    out = {"pairs": datasets.Dataset.from_list(rows, features=datasets.Features(features))}
    if candidates:
        items = []
        for (p, i), row in scores.iterrows():
            item = {
                "prompt_id": int(p),
                "prompt": str(prompts.loc[int(p), "prompt"]),
                "split": str(prompts.loc[int(p), "split"]),
                "sample_idx": int(i),
                "seed": int(manifest.loc[(p, i), "seed"]),
                "image": media[(int(p), int(i))][0],
                "scores": _scores_struct(row, columns),
            }
            if video:
                item["video"] = media[(int(p), int(i))][1]
            items.append(item)
        cand_features = {
            "prompt_id": datasets.Value("int64"),
            "prompt": datasets.Value("string"),
            "split": datasets.Value("string"),
            "sample_idx": datasets.Value("int64"),
            "seed": datasets.Value("int64"),
            "image": datasets.Image(),
            "scores": dict(score_type),
        }
        if video:
            cand_features["video"] = datasets.Value("binary")
        out["candidates"] = datasets.Dataset.from_list(items, features=datasets.Features(cand_features))
    return datasets.DatasetDict(out)


def export_dataset(
    recipe: Any,
    out: str | os.PathLike | None = None,
    candidates: bool = False,
    push_to_hub: str | None = None,
    private: bool = True,
) -> dict[str, Any]:
    """Build and save the dataset (and push it when ``push_to_hub`` names a dataset repo)."""
    from mpo.summary import print_summary

    run = RunDir.from_recipe(recipe)
    target = Path(out) if out is not None else run.root / DATASET_DIR
    data = build_dataset(recipe, run, candidates)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        data.save_to_disk(str(tmp))
        (tmp / "mpo_source.json").write_text(
            json.dumps({"run": str(run.root.resolve()), "recipe": recipe.name})
        )
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary: dict[str, Any] = {"dataset": str(target), **{f"{k} rows": len(v) for k, v in data.items()}}
    if push_to_hub:
        data.push_to_hub(push_to_hub, private=private)
        summary["pushed"] = push_to_hub
    print_summary("export-dataset", summary)
    return summary
