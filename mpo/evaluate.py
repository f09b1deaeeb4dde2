"""Held-out reward per dimension: the curves that show what training does, and the best-checkpoint pick.

::

    mpo eval recipes/tiny/sdxl.yaml                          # the best (or last) checkpoint, standalone
    accelerate launch --num_processes 8 -m mpo.cli eval RECIPE

``evaluate`` samples ``eval.samples_per_prompt`` images (or videos) for each held-out prompt from fixed
noise (``candidate_seed(eval.seed, prompt_id, i)``: the same noise before training, at every eval and
after), decodes them, scores them with the reward and returns the mean of every dimension and of the
total. The trainer calls it at step 0 (the untrained model), every ``eval.every`` steps and at the
end; each call is one row of eval.parquet (step, total, dim.*, samples) and one point of the
``eval/total`` and ``eval/dim.<name>`` tracker curves. The first ``eval.grid_size`` samples go to the
tracker one by one, captioned with their prompt and step (wandb: ``wandb.Image`` / ``wandb.Video``;
tensorboard: one image, or one animated-GIF video summary as ``add_video`` writes, per sample), and
into the run directory: ``eval/samples-step-<n>.png`` (a strip of first frames) and
``eval/step-<n>/<prompt_id>-<sample>.png`` (+ ``.mp4`` for videos), which ``mpo report`` turns
into before/after pictures.

The samples are split across processes (each scores its own share with its own reward) and every
process samples the same number of batches, padding with repeats that are not scored: under
DeepSpeed ZeRO-3 each forward is a collective, and an uneven split would hang.

Departure from the paper: the paper reports the reward of the final model on its benchmark prompts;
here the held-out prompts are the run's own val split, scored with the run's reward.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator

from mpo.backbones.base import Backbone, Embeddings, torch_dtype
from mpo.backbones.registry import load_backbone
from mpo.distributed import (
    errors_reach_every_rank,
    gather,
    is_main,
    main_process_first,
    make_accelerator,
    process_rank_and_count,
    wait_for_everyone,
    whole_model_loading,
)
from mpo.seeds import candidate_noise, candidate_seed
from mpo.store import CandidateStore, RunDir, StoreError, read_parquet, write_parquet

Item = tuple[int, str, int]  # (prompt_id, prompt, sample index)
MAX_PREVIEW_FRAMES = 49  # frames of a video sample kept for the tracker (evenly spaced)


def eval_prompts(run: RunDir, recipe: Any) -> pd.DataFrame:
    """The held-out prompts used for eval: the val split, by prompt_id, at most ``eval.num_prompts``."""
    if not run.prompts_parquet.exists():
        raise StoreError(f"{run.prompts_parquet}: missing; run the generate stage first")
    prompts = read_parquet(run.prompts_parquet)
    val = prompts[prompts["split"] == "val"].sort_values("prompt_id", kind="stable")
    if recipe.eval.num_prompts is not None:
        val = val.head(int(recipe.eval.num_prompts))
    if val.empty:
        raise StoreError(
            f"{run.prompts_parquet}: no val prompts to evaluate on; set prompts.val_fraction or prompts.val_count"
        )
    return val.reset_index(drop=True)


def cached_embeddings(run: RunDir, prompts: pd.DataFrame) -> tuple[dict[int, Embeddings], Embeddings] | None:
    """The val prompts' embeddings from the candidate cache (the generate stage encodes every prompt),
    so eval needs no text encoder; None when the cache does not hold them all."""
    if not run.candidates_parquet.exists():
        return None
    store = CandidateStore(run)
    try:
        rows = {int(p): store.embeddings([int(p)]) for p in prompts["prompt_id"]}
        return rows, store.negative_embeddings()
    except StoreError:
        return None


def _my_items(items: list[Item], accelerator: Accelerator | None) -> list[tuple[Item, bool]]:
    """This process's items, padded with repeats (flag False) to the same count on every process."""
    rank, world = process_rank_and_count(accelerator)
    per_process = math.ceil(len(items) / world)
    mine = [(item, True) for item in items[rank::world]]
    while len(mine) < per_process:
        mine.append((mine[-1][0] if mine else items[0], False))
    return mine


