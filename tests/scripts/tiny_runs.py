"""Run directories with candidates, scores and pairs on the tiny recipes, for the training tests.

Generating and scoring once per test module and copying the result into each test's own folder keeps
every training test independent (its own checkpoints, eval.parquet and export) without paying for
generation again. The tiny models are built once per pytest session, in the session's base temp dir.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from mpo.backbones import get_backbone_class
from mpo.config import load_recipe
from mpo.generate import generate_stage
from mpo.score import score_stage
from mpo.select import select_stage
from mpo.store import CandidateStore, RunDir

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


# A whole `mpo run` in a few seconds: 6 prompts in 3 shards, 2 training steps, a checkpoint at each.
FINISHED_STEPS = 2


def finished_overrides(out: Path, models: Path, *extra: str) -> list[str]:
    """Overrides of the tiny SDXL recipe for the fault tests' finished run."""
    return [
        f"output_dir={out}",
        f"model.path={models / 'sdxl'}",
        "prompts.limit=6",
        "generate.num_candidates=3",
        "generate.num_inference_steps=2",
        f"generate.height={SDXL_SIZE['height']}",
        f"generate.width={SDXL_SIZE['width']}",
        "generate.previews=0",
        "generate.prompts_per_shard=2",
        f"train.max_steps={FINISHED_STEPS}",
        "train.checkpoint_every=1",
        "train.batch_size=2",
        "eval.every=0",
        "eval.num_prompts=1",
        "eval.samples_per_prompt=1",
        "tracking.tracker=none",
        *extra,
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


# ---- comparing runs ------------------------------------------------------------------------------------
# Bitwise equality between processes on a CPU needs a fixed thread count and MKL's conditional
# numerical reproducibility: without MKL_CBWR, MKL picks kernels by memory alignment, which differs
# from process to process, and results differ in the last bit. Every run compared bitwise is
# therefore a subprocess started with this environment.
DETERMINISTIC_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_CBWR": "AUTO",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_latents(run: RunDir) -> dict[tuple[int, int], torch.Tensor]:
    """Every cached candidate latent of a run, by (prompt_id, sample_idx)."""
    store = CandidateStore(run)
    keys = list(zip(store.manifest["prompt_id"], store.manifest["sample_idx"]))
    latents = store.latents([k[0] for k in keys], [k[1] for k in keys])
    return {(int(p), int(s)): latents[i] for i, (p, s) in enumerate(keys)}


def assert_same_candidates(a: RunDir, b: RunDir) -> None:
    """Same manifest, latents, prompt and negative embeddings, and shard files, bit for bit."""
    pd.testing.assert_frame_equal(
        pd.read_parquet(a.candidates_parquet), pd.read_parquet(b.candidates_parquet)
    )
    la, lb = all_latents(a), all_latents(b)
    assert la.keys() == lb.keys()
    assert all(torch.equal(la[k], lb[k]) for k in la)
    sa, sb = CandidateStore(a), CandidateStore(b)
    ids = sorted({k[0] for k in la})
    ea, eb = sa.embeddings(ids), sb.embeddings(ids)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    na, nb = sa.negative_embeddings(), sb.negative_embeddings()
    assert na.keys() == nb.keys() and all(torch.equal(na[k], nb[k]) for k in na)
    assert sorted(p.name for p in a.candidates_dir.glob("shard-*")) == sorted(
        p.name for p in b.candidates_dir.glob("shard-*")
    )
