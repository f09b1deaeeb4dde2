"""``train.reference: precomputed`` on the tiny SDXL: the same losses and weights as the live
reference, exactly, in float32; no frozen copy in memory; a killed reference pass or training run
resumes; training past the precomputed plan without the base weights is refused, naming the folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mpo.reference
import mpo.train
from mpo.reference import PrecomputedReference
from mpo.store import StoreError
from mpo.train import train_stage
from tests.scripts.processes import run_launch
from tests.scripts.tiny_runs import checkpoint_tensors, copy_run, recipe_for

FINETUNE = {
    "full": ["model.finetune=full", "train.learning_rate=1e-3"],
    "lora": ["model.finetune=lora", "model.lora_rank=4", "train.learning_rate=1e-2"],
}
COMMON = ["train.beta=500", "train.batch_size=2", "train.max_steps=3", "tracking.log_every=1", "eval.every=0"]


class Killed(Exception):
    """Stands in for the job being killed."""


def _train(run: Path, models: Path, extra: list[str], monkeypatch=None) -> tuple[dict, object, list]:
    """Train; returns the summary, the trainer and what setup_model returned as the frozen copy."""
    kept, frozen = [], []
    loop, setup_model = mpo.train.train_loop, mpo.train.setup_model

    def keep(t):
        kept.append(t)
        return loop(t)

    def remember(*args, **kwargs):
        out = setup_model(*args, **kwargs)
        frozen.append(out[2])
        return out

    with pytest.MonkeyPatch.context() as m:
        m.setattr(mpo.train, "train_loop", keep)
        m.setattr(mpo.train, "setup_model", remember)
        summary = train_stage(recipe_for(run, models, extra=[*COMMON, *extra]))
    return summary, (kept[0] if kept else None), frozen


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_precomputed_reference_gives_the_live_losses_and_weights_exactly(
    prepared, models, tmp_path, monkeypatch, finetune
):
    live_run, stored_run = copy_run(prepared, tmp_path / "live"), copy_run(prepared, tmp_path / "stored")
    _, live, _ = _train(live_run, models, [*FINETUNE[finetune], "train.reference=live"], monkeypatch)
    _, stored, frozen = _train(
        stored_run, models, [*FINETUNE[finetune], "train.reference=precomputed"], monkeypatch
    )
    assert isinstance(stored.reference, PrecomputedReference)
    assert frozen == [None], "a precomputed reference must not keep a copy of the denoiser"
    assert sorted(p.name for p in (stored_run / "reference").iterdir())  # stored in the run directory
    assert [h["step"] for h in live.history] == [h["step"] for h in stored.history] == [1, 2, 3]
    for a, b in zip(live.history, stored.history):
        assert a == b, f"step {a['step']}: live {a} != precomputed {b}"
    assert live.history[-1]["train/reward_margin"] != 0.0  # training moved the policy off the reference
    a, b = (
        checkpoint_tensors(live_run / "checkpoints" / "step-3"),
        checkpoint_tensors(stored_run / "checkpoints" / "step-3"),
    )
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_reference_resumes_and_refuses_to_outrun_its_plan(
    prepared, models, tmp_path, monkeypatch
):
    extra = [*FINETUNE["full"], "train.reference=precomputed", "train.checkpoint_every=2"]
    monkeypatch.setattr(mpo.reference, "CHUNK_MICRO_STEPS", 2)  # 3 micro-steps: two chunks
    straight = copy_run(prepared, tmp_path / "straight")
    _, reference_run, _ = _train(straight, models, extra, monkeypatch)

    run = copy_run(prepared, tmp_path / "resumed")
    written = []
    save_file = mpo.reference.save_file

    def save_then_die(tensors, path, metadata=None):
        if written:
            raise Killed  # killed while writing the second chunk: the first one is complete
        written.append(path)
        return save_file(tensors, path, metadata)

    with monkeypatch.context() as m:
        m.setattr(mpo.reference, "save_file", save_then_die)
        with pytest.raises(Killed):
            _train(run, models, extra, monkeypatch)
    assert len(list((run / "reference").glob("part-*.safetensors"))) == 1

    computed = []
    precompute = mpo.reference.precompute_reference

    def count(*args, **kwargs):
        original = args[5]  # inputs_of: one call per micro-batch computed

        def inputs_of(batch):
            computed.append(batch["position"].tolist())
            return original(batch)

        return precompute(*args[:5], inputs_of, *args[6:], **kwargs)

    original_checkpoint = mpo.train.checkpoint

    def checkpoint_then_die(t):
        original_checkpoint(t)
        if t.progress.step == 2:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(mpo.train, "precompute_reference", count)
        m.setattr(mpo.train, "checkpoint", checkpoint_then_die)
        with pytest.raises(Killed):
            _train(run, models, extra, monkeypatch)
    assert computed == [[4, 5]], f"the pass should resume at its missing chunk, computed {computed}"
    summary, resumed, _ = _train(run, models, extra, monkeypatch)
    assert summary["resumed from step"] == 2
    assert resumed.history[-1] == reference_run.history[-1]
    a, b = (
        checkpoint_tensors(straight / "checkpoints" / "step-3"),
        checkpoint_tensors(run / "checkpoints" / "step-3"),
    )
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)

    with pytest.raises(StoreError, match=r"reference.*train\.reference=live"):
        _train(run, models, [*extra, "train.max_steps=5"], monkeypatch)


def test_the_plan_holds_the_positions_each_process_trains_on(monkeypatch):
    """Per process, the planned positions of every chunk are the sampler's micro-batches in order
    (2 processes x 3 pairs, chunks of 2 micro-steps, 5 micro-steps); together they cover the stream
    once. (Batch 1 per process would not tell the rank offset k W + r from (k W + r) B.)"""
    from itertools import islice

    from mpo.reference import Plan
    from mpo.train_data import StreamBatchSampler

    monkeypatch.setattr(mpo.reference, "CHUNK_MICRO_STEPS", 2)
    every = []
    for rank in range(2):
        plan = Plan(micro_steps=5, batch_size=3, rank=rank, world_size=2)
        planned = torch.cat([plan.chunk_positions(k) for k in range(plan.chunks)])
        sampled = [p for batch in islice(iter(StreamBatchSampler(3, rank, 2)), 5) for p in batch]
        assert plan.chunks == 3 and planned.tolist() == sampled, rank
        every += sampled
    assert sorted(every) == list(range(plan.positions)) == list(range(30))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("launch", ["ddp", "zero2"])
def test_precomputed_reference_on_two_processes_gives_the_one_process_losses(
    prepared, models, tmp_path, launch
):
    """Each process computes the errors of its own positions, all read every part; the 2-process run
    logs the losses of a 1-process live run over the same pairs."""
    import json
    import os
    import socket
    import sys

    from tests.scripts.tiny_runs import ROOT, SDXL, SDXL_SMALL

    extra = [*FINETUNE["full"], "train.beta=500", "train.max_steps=2", "train.checkpoint_every=0"]
    extra += ["tracking.log_every=1", "eval.every=0"]
    two = copy_run(prepared, tmp_path / "two")
    overrides = [*SDXL_SMALL, f"output_dir={two}", f"model.path={models / 'sdxl'}", "eval.num_prompts=2"]
    overrides += [*extra, "train.batch_size=1", "train.reference=precomputed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)
    if launch == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
    config = ROOT / "launch" / ("cpu_ddp.yaml" if launch == "ddp" else "cpu_deepspeed_zero2.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(port), str(ROOT / "tests" / "scripts" / "train_run.py"), str(SDXL), *overrides,
    ]  # fmt: skip
    result = run_launch(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    parts = sorted(p.name for p in (two / "reference").glob("part-*.safetensors"))
    assert len(parts) == 2 and "w2r0" in parts[0] and "w2r1" in parts[1]
    ranks = [json.loads((two / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]

    one = copy_run(prepared, tmp_path / "one")
    _, live, _ = _train(one, models, [*extra, "train.batch_size=2", "train.reference=live"], None)
    for rank in ranks:
        for a, b in zip(live.history, rank["history"], strict=True):
            for key in ("train/loss", "train/reward_margin", "train/ref_diff", "train/model_diff"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (a["step"], key)
