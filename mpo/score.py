"""The score stage: decode every cached candidate and score it with VisionReward.

::

    mpo score recipes/tiny/sdxl.yaml                                              # 1 process
    accelerate launch --num_processes 8 -m mpo.cli score RECIPE                    # 8 GPUs

Decoded frames go to the reward in memory (images [3,H,W]; videos [T,3,H,W] at ``generate.fps``,
from which the reward samples one frame per second), never through files. The reward is built once
per process from ``recipe.reward``. Of the generation model only the VAE is loaded
(``Backbone.load_decoder``: the denoiser and text encoders are never read, so their memory is the
reward's), decoding in the family's slices / tiles exactly as the full pipeline would.

Work is split by shard, as in generate (shard g on rank g % world). Each shard's scores go to
candidates/score-<g>.parquet atomically: that file is the unit of resume, and carries the reward
settings that produced it, so a resumed run never mixes two rewards (other settings are refused,
naming the key, or with ``--force`` scored again), and the content hash of the candidate shard it
scored (a shard made again is scored again). The main process then
concatenates them into scores.parquet (prompt_id, sample_idx, split, total, dim.*, sub.*, q.*,
source), one row per candidate, sorted by (prompt_id, sample_idx).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from mpo.backbones.base import Backbone
from mpo.backbones.registry import load_decoder
from mpo.config import resolve_paths
from mpo.distributed import (
    errors_reach_every_rank,
    is_main,
    main_process_first,
    make_accelerator,
    split_for_process,
    wait_for_everyone,
    whole_model_loading,
)
from mpo.memory import check_fits, pixel_bytes
from mpo.store import (
    CandidateStore,
    RunDir,
    StoreError,
    describe_changes,
    parquet_metadata,
    read_parquet,
    remove_temp_files,
    shard_hash,
    shard_index,
    write_parquet,
)
from mpo.summary import print_summary
from reward.types import Sample

KEY_COLUMNS = ["prompt_id", "sample_idx", "split"]


def reward_fingerprint(recipe: Any) -> dict[str, Any]:
    """The settings the scores depend on (beyond the latents): stored with each score shard. Local
    paths are made absolute, so the run resumes from its recipe.yaml or from another directory."""
    r = resolve_paths(recipe).reward
    fields = ("checklist", "weights", "backend", "model_path", "alignment_model_path", "dtype", "max_frames")
    fingerprint = {"reward": {k: getattr(r, k) for k in fields}, "fps": recipe.generate.fps}
    vae = resolve_paths(recipe).model.vae_path  # decodes the latents the reward sees
    if vae is not None:
        fingerprint["vae"] = vae
    return fingerprint


def shard_fingerprint(run: RunDir, index: int, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The reward settings plus the content hash of the candidate shard being scored."""
    return {**fingerprint, "candidates": shard_hash(run.shard(index))}


def score_is_done(run: RunDir, index: int, fingerprint: dict[str, Any], force: bool = False) -> bool:
    """True when score-<index>.parquet exists for this reward and this candidate shard (a shard made
    again is scored again); raises if it was made by other reward settings, unless ``force``."""
    path = run.score_shard(index)
    if not path.exists():
        return False
    try:
        stored = json.loads(parquet_metadata(path).get("fingerprint", "{}"))
    except ValueError as err:
        raise StoreError(f"{path}: damaged ({err}); delete it to score the shard again") from err
    want = shard_fingerprint(run, index, fingerprint)
    if stored == want:
        return True
    if stored.get("candidates") != want["candidates"] and {**stored, "candidates": None} == {
        **want,
        "candidates": None,
    }:
        return False  # the same reward, a new candidate shard
    if force:
        return False
    changes = "; ".join(describe_changes(stored, want))
    raise StoreError(
        f"{path} was scored by other reward settings than this recipe's ({changes}); restore them, use "
        "a new output_dir, or add --force to score again with this recipe"
    )


def order_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Key columns, total, dim.*, sub.*, q.*, then anything else the reward gave, source last."""
    groups = [["total"], *[[c for c in frame.columns if c.startswith(p)] for p in ("dim.", "sub.", "q.")]]
    ordered = KEY_COLUMNS + [c for g in groups for c in g if c in frame.columns]
    rest = [c for c in frame.columns if c not in ordered and c != "source"]
    return frame[ordered + rest + (["source"] if "source" in frame.columns else [])]


@torch.no_grad()
def score_shard(
    backbone: Backbone,
    reward: Any,
    store: CandidateStore,
    rows: pd.DataFrame,
    recipe: Any,
    device: torch.device,
    progress: tqdm | None = None,
) -> pd.DataFrame:
    """Scores of one shard's candidates (``rows``: manifest rows joined with prompt and split)."""
    batch = max(1, int(recipe.reward.batch_size))
    results: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch):
        chunk = rows.iloc[start : start + batch]
        latents = store.latents(chunk["prompt_id"].tolist(), chunk["sample_idx"].tolist()).to(device)
        pixels = backbone.decode(latents).float().cpu()
        samples = [
            Sample(
                pixels=pixels[i],
                prompt=str(r.prompt),
                fps=float(recipe.generate.fps),
                id=f"{r.prompt_id}:{r.sample_idx}",
            )
            for i, r in enumerate(chunk.itertuples(index=False))
        ]
        scores = reward.score(samples)
        for r, values in zip(chunk.itertuples(index=False), scores.to_rows()):
            results.append({"prompt_id": r.prompt_id, "sample_idx": r.sample_idx, "split": r.split, **values})
            results[-1]["source"] = scores.source
        if progress is not None:
            progress.update(len(chunk))
    return order_columns(pd.DataFrame(results))


