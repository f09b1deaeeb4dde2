"""``mpo report RUN_DIR``: the pictures of a run, where people would rather look than read.

Writes ``<run>/report/``::

    curve-total.png, curve-<dimension>.png   held-out reward per eval step (eval.parquet), one chart each
    before-after-<prompt_id>.png             per eval prompt: the base model's sample (step 0) beside the
                                             latest eval's, captioned with the prompt and their rewards
    pairs.png                                a few selected pairs (largest margins): winner, loser and
                                             their per-dimension scores

The training stage writes it at its end; ``mpo report`` rewrites it from the run directory alone
(its ``recipe.yaml``), e.g. for a run that is still going. Charts use matplotlib's Agg backend (no
display needed). Eval samples come from ``eval/step-<n>/`` (written at each eval); pair images from
the generate stage's previews when it wrote them, else decoded from the cached latents.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mpo.logs import get_logger
from mpo.store import RunDir, read_parquet

REPORT_DIR = "report"
PAIRS_SHOWN = 4
log = get_logger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    from mpo.store import atomic_write

    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


# ---- curves -----------------------------------------------------------------------------------------
def curve_charts(run: RunDir, out: Path) -> list[Path]:
    """One PNG per metric of eval.parquet (total and each dimension) against the training step."""
    if not run.eval_parquet.exists():
        return []
    plt = _pyplot()
    table = read_parquet(run.eval_parquet).sort_values("step")
    written = []
    for column in ["total", *[c for c in table.columns if c.startswith("dim.")]]:
        values = table[column].to_numpy(dtype=float)
        if np.isnan(values).all():
            continue  # a dimension the reward's backend cannot judge
        name = column.removeprefix("dim.")
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(table["step"], values, marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out reward")
        ax.set_title(f"{name}: {values[0]:.4f} -> {values[-1]:.4f}")
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / f"curve-{name}.png"))
    return written


# ---- before / after ---------------------------------------------------------------------------------
def _eval_samples(run: RunDir) -> dict[int, dict[tuple[int, int], dict[str, Any]]]:
    """step -> (prompt_id, sample_idx) -> the index entry of eval/step-<n>/samples.json (+ its folder)."""
    steps: dict[int, dict[tuple[int, int], dict[str, Any]]] = {}
    for index in sorted((run.root / "eval").glob("step-*/samples.json")):
        step = int(index.parent.name.removeprefix("step-"))
        entries = json.loads(index.read_text())
        steps[step] = {(e["prompt_id"], e["sample_idx"]): {**e, "dir": index.parent} for e in entries}
    return steps


def before_after_pictures(run: RunDir, out: Path) -> list[Path]:
    """Per eval prompt: step 0 beside the latest evaluated step (the first sample of each)."""
    from PIL import Image

    steps = _eval_samples(run)
    if 0 not in steps or len(steps) < 2:
        return []
    last = max(steps)
    plt = _pyplot()
    written = []
    for key in sorted(k for k in steps[0] if k in steps[last] and k[1] == 0):
        before, after = steps[0][key], steps[last][key]
        fig, axes = plt.subplots(1, 2, figsize=(6, 3.4))
        for ax, entry, label in ((axes[0], before, "base (step 0)"), (axes[1], after, f"step {last}")):
            ax.imshow(np.asarray(Image.open(entry["dir"] / entry["file"]).convert("RGB")))
            ax.set_title(f"{label}\nreward {entry['total']:.4f}", fontsize=9)
            ax.axis("off")
        fig.suptitle(_wrap(before["prompt"]), fontsize=9)
        written.append(_save(fig, out / f"before-after-{key[0]}.png"))
    return written


def _wrap(text: str, width: int = 60) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])


# ---- pairs ------------------------------------------------------------------------------------------
def _pair_images(
    recipe: Any, run: RunDir, keys: list[tuple[int, int]], backbone: Any = None
) -> dict[tuple[int, int], np.ndarray]:
    from PIL import Image

    from mpo.generate import preview_path

    found: dict[tuple[int, int], np.ndarray] = {}
    missing = []
    for p, i in keys:
        path = preview_path(run, p, i, "image")  # video previews are MP4s: decoded below instead
        if path.exists():
            found[(p, i)] = np.asarray(Image.open(path).convert("RGB"))
        else:
            missing.append((p, i))
    if missing and recipe is not None:
        from mpo.export_dataset import decode_candidates

        decoded, _ = decode_candidates(recipe, run, missing, backbone)
        found.update({k: v[0] if v.ndim == 4 else v for k, v in decoded.items()})
    return found


def pair_pictures(
    recipe: Any, run: RunDir, out: Path, shown: int = PAIRS_SHOWN, backbone: Any = None
) -> list[Path]:
    """The ``shown`` pairs with the largest margins: winner and loser with every dimension's score."""
    if not run.pairs_parquet.exists() or not run.scores_parquet.exists():
        return []
    pairs = read_parquet(run.pairs_parquet).sort_values("margin", ascending=False, kind="stable").head(shown)
    if pairs.empty:
        return []
    scores = read_parquet(run.scores_parquet).set_index(["prompt_id", "sample_idx"])
    prompts = read_parquet(run.prompts_parquet).set_index("prompt_id")
    columns = ["total", *[c for c in scores.columns if c.startswith("dim.")]]
    keys = [(int(r.prompt_id), int(i)) for r in pairs.itertuples() for i in (r.win, r.lose)]
    images = _pair_images(recipe, run, keys, backbone)
    plt = _pyplot()
    fig, axes = plt.subplots(len(pairs), 2, figsize=(7, 3.6 * len(pairs)), squeeze=False)
    for row, r in enumerate(pairs.itertuples()):
        p = int(r.prompt_id)
        for col, (label, i) in enumerate((("winner", int(r.win)), ("loser", int(r.lose)))):
            ax = axes[row][col]
            if (p, i) in images:
                ax.imshow(images[(p, i)])
            ax.axis("off")
            values = scores.loc[(p, i)]
            lines = [f"{c.removeprefix('dim.')}: {_num(values[c])}" for c in columns]
            ax.set_title(f"{label} #{i}", fontsize=9)
            ax.text(0.5, -0.04, "\n".join(lines), transform=ax.transAxes, ha="center", va="top", fontsize=7)
        axes[row][0].annotate(
            _wrap(str(prompts.loc[p, "prompt"]), 40) + f"\nmargin {r.margin:.4f} ({r.rule})",
            xy=(-0.1, 0.5),
            xycoords="axes fraction",
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.tight_layout()
    return [_save(fig, out / "pairs.png")]


def _num(value: Any) -> str:
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.4f}"


# ---- the report -------------------------------------------------------------------------------------
def write_report(run: RunDir, recipe: Any = None, backbone: Any = None) -> list[Path]:
    """Every picture this run's files allow (missing inputs are skipped, never an error). Pair images
    not among the previews are decoded with ``backbone`` (the trainer's, already loaded) or a
    freshly loaded one."""
    out = run.root / REPORT_DIR
    pairs = pair_pictures(recipe, run, out, backbone=backbone)
    written = curve_charts(run, out) + before_after_pictures(run, out) + pairs
    log.info("report: %d pictures in %s", len(written), out)
    return written


def report_command(run_dir: str | Path) -> list[Path]:
    """``mpo report RUN_DIR``: the recipe comes from the run directory's recipe.yaml."""
    from mpo.config import RecipeError, load_recipe

    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise RecipeError(f"{run.root}: no such run directory")
    recipe = load_recipe(run.recipe_yaml) if run.recipe_yaml.exists() else None
    written = write_report(run, recipe)
    for path in written:
        print(path)
    return written
