"""The Diffusion-DPO trainer on the tiny SDXL: resume equivalence, every parameter trains, batch x
accumulation invariance, non-finite losses stop with the pair named, and 2-process DeepSpeed ZeRO-2."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from accelerate.tracking import GeneralTracker
from safetensors.torch import load_file

import mpo.train
from mpo.distributed import make_accelerator
from mpo.store import CandidateStore, RunDir, read_parquet
from mpo.train import TrainingError, train_stage
from mpo.train_data import PairDataset, load_train_pairs
from mpo.train_state import latest_checkpoint, list_checkpoints
from tests.scripts.tiny_runs import (
    ROOT,
    SDXL,
    SDXL_SMALL,
    checkpoint_tensors,
    copy_run,
    recipe_for,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class Killed(Exception):
    """Stands in for the job being killed right after a checkpoint."""


class Capture:
    """Records the trainable parameters when the optimizer is built (initial values, and the live
    tensors, which hold the final values once training returns), the gradient and learning rate of
    every optimizer step, as the optimizer sees them (accumulated and clipped), and the trainer."""

    def __init__(self, monkeypatch) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.live: dict[str, torch.Tensor] = {}
        self.all_names: list[str] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []
        self.trainer = None
        original = mpo.train.setup_optimizer
        loop = mpo.train.train_loop

        def keep(t):
            self.trainer = t
            return loop(t)

        monkeypatch.setattr(mpo.train, "train_loop", keep)

        def wrapped(recipe, denoiser, world_size, **kwargs):
            named = [(n, p) for n, p in denoiser.named_parameters() if p.requires_grad]
            self.initial = {n: p.detach().clone() for n, p in named}
            self.live = dict(named)
            self.all_names = [n for n, _ in denoiser.named_parameters()]
            optimizer = original(recipe, denoiser, world_size, **kwargs)
            step = optimizer.step

            def recording_step(opt, *args, **kwargs):
                self.grads.append({n: p.grad.detach().clone() for n, p in named})
                self.lrs.append(opt.param_groups[0]["lr"])
                return step(*args, **kwargs)

            optimizer.step = types.MethodType(recording_step, optimizer)  # bound, as lr schedulers expect
            return optimizer

        monkeypatch.setattr(mpo.train, "setup_optimizer", wrapped)

    def final(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.live.items()}


def _train(run: Path, models: Path, extra: list[str]) -> dict:
    return train_stage(recipe_for(run, models, extra=extra))


FINETUNE = {
    "full": ["model.finetune=full", "train.learning_rate=1e-4"],
    # Dropout makes the resume test depend on the restored RNG state too.
    "lora": [
        "model.finetune=lora",
        "model.lora_rank=4",
        "model.lora_dropout=0.1",
        "train.learning_rate=1e-3",
    ],
}


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_kill_and_resume_gives_the_uninterrupted_weights_and_every_parameter_trains(
    prepared, models, tmp_path, monkeypatch, finetune
):
    extra = [
        *FINETUNE[finetune],
        "train.beta=50",
        "train.batch_size=2",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.lr_schedule=linear",
        "train.warmup_steps=1",
    ]
    straight = copy_run(prepared, tmp_path / "straight")
    with monkeypatch.context() as m:
        capture = Capture(m)
        summary = _train(straight, models, extra)
    assert summary["steps trained now"] == 4
    initial, final = capture.initial, capture.final()
    assert initial, "nothing was trainable"
    if finetune == "lora":
        assert all("lora_" in n for n in initial) and len(initial) < len(capture.all_names)
    else:
        assert sorted(initial) == sorted(capture.all_names)
    unchanged = [n for n in initial if torch.equal(initial[n], final[n])]
    assert not unchanged, f"{len(unchanged)} trainable tensors did not change, e.g. {unchanged[:3]}"

    resumed = copy_run(prepared, tmp_path / "resumed")
    original_checkpoint = mpo.train.checkpoint

    def checkpoint_then_die(t):
        original_checkpoint(t)
        if t.progress.step == 2:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(mpo.train, "checkpoint", checkpoint_then_die)
        with pytest.raises(Killed):
            _train(resumed, models, extra)
    assert [s for s, _ in list_checkpoints(RunDir(resumed))] == [2]
    summary = _train(resumed, models, extra)
    assert summary["resumed from step"] == 2 and summary["steps trained now"] == 2

    a = checkpoint_tensors(straight / "checkpoints" / "step-4")
    b = checkpoint_tensors(resumed / "checkpoints" / "step-4")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    # The resumed run continued the same curve: its eval rows match the uninterrupted run's.
    ea, eb = read_parquet(straight / "eval.parquet"), read_parquet(resumed / "eval.parquet")
    assert list(ea["step"]) == list(eb["step"]) == [0, 4]
    assert ea["total"].tolist() == pytest.approx(eb["total"].tolist(), abs=1e-6)


def test_batch_one_times_accumulation_two_equals_batch_two(prepared, models, tmp_path, monkeypatch):
    """The gradient of an optimizer step does not depend on how its pairs are split into micro-steps:
    compared with clipping off (a clip would hide a scale error: the norms here are above 1), and
    the scheduler steps once per optimizer step, with the lr each step used logged for that step."""
    lr = 1e-3
    common = [
        *FINETUNE["full"],
        f"train.learning_rate={lr}",
        "train.max_steps=3",
        "train.checkpoint_every=100",
        "train.max_grad_norm=1e9",  # off
        "train.warmup_steps=2",  # lr used: 0, lr / 2, lr
        "tracking.log_every=1",
    ]
    runs = {}
    for name, batch, accumulation in (("b2a1", 2, 1), ("b1a2", 1, 2)):
        with monkeypatch.context() as m:
            capture = Capture(m)
            run = copy_run(prepared, tmp_path / name)
            _train(
                run,
                models,
                [*common, f"train.batch_size={batch}", f"train.gradient_accumulation_steps={accumulation}"],
            )
        runs[name] = capture
    a, b = runs["b2a1"], runs["b1a2"]
    assert len(a.grads) == len(b.grads) == 3  # one optimizer step per 2 pairs in both
    for capture in (a, b):
        assert capture.lrs == pytest.approx([0.0, lr / 2, lr])
        assert [h["train/lr"] for h in capture.trainer.history] == pytest.approx(capture.lrs)
        norms = [h["train/grad_norm"] for h in capture.trainer.history]
        own = [
            math.sqrt(sum(float(g.double().square().sum()) for g in step.values())) for step in capture.grads
        ]
        assert norms == pytest.approx(own, rel=1e-4)  # logged norms are the unclipped ones
    assert min(own) > 1.0, f"pre-clip norms {own}: a clip at 1 would have hidden a scale error"
    # Step 1 starts from the same weights, so its gradients must agree to float rounding; later steps
    # start from weights that differ by Adam's amplification of that rounding, so a little less.
    for step, tolerance in ((0, 1e-4), (1, 1e-2), (2, 1e-2)):
        scale = max(g.abs().max().item() for g in a.grads[step].values())
        apart = max((a.grads[step][n] - b.grads[step][n]).abs().max().item() for n in a.grads[step])
        assert scale > 0 and apart < tolerance * scale, (
            f"step {step + 1}: gradients differ by {apart} (max {scale})"
        )
    # And a different batch really gives a different gradient (the comparison is not vacuous).
    other = max((a.grads[0][n] - a.grads[1][n]).abs().max().item() for n in a.grads[0])
    assert other > 1e-2 * max(g.abs().max().item() for g in a.grads[0].values())
    moved = max((a.final()[n] - a.initial[n]).abs().max().item() for n in a.initial)
    apart = max((a.final()[n] - b.final()[n]).abs().max().item() for n in a.initial)
    assert apart < 0.05 * moved, f"final weights differ by {apart}; training moved them by {moved}"


def _dataset(run: Path, recipe) -> PairDataset:
    """The trainer's data stream, to look up which pair a stream position is."""
    return PairDataset(RunDir(run), load_train_pairs(RunDir(run)), recipe.train.seed, (0, 1000))


