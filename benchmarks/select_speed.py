"""Speed of pair selection: the vectorised select_pairs against a per-prompt Python double loop.

::

    python benchmarks/select_speed.py                       # 1,000,000 samples, N = 8, 5 dimensions
    python benchmarks/select_speed.py --samples 100000 --level question --dims 60

The loop (the obvious implementation, one ordered pair at a time) runs on a 1% subset of the prompts
and is extrapolated linearly, which is fair: its cost is exactly proportional to the number of
prompts. Both run in this process, so the ratio does not depend on the machine.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd

from mpo.schema import SelectConfig
from mpo.select import LEVEL_PREFIX, select_pairs


def make_scores(samples: int, n: int, dims: int, prefix: str, seed: int = 0) -> pd.DataFrame:
    """Scores on a coarse grid (ties happen, as with real checklist answers), total = sum + noise."""
    rng = np.random.default_rng(seed)
    prompts = samples // n
    frame = pd.DataFrame(
        {"prompt_id": np.repeat(np.arange(prompts), n), "sample_idx": np.tile(np.arange(n), prompts)}
    )
    values = rng.integers(0, 5, size=(prompts * n, dims)).astype(np.float64) / 4
    for d in range(dims):
        frame[f"{prefix}d{d}"] = values[:, d]
    frame["total"] = values.sum(axis=1) + rng.normal(0, 0.1, prompts * n)
    return frame


def loop_select(scores: pd.DataFrame, cfg: SelectConfig) -> int:
    """The baseline: group, then test every ordered pair in Python."""
    columns = [c for c in scores.columns if c.startswith(LEVEL_PREFIX[cfg.level])]
    t = cfg.threshold
    kept = 0
    for _, group in scores.groupby("prompt_id", sort=True):
        totals = group["total"].tolist()
        rows = group[columns].to_numpy().tolist()
        for i, (ti, ri) in enumerate(zip(totals, rows)):
            for j, (tj, rj) in enumerate(zip(totals, rows)):
                margin = ti - tj
                if i == j or not (margin >= t and (margin > 0 or t > 0)):
                    continue
                if cfg.rule == "dpo" or all(a >= b and not math.isnan(a) for a, b in zip(ri, rj)):
                    kept += 1
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--candidates", type=int, default=8, help="N per prompt")
    parser.add_argument("--dims", type=int, default=5, help="columns at the dominance level")
    parser.add_argument("--level", default="dimension", choices=sorted(LEVEL_PREFIX))
    parser.add_argument("--rule", default="mpo", choices=["mpo", "dpo"])
    parser.add_argument("--subset", type=float, default=0.01, help="fraction of prompts for the loop")
    args = parser.parse_args()

    scores = make_scores(args.samples, args.candidates, args.dims, LEVEL_PREFIX[args.level])
    cfg = SelectConfig(rule=args.rule, level=args.level)
    prompts = scores["prompt_id"].nunique()
    print(
        f"{len(scores):,} samples, {prompts:,} prompts x {args.candidates}, {args.dims} {args.level} columns"
    )

    start = time.perf_counter()
    pairs, stats = select_pairs(scores, cfg)
    vectorised = time.perf_counter() - start
    print(f"select_pairs (vectorised): {vectorised:.2f} s, {len(pairs):,} {args.rule} pairs")

    keep = max(1, round(prompts * args.subset))
    subset = scores[scores["prompt_id"] < keep]
    start = time.perf_counter()
    loop_kept = loop_select(subset, cfg)
    loop = (time.perf_counter() - start) * prompts / keep
    sub_pairs, _ = select_pairs(subset, cfg)
    assert loop_kept == len(sub_pairs), f"loop kept {loop_kept}, select_pairs {len(sub_pairs)}"
    print(f"python loop on {keep:,} prompts, extrapolated to all: {loop:.1f} s")
    print(f"speed-up: {loop / vectorised:.0f}x   (#Dom / #Not-Dom: ", end="")
    print(f"{stats.threshold_pairs_dominant:,} / {stats.threshold_pairs_not_dominant:,})")


if __name__ == "__main__":
    main()
