"""``mpo run`` end to end on the tiny recipes: every stage runs, the export loads in diffusers, a rerun
does nothing, and the tracker gets the curves."""

from __future__ import annotations

import torch
from diffusers import CogVideoXPipeline, DiffusionPipeline, StableDiffusionXLPipeline

from mpo.cli import main
from mpo.config import load_recipe
from mpo.run import run_all
from mpo.store import read_parquet
from tests.scripts.tiny_runs import COGVIDEOX, COGVIDEOX_SIZE, SDXL, SDXL_SIZE, shared_models

STAGES = ["generate", "score", "select", "train", "export"]


def test_mpo_run_tiny_sdxl_end_to_end_then_rerun_skips_everything(tmp_path_factory, tmp_path, capsys):
    torch.set_num_threads(1)
    models = shared_models(tmp_path_factory)
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        f"model.path={models / 'sdxl'}",
        "prompts.limit=6",
        "generate.num_candidates=3",
        "generate.num_inference_steps=3",
        f"generate.height={SDXL_SIZE['height']}",
        f"generate.width={SDXL_SIZE['width']}",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "eval.every=2",
        "eval.samples_per_prompt=1",
        "tracking.tracker=wandb",
        "tracking.mode=offline",
    ]
    assert main(["run", str(SDXL), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "held-out reward: step 0 -> step" in printed and "dim.quality" in printed

    for name in ("prompts.parquet", "candidates.parquet", "scores.parquet", "pairs.parquet", "eval.parquet"):
        assert (out / name).exists(), name
    assert read_parquet(out / "eval.parquet")["step"].tolist() == [0, 2, 4]
    pipe = DiffusionPipeline.from_pretrained(out / "export")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    image = pipe("a red car", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
    # wandb (offline) got every eval's samples, one image each: 3 evals x 2 held-out prompts.
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and len(list(runs[0].glob("files/media/images/eval/samples_*.png"))) == 6
    assert (out / "report" / "curve-total.png").exists()  # the run's pictures, written by train

    reports = run_all(load_recipe(str(SDXL), overrides))
    assert [r.name for r in reports] == STAGES
    assert [r.did_work for r in reports] == [False] * 5, [(r.name, r.did_work) for r in reports]
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1  # no tracker run for a skipped train


def test_mpo_run_tiny_cogvideox(tmp_path_factory, tmp_path):
    torch.set_num_threads(1)
    models = shared_models(tmp_path_factory)
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        f"model.path={models / 'cogvideox'}",
        "prompts.limit=4",
        "generate.num_candidates=3",
        "generate.num_inference_steps=2",
        *(f"generate.{k}={v}" for k, v in COGVIDEOX_SIZE.items()),
        "train.max_steps=2",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "eval.every=0",
        "tracking.tracker=none",
    ]
    reports = run_all(load_recipe(str(COGVIDEOX), overrides))
    assert [r.did_work for r in reports] == [True] * 5
    export = out / "export"
    assert (export / "lora" / "pytorch_lora_weights.safetensors").exists()
    pipe = DiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe, CogVideoXPipeline)
    frames = pipe(
        "a red car",
        num_inference_steps=2,
        num_frames=COGVIDEOX_SIZE["num_frames"],
        height=COGVIDEOX_SIZE["height"],
        width=COGVIDEOX_SIZE["width"],
        output_type="pt",
    ).frames
    assert frames.shape[:3] == (1, COGVIDEOX_SIZE["num_frames"], 3) and torch.isfinite(frames).all()
    assert "dim.quality" in (export / "README.md").read_text()