def test_non_finite_loss_names_step_and_pair_and_keeps_the_last_checkpoint(
    prepared, models, tmp_path, monkeypatch
):
    run = copy_run(prepared, tmp_path / "run")
    extra = ["train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=2"]
    calls = []
    original = mpo.train.dpo_loss_from_errors

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # step 3, second pair of the batch
            per_pair = out.per_pair_loss.clone()
            per_pair[1] = float("nan")
            out = dataclasses.replace(out, per_pair_loss=per_pair, loss=per_pair.mean())
        return out

    monkeypatch.setattr(mpo.train, "dpo_loss_from_errors", poisoned)
    capture = Capture(monkeypatch)
    with pytest.raises(TrainingError) as err:
        _train(run, models, extra)
    prompt_id, win, lose = _dataset(run, recipe_for(run, models, extra=extra)).pair_at(2 * 2 + 1)
    message = str(err.value)
    assert "at step 3" in message
    assert f"'prompt_id': {prompt_id}, 'win': {win}, 'lose': {lose}" in message
    assert message.count("'prompt_id'") == 1  # only the poisoned pair is named
    assert "step-2" in message
    assert latest_checkpoint(RunDir(run))[0] == 2
    assert not list((run / "checkpoints").glob("*.tmp"))
    saved = checkpoint_tensors(run / "checkpoints" / "step-2")
    assert all(torch.isfinite(t).all() for t in saved.values())
    # The poisoned step's update was skipped on the device: the weights are still step 2's.
    live = capture.final()
    assert len(capture.grads) == 3 and live.keys() == {k.split("/", 1)[1] for k in saved}
    assert all(torch.equal(live[k.split("/", 1)[1]], v) for k, v in saved.items())


