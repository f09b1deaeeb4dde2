"""Run directories with candidates, scores and pairs on the tiny recipes, for the training tests.

Generating and scoring once per test module and copying the result into each test's own folder keeps
every training test independent (its own checkpoints, eval.parquet and export) without paying for
generation again. The tiny models are built once per pytest session, in the session's base temp dir.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from mpo.backbones import get_backbone_class
from mpo.config import load_recipe
from mpo.generate import generate_stage
from mpo.score import score_stage
from mpo.select import select_stage

ROOT = Path(__file__).resolve().parents[2]
SDXL_SIZE = get_backbone_class("sdxl").tiny_size
COGVIDEOX_SIZE = get_backbone_class("cogvideox").tiny_size
SDXL = ROOT / "recipes" / "tiny" / "sdxl.yaml"
COGVIDEOX = ROOT / "recipes" / "tiny" / "cogvideox.yaml"
# Generated data shared by a test module; training copies never touch these folders.
STAGE_OUTPUTS = ("recipe.yaml", "prompts.parquet", "candidates", "candidates.parquet", "scores.parquet")
SELECT_OUTPUTS = ("pairs.parquet", "select_stats.json")

SDXL_SMALL = [
    "prompts.limit=8",  # 6 train + 2 held-out prompts
    "generate.num_candidates=4",
    "generate.num_inference_steps=4",
    f"generate.height={SDXL_SIZE['height']}",
    f"generate.width={SDXL_SIZE['width']}",
    "generate.previews=0",
    "eval.num_prompts=1",
    "eval.samples_per_prompt=1",
    "eval.every=0",
    "tracking.tracker=none",
]
COGVIDEOX_SMALL = [
    "prompts.limit=6",
    "generate.num_candidates=3",
    "generate.num_inference_steps=3",
    *(f"generate.{k}={v}" for k, v in COGVIDEOX_SIZE.items()),
    "generate.previews=0",
    "eval.num_prompts=1",
    "eval.samples_per_prompt=1",
    "eval.every=0",
    "tracking.tracker=none",
]


def shared_models(tmp_path_factory) -> Path:
    """One folder of tiny models for the whole session (built on first load, atomically)."""
    path = tmp_path_factory.getbasetemp() / "shared-tiny-models"
    path.mkdir(exist_ok=True)
    return path


def recipe_for(out: Path, models: Path, recipe: Path = SDXL, small=SDXL_SMALL, extra=()):
    family = "cogvideox" if recipe == COGVIDEOX else "sdxl"
    return load_recipe(str(recipe), [*small, f"output_dir={out}", f"model.path={models / family}", *extra])


def prepare(out: Path, models: Path, recipe: Path = SDXL, small=SDXL_SMALL, extra=()) -> Path:
    """generate + score + select into ``out``."""
    r = recipe_for(out, models, recipe, small, extra)
    generate_stage(r)
    score_stage(r)
    select_stage(r)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    """A fresh run directory holding only ``src``'s generated data and pairs."""
    dst.mkdir(parents=True)
    for name in (*STAGE_OUTPUTS, *SELECT_OUTPUTS):
        path = src / name
        if path.is_dir():
            shutil.copytree(path, dst / name)
        elif path.exists():
            shutil.copy2(path, dst / name)
    return dst


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's ``weights/`` folder (LoRA or full), by file and key."""
    tensors = {}
    for path in sorted((folder / "weights").rglob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            tensors[f"{path.parent.name}/{key}"] = value
    return tensors
