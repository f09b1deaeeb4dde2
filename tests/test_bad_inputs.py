"""Bad input never ends in a traceback: the ``mpo`` command, driven with a table of broken recipes, run
directories, files and file systems, exits 2 with one line naming the file, key or value, and what
was finished stays as it was (a rerun after the fix resumes)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import SafetensorError

import mpo.lock
import mpo.store
import mpo.train_state
from mpo.cli import main
from tests.scripts.tiny_runs import FINISHED_STEPS, SDXL
from tests.scripts.tiny_runs import finished_overrides as overrides


@dataclass
class Case:
    """A broken thing: ``make(ctx)`` breaks it and returns the command; stderr must name ``expect``."""

    make: Callable[[Ctx], list[str]]
    expect: str


@dataclass
class Ctx:
    tmp: Path
    models: Path
    finished: Path
    monkeypatch: pytest.MonkeyPatch

    def run_copy(self) -> Path:
        """A private copy of the finished run directory."""
        copy = self.tmp / "run"
        shutil.copytree(self.finished, copy)
        return copy

    def command(self, name: str, out: Path, *extra: str) -> list[str]:
        return [name, str(SDXL), *overrides(out, self.models, *extra)]


def _file(ctx: Ctx, name: str, content: bytes) -> Path:
    path = ctx.tmp / name
    path.write_bytes(content)
    return path


def _truncate(path: Path, by: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-by])


def _flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def _refuse(monkeypatch, target: object, name: str, under: Path, error: int) -> None:
    """Make ``target.name(path, ...)`` fail with ``error`` for paths under ``under``."""
    original = getattr(target, name)

    def refusing(path, *args, **kwargs):
        if str(path).startswith(str(under)):
            raise OSError(error, os.strerror(error), str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(target, name, refusing)


def _disk_full(*args, **kwargs):
    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


def _garbage(run: Path, relative: str) -> list[str]:
    (run / relative).write_bytes(b"\x00garbage\xff" * 8)
    return []


def _changed_checkpoint(ctx: Ctx, relative: str, change: Callable[[Path], object]) -> list[str]:
    """Break a file of the last checkpoint, then resume training past it."""
    run = ctx.run_copy()
    change(run / "checkpoints" / f"step-{FINISHED_STEPS}" / relative)
    return ctx.command("train", run, f"train.max_steps={FINISHED_STEPS + 1}")


def _locked(ctx: Ctx) -> list[str]:
    run = ctx.run_copy()
    import json

    import psutil

    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "now", "command": "mpo run"}
    holder["process_started"] = psutil.Process().create_time()
    (run / mpo.lock.LOCK_NAME).write_text(json.dumps(holder))
    return ctx.command("run", run)


CASES: dict[str, Case] = {
    # recipes and the command line
    "recipe is not UTF-8": Case(lambda c: ["run", str(_file(c, "r.yaml", b"name: caf\xe9\n"))], "not UTF-8"),
    "unknown recipe key": Case(
        lambda c: c.command("run", c.tmp / "o", "train.betta=5"), "did you mean train.beta"
    ),
    "prompts file missing": Case(
        lambda c: c.command("run", c.tmp / "o", "prompts.file=nope.txt"), "nope.txt"
    ),
    "prompts file is not UTF-8": Case(
        lambda c: c.command("generate", c.tmp / "o", "prompts.file=" + str(_file(c, "p.txt", b"a caf\xe9"))),
        "not UTF-8",
    ),
    "bad model.path": Case(
        lambda c: c.command("generate", c.tmp / "o", f"model.path={c.tmp / 'no-model'}", "model.tiny=false"),
        "model.path=",
    ),
    "a million candidates": Case(
        lambda c: c.command("generate", c.tmp / "o", "generate.num_candidates=100000000"),
        "generate.num_candidates",
    ),
    "height of 10^5 pixels": Case(
        lambda c: c.command("generate", c.tmp / "o", "generate.height=100000", "generate.width=100000"),
        "generate.height",
    ),
    # the output directory
    "output_dir is a file": Case(lambda c: c.command("run", _file(c, "f", b"x")), "is a file, not a folder"),
    "output_dir under a file": Case(
        lambda c: c.command("run", _file(c, "f", b"x") / "run"), "a file, not a folder"
    ),
    "output_dir on a read-only disk": Case(
        lambda c: (
            _refuse(c.monkeypatch, os, "mkdir", c.tmp / "ro", errno.EROFS),
            c.command("run", c.tmp / "ro"),
        )[1],
        "Read-only file system",
    ),
    "output_dir in use by another command": Case(_locked, "is in use by another mpo command"),
    # settings a finished stage was made with
    "changed train.beta on a finished run": Case(
        lambda c: c.command("run", c.run_copy(), "train.beta=500"), "train.beta: 50.0 -> 500"
    ),
    "changed select.rule on a finished run": Case(
        lambda c: c.command("run", c.run_copy(), "select.rule=dpo"), "select.rule: 'mpo' -> 'dpo'"
    ),
    "changed generate.seed on a finished run": Case(
        lambda c: c.command("run", c.run_copy(), "generate.seed=7"), "generate.seed: 0 -> 7"
    ),
    # damaged files
    "candidate shard cut by 4 bytes": Case(
        lambda c: (
            _truncate((r := c.run_copy()) / "candidates" / "shard-00001.safetensors", 4),
            c.command("run", r),
        )[1],
        "shard-00001.safetensors: damaged",
    ),
    "bit flip in a candidate shard": Case(
        lambda c: (
            _flip_byte((r := c.run_copy()) / "candidates" / "shard-00002.safetensors", 9),
            c.command("train", r, "train.max_steps=3"),
        )[1],
        "shard-00002.safetensors: damaged",
    ),
    "garbage score shard": Case(
        lambda c: (_garbage(r := c.run_copy(), "candidates/score-00000.parquet"), c.command("score", r))[1],
        "score-00000.parquet",
    ),
    "garbage candidates.parquet": Case(
        lambda c: (_garbage(r := c.run_copy(), "candidates.parquet"), c.command("score", r))[1],
        "candidates.parquet",
    ),
    "garbage pairs.parquet": Case(
        lambda c: (_garbage(r := c.run_copy(), "pairs.parquet"), c.command("train", r))[1], "pairs.parquet"
    ),
    "garbage checkpoints/best": Case(
        lambda c: (_garbage(r := c.run_copy(), "checkpoints/best"), c.command("export", r))[1],
        "checkpoints/best",
    ),
    "garbage export.json": Case(
        lambda c: (_garbage(r := c.run_copy(), "export/export.json"), c.command("export", r))[1],
        "export.json",
    ),
    "missing weights file": Case(
        lambda c: _changed_checkpoint(c, "weights/denoiser/diffusion_pytorch_model.safetensors", Path.unlink),
        "weights: no weights file in the checkpoint",
    ),
    "truncated optimizer state": Case(
        lambda c: _changed_checkpoint(c, "optimizer.safetensors", lambda p: _truncate(p, 100)),
        "optimizer.safetensors",
    ),
    "garbage progress.json": Case(
        lambda c: _changed_checkpoint(c, "progress.json", lambda p: p.write_text("{")), "progress.json"
    ),
    "garbage trainer.json": Case(
        lambda c: _changed_checkpoint(c, "trainer.json", lambda p: p.write_text("[")), "trainer.json"
    ),
    # the file system refusing writes
    "disk full while writing a shard": Case(
        lambda c: (
            c.monkeypatch.setattr(mpo.store, "save_file", _disk_full),
            c.command("generate", c.tmp / "o"),
        )[1],
        "No space left on device",
    ),
    "disk full while writing a checkpoint": Case(
        lambda c: (
            c.monkeypatch.setattr(mpo.train_state, "save_file", _disk_full),
            c.command("train", c.run_copy(), f"train.max_steps={FINISHED_STEPS + 1}"),
        )[1],
        "cannot write checkpoint step-3 (No space left on device)",
    ),
    "select --scores on a garbage file": Case(
        lambda c: [
            "select",
            "--scores",
            str(_file(c, "s.parquet", b"PAR1 nope")),
            "--out",
            str(c.tmp / "p.parquet"),
        ],
        "s.parquet",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_clear_line(name, finished, models, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    argv = case.make(Ctx(tmp_path, models, finished, monkeypatch))
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, f"{name}: exit {status}\n{err[-2000:]}"
    assert "Traceback" not in err
    # One message: its first line names the command; a recipe error lists one problem per line below.
    at = err.index(f"mpo {argv[0]}:")
    message = err[at:].rstrip().splitlines()
    assert all(line.startswith("  ") for line in message[1:]), f"{name}: {err[-2000:]}"
    assert case.expect in "\n".join(message), f"{name}: {err[-2000:]}"


def test_xformers_without_xformers_is_refused_at_load(finished, models, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    assert main(["run", str(SDXL), *overrides(tmp_path / "o", models, "train.attention=xformers")]) == 2
    assert "train.attention='xformers'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before generate and score ran


def test_a_finished_run_writes_nothing(finished, tmp_path, models, monkeypatch, capsys):
    """What a read-only disk needs: a rerun of a finished run reports every stage up to date and
    changes no file (the lock cannot be created there, and is then not needed)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")}
    _refuse(monkeypatch, os, "open", run / mpo.lock.LOCK_NAME, errno.EROFS)
    assert main(["run", str(SDXL), *overrides(run, models)]) == 0
    assert "done now" not in capsys.readouterr().out
    assert main(["eval", str(SDXL), *overrides(run, models)]) == 0
    assert "eval (up to date)" in capsys.readouterr().out
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")}
    assert after == before