@torch.no_grad()
def evaluate(
    backbone: Backbone,
    reward: Any,
    prompts: pd.DataFrame,
    recipe: Any,
    *,
    accelerator: Accelerator | None = None,
    embeddings: dict[int, Embeddings] | None = None,
    negative: Embeddings | None = None,
) -> dict[str, Any]:
    """Mean reward of fresh samples on ``prompts`` (columns prompt_id, prompt); every process calls it.

    Samples with the backbone's current denoiser as it is (the caller puts it in eval mode).
    ``embeddings`` (prompt_id -> one-row embeddings) and ``negative`` skip the text encoders.
    Returns {"total", "dim.<name>" ...: float, "samples": int, "grid": uint8 [H, W, 3] array of the
    first ``eval.grid_size`` samples (None on other processes than the main one)}.
    """
    device = next(backbone.denoiser.parameters()).device
    dtype = torch_dtype(recipe.model.dtype)
    shape = tuple(backbone.latent_shape(recipe.generate))
    n = int(recipe.eval.samples_per_prompt)
    items = [
        (int(p), str(text), i) for p, text in zip(prompts["prompt_id"], prompts["prompt"]) for i in range(n)
    ]
    grid_keys = {(p, i) for p, _, i in items[: int(recipe.eval.grid_size)]}
    if negative is None:
        negative = backbone.encode_negative()
    cache: dict[int, Embeddings] = dict(embeddings or {})

    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    previews: list[dict[str, Any]] = []
    mine = _my_items(items, accelerator)
    batch = max(1, int(recipe.reward.batch_size))
    bar = tqdm(total=len(mine), desc="eval", unit="sample", leave=False, disable=not is_main(accelerator))
    for start in range(0, len(mine), batch):
        chunk = mine[start : start + batch]
        for p, text, _ in (item for item, _ in chunk):
            if p not in cache:
                cache[p] = backbone.encode_prompts([text])
        cached = [cache[p] for (p, _, _), _ in chunk]
        embeds = {k: torch.cat([row[k] for row in cached]).to(device) for k in cached[0]}
        noise = torch.stack(
            [
                candidate_noise(shape, candidate_seed(recipe.eval.seed, p, i), device, dtype)
                for (p, _, i), _ in chunk
            ]
        )
        pixels = backbone.decode(backbone.sample(embeds, negative, noise, recipe.generate)).float().cpu()
        bar.update(len(chunk))
        keep = [k for k, (_, real) in enumerate(chunk) if real]
        if not keep:
            continue
        scores = reward.score([_sample(pixels[k], chunk[k][0], recipe) for k in keep])
        for k, values in zip(keep, scores.to_rows()):
            (p, text, i), _ = chunk[k]
            rows.append({"prompt_id": p, "sample_idx": i, **values})
            if (p, i) in grid_keys:
                previews.append(_preview(pixels[k], p, i, text, values, recipe))
    bar.close()
    all_rows = [r for part in gather(accelerator, rows) for r in part]
    all_previews = [x for part in gather(accelerator, previews) for x in part]
    return _summarise(all_rows, all_previews, accelerator)


def _sample(pixels: torch.Tensor, item: Item, recipe: Any):
    from reward.types import Sample

    p, text, i = item
    return Sample(pixels=pixels, prompt=text, fps=float(recipe.generate.fps), id=f"eval {p}:{i}")


