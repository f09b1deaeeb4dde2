"""The export stage: the aligned model as files diffusers loads, with a model card.

::

    mpo export recipes/tiny/sdxl.yaml        # the best checkpoint (export.which=last for the last)

Writes ``<output_dir>/export/``::

    pipeline/                           DiffusionPipeline.from_pretrained(...) loads and runs it: the
                                        backbone's pipeline with the trained denoiser (LoRA runs: the
                                        adapter merged in when export.merge_lora, else the base model)
    lora/pytorch_lora_weights.safetensors   LoRA runs: pipe.load_lora_weights("export/lora") on the base
    README.md                           model card: recipe, pair statistics, held-out reward per
                                        dimension before and after training
    export.json                         which checkpoint this is (a rerun with the same one is skipped)

The folder is assembled under a temporary name and renamed into place, so a killed export never
leaves a half-written ``export/``; the next export removes what a killed one left
(``.export.tmp-*``, ``.export.old-*``). The record names the checkpoint by its unique id, so a
checkpoint trained again (same step, new weights) is exported again; a finished export writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from accelerate import Accelerator
from omegaconf import OmegaConf

from mpo.backbones.base import Backbone, torch_dtype
from mpo.backbones.registry import load_backbone
from mpo.distributed import is_main, wait_for_everyone, whole_model_loading
from mpo.errors import errors_reach_every_rank
from mpo.store import RunDir, StoreError, read_parquet
from mpo.train_state import chosen_checkpoint, read_progress
from mpo.weights import LORA_DIR, denoiser_component, load_trained

MARKER = "export.json"
PIPELINE_DIR = "pipeline"
STATS_NAME = "select_stats.json"


def export_record(recipe: Any, step: int, checkpoint: Path) -> dict[str, Any]:
    """What an export is made from; an existing export with the same record is up to date."""
    from mpo.config import resolve_paths

    return {
        "checkpoint": checkpoint.name,
        "checkpoint id": read_progress(checkpoint).id,
        "step": int(step),
        "which": recipe.export.which,
        "finetune": recipe.model.finetune,
        "merge_lora": bool(recipe.export.merge_lora),
        "base": str(resolve_paths(recipe).model.path),
    }


def read_record(run: RunDir) -> dict[str, Any] | None:
    """The record of the export in place (None when there is none)."""
    marker = run.export / MARKER
    if not marker.exists():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError(f"a JSON object expected, got {type(record).__name__}")
    except (OSError, ValueError) as err:
        raise StoreError(
            f"{marker}: unreadable ({err}); the export cannot be trusted: delete {run.export} to export again"
        ) from err
    return record


def remove_leftovers(run: RunDir) -> list[Path]:
    """The temporary folders of killed exports (main process, under the run lock: nobody else
    exports into this run directory)."""
    leftovers = sorted(run.root.glob(f".{run.export.name}.tmp-*")) + sorted(
        run.root.glob(f".{run.export.name}.old-*")
    )
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


@errors_reach_every_rank
def export_stage(recipe: Any, accelerator: Accelerator | None = None, force: bool = False) -> dict[str, Any]:
    """Export the checkpoint ``export.which`` names (main process; the others wait). Exported again
    whenever the checkpoint or the export settings differ from the export in place (it is derived
    from the checkpoint alone, so nothing is lost); ``force`` is accepted for symmetry."""
    run = RunDir.from_recipe(recipe)
    started = time.perf_counter()
    step, checkpoint = chosen_checkpoint(run, recipe.export.which)
    record = export_record(recipe, step, checkpoint)
    summary: dict[str, Any] = {"export": str(run.export), "checkpoint": str(checkpoint), "step": step}
    if is_main(accelerator):
        remove_leftovers(run)
    if read_record(run) == record:
        summary["exported"] = False
    elif is_main(accelerator):
        write_export(recipe, run, checkpoint, record)
        summary["exported"] = True
    wait_for_everyone(accelerator)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    if is_main(accelerator):
        from mpo.summary import print_summary

        print_summary("export" if summary.get("exported", True) else "export (up to date)", summary)
    return summary


def write_export(recipe: Any, run: RunDir, checkpoint: Path, record: dict[str, Any]) -> None:
    """Assemble the export in a temporary folder beside ``export/``, then swap it in."""
    tmp = run.root / f".export.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with whole_model_loading():  # main process only: no ZeRO-3 collectives
            backbone = load_backbone(recipe.model, "cpu")
        weights = checkpoint / "weights"
        if recipe.model.finetune == "lora":
            shutil.copytree(weights / LORA_DIR, tmp / LORA_DIR)
            _save_lora_pipeline(backbone, weights, tmp / PIPELINE_DIR, merge=bool(recipe.export.merge_lora))
        else:
            load_trained(backbone, "full", weights, torch_dtype(recipe.model.dtype))
            backbone.pipeline().save_pretrained(tmp / PIPELINE_DIR)
        (tmp / "README.md").write_text(model_card(recipe, run, backbone, record))
        (tmp / MARKER).write_text(json.dumps(record, indent=2))
        _swap_in(tmp, run.export)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_lora_pipeline(backbone: Backbone, weights: Path, out: Path, merge: bool) -> None:
    pipe = backbone.pipeline()
    if not merge:  # the base model; users add export/lora themselves
        pipe.save_pretrained(out)
        return
    name = denoiser_component(pipe, backbone.denoiser)
    load_trained(backbone, "lora", weights, torch_dtype("float32"))
    pipe.fuse_lora(components=[name])
    pipe.unload_lora_weights()  # drops the adapter layers; the fused weights stay
    pipe.save_pretrained(out)


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace ``target`` by ``tmp`` with renames only (the old folder is deleted last)."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


# ---- model card -------------------------------------------------------------------------------------
def before_after(run: RunDir, step: int | None = None) -> pd.DataFrame:
    """Held-out reward per dimension at step 0 and at ``step`` (default: the last evaluated step):
    columns metric, before, after, change; empty when nothing was evaluated."""
    if not run.eval_parquet.exists():
        return pd.DataFrame(columns=["metric", "before", "after", "change"])
    table = read_parquet(run.eval_parquet).set_index("step")
    if step is None or step not in table.index:
        step = int(table.index.max())
    before = table.loc[0] if 0 in table.index else table.iloc[0] * float("nan")
    metrics = ["total", *[c for c in table.columns if c.startswith("dim.")]]
    rows = [(m, float(before[m]), float(table.loc[step, m])) for m in metrics]
    frame = pd.DataFrame(rows, columns=["metric", "before", "after"])
    frame["change"] = frame["after"] - frame["before"]
    frame.attrs["step"] = step
    return frame


def model_card(recipe: Any, run: RunDir, backbone: Backbone, record: dict[str, Any]) -> str:
    """README.md of the export: how to load it, what it was trained on, what it changed."""
    tag = "text-to-video" if backbone.modality == "video" else "text-to-image"
    lora = recipe.model.finetune == "lora"
    scores = before_after(run, record["step"])
    lines = [
        "---",
        "library_name: diffusers",
        f"pipeline_tag: {tag}",
        "tags: [diffusion-dpo, mpo, visionreward]",
        "---",
        "",
        f"# {recipe.name}",
        "",
        f"{recipe.model.family} ({recipe.model.path}) aligned with multi-dimensional preference optimisation: "
        f"Diffusion-DPO (beta {recipe.train.beta}) on pairs selected by `{recipe.select.rule}` at the "
        f"`{recipe.select.level}` level from the `{recipe.reward.checklist}` checklist "
        f"(`{recipe.reward.backend}` backend). {'LoRA' if lora else 'Full fine-tuning'}; this is checkpoint "
        f"`{record['checkpoint']}` ({record['which']}).",
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{PIPELINE_DIR}")'
        + ("  # LoRA merged in" if lora and record["merge_lora"] else ""),
    ]
    if lora:
        # e.g. load_into_transformer_2=True for the low-noise expert of Wan 2.2 A14B
        extra = "".join(f", {k}={v!r}" for k, v in backbone.lora_load_kwargs.items())
        lines += [
            "# or the adapter on the base model:",
            f'pipe = DiffusionPipeline.from_pretrained("{recipe.model.path}")',
            f'pipe.load_lora_weights("{LORA_DIR}"{extra})',
        ]
    lines += ["```", "", "## Held-out reward per dimension", ""]
    if scores.empty:
        lines.append("No evaluation was recorded (eval.parquet is missing).")
    else:
        lines += [
            f"Mean over the held-out prompts, before training (step 0) and at step {scores.attrs['step']}.",
            "",
            "| metric | before | after | change |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r.metric} | {fmt(r.before)} | {fmt(r.after)} | {fmt(r.change, '+')} |"
            for r in scores.itertuples()
        ]
        lines += (
            ["", "n/a: the reward's backend cannot judge that dimension."]
            if scores["after"].isna().any()
            else []
        )
    lines += ["", "## Preference pairs", ""]
    stats_path = run.root / STATS_NAME
    if recipe.rounds.count:  # iterative: each round selected its own pairs
        from mpo.rounds import rounds_markdown

        lines += [f"{recipe.rounds.count} rounds, each sampling from the policy the round before trained.", ""]
        lines += rounds_markdown(run, recipe)
    elif stats_path.exists():
        stats = json.loads(stats_path.read_text())
        lines += ["| statistic | value |", "|---|---|"]
        lines += [f"| {k} | {_short(v)} |" for k, v in stats.items() if k not in ("config", "source")]
    else:
        lines.append(f"{stats_path.name} is missing.")
    recipe_yaml = OmegaConf.to_yaml(OmegaConf.create(recipe), resolve=True)
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def fmt(value: float, sign: str = "") -> str:
    """A score for a table: 4 decimals, "n/a" for a dimension the reward could not judge (NaN)."""
    return "n/a" if value != value else f"{value:{sign}.4f}"


def _short(value: Any) -> str:
    if isinstance(value, dict):
        text = ", ".join(f"{k}: {v}" for k, v in value.items())
    elif isinstance(value, list):
        text = "; ".join(map(str, value))
    else:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 120 else text[:117] + "..."