def test_disk_full_then_rerun_resumes(finished, models, tmp_path, monkeypatch):
    """Disk full while writing checkpoint step-3: the error leaves no half-written folder, the last
    complete checkpoint stays, and after space is freed the same command resumes from it."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    command = ["train", str(SDXL), *overrides(run, models, "train.max_steps=4")]
    with monkeypatch.context() as m:
        m.setattr(mpo.train_state, "save_file", _disk_full)
        assert main(command) == 2
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["best", "step-1", "step-2"]  # no step-3.tmp left, nothing lost
    assert main(command) == 0
    assert (run / "checkpoints" / "step-4" / "progress.json").exists()


def test_disk_full_while_generating_keeps_the_finished_shards(models, tmp_path, monkeypatch):
    out = tmp_path / "run"
    command = ["generate", str(SDXL), *overrides(out, models)]
    real = mpo.store.save_file
    written: list[str] = []

    def full_after_two(tensors, path, metadata=None):
        if len(written) == 2:
            _disk_full()
        written.append(path)
        return real(tensors, path, metadata=metadata)

    with monkeypatch.context() as m:
        m.setattr(mpo.store, "save_file", full_after_two)
        assert main(command) == 2
    left = sorted(p.name for p in (out / "candidates").iterdir() if p.name != "negative.safetensors")
    assert left == ["shard-00000.safetensors", "shard-00001.safetensors"]  # no temporary file left
    assert main(command) == 0
    assert len(list((out / "candidates").glob("shard-*.safetensors"))) == 3


def test_stale_lock_of_a_dead_process_is_taken_over(finished, models, tmp_path, capsys):
    import json

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    dead = {"host": socket.gethostname(), "pid": 2**22 + 17, "started": "yesterday", "command": "mpo run"}
    (run / mpo.lock.LOCK_NAME).write_text(json.dumps(dead))
    assert main(["run", str(SDXL), *overrides(run, models)]) == 0
    assert "took over the stale run lock of pid 4194321" in capsys.readouterr().err
    assert not (run / mpo.lock.LOCK_NAME).exists()  # released at the end