def _first_frame(pixels: torch.Tensor) -> np.ndarray:
    frame = pixels[0] if pixels.ndim == 4 else pixels
    return (frame.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _preview(pixels: torch.Tensor, p: int, i: int, text: str, scores: dict, recipe: Any) -> dict[str, Any]:
    """One sample for the trackers and the run-directory pictures: uint8 HWC (image) or THWC (video)."""
    preview: dict[str, Any] = {"prompt_id": p, "sample_idx": i, "prompt": text, "image": _first_frame(pixels)}
    preview["total"] = float(scores.get("total", float("nan")))
    if pixels.ndim == 4:  # a video: evenly spaced frames, at most MAX_PREVIEW_FRAMES
        index = np.linspace(0, len(pixels) - 1, min(len(pixels), MAX_PREVIEW_FRAMES)).round().astype(int)
        frames = pixels[torch.as_tensor(index)].clamp(0, 1).permute(0, 2, 3, 1).numpy()
        preview["video"] = (frames * 255).round().astype(np.uint8)
        preview["fps"] = float(recipe.generate.fps) * len(index) / len(pixels)
    return preview


def _summarise(rows: list[dict[str, Any]], previews: list, accelerator: Accelerator | None) -> dict[str, Any]:
    frame = pd.DataFrame(rows)
    columns = ["total", *[c for c in frame.columns if c.startswith("dim.")]]
    with warnings.catch_warnings():  # a dimension the backend cannot judge is all NaN: its mean is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        result: dict[str, Any] = {c: float(np.nanmean(frame[c].to_numpy(dtype=float))) for c in columns}
    result["samples"] = len(frame)
    ordered = sorted(previews, key=lambda x: (x["prompt_id"], x["sample_idx"]))
    main = is_main(accelerator)
    result["grid"] = np.concatenate([x["image"] for x in ordered], axis=1) if ordered and main else None
    result["previews"] = ordered if main else []
    return result


def metrics(result: dict[str, Any]) -> dict[str, float]:
    """The scalar part of an :func:`evaluate` result, named for the trackers (``eval/total``...)."""
    return {f"eval/{k}": v for k, v in result.items() if k not in NOT_SCALARS}


NOT_SCALARS = ("grid", "samples", "previews")


def record(run: RunDir, step: int, result: dict[str, Any]) -> pd.DataFrame:
    """Put ``result`` into eval.parquet as the row of ``step`` (replacing an older row of the same
    step, so a resumed run never duplicates one) and return the table. Main process only."""
    row = {"step": int(step), **{k: v for k, v in result.items() if k not in ("grid", "previews")}}
    table = read_parquet(run.eval_parquet) if run.eval_parquet.exists() else pd.DataFrame()
    if not table.empty:
        table = table[table["step"] != step]
    table = pd.concat([table, pd.DataFrame([row])], ignore_index=True).sort_values("step", kind="stable")
    table = table.reset_index(drop=True)
    write_parquet(table, run.eval_parquet)
    return table


def log(accelerator: Accelerator, step: int, result: dict[str, Any]) -> None:
    """Send the curves and the samples to the trackers: one captioned image (or video) per sample."""
    accelerator.log(metrics(result), step=step)
    previews = result.get("previews") or []
    if not previews or not accelerator.is_main_process:
        return
    from mpo import tracker_media

    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker_media.log_wandb(tracker, previews, step)
        elif tracker.name == "tensorboard":
            tracker_media.log_tensorboard(tracker, previews, step)


def _evaluated_alike(run: RunDir, step: int, checkpoint: Any, recipe: Any, acc: Accelerator) -> bool:
    """eval.parquet already has the row of ``step``, measured by the training run with the eval
    settings (and reward) of this recipe: the eval stage has nothing to do."""
    from mpo.train import run_settings
    from mpo.train_state import read_progress

    if not run.eval_parquet.exists() or not (read_parquet(run.eval_parquet)["step"] == step).any():
        return False
    stored = read_progress(checkpoint).settings
    index = (stored.get("rounds") or {}).get("round")  # an iterative run: the round it was trained in
    now = run_settings(recipe, acc, run.round_dir(index) if index is not None else run)
    return all(stored.get(k) == now.get(k) for k in ("eval", "eval sampling", "reward"))


@errors_reach_every_rank
def eval_stage(recipe: Any, accelerator: Accelerator | None = None, force: bool = False) -> dict[str, Any]:
    """Evaluate the checkpoint ``export.which`` names (best, else last) and record its row; nothing
    to do when that row was measured with these eval settings (``force`` measures it again)."""
    from mpo.train_state import chosen_checkpoint
    from mpo.weights import load_trained
    from reward.visionreward import VisionReward

    acc = accelerator if accelerator is not None else make_accelerator(recipe)
    run = RunDir.from_recipe(recipe)
    start = time.perf_counter()
    step, path = chosen_checkpoint(run, recipe.export.which)
    if not force and _evaluated_alike(run, step, path, recipe, acc):
        summary = {"checkpoint": str(path), "step": step, "evaluated now": False}
        if is_main(acc):
            from mpo.summary import print_summary

            print_summary("eval (up to date)", summary)
        return summary
    prompts = eval_prompts(run, recipe)
    with main_process_first(acc), whole_model_loading():
        backbone = load_backbone(recipe.model, acc.device)
    load_trained(backbone, recipe.model.finetune, path / "weights", torch_dtype(recipe.model.dtype))
    backbone.denoiser.eval()
    cached = cached_embeddings(run, prompts)
    embeddings, negative = cached if cached is not None else (None, None)
    reward = VisionReward.from_config(recipe.reward, device=acc.device)
    result = evaluate(
        backbone, reward, prompts, recipe, accelerator=acc, embeddings=embeddings, negative=negative
    )
    summary: dict[str, Any] = {}
    if is_main(acc):
        record(run, step, result)
        if result["grid"] is not None:
            save_grid(run, step, result["grid"])
        save_samples(run, step, result["previews"])
        summary = {"checkpoint": str(path), "step": step}
        summary.update({k: v for k, v in result.items() if k not in ("grid", "previews")})
        summary["seconds"] = round(time.perf_counter() - start, 2)
        from mpo.summary import print_summary

        print_summary("eval", summary)
    wait_for_everyone(acc)
    return summary


def save_grid(run: RunDir, step: int, grid: np.ndarray) -> None:
    """A PNG of the sample grid next to eval.parquet, for runs without a tracker."""
    from PIL import Image

    from mpo.store import atomic_write

    with atomic_write(run.root / "eval" / f"samples-step-{step}.png") as tmp:
        Image.fromarray(grid).save(tmp)


def samples_dir(run: RunDir, step: int) -> Path:
    return run.root / "eval" / f"step-{step}"


def save_samples(run: RunDir, step: int, previews: list[dict[str, Any]]) -> None:
    """Each logged sample as ``eval/step-<n>/<prompt_id>-<sample>.png`` (+ ``.mp4``) and an index
    (``samples.json``: prompt and total of each), for ``mpo report``'s before/after pictures."""
    import json

    from PIL import Image

    from mpo.store import atomic_write, write_text

    folder = samples_dir(run, step)
    index = []
    for x in previews:
        name = f"{x['prompt_id']}-{x['sample_idx']}"
        with atomic_write(folder / f"{name}.png") as tmp:
            Image.fromarray(x["image"]).save(tmp)
        if "video" in x:
            from mpo import tracker_media

            with atomic_write(folder / f"{name}.mp4") as tmp:
                tracker_media.write_mp4(tmp, x["video"], x["fps"])
        index.append(
            {k: x[k] for k in ("prompt_id", "sample_idx", "prompt", "total")} | {"file": f"{name}.png"}
        )
    if index:
        write_text(folder / "samples.json", json.dumps(index, indent=2))
