"""The export stage: the aligned model as files diffusers loads, with a model card.

::

    mpo export recipes/tiny/sdxl.yaml        # the best checkpoint (export.which=last for the last)

Writes ``<output_dir>/export/``, a folder that is also a hub repo as it is::

    model_index.json, unet/, vae/ ...   DiffusionPipeline.from_pretrained("export") loads and runs it:
                                        the backbone's pipeline with the trained denoiser (LoRA runs:
                                        the adapter merged in; with export.merge_lora=false there is no
                                        pipeline copy, only the adapter)
    lora/pytorch_lora_weights.safetensors   LoRA runs: pipe.load_lora_weights("export", subfolder="lora")
    lora/pytorch_lora_weights_comfyui.safetensors   with "comfyui" in export.lora_formats: the same
                                        adapter in the original checkpoint's key layout (SDXL, FLUX:
                                        kohya's; Wan: the original Wan's) that ComfyUI loads
                                        (mpo/lora_formats.py)
    README.md                           model card (huggingface_hub ModelCard, mpo/model_card.py): the
                                        hub header, usage, recipe, pair statistics, held-out reward
                                        per dimension before and after training
    export.json                         which checkpoint this is (a rerun with the same one is skipped)

The folder is assembled under a temporary name and renamed into place, so a killed export never
leaves a half-written ``export/``; the next export removes what a killed one left
(``.export.tmp-*``, ``.export.old-*``). The record names the checkpoint by its unique id, so a
checkpoint trained again (same step, new weights) is exported again; a finished export writes nothing.
With ``export.push_to_hub.repo_id`` set, the folder is then uploaded (mpo/hub.py).
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

from mpo.backbones.base import Backbone, torch_dtype
from mpo.backbones.registry import load_backbone
from mpo.distributed import is_main, wait_for_everyone, whole_model_loading
from mpo.errors import errors_reach_every_rank
from mpo.store import RunDir, StoreError, read_parquet
from mpo.train_state import chosen_checkpoint, read_progress
from mpo.weights import LORA_DIR, denoiser_component, load_trained

MARKER = "export.json"
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
        "lora_formats": list(recipe.export.lora_formats),
        "ema": bool(recipe.train.ema and recipe.export.ema),
        "base": str(resolve_paths(recipe).model.path),
        "vae": resolve_paths(recipe).model.vae_path,
        "license": recipe.export.license,
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
    push = recipe.export.push_to_hub
    if push.repo_id and is_main(accelerator):
        from mpo.hub import already_pushed, push_export, save_push_record

        if already_pushed(run.root, push, record):
            summary["pushed"] = f"{push.repo_id} (up to date)"
        else:
            pushed = push_export(run.export, push, record, recipe.name)
            save_push_record(run.root, pushed)
            summary["pushed"] = pushed["url"]
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
        from mpo.train_options import exported_weights

        weights = exported_weights(recipe, checkpoint)  # weights_ema/ with train.ema and export.ema
        pipeline_here = recipe.model.finetune == "full" or bool(recipe.export.merge_lora)
        if recipe.model.finetune == "lora":
            tmp.mkdir(parents=True)
            if "diffusers" in recipe.export.lora_formats:
                shutil.copytree(weights / LORA_DIR, tmp / LORA_DIR)
            if "comfyui" in recipe.export.lora_formats:
                write_comfyui_lora(recipe, backbone, weights, tmp / LORA_DIR)
            if pipeline_here:
                _save_merged_pipeline(backbone, weights, tmp)
        else:
            load_trained(backbone, "full", weights, torch_dtype(recipe.model.dtype))
            backbone.pipeline().save_pretrained(tmp)
        model_card(recipe, run, backbone, record, pipeline_here).save(tmp / "README.md")
        (tmp / MARKER).write_text(json.dumps(record, indent=2))
        _swap_in(tmp, run.export)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_merged_pipeline(backbone: Backbone, weights: Path, out: Path) -> None:
    pipe = backbone.pipeline()
    name = denoiser_component(pipe, backbone.denoiser)
    load_trained(backbone, "lora", weights, torch_dtype("float32"))
    pipe.fuse_lora(components=[name])
    pipe.unload_lora_weights()  # drops the adapter layers; the fused weights stay
    pipe.save_pretrained(out)


def write_comfyui_lora(recipe: Any, backbone: Backbone, weights: Path, out: Path) -> Path:
    """The checkpoint's diffusers LoRA file in the family's original key layout (kohya / ComfyUI),
    beside it."""
    from safetensors.torch import load_file, save_file

    from mpo.lora_formats import COMFYUI_FILE, comfyui_architecture, comfyui_metadata, to_comfyui
    from mpo.weights import LORA_FILE

    convention = type(backbone).comfyui_lora
    if convention is None:  # the recipe loader refuses this; a direct caller gets the same words
        raise ValueError(
            f"export.lora_formats: model.family={recipe.model.family!r} has no ComfyUI LoRA layout"
        )
    layers = load_file(str(weights / LORA_DIR / LORA_FILE))
    # The prefix the diffusers file was saved under (Wan 2.2's low-noise expert: transformer).
    component = backbone.lora_component or denoiser_component(backbone.pipeline(), backbone.denoiser)
    config = backbone.denoiser.config
    state = to_comfyui(layers, component, convention["layout"], config, recipe.model.lora_alpha)
    meta = comfyui_metadata(
        recipe.model.lora_rank,
        recipe.model.lora_alpha,
        comfyui_architecture(convention, config),
        recipe.name,
        convention.get("implementation"),
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / COMFYUI_FILE), metadata=meta)
    return out / COMFYUI_FILE


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


def model_card(
    recipe: Any, run: RunDir, backbone: Backbone, record: dict[str, Any], pipeline_here: bool = True
):
    """README.md of the export (a ``huggingface_hub.ModelCard``): how to load it, what it was trained
    on, what it changed. Its snippet loads from the hub repo when one is set, else from ``export/``."""
    from mpo.model_card import build_card, read_pair_stats

    where = recipe.export.push_to_hub.repo_id or str(run.export.resolve())
    pair_lines = None
    if recipe.rounds.count:  # iterative: each round selected its own pairs
        from mpo.rounds import rounds_markdown

        pair_lines = [
            f"{recipe.rounds.count} rounds, each sampling from the policy the round before trained.",
            "",
        ]
        pair_lines += rounds_markdown(run, recipe)
    convention = type(backbone).comfyui_lora
    comfyui = None
    if convention and recipe.model.finetune == "lora" and "comfyui" in list(recipe.export.lora_formats):
        from mpo.lora_formats import layout

        comfyui = {
            "tools": convention.get("tools", "ComfyUI"),
            "layout": layout(convention["layout"]).description,
        }
    return build_card(
        recipe,
        modality=backbone.modality,
        record=record,
        scores=before_after(run, record["step"]),
        pair_stats=read_pair_stats(run.root / STATS_NAME),
        where=where,
        pipeline_here=pipeline_here,
        lora_kwargs=backbone.lora_load_kwargs,
        fmt=fmt,
        short=_short,
        pair_lines=pair_lines,
        comfyui=comfyui,
    )


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