def test_poisoned_latent_stops_at_its_first_pair(prepared, models, tmp_path, monkeypatch):
    run = copy_run(prepared, tmp_path / "run")
    extra = ["train.batch_size=1", "train.max_steps=2", "train.checkpoint_every=1"]
    target = _dataset(run, recipe_for(run, models, extra=extra)).pair_at(0)
    original = CandidateStore.latents

    def latents(self, prompt_ids, sample_idxs):
        out = original(self, prompt_ids, sample_idxs)
        for row, key in enumerate(zip(prompt_ids, sample_idxs)):
            if key == (target[0], target[1]):
                out[row] = float("nan")
        return out

    monkeypatch.setattr(CandidateStore, "latents", latents)
    with pytest.raises(TrainingError) as err:
        _train(run, models, extra)
    assert "at step 1" in str(err.value)
    assert f"'prompt_id': {target[0]}, 'win': {target[1]}, 'lose': {target[2]}" in str(err.value)
    assert "no checkpoint was written yet" in str(err.value)
    assert latest_checkpoint(RunDir(run)) is None


def test_two_process_deepspeed_zero2_matches_one_process(prepared, models, tmp_path, monkeypatch):
    """2 processes x 1 pair x accumulation 2 under ZeRO-2 = 1 process x 2 pairs x accumulation 2, with
    warmup: same pairs, weights, logged lr and (DeepSpeed's own, pre-clip) gradient norm."""
    extra = [
        *FINETUNE["full"],
        "train.learning_rate=1e-3",
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "train.gradient_accumulation_steps=2",
        "train.warmup_steps=1",  # lr used: 0, then 1e-3
        "tracking.log_every=1",
        "eval.num_prompts=2",
    ]
    two = copy_run(prepared, tmp_path / "two")
    overrides = [
        *SDXL_SMALL,
        f"output_dir={two}",
        f"model.path={models / 'sdxl'}",
        *extra,
        "train.batch_size=1",
    ]
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}  # with it, DeepSpeed is dropped
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "cpu_deepspeed_zero2.yaml"),
        "--main_process_port", str(_free_port()), str(ROOT / "tests" / "scripts" / "train_run.py"), str(SDXL), *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((two / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 and r["distributed_type"] == "DEEPSPEED" for r in ranks)
    # Global micro-batch k is stream positions [2k, 2k+2): rank 0 takes the first, rank 1 the second.
    assert ranks[0]["positions"] == [0, 2, 4, 6] and ranks[1]["positions"] == [1, 3, 5, 7]
    step = two / "checkpoints" / "step-2"
    assert (step / "progress.json").exists() and (step / "weights" / "denoiser").is_dir()
    assert json.loads((step / "progress.json").read_text())["pairs_seen"] == 8

    one = copy_run(prepared, tmp_path / "one")
    with monkeypatch.context() as m:
        capture = Capture(m)
        _train(one, models, [*extra, "train.batch_size=2"])
    logged_one, logged_two = capture.trainer.history, ranks[0]["history"]
    assert [h["train/lr"] for h in logged_two] == [h["train/lr"] for h in logged_one] == [0.0, 1e-3]
    assert ranks[1]["history"] == logged_two  # every process logs the means over processes
    for a, b in zip(logged_one, logged_two):
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-3)
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
    a, b = checkpoint_tensors(one / "checkpoints" / "step-2"), checkpoint_tensors(step)
    base = load_file(str(next((models / "sdxl" / "unet").glob("*.safetensors"))))
    assert a.keys() == b.keys() == {f"denoiser/{k}" for k in base}
    # Same pairs, noise and averaged gradient; Adam amplifies float rounding where a gradient is near its
    # epsilon, so the weights agree to a small fraction of how far the two steps moved them.
    moved = max((a[k] - base[k.split("/", 1)[1]]).abs().max().item() for k in a)
    apart = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3 and apart < 0.05 * moved, (
        f"1 vs 2 processes differ by {apart}; training moved {moved}"
    )
    # Eval split over two ranks (one prompt each) gives the one-process numbers.
    e1, e2 = read_parquet(one / "eval.parquet"), read_parquet(two / "eval.parquet")
    assert e1["samples"].tolist() == e2["samples"].tolist() == [2, 2]
    assert e1["total"].tolist() == pytest.approx(e2["total"].tolist(), abs=1e-5)


