"""The generate stage: N candidates per prompt, cached as latents + prompt embeddings.

::

    mpo generate recipes/tiny/sdxl.yaml                                           # 1 process
    accelerate launch --num_processes 8 -m mpo.cli generate RECIPE                 # 8 GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m mpo.cli generate RECIPE

Candidates are made for every prompt, train and val: the val prompts' candidate scores are the
"before training" baseline of the eval curves.

What makes the result independent of the number of processes:
- candidate (p, i) starts from noise seeded by ``candidate_seed(generate.seed, p, i)``, drawn on the
  CPU, and is denoised with p's own embeddings (encoded alone, so no padding effects from other
  prompts), in a batch of ``generate.batch_size`` candidates (whole prompts of one shard; default:
  prompt p's N alone). Batching across prompts changes no candidate beyond the kernels' batch
  invariance (bitwise on CPU at one thread; tests/test_sampling.py), and the batch size is part of
  the fingerprint, so a resumed run never mixes two (``batch_size: auto`` finds the largest batch
  that fits by trying, :mod:`mpo.batch_fit`: then candidates agree across machines to that
  invariance, not bit for bit);
- the sampler (``generate.scheduler`` and options, cache hooks, compile: :mod:`mpo.sampling`) is
  set up by the backbone's ``sample``, so the loop below never sees a family;
- shard g always holds prompts [g*P, (g+1)*P) (P = ``generate.prompts_per_shard``); processes take
  shards g = rank, rank + world, ... The shard files are therefore the same set, with the same
  content, for any world size, and are named by g alone.

Bitwise equality across process counts also needs the same kernels in every process: on GPUs the
same GPU model and library versions; on CPUs the same thread count and, with MKL, conditional
numerical reproducibility (``MKL_CBWR=AUTO`` in the environment), since MKL otherwise picks kernels by
memory alignment and results can differ in the last bit from process to process.

Resume: a shard file with its final name is complete (written atomically) and is skipped after its
metadata is checked against the recipe (a mismatch is an error naming the changed key, never a silent
mix of two recipes; ``--force`` deletes the mismatched shards and makes them again) and its bytes
against its content hash (each process checks its share). Temporary files of killed writers are
deleted. candidates.parquet is rebuilt from the shards' metadata at the end, never appended to, so a
killed and resumed run ends with exactly the manifest of an uninterrupted one; a finished run writes
nothing. Before the first candidate, a lower bound on the memory of one batch is checked against the
device (:mod:`mpo.memory`).

Departure from the paper: none in substance; the paper samples with the released pipelines' own
schedulers, here each backbone's ``sample`` does, with classifier-free guidance against the empty
prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mpo.backbones.base import Backbone, Embeddings, repeat_rows, torch_dtype
from mpo.backbones.registry import load_backbone
from mpo.batch_fit import BatchPlan, find_prompts_per_batch
from mpo.config import resolve_paths, save_resolved, to_yaml
from mpo.distributed import (
    errors_reach_every_rank,
    gather,
    is_main,
    main_process_first,
    make_accelerator,
    split_for_process,
    wait_for_everyone,
    whole_model_loading,
)
from mpo.memory import check_generate_and_score, generation_bytes
from mpo.sampling import BATCH_AUTO
from mpo.sampling import fingerprint_keys as sampling_fingerprint
from mpo.seeds import candidate_noise, candidate_seed
from mpo.store import (
    RunDir,
    ShardInfo,
    StoreError,
    atomic_write,
    build_manifest,
    describe_changes,
    prepare_prompts,
    read_parquet,
    read_shard_info,
    remove_temp_files,
    shard_index,
    verify_shard,
    write_parquet,
    write_shard,
)
from mpo.summary import print_summary


@dataclass(frozen=True)
class ShardPlan:
    """One shard's prompts, fixed by their position in prompts.parquet."""

    index: int
    prompt_ids: list[int]
    prompts: list[str]
    first_position: int  # position of the shard's first prompt in prompts.parquet


def plan_shards(prompts: pd.DataFrame, prompts_per_shard: int) -> list[ShardPlan]:
    """Split the prompt table (in prompt_id order) into shards of ``prompts_per_shard`` prompts."""
    if prompts_per_shard < 1:
        raise StoreError(f"generate.prompts_per_shard={prompts_per_shard}: must be >= 1")
    ordered = prompts.sort_values("prompt_id", kind="stable")
    ids, texts = ordered["prompt_id"].astype(int).tolist(), ordered["prompt"].astype(str).tolist()
    return [
        ShardPlan(g, ids[start : start + prompts_per_shard], texts[start : start + prompts_per_shard], start)
        for g, start in enumerate(range(0, len(ids), prompts_per_shard))
    ]


