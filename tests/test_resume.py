"""Resuming a run keeps it whole: SIGTERM / SIGINT stop training at a step boundary with a checkpoint
and the resumed run ends with the uninterrupted weights; no file of a checkpoint can make a resume
run code; settings that changed are refused by name or redone with ``--force``; the run directory's
own recipe.yaml resumes it; leftovers of killed stages are cleaned."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch

import mpo.train
from mpo.cli import main
from mpo.store import read_parquet
from tests.scripts.tiny_runs import ROOT, SDXL, checkpoint_tensors, copy_run
from tests.scripts.tiny_runs import finished_overrides as overrides

STEPS = 4
TRAIN = [
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=100",
    "train.lr_schedule=linear",
    "train.warmup_steps=1",
]


def _train(run: Path, models: Path, *extra: str) -> int:
    return main(["train", str(SDXL), *overrides(run, models, *TRAIN, *extra)])


@pytest.fixture(scope="module")
def straight(finished, models, tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones are compared with."""
    run = copy_run(finished, tmp_path_factory.mktemp("straight") / "run")
    assert _train(run, models) == 0
    return run


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_at_the_step_boundary_and_the_resume_matches(
    signum, straight, finished, models, tmp_path, monkeypatch, capsys
):
    run = copy_run(finished, tmp_path / "run")
    original, calls = mpo.train.dpo_step, []

    def signalled_step(t, batch):
        calls.append(t.progress.step)
        if len(calls) == 2:  # during step 2, as SLURM's time limit or a Ctrl-C would
            os.kill(os.getpid(), signum)
        return original(t, batch)

    with monkeypatch.context() as m:
        m.setattr(mpo.train, "dpo_step", signalled_step)
        assert _train(run, models) == 128 + signum
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step 2 of {STEPS}" in err and "resume from step 2" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]  # the boundary's, complete

    assert _train(run, models) == 0
    assert "resumed from step" in capsys.readouterr().out
    a = checkpoint_tensors(straight / "checkpoints" / f"step-{STEPS}")
    b = checkpoint_tensors(run / "checkpoints" / f"step-{STEPS}")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


class Payload:
    """Unpickling this runs code: it leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _checkpoint_files(run: Path) -> list[str]:
    step = run / "checkpoints" / "step-2"
    return sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())


CHECKPOINT_FILES = [
    "optimizer.json",
    "optimizer.safetensors",
    "progress.json",
    "rng-0.safetensors",
    "trainer.json",
    "weights/denoiser/config.json",
    "weights/denoiser/diffusion_pytorch_model.safetensors",
]


def test_the_payload_test_covers_every_file_of_a_checkpoint(finished):
    """A new file in checkpoints must be added to what a resume checks (and to the test below)."""
    assert _checkpoint_files(finished) == CHECKPOINT_FILES


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_planted_payload_in_any_checkpoint_file_is_refused(name, finished, models, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps({"state": Payload(marker)})
    torch.save({"state": Payload(marker)}, run / "checkpoints" / "step-2" / name)  # a torch-format pickle
    assert main(["train", str(SDXL), *overrides(run, models, "train.max_steps=3")]) == 2
    err = capsys.readouterr().err
    assert name.split("/")[-1] in err and "Traceback" not in err
    assert not marker.exists(), "the payload ran"
    (run / "checkpoints" / "step-2" / name).write_bytes(payload)  # a bare pickle
    assert main(["export", str(SDXL), *overrides(run, models, "export.which=last", "train.max_steps=3")]) in (
        0,
        2,
    )
    assert not marker.exists(), "the payload ran"


def test_force_redoes_a_changed_stage_and_everything_after_it(finished, models, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = json.loads((run / "export" / "export.json").read_text())
    command = ["run", str(SDXL), *overrides(run, models, "select.rule=dpo")]
    assert main(command) == 2  # refused, naming the key
    assert "select.rule: 'mpo' -> 'dpo'" in capsys.readouterr().err
    assert main([*command, "--force"]) == 0
    out = capsys.readouterr().out
    for stage, work in (
        ("generate", "skipped"),
        ("score", "skipped"),
        ("select", "done now"),
        ("train", "done now"),
        ("export", "done now"),
    ):
        assert any(
            line.split("│")[1].strip() == stage and work in line for line in out.splitlines() if "│" in line
        ), stage
    assert read_parquet(run / "pairs.parquet")["rule"].eq("dpo").all()
    progress = json.loads((run / "checkpoints" / "step-2" / "progress.json").read_text())
    assert progress["settings"]["select"]["rule"] == "dpo"
    after = json.loads((run / "export" / "export.json").read_text())
    assert after["checkpoint id"] == progress["id"] != before["checkpoint id"]
    assert main(command) == 0  # now up to date with the new settings
    assert "done now" not in capsys.readouterr().out


def test_the_run_directorys_own_recipe_resumes_it_from_anywhere(
    finished, models, tmp_path, monkeypatch, capsys
):
    """model.path relative in the command, absolute in recipe.yaml: both resolve to the same run."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    monkeypatch.chdir(models.parent)
    relative = [o for o in overrides(run, models) if not o.startswith("model.path=")]
    prompts = f"prompts.file={ROOT / 'recipes' / 'tiny' / 'prompts.txt'}"
    assert main(["run", str(SDXL), *relative, prompts, f"model.path={models.name}/sdxl"]) == 0
    assert "done now" not in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(run / "recipe.yaml"), f"output_dir={run}", "train.max_steps=3"]) == 0
    assert "resumed from step" in capsys.readouterr().out


def test_leftovers_of_killed_stages_are_removed(finished, models, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    dead = 2**22 + 17  # above Linux's largest pid: no such process
    killed = [
        run / f".export.tmp-{dead}-0badf00d",
        run / ".export.old-0badf00d",
        run / "checkpoints" / "step-7.tmp",
    ]
    for folder in killed:
        (folder / "pipeline").mkdir(parents=True)
    dead_build = models / f".sdxl.tmp-{dead}-0badf00d"
    (dead_build / "unet").mkdir(parents=True)
    assert main(["run", str(SDXL), *overrides(run, models)]) == 0  # every stage up to date
    assert [p for p in killed if p.exists()] == []
    assert main(["train", str(SDXL), *overrides(run, models, "train.max_steps=3")]) == 0  # loads the model
    assert not dead_build.exists()  # the tiny model was there (no build), and the dead build's folder went
