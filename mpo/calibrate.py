"""``mpo calibrate``: which cheaper sampler still selects the reference sampler's pairs.

::

    mpo calibrate recipes/sdxl/mpo.yaml --prompts 16 --agreement 0.9
    mpo calibrate RECIPE --setting scheduler=unipc,num_inference_steps=12 --setting num_inference_steps=20

What MPO takes from the candidates is not their pixels but which pairs the selection keeps. On a
small subset of the recipe's train prompts this runs the reference sampler (the family's default
scheduler at ``--reference-steps``, 50 by default: the released pipelines' own sampling) and each
candidate setting (``generate.*`` overrides), from the same seeded noise as ``mpo generate``, scores
every candidate with the recipe's reward, selects pairs with the recipe's rule, and prints per
setting:

- denoiser calls per candidate (rows through the network: guidance's doubled batch counts twice),
  the denoiser's multiply-accumulates per candidate (its linear and convolution layers, counted as
  they run: what a cache hook skips is not counted; :mod:`mpo.block_work`) and seconds per
  candidate (sampling only, after a warm-up batch);
- pair Jaccard: |pairs in both| / |pairs in either|, a pair being (prompt, unordered candidates);
- kept: the fraction of the reference's pairs selected with the same winner;
- Spearman: rank correlation of the candidates' reward totals with the reference's.

The recommendation is the cheapest setting (fewest denoiser calls, then seconds) whose agreement,
the smaller of Jaccard and kept, is at least ``--agreement``: a setting that selects many more
pairs than the reference (high kept, low Jaccard) is not called agreeing. Nothing is written to the
run directory; ``--out FILE`` saves the table as JSON. Below the table, for each setting that runs
less of some block than the reference does, the share of each repeated block's work that still ran:
where a cache hook saves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mpo.backbones.base import Backbone, Embeddings, repeat_rows, torch_dtype
from mpo.backbones.registry import load_backbone
from mpo.block_work import BlockWork, count_block_work, format_fractions
from mpo.generate import plan_batches, with_steps
from mpo.sampling import count_denoiser_calls
from mpo.score import order_columns
from mpo.seeds import candidate_noise, candidate_seed
from mpo.select import select_pairs
from mpo.store import read_prompt_file, split_prompts

REFERENCE = "reference"
# Tried when no --setting is given: the multistep solvers at a fraction of the reference's steps.
DEFAULT_SETTINGS = (
    "scheduler=dpmpp_2m,num_inference_steps=10",
    "scheduler=dpmpp_2m,num_inference_steps=15",
    "scheduler=dpmpp_2m,num_inference_steps=20",
    "scheduler=unipc,num_inference_steps=10",
    "scheduler=unipc,num_inference_steps=15",
    "scheduler=unipc,num_inference_steps=20",
    "num_inference_steps=25",
)


@dataclass
class Row:
    """One line of the table."""

    setting: str
    denoiser_calls: float  # per candidate
    seconds: float  # per candidate, sampling only
    pairs: int
    jaccard: float
    kept: float
    spearman: float
    gmacs: float = 0.0  # the denoiser's multiply-accumulates per candidate, in 1e9
    block_work: dict[str, float] = field(default_factory=dict)  # share of the reference's, per block

    @property
    def agreement(self) -> float:
        return min(self.jaccard, self.kept)


def parse_setting(text: str) -> list[str]:
    """``scheduler=unipc,num_inference_steps=12`` -> generate.* overrides (a key may already say
    ``generate.``). Commas inside braces or brackets belong to the value."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "{["
        depth -= ch in "}]"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    out = []
    for part in (p.strip() for p in parts if p.strip()):
        key = part.partition("=")[0].strip()
        out.append(part if key.startswith("generate.") else f"generate.{part}")
    return out


def calibration_prompts(recipe: Any, count: int) -> pd.DataFrame:
    """The first ``count`` train prompts of the recipe's split (the run's own prompt_ids, hence the
    run's seeds), read from the prompts file without touching the run directory."""
    cfg = recipe.prompts
    prompts = read_prompt_file(cfg.file)
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    frame = split_prompts(prompts, cfg.val_fraction, cfg.val_count, cfg.split_seed)
    train = frame[frame["split"] == "train"].sort_values("prompt_id", kind="stable")
    return train.head(max(1, int(count)))


def denoise_candidates(
    backbone: Backbone, prompts: pd.DataFrame, negative: Embeddings, gen: Any, dtype
) -> tuple:
    """Every candidate of ``prompts`` as generate makes it (``batch_size: auto`` probes first);
    returns (latents, denoiser rows, seconds, the denoiser's work per block)."""
    n = gen.num_candidates
    shape = tuple(backbone.latent_shape(gen))
    device = next(backbone.denoiser.parameters()).device
    ids, texts = prompts["prompt_id"].astype(int).tolist(), prompts["prompt"].astype(str).tolist()
    per_batch = plan_batches(backbone, gen, texts[0], negative, device, dtype).prompts
    blocks = getattr(getattr(backbone, "sampling_support", None), "compile_blocks", ())
    out, rows, seconds = [], 0, 0.0
    with (
        count_denoiser_calls(backbone.denoiser) as counter,
        count_block_work(backbone.denoiser, blocks) as work,
    ):
        for start in range(0, len(ids), per_batch):
            embeds = [backbone.encode_prompts([t]) for t in texts[start : start + per_batch]]
            chunk = ids[start : start + per_batch]
            noise = torch.stack(
                [
                    candidate_noise(shape, candidate_seed(gen.seed, p, i), device, dtype)
                    for p in chunk
                    for i in range(n)
                ]
            )
            batch = {k: torch.cat([repeat_rows(e, n, "embeds")[k] for e in embeds]) for k in embeds[0]}
            clock = time.perf_counter()
            out.append(
                backbone.sample(batch, repeat_rows(negative, len(noise), "negative"), noise, gen).cpu()
            )
            seconds += time.perf_counter() - clock
        rows = counter.rows
    return torch.cat(out), rows, seconds, work


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _score(backbone, reward, prompts: pd.DataFrame, latents: torch.Tensor, recipe: Any) -> pd.DataFrame:
    from reward.types import Sample

    n = recipe.generate.num_candidates
    keys = [(int(p), str(t), i) for p, t in zip(prompts["prompt_id"], prompts["prompt"]) for i in range(n)]
    batch = max(1, int(recipe.reward.batch_size))
    results = []
    for start in range(0, len(keys), batch):
        chunk = keys[start : start + batch]
        pixels = backbone.decode(latents[start : start + batch]).float().cpu()
        samples = [
            Sample(pixels=pixels[j], prompt=t, fps=float(recipe.generate.fps), id=f"{p}:{i}")
            for j, (p, t, i) in enumerate(chunk)
        ]
        for (p, _, i), values in zip(chunk, reward.score(samples).to_rows()):
            results.append({"prompt_id": p, "sample_idx": i, "split": "train", **values})
    return order_columns(pd.DataFrame(results))


def _pair_sets(pairs: pd.DataFrame) -> tuple[set, set]:
    """(unordered pairs, ordered (prompt, winner, loser) triples)."""
    cols = [pairs[c].astype(int).tolist() for c in ("prompt_id", "win", "lose")]
    ordered = set(zip(*cols))
    return {(p, frozenset((w, lo))) for p, w, lo in ordered}, ordered


def agreement(reference: tuple[pd.DataFrame, pd.DataFrame], other: tuple[pd.DataFrame, pd.DataFrame]) -> dict:
    """Jaccard, kept-with-the-same-winner and Spearman of totals between two (scores, pairs)."""
    (ref_scores, ref_pairs), (scores, pairs) = reference, other
    ref_unordered, ref_ordered = _pair_sets(ref_pairs)
    unordered, ordered = _pair_sets(pairs)
    union = ref_unordered | unordered
    jaccard = len(ref_unordered & unordered) / len(union) if union else 1.0
    kept = len(ref_ordered & ordered) / len(ref_ordered) if ref_ordered else 1.0
    joined = ref_scores[["prompt_id", "sample_idx", "total"]].merge(
        scores[["prompt_id", "sample_idx", "total"]], on=["prompt_id", "sample_idx"], suffixes=("_ref", "")
    )
    spearman = joined["total_ref"].corr(joined["total"], method="spearman")
    return {"jaccard": jaccard, "kept": kept, "spearman": float(spearman) if pd.notna(spearman) else 1.0}


def calibrate(
    recipe: Any,
    settings: Sequence[tuple[str, Any]],
    reference: Any,
    prompts: int = 8,
    backbone: Backbone | None = None,
    reward: Any = None,
) -> list[Row]:
    """The table: ``reference`` and each of ``settings`` ((label, recipe) pairs, the recipes already
    validated) on the first ``prompts`` train prompts. The model and reward are loaded once."""
    from reward.visionreward import VisionReward

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backbone is None:
        backbone = load_backbone(recipe.model, device)
    if reward is None:
        reward = VisionReward.from_config(recipe.reward, device=device)
    subset = calibration_prompts(recipe, prompts)
    dtype = torch_dtype(recipe.model.dtype)
    with torch.no_grad():
        negative = backbone.encode_negative()
        # A warm-up batch (one prompt, two steps), so that one-time costs are nobody's seconds.
        denoise_candidates(backbone, subset.head(1), negative, with_steps(reference.generate, 2), dtype)
        results = {}
        for label, setting in [(REFERENCE, reference), *settings]:
            latents, rows, seconds, work = denoise_candidates(
                backbone, subset, negative, setting.generate, dtype
            )
            scores = _score(backbone, reward, subset, latents, setting)
            pairs, _ = select_pairs(scores, setting.select, source=f"calibrate {label}")
            results[label] = (scores, pairs, rows / len(latents), seconds / len(latents), work, len(latents))
    table = []
    reference_work: BlockWork = results[REFERENCE][4]
    for label, (scores, pairs, calls, seconds, work, count) in results.items():
        agree = agreement(results[REFERENCE][:2], (scores, pairs))
        per_block = work.fractions(reference_work)
        table.append(
            Row(
                label,
                calls,
                seconds,
                len(pairs),
                **agree,
                gmacs=work.total() / count / 1e9,
                block_work=per_block,
            )
        )
    return table


def recommend(table: Sequence[Row], threshold: float) -> Row | None:
    """The cheapest candidate setting (not the reference) whose agreement reaches ``threshold``."""
    good = [r for r in table if r.setting != REFERENCE and r.agreement >= threshold]
    return min(good, key=lambda r: (r.denoiser_calls, r.seconds)) if good else None


def format_table(table: Sequence[Row], threshold: float) -> str:
    reference = next(r for r in table if r.setting == REFERENCE)
    width = max(len(r.setting) for r in table)
    head = (
        f"{'setting':<{width}}  {'calls/cand':>10}  {'GMAC/cand':>9}  {'s/cand':>8}  {'x ref':>6}  "
        f"{'pairs':>5}  {'jaccard':>7}  {'kept':>5}  {'spearman':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in table:
        ratio = r.seconds / reference.seconds if reference.seconds > 0 else float("nan")
        lines.append(
            f"{r.setting:<{width}}  {r.denoiser_calls:>10.1f}  {r.gmacs:>9.3g}  {r.seconds:>8.3f}  "
            f"{ratio:>6.2f}  {r.pairs:>5d}  {r.jaccard:>7.3f}  {r.kept:>5.3f}  {r.spearman:>8.3f}"
        )
    skipping = [
        r
        for r in table
        if any(f < 0.999 * (r.denoiser_calls / reference.denoiser_calls) for f in r.block_work.values())
    ]
    if skipping:
        lines.append("work that ran per block, % of the reference's (a cache hook skips the rest):")
        lines.extend(f"  {r.setting}: {format_fractions(r.block_work)}" for r in skipping)
    best = recommend(table, threshold)
    if best is None:
        lines.append(
            f"no setting reaches agreement {threshold} (min of jaccard and kept); keep the reference"
        )
    else:
        lines.append(
            f"recommended: {best.setting} (agreement {best.agreement:.3f} >= {threshold}, "
            f"{best.denoiser_calls / reference.denoiser_calls:.2f} of the reference's denoiser calls)"
        )
    return "\n".join(lines)


def run_calibrate(
    recipe_path: str,
    overrides: Sequence[str],
    settings: Sequence[str],
    reference_steps: int = 50,
    prompts: int = 8,
    threshold: float = 0.9,
    out: str | None = None,
) -> list[Row]:
    """What ``mpo calibrate`` does: every setting loaded as a recipe (so a bad one is a recipe error
    naming its key), the table printed, and saved to ``out`` as JSON when given."""
    from mpo.config import load_recipe

    base = load_recipe(recipe_path, overrides)
    # The reference: the family's default scheduler, no cache or compile, one prompt per batch.
    reference = load_recipe(
        recipe_path,
        [
            *overrides,
            "generate.scheduler=default",
            "generate.scheduler_options={}",
            "generate.cache=none",
            "generate.cache_options={}",
            "generate.compile=none",
            "generate.attention=default",
            "generate.channels_last=false",
            "generate.batch_size=null",
            f"generate.num_inference_steps={reference_steps}",
        ],
    )
    loaded = [(text, load_recipe(recipe_path, [*overrides, *parse_setting(text)])) for text in settings]
    table = calibrate(base, loaded, reference, prompts)
    print(format_table(table, threshold))
    if out is not None:
        best = recommend(table, threshold)
        data = {
            "threshold": threshold,
            "recommended": best.setting if best else None,
            "rows": [{**asdict(r), "agreement": r.agreement} for r in table],
        }
        Path(out).write_text(json.dumps(data, indent=2))
    return table