@errors_reach_every_rank
def score_stage(
    recipe: Any,
    accelerator: Accelerator | None = None,
    force: bool = False,
    *,
    run: RunDir | None = None,
) -> dict[str, Any]:
    """Score every shard not scored yet, then write scores.parquet (an iterative run
    (:mod:`mpo.rounds`) gives a round's ``run`` directory)."""
    acc = accelerator if accelerator is not None else make_accelerator(recipe)
    run = run if run is not None else RunDir.from_recipe(recipe)
    start = time.perf_counter()
    for path in (run.prompts_parquet, run.candidates_parquet):
        if not path.exists():
            raise StoreError(f"{path}: missing; run the generate stage first")
    prompts = read_parquet(run.prompts_parquet)
    manifest = read_parquet(run.candidates_parquet).merge(
        prompts[["prompt_id", "prompt", "split"]], on="prompt_id", how="left", validate="many_to_one"
    )
    if manifest["split"].isna().any():
        orphan = manifest.loc[manifest["split"].isna(), "prompt_id"].iloc[0]
        raise StoreError(f"{run.candidates_parquet}: prompt_id {orphan} is not in {run.prompts_parquet}")
    shards = sorted(manifest["shard"].unique(), key=shard_index)
    fingerprint = reward_fingerprint(recipe)
    if is_main(acc):
        remove_temp_files(run.candidates_dir)  # nobody writes before the barrier below
    wait_for_everyone(acc)

    pending = [s for s in shards if not score_is_done(run, shard_index(s), fingerprint, force)]
    mine = split_for_process(pending, acc)
    if pending:
        from reward.visionreward import VisionReward

        with main_process_first(acc), whole_model_loading():
            backbone = load_decoder(recipe.model, acc.device)  # the VAE alone
        g = recipe.generate
        frames = g.num_frames if backbone.modality == "video" else 1
        check_fits(
            pixel_bytes(recipe.reward.batch_size, g.height, g.width, frames),
            "decoding one batch for the reward",
            ["reward.batch_size", "generate.height / width / num_frames"],
            acc.device,
        )
        reward = VisionReward.from_config(recipe.reward, device=acc.device)
        store = CandidateStore(run)
        groups = {name: rows.sort_values("offset") for name, rows in manifest.groupby("shard")}
        progress = tqdm(
            total=sum(len(groups[s]) for s in mine),
            desc=f"score (rank {acc.process_index} of {acc.num_processes})",
            unit="sample",
            disable=not is_main(acc),
        )
        for name in mine:
            frame = score_shard(backbone, reward, store, groups[name], recipe, acc.device, progress)
            stamp = shard_fingerprint(run, shard_index(name), fingerprint)
            write_parquet(frame, run.score_shard(shard_index(name)), {"fingerprint": json.dumps(stamp)})
        progress.close()
        del backbone, reward
    wait_for_everyone(acc)

    summary: dict[str, Any] = {
        "output_dir": str(run.root),
        "samples": len(manifest),
        "shards scored now": len(pending),
        "processes": acc.num_processes,
    }
    if is_main(acc):
        # Rewritten only when something was scored: an untouched scores.parquet keeps its mtime, which
        # is how the select stage knows that its pairs are still up to date.
        if pending or not run.scores_parquet.exists():
            scores = concatenate_scores(run, shards, manifest)
        else:
            scores = read_parquet(run.scores_parquet)
        summary["seconds"] = round(time.perf_counter() - start, 2)
        summary["source"] = ", ".join(sorted(scores["source"].astype(str).unique()))
        summary["total (mean)"] = float(scores["total"].mean())
        summary["total (val prompts, mean)"] = float(scores.loc[scores["split"] == "val", "total"].mean())
        dims = [c for c in scores.columns if c.startswith("dim.")]
        summary.update({f"{c} (mean)": float(scores[c].mean()) for c in dims})
        print_summary("score", summary)
    wait_for_everyone(acc)
    return summary


def concatenate_scores(run: RunDir, shards: Sequence[str], manifest: pd.DataFrame) -> pd.DataFrame:
    """scores.parquet from the per-shard files; every candidate of the manifest exactly once."""
    frames = []
    for name in shards:
        path = run.score_shard(shard_index(name))
        if not path.exists():
            raise StoreError(f"{path}: missing after scoring")
        frames.append(read_parquet(path))
    scores = pd.concat(frames, ignore_index=True).sort_values(["prompt_id", "sample_idx"], kind="stable")
    scores = scores.reset_index(drop=True)
    have = list(zip(scores["prompt_id"], scores["sample_idx"]))
    want = sorted(zip(manifest["prompt_id"], manifest["sample_idx"]))
    if have != want:
        raise StoreError(
            f"score shards in {run.candidates_dir} hold {len(have)} rows for {len(want)} candidates "
            f"of {run.candidates_parquet}; delete the score-*.parquet files and score again"
        )
    write_parquet(scores, run.scores_parquet)
    return scores