@pytest.mark.slow
def test_two_process_deepspeed_zero3_trains_gathers_weights_and_resumes(prepared, models, tmp_path):
    """ZeRO-3 shards the denoiser: the models must load whole (no zero.Init collectives), eval sampling
    must run the same number of forwards on every rank, and weights/ must be gathered."""
    config = tmp_path / "zero3.yaml"
    text = (ROOT / "launch" / "cpu_deepspeed_zero2.yaml").read_text()
    config.write_text(
        text.replace("launch/deepspeed/zero2.json", str(ROOT / "launch" / "deepspeed" / "zero3.json"))
    )
    run = copy_run(prepared, tmp_path / "run")
    extra = [*FINETUNE["full"], "train.batch_size=1", "train.checkpoint_every=1", "eval.num_prompts=2"]
    overrides = [*SDXL_SMALL, f"output_dir={run}", f"model.path={models / 'sdxl'}", *extra]
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    for steps in (1, 2):
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(_free_port()), str(ROOT / "tests" / "scripts" / "train_run.py"), str(SDXL),
            *overrides, f"train.max_steps={steps}",
        ]  # fmt: skip
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((run / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["positions"] for r in ranks] == [[2], [3]]  # the second launch resumed at step 1
    weights = checkpoint_tensors(run / "checkpoints" / "step-2")
    base = load_file(str(next((models / "sdxl" / "unet").glob("*.safetensors"))))
    assert weights.keys() == {f"denoiser/{k}" for k in base}
    assert all(weights[f"denoiser/{k}"].shape == v.shape for k, v in base.items())  # whole, not shards
    assert read_parquet(run / "eval.parquet")["samples"].tolist() == [2, 2, 2]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordingTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is sent."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.config = values

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((step, dict(values)))


def test_curves_reach_the_trackers(prepared, models, tmp_path):
    run = copy_run(prepared, tmp_path / "run")
    recipe = recipe_for(
        run,
        models,
        extra=["train.max_steps=4", "tracking.tracker=wandb", "tracking.log_every=2", "eval.every=2"],
    )
    tracker = RecordingTracker()
    accelerator = make_accelerator(recipe, training=True, log_with=[tracker])
    train_stage(recipe, accelerator)
    train_steps = [step for step, values in tracker.logged if "train/loss" in values]
    eval_steps = [step for step, values in tracker.logged if "eval/total" in values]
    assert train_steps == [2, 4] and eval_steps == [0, 2, 4]
    train_keys = {"loss", "implicit_acc", "reward_margin", "model_diff", "ref_diff", "lr", "grad_norm"}
    for _, values in tracker.logged:
        if "train/loss" in values:
            assert {f"train/{k}" for k in train_keys} <= values.keys()
            assert all(v == v for v in values.values())  # no NaN
            assert values["train/lr"] == pytest.approx(recipe.train.learning_rate)
        if "eval/total" in values:
            assert "eval/dim.quality" in values
    assert tracker.config["train"]["beta"] == recipe.train.beta


def test_tensorboard_gets_the_dimension_curves(prepared, models, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = copy_run(prepared, tmp_path / "run")
    recipe = recipe_for(
        run, models, extra=["train.max_steps=2", "tracking.tracker=tensorboard", "eval.every=2"]
    )
    train_stage(recipe)
    events = sorted(run.rglob("events.out.tfevents.*"))
    assert events, f"no tensorboard event file under {run}"
    tags: set[str] = set()
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/total", "eval/dim.quality"} <= tags
