"""``mpo run`` under ``accelerate launch`` with 2 CPU processes, the way the README says to run it: every
rank exits 0, the closing tables print once, and the export equals the 1-process export (DDP here;
DeepSpeed ZeRO-2 and ZeRO-3 in the slow tier). An error on rank 1 alone stops both ranks with its
message; SIGTERM / SIGINT to the launcher stop training with a checkpoint that resumes to the
uninterrupted weights; DeepSpeed's own checkpoint files cannot run code on resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mpo.cli import main
from mpo.lock import LOCK_NAME
from tests.scripts.processes import run_launch
from tests.scripts.tiny_runs import COGVIDEOX, COGVIDEOX_SMALL, ROOT, SDXL, checkpoint_tensors, copy_run
from tests.scripts.tiny_runs import finished_overrides as overrides

DDP = ROOT / "launch" / "cpu_ddp.yaml"
ZERO2 = ROOT / "launch" / "cpu_deepspeed_zero2.yaml"
# Two processes with one pair each take the same optimizer steps as one process with two.
TWO_RANKS = "train.batch_size=1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(deepspeed: bool) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if deepspeed:
        env.pop("ACCELERATE_USE_CPU", None)  # with it, accelerate drops DeepSpeed
    else:
        env["ACCELERATE_USE_CPU"] = "true"  # without it, each CPU process trains alone
    return env


def _command(config: Path, args: list[str], script: list[str] | None = None) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(_free_port()), *(script or ["-m", "mpo.cli"]), *args,
    ]  # fmt: skip


def launch(config: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    deepspeed = "deepspeed" in config.name or "zero" in config.name
    return run_launch(
        _command(config, args), cwd=ROOT, env=_env(deepspeed), capture_output=True, text=True, timeout=timeout
    )


def _messages(stderr: str, start: str) -> list[str]:
    """The workers' messages that start with ``start``: the two processes share stderr, so one's line
    may begin after the other's unfinished progress bar."""
    return re.findall(rf"{re.escape(start)}[^\r\n]*", stderr)


def _tail(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-2500:] + result.stderr[-3500:]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def assert_same_training(one: dict, two: dict, base: dict) -> None:
    """1 vs 2 processes: the same pairs, noise and averaged gradient, so the same update up to float
    rounding, which Adam amplifies where a gradient is near its epsilon: what training changed
    agrees to 5% (as a whole: ungathered or unaveraged gradients would be ~100% off)."""
    assert one.keys() == two.keys() == base.keys() and one
    delta_one = torch.cat([(one[k] - base[k]).flatten() for k in sorted(one)])
    delta_two = torch.cat([(two[k] - base[k]).flatten() for k in sorted(one)])
    moved, apart = delta_one.norm().item(), (delta_one - delta_two).norm().item()
    assert moved > 0 and apart < 0.05 * moved, (
        f"1 vs 2 processes differ by {apart} (L2); training moved {moved}"
    )


def assert_whole_run(result: subprocess.CompletedProcess, out: Path) -> None:
    assert result.returncode == 0, _tail(result)
    assert result.stdout.count("mpo run ->") == 1, _tail(result)  # the closing tables, once
    assert result.stdout.count("held-out reward: step 0 -> step") == 1
    assert (out / "export" / "export.json").exists() and not (out / LOCK_NAME).exists()


@pytest.mark.distributed
def test_mpo_run_on_two_ddp_processes_exits_0_and_exports_the_one_process_model(finished, models, tmp_path):
    out = tmp_path / "run"
    result = launch(DDP, ["run", str(SDXL), *overrides(out, models, TWO_RANKS)])
    assert_whole_run(result, out)
    progress = json.loads((out / "checkpoints" / "step-2" / "progress.json").read_text())
    assert (
        progress["settings"]["layout"]["processes"] == 2 and not progress["settings"]["layout"]["deepspeed"]
    )
    unet = Path("export") / "unet"
    assert_same_training(_weights(finished / unet), _weights(out / unet), _weights(models / "sdxl" / "unet"))


# ---- slow: DeepSpeed ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero2_run(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2") / "run"
    result = launch(ZERO2, ["run", str(SDXL), *overrides(out, models, TWO_RANKS)])
    assert_whole_run(result, out)
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_mpo_run_on_two_zero2_processes_exports_the_one_process_model(zero2_run, finished, models):
    progress = json.loads((zero2_run / "checkpoints" / "step-2" / "progress.json").read_text())
    assert progress["settings"]["layout"]["deepspeed"] and progress["settings"]["layout"]["processes"] == 2
    unet = Path("export") / "unet"
    assert_same_training(
        _weights(finished / unet), _weights(zero2_run / unet), _weights(models / "sdxl" / "unet")
    )


