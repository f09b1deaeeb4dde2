"""The reward trainer under ``accelerate launch`` with 2 CPU processes (gloo): DDP and DeepSpeed ZeRO-2
give the weights and held-out curve of one process with the same global batch, and every rank exits 0."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reward.backends.tiny_vlm import build_tiny_qwen2_vl
from reward.synthetic import write_shapes
from reward.train import train_stage
from reward.train_config import load_train_recipe
from tests.scripts.processes import run_launch

ROOT = Path(__file__).resolve().parents[1]
TINY_QA = ROOT / "recipes" / "reward" / "tiny_qa.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT)}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dist")
    return {"model": build_tiny_qwen2_vl(root / "tiny"), **write_shapes(root / "shapes", count=24)}


def _overrides(run: Path, setup: dict[str, Path], batch: int) -> list[str]:
    # Full fine-tuning with accumulation 2: DDP's no_sync micro-steps and the loss normaliser both matter.
    return [
        f"output_dir={run}", f"model.path={setup['model']}", f"data.checklist={setup['checklist']}",
        f"data.annotations=[{setup['annotations']}]", "data.val_fraction=0.25", "model.finetune=full",
        "train.learning_rate=1e-3", "train.lr_schedule=constant", "train.warmup_steps=0", f"train.batch_size={batch}", "train.gradient_accumulation_steps=2",
        "train.max_steps=2", "train.checkpoint_every=0", "eval.batch_size=4",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, setup) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    train_stage(load_train_recipe(TINY_QA, _overrides(run, setup, batch=4)))
    return run


def _launch(
    config: str, run: Path, setup: dict[str, Path], env: dict[str, str]
) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / config),
        "--main_process_port", str(_free_port()), "-m", "reward.cli", "train", str(TINY_QA),
        *_overrides(run, setup, batch=2),
    ]  # fmt: skip
    return run_launch(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _compare(one: Path, two: Path, base: Path) -> None:
    a = load_file(str(one / "model" / "model.safetensors"))
    b = load_file(str(two / "model" / "model.safetensors"))
    start = load_file(str(base / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    apart = max(float((a[k] - b[k]).abs().max()) for k in a)
    # the same samples, the same normalised gradient; Adam's first steps amplify float rounding where a
    # gradient is tiny, so the weights agree to a small fraction of how far training moved them
    assert moved > 1e-3 and apart < 0.02 * moved, (
        f"1 vs 2 processes differ by {apart}; training moved {moved}"
    )
    curve_one = {c["step"]: c for c in map(json.loads, (one / "eval.jsonl").read_text().splitlines())}
    curve_two = {c["step"]: c for c in map(json.loads, (two / "eval.jsonl").read_text().splitlines())}
    assert set(curve_one) <= set(curve_two) and curve_one
    for step, c1 in curve_one.items():  # held-out rows split over 2 ranks give the 1-process numbers
        assert curve_two[step]["rows"] == c1["rows"]
        assert curve_two[step]["mean_abs_dp"] == pytest.approx(c1["mean_abs_dp"], abs=2e-3)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_matches_one_process(one_process, setup, tmp_path):
    two = tmp_path / "ddp"
    result = _launch("cpu_ddp.yaml", two, setup, {**ENV, "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "processes" in result.stdout and "│ 2 " in result.stdout.split("processes", 1)[1][:40]
    _compare(one_process, two, setup["model"])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_deepspeed_zero2_matches_one_process(one_process, setup, tmp_path):
    two = tmp_path / "zero2"
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}  # with it, DeepSpeed is dropped
    result = _launch("cpu_deepspeed_zero2.yaml", two, setup, env)
    assert result.returncode == 0, result.stderr[-4000:]
    progress = json.loads((two / "checkpoints" / "step-2" / "progress.json").read_text())
    assert progress["settings"]["deepspeed"] is True and progress["pairs_seen"] == 2 * 2 * 2 * 2
    _compare(one_process, two, setup["model"])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_deepspeed_zero3_trains_resumes_and_exports_whole_weights(one_process, setup, tmp_path):
    """ZeRO-3 shards every weight: the VLM must load whole, every rank must run the same number of
    held-out forwards, and checkpoints and the export must hold gathered (whole) tensors."""
    config = tmp_path / "zero3.yaml"
    text = (ROOT / "launch" / "cpu_deepspeed_zero2.yaml").read_text()
    config.write_text(
        text.replace("launch/deepspeed/zero2.json", str(ROOT / "launch" / "deepspeed" / "zero3.json"))
    )
    two = tmp_path / "zero3"
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    for steps in (1, 2):  # the second launch resumes from the first one's checkpoint
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(_free_port()), "-m", "reward.cli", "train", str(TINY_QA),
            *_overrides(two, setup, batch=2), f"train.max_steps={steps}", "train.checkpoint_every=1",
        ]  # fmt: skip
        result = run_launch(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-4000:]
    assert (
        "resumed from step" in result.stdout and "│ 1 " in result.stdout.split("resumed from step", 1)[1][:40]
    )
    base = load_file(str(setup["model"] / "model.safetensors"))
    exported = load_file(str(two / "model" / "model.safetensors"))
    assert all(exported[k].shape == v.shape for k, v in base.items() if k in exported)
    _compare(one_process, two, setup["model"])


@pytest.mark.slow
@pytest.mark.distributed
def test_a_damaged_file_on_one_rank_stops_both_after_a_checkpoint(setup, tmp_path):
    import shutil

    from reward import train_data as td
    from reward.checklist import load_checklist

    data_dir = tmp_path / "data"
    shutil.copytree(setup["annotations"].parent, data_dir)
    local = {**setup, "checklist": data_dir / "checklist.yaml", "annotations": data_dir / "annotations.jsonl"}
    overrides = [
        *_overrides(tmp_path / "run", local, batch=2),
        "train.gradient_accumulation_steps=1",
        "train.max_steps=3",
    ]
    recipe = load_train_recipe(TINY_QA, overrides)
    data = td.read_annotations([local["annotations"]], load_checklist(local["checklist"]))
    train = td.TrainSet.build(
        data, td.split_samples(data.samples, 0.25, None, 0), "downsample", recipe.train.seed
    )
    victim = data.samples[train.sample_at(7)]  # step 2 reads positions 4-7: rank 1 takes 6 and 7
    victim.media.write_bytes(victim.media.read_bytes()[:60])
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "cpu_ddp.yaml"),
        "--main_process_port", str(_free_port()), "-m", "reward.cli", "train", str(TINY_QA), *overrides,
    ]  # fmt: skip
    result = run_launch(command, cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    # both ranks report it (the error is gathered), and the step trained before it is kept
    assert result.stderr.count(f"{victim.where}: image {victim.media}: cannot be decoded") == 2, (
        result.stderr[-3000:]
    )
    assert "checkpoint step-1 holds the 1 steps done" in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-1" / "progress.json").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_deepspeed_zero3_with_lora_matches_one_process(setup, tmp_path):
    """LoRA under ZeRO-3: the frozen base and the adapters are sharded alike; the merged export
    equals the one-process run's."""
    lora = ["model.finetune=lora", "model.lora_rank=4", "train.learning_rate=1e-2"]
    one = tmp_path / "one"
    train_stage(load_train_recipe(TINY_QA, [*_overrides(one, setup, batch=4), *lora]))
    config = tmp_path / "zero3.yaml"
    text = (ROOT / "launch" / "cpu_deepspeed_zero2.yaml").read_text()
    config.write_text(
        text.replace("launch/deepspeed/zero2.json", str(ROOT / "launch" / "deepspeed" / "zero3.json"))
    )
    two = tmp_path / "zero3"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(_free_port()), "-m", "reward.cli", "train", str(TINY_QA),
        *_overrides(two, setup, batch=2), *lora,
    ]  # fmt: skip
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    result = run_launch(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    _compare(one, two, setup["model"])