def generation_fingerprint(recipe: Any) -> dict[str, Any]:
    """The settings a shard's latents depend on; stored in every shard and checked on resume. Local
    paths are made absolute, so the run resumes from its recipe.yaml or from another directory."""
    m, g = resolve_paths(recipe).model, recipe.generate
    fingerprint = {
        "model": {k: getattr(m, k) for k in ("family", "path", "revision", "variant", "dtype")},
        "generate": {
            k: getattr(g, k)
            for k in (
                "num_candidates",
                "num_inference_steps",
                "guidance_scale",
                "height",
                "width",
                "num_frames",
                "seed",
                "prompts_per_shard",
            )
        },
    }
    fingerprint["generate"].update(sampling_fingerprint(g))
    return fingerprint


def prompts_per_batch(gen: Any) -> int:
    """Whole prompts per denoising batch: ``generate.batch_size`` candidates (None: one prompt's N;
    auto: a whole shard's, the most :func:`mpo.batch_fit.find_prompts_per_batch` will try)."""
    if gen.batch_size == BATCH_AUTO:
        return int(gen.prompts_per_shard)
    batch = gen.num_candidates if gen.batch_size is None else int(gen.batch_size)
    return max(1, batch // int(gen.num_candidates))


def with_steps(gen: Any, steps: int) -> Any:
    """``gen`` with another ``num_inference_steps`` (a recipe section or a plain dataclass)."""
    if dataclasses.is_dataclass(gen):
        return dataclasses.replace(gen, num_inference_steps=steps)
    return OmegaConf.merge(gen, {"num_inference_steps": steps})


def plan_batches(
    backbone: Backbone,
    gen: Any,
    first_prompt: str,
    negative: Embeddings,
    device: torch.device,
    dtype: torch.dtype,
) -> BatchPlan:
    """The prompts per batch this process denoises: the recipe's, or under ``batch_size: auto`` the
    largest that fits, probed with two-step samples of ``first_prompt`` (:mod:`mpo.batch_fit`)."""
    if gen.batch_size != BATCH_AUTO:
        return BatchPlan(prompts_per_batch(gen))
    n, shape = int(gen.num_candidates), tuple(backbone.latent_shape(gen))
    embeds = backbone.encode_prompts([first_prompt])
    probe_gen = with_steps(gen, min(2, int(gen.num_inference_steps)))

    def probe(k: int) -> None:
        rows = k * n
        noise = torch.randn((rows, *shape), generator=torch.Generator().manual_seed(0)).to(device, dtype)
        backbone.sample(
            repeat_rows(embeds, rows, "embeds"), repeat_rows(negative, rows, "negative"), noise, probe_gen
        )

    per_prompt = generation_bytes(n, shape, dtype, embeds)
    return BatchPlan(find_prompts_per_batch(probe, int(gen.prompts_per_shard), per_prompt, device), auto=True)


def expected_candidates(plan: ShardPlan, num_candidates: int, seed: int) -> list[tuple[int, int, int]]:
    return [(p, i, candidate_seed(seed, p, i)) for p in plan.prompt_ids for i in range(num_candidates)]


def existing_shard(
    run: RunDir, plan: ShardPlan, recipe: Any, fingerprint: dict[str, Any]
) -> ShardInfo | None:
    """The metadata of shard ``plan.index`` if it is complete, None if it is not written yet; raises
    if it exists but was made by other settings or for other prompts."""
    path = run.shard(plan.index)
    if not path.exists():
        return None
    info = read_shard_info(path)
    want = expected_candidates(plan, recipe.generate.num_candidates, recipe.generate.seed)
    if info.fingerprint != fingerprint or info.candidates != want:
        changes = describe_changes(info.fingerprint, fingerprint) or ["the shard's prompts or seeds"]
        raise StoreError(
            f"{path} was generated by other settings than this recipe's ({'; '.join(changes)}); use a "
            f"new output_dir, or delete {run.candidates_dir} to generate again"
        )
    return info


def preview_path(run: RunDir, prompt_id: int, sample_idx: int, modality: str):
    return run.previews_dir / f"{prompt_id:06d}-{sample_idx:03d}.{'mp4' if modality == 'video' else 'png'}"


def write_preview(path, pixels: torch.Tensor, modality: str, fps: float) -> None:
    from reward.media import save_image, save_video

    with atomic_write(path) as tmp:
        if modality == "video":
            save_video(tmp, pixels, fps=fps)
        else:
            save_image(tmp, pixels)


@torch.no_grad()
def generate_shard(
    backbone: Backbone,
    plan: ShardPlan,
    negative: Embeddings,
    recipe: Any,
    run: RunDir,
    fingerprint: dict[str, Any],
    device: torch.device,
    progress: tqdm | None = None,
    batch: BatchPlan | None = None,
) -> None:
    """Denoise every candidate of one shard and write the shard atomically.

    A batch holds the candidates of ``batch.prompts`` whole prompts (default: the recipe's), each
    candidate from its own seeded noise and with its own prompt's embeddings (every prompt encoded
    alone); a batch that runs out of memory under ``batch_size: auto`` is redone with fewer prompts.
    Previews are written before the shard: the shard file is what marks this work as done.
    """
    gen = recipe.generate
    n = gen.num_candidates
    dtype = torch_dtype(recipe.model.dtype)
    shape = tuple(backbone.latent_shape(gen))
    batch = batch if batch is not None else BatchPlan(prompts_per_batch(gen))
    latents, embed_rows, candidates = [], [], []
    items = list(enumerate(zip(plan.prompt_ids, plan.prompts)))
    start = 0
    while start < len(items):
        chunk = items[start : start + batch.prompts]
        embeds = [backbone.encode_prompts([prompt]) for _, (_, prompt) in chunk]
        seeds = [[candidate_seed(gen.seed, pid, i) for i in range(n)] for _, (pid, _) in chunk]
        noise = torch.stack([candidate_noise(shape, s, device, dtype) for row in seeds for s in row])
        rows = {key: torch.cat([repeat_rows(e, n, "embeds")[key] for e in embeds]) for key in embeds[0]}
        try:
            clean = backbone.sample(rows, repeat_rows(negative, len(noise), "negative"), noise, gen)
        except Exception as err:
            del noise, rows, embeds
            if batch.shrink_after(err, device):
                continue  # the same prompts again, fewer at a time
            raise
        start += len(chunk)
        for j, (k, (pid, _)) in enumerate(chunk):
            first = (plan.first_position + k) * n  # global rank of this prompt's first candidate
            wanted = [i for i in range(n) if first + i < gen.previews]
            if wanted:
                pixels = backbone.decode(clean[[j * n + i for i in wanted]]).float().cpu()
                for row, i in enumerate(wanted):
                    write_preview(
                        preview_path(run, pid, i, backbone.modality), pixels[row], backbone.modality, gen.fps
                    )
            candidates.extend((pid, i, s) for i, s in enumerate(seeds[j]))
            embed_rows.append({key: v.cpu() for key, v in embeds[j].items()})
        latents.append(clean.cpu())
        if progress is not None:
            progress.update(len(noise))
    stacked = {key: torch.cat([row[key] for row in embed_rows]) for key in embed_rows[0]}
    write_shard(run.shard(plan.index), torch.cat(latents), stacked, plan.prompt_ids, candidates, fingerprint)


def save_recipe(recipe: Any, run: RunDir, force: bool = False) -> None:
    """Write the resolved recipe once; a resumed run keeps the original (shards check the settings),
    a forced one records the recipe that redid the work."""
    if not run.recipe_yaml.exists() or force:
        if run.recipe_yaml.exists() and to_yaml(resolve_paths(recipe)) in run.recipe_yaml.read_text():
            return  # the same recipe: a finished run writes nothing
        save_resolved(recipe, run.recipe_yaml)


def discard_mismatched(
    run: RunDir, plans: Sequence[ShardPlan], recipe: Any, fingerprint: dict[str, Any]
) -> int:
    """``--force``: delete the shards made by other settings (or for other prompts) and the ones the
    plan no longer has, so that they are made again; returns how many. Main process only."""
    planned = {p.index for p in plans}
    removed = 0
    for plan in plans:
        try:
            existing_shard(run, plan, recipe, fingerprint)
        except StoreError:
            run.shard(plan.index).unlink(missing_ok=True)
            removed += 1
    for path in sorted(run.candidates_dir.glob("shard-*.safetensors")):
        if shard_index(path) not in planned:
            path.unlink()
            removed += 1
    return removed


@errors_reach_every_rank
def generate_stage(
    recipe: Any,
    accelerator: Accelerator | None = None,
    force: bool = False,
    *,
    run: RunDir | None = None,
    prompts: pd.DataFrame | None = None,
    load_model: Callable[[], Backbone] | None = None,
    policy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate (or finish generating) every shard of the run, then rebuild candidates.parquet.
    ``force``: shards made by other settings are made again instead of refused.

    An iterative run (:mod:`mpo.rounds`) gives a round's ``run`` directory, its ``prompts`` (rows of
    prompts.parquet), ``load_model``, the model to sample with (called only when a shard is to be
    made, on every process at once), and ``policy``, what that model's weights are: it joins every
    shard's fingerprint, so candidates of another policy are never taken for this one's."""
    acc = accelerator if accelerator is not None else make_accelerator(recipe)
    run = run if run is not None else RunDir.from_recipe(recipe)
    start = time.perf_counter()
    if prompts is None:
        prompts = prepare_prompts(recipe, write=is_main(acc), force=force)
        wait_for_everyone(acc)  # a forced new prompt table is written before anyone reads it
        prompts = prepare_prompts(recipe, write=False)
    plans = plan_shards(prompts, recipe.generate.prompts_per_shard)
    fingerprint = generation_fingerprint(recipe)
    if policy is not None:
        fingerprint["policy"] = policy
    if is_main(acc):
        if force and run.candidates_dir.is_dir():
            discard_mismatched(run, plans, recipe, fingerprint)
        run.make_dirs()
        save_recipe(recipe, run, force)
        remove_temp_files(run.candidates_dir)  # nobody writes before the barrier below
        remove_temp_files(run.previews_dir)
    wait_for_everyone(acc)

    # Every process sees the same files here (no shard is written before this point), so all agree
    # on whether any model is needed and take the same collective steps below. Each checks the bytes
    # of its share of the finished shards.
    pending = [p for p in plans if existing_shard(run, p, recipe, fingerprint) is None]
    done = [p for p in plans if p not in pending]
    for plan in split_for_process(done, acc):
        verify_shard(run.shard(plan.index))
    wait_for_everyone(acc)
    mine = split_for_process(pending, acc)
    n = recipe.generate.num_candidates
    batch = BatchPlan(0)
    if pending:
        if load_model is not None:
            backbone = load_model()
        else:
            with main_process_first(acc), whole_model_loading():  # the first load may build a tiny model
                backbone = load_backbone(recipe.model, acc.device)
        with torch.no_grad():
            negative = {k: v.cpu() for k, v in backbone.encode_negative().items()}
        check_generate_and_score(
            recipe,
            backbone.latent_shape(recipe.generate),
            torch_dtype(recipe.model.dtype),
            negative,
            backbone.modality == "video",
            acc.device,
        )
        if is_main(acc) and not run.negative.exists():
            with atomic_write(run.negative) as tmp:
                save_file({k: v.contiguous() for k, v in negative.items()}, str(tmp))
        negative = {k: v.to(acc.device) for k, v in negative.items()}
        progress = tqdm(
            total=sum(len(p.prompt_ids) for p in mine) * n,
            desc=f"generate (rank {acc.process_index} of {acc.num_processes})",
            unit="candidate",
            disable=not is_main(acc),
        )
        if mine:
            dtype = torch_dtype(recipe.model.dtype)
            batch = plan_batches(backbone, recipe.generate, mine[0].prompts[0], negative, acc.device, dtype)
        for plan in mine:
            generate_shard(backbone, plan, negative, recipe, run, fingerprint, acc.device, progress, batch)
        progress.close()
        del backbone
    generated = sum(gather(acc, sum(len(p.prompt_ids) for p in mine) * n))

    # The same on every process (run_all reads it wherever it runs); the main one prints it.
    summary = {
        "output_dir": str(run.root),
        "prompts": len(prompts),
        "val prompts": int((prompts["split"] == "val").sum()),
        "candidates": len(prompts) * n,
        "shards": len(plans),
        "shards generated now": len(pending),
        "candidates generated now": generated,
        "processes": acc.num_processes,
    }
    if batch.prompts:  # this process denoised: with batch_size auto, what it found
        summary["candidates per batch"] = batch.prompts * n
    if is_main(acc):
        manifest = rebuild_manifest(run, plans, recipe, fingerprint)
        if len(manifest) != summary["candidates"]:
            raise StoreError(
                f"{run.candidates_parquet}: {len(manifest)} rows for {summary['candidates']} candidates"
            )
        seconds = time.perf_counter() - start
        summary["seconds"] = round(seconds, 2)
        summary["candidates / s"] = generated / seconds if seconds > 0 else 0.0
        print_summary("generate", summary)
    wait_for_everyone(acc)
    return summary


def rebuild_manifest(
    run: RunDir, plans: Sequence[ShardPlan], recipe: Any, fingerprint: dict[str, Any]
) -> pd.DataFrame:
    """candidates.parquet from the shards' metadata (every planned shard must be complete); written
    only when it changes, so that a finished run (even on a read-only disk) writes nothing."""
    infos = [existing_shard(run, p, recipe, fingerprint) for p in plans]
    missing = [str(run.shard(p.index)) for p, info in zip(plans, infos) if info is None]
    if missing:
        raise StoreError(
            f"shards missing after generation: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    manifest = build_manifest(infos)
    if run.candidates_parquet.exists():
        with contextlib.suppress(StoreError):  # a damaged manifest is simply written again
            if read_parquet(run.candidates_parquet).equals(manifest):
                return manifest
    write_parquet(manifest, run.candidates_parquet)
    return manifest