def _cogvideox_full(out: Path, models: Path, *extra: str) -> list[str]:
    return [
        *COGVIDEOX_SMALL,
        f"output_dir={out}",
        f"model.path={models / 'cogvideox'}",
        "model.finetune=full",
        "train.learning_rate=1e-3",
        "train.max_steps=2",
        "train.checkpoint_every=1",
        "eval.every=0",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_mpo_run_on_two_zero3_processes_full_cogvideox_exports_the_one_process_model(models, tmp_path):
    """ZeRO-3 shards the video transformer: its export is gathered whole on rank 0."""
    config = tmp_path / "zero3.yaml"
    text = ZERO2.read_text().replace(
        "launch/deepspeed/zero2.json", str(ROOT / "launch" / "deepspeed" / "zero3.json")
    )
    config.write_text(text)
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    assert main(["run", str(COGVIDEOX), *_cogvideox_full(one, models, "train.batch_size=2")]) == 0
    result = launch(config, ["run", str(COGVIDEOX), *_cogvideox_full(two, models, TWO_RANKS)], timeout=500)
    assert_whole_run(result, two)
    transformer = Path("export") / "transformer"
    base = _weights(models / "cogvideox" / "transformer")
    assert_same_training(_weights(one / transformer), _weights(two / transformer), base)


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_checkpoint_files_cannot_run_code(zero2_run, models, tmp_path):
    from mpo.train_state import CheckpointError, verify_checkpoint

    marker = tmp_path / "payload-ran"
    files = sorted((zero2_run / "checkpoints" / "step-2" / "pytorch_model").glob("*.pt"))
    assert [p.name for p in files] == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    verify_checkpoint(zero2_run / "checkpoints" / "step-2", 1, deepspeed=True)  # as DeepSpeed wrote it
    for file in files:
        run = tmp_path / file.stem / "run"
        shutil.copytree(zero2_run, run)
        torch.save(
            {"optimizer_state_dict": Payload(marker)},
            run / "checkpoints" / "step-2" / "pytorch_model" / file.name,
        )
        rank = 1 if "rank_1" in file.name else 0
        with pytest.raises(CheckpointError, match=re.escape(file.name)):
            verify_checkpoint(run / "checkpoints" / "step-2", rank, deepspeed=True)
        assert not marker.exists()
    # Planted in rank 1's partition only: both ranks stop, with that file's name, before loading.
    result = launch(ZERO2, ["train", str(SDXL), *overrides(run, models, TWO_RANKS, "train.max_steps=3")])
    assert result.returncode != 0 and not marker.exists()
    lines = _messages(result.stderr, "mpo train:")
    assert (
        len(lines) == 2
        and lines[0] == lines[1]
        and files[-1].name in lines[0]
        and "(rank 1 of 2)" in lines[0]
    )


# ---- slow: an error on one rank, signals ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_an_error_on_rank_1_alone_stops_both_ranks_with_its_message(finished, models, tmp_path):
    """A bit flip in the shard that rank 1 checks when the run resumes (shards 0 and 2 are rank 0's)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shard = run / "candidates" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-9] ^= 0x10
    shard.write_bytes(bytes(data))
    started = time.monotonic()
    result = launch(DDP, ["run", str(SDXL), *overrides(run, models, TWO_RANKS)], timeout=240)
    assert result.returncode != 0
    lines = _messages(result.stderr, "mpo run:")
    assert len(lines) == 2 and lines[0] == lines[1], _tail(result)  # the same message on each rank
    assert "shard-00001.safetensors: damaged" in lines[0] and lines[0].endswith("(rank 1 of 2)")
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)) == {"2"}, _tail(result)  # each rank
    assert not re.search(r"^\[(default)?rank\d\]: Traceback", result.stderr, re.M)  # no worker traceback
    assert time.monotonic() - started < 200  # nobody waited for a timeout
    assert not (run / LOCK_NAME).exists()


SIGNAL_TRAIN = [
    "train.max_steps=6",
    "train.checkpoint_every=100",
    "train.lr_schedule=linear",
    "train.warmup_steps=1",
]


@pytest.fixture(scope="module")
def straight_two(finished, models, tmp_path_factory) -> Path:
    run = copy_run(finished, tmp_path_factory.mktemp("straight-two") / "run")
    result = launch(DDP, ["train", str(SDXL), *overrides(run, models, TWO_RANKS, *SIGNAL_TRAIN)])
    assert result.returncode == 0, _tail(result)
    return run


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_checkpoints_both_ranks_and_the_resume_matches(
    signum, straight_two, finished, models, tmp_path
):
    run = copy_run(finished, tmp_path / "run")
    markers = tmp_path / "markers"
    args = ["train", str(SDXL), *overrides(run, models, TWO_RANKS, *SIGNAL_TRAIN)]
    script = [str(ROOT / "tests" / "scripts" / "slow_steps.py"), "0.5", str(markers)]
    job = subprocess.Popen(
        _command(DDP, args, script),
        cwd=ROOT,
        env=_env(False),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 200
    while not all((markers / f"rank-{r}-step-3").exists() for r in (0, 1)):
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            out, err = job.communicate()
            raise AssertionError(f"training never reached step 3: {out[-2000:]}{err[-3000:]}")
        time.sleep(0.2)
    job.send_signal(signum)  # what SLURM's time limit (SIGTERM) or a Ctrl-C (SIGINT) does
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    name = signal.Signals(signum).name
    lines = _messages(stderr, "mpo train: stopped by")
    assert len(lines) == 2 and lines[0] == lines[1], stdout[-2000:] + stderr[-3000:]
    step = int(re.search(rf"stopped by {name} after step (\d+) of 6", lines[0]).group(1))
    assert 3 <= step < 6 and f"resume from step {step}" in lines[0]
    assert (run / "checkpoints" / f"step-{step}" / "rng-1.safetensors").exists()

    result = launch(DDP, args)
    assert result.returncode == 0, _tail(result)
    assert re.search(rf"resumed from step\s*│\s*{step}", result.stdout)
    a = checkpoint_tensors(straight_two / "checkpoints" / "step-6")
    b = checkpoint_tensors(run / "checkpoints" / "step-6")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
