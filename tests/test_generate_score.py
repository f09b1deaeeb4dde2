"""Generate and score stages on the tiny recipes: determinism, 1 vs 2 processes, kill and resume."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mpo.backbones.cogvideox import CogVideoXBackbone
from mpo.backbones.sdxl import SDXLBackbone
from mpo.config import load_recipe
from mpo.generate import generate_stage
from mpo.score import score_stage
from mpo.store import CandidateStore, RunDir, StoreError, read_shard_info, temp_files
from tests.scripts.processes import run_launch
from tests.scripts.tiny_runs import DETERMINISTIC_ENV, all_latents, assert_same_candidates, free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "run_stage.py"
SDXL = ROOT / "recipes" / "tiny" / "sdxl.yaml"
COGVIDEOX = ROOT / "recipes" / "tiny" / "cogvideox.yaml"
SMALL = [
    "prompts.limit=4",
    "generate.num_candidates=3",
    "generate.num_inference_steps=3",
    "generate.prompts_per_shard=1",
    "generate.previews=2",
]
ENV = DETERMINISTIC_ENV


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """The tiny pipelines, saved with save_pretrained and loaded back by every run through the recipe's
    loader. Their brief denoiser pretraining is skipped: these tests check plumbing, not samples."""
    root = tmp_path_factory.mktemp("models")
    SDXLBackbone.tiny_pipeline().save_pretrained(root / "sdxl")
    CogVideoXBackbone.tiny_pipeline().save_pretrained(root / "cogvideox")
    return root


def _overrides(out: Path, models: Path, family: str = "sdxl", extra: tuple[str, ...] = ()) -> list[str]:
    prompts = ROOT / "recipes" / "tiny" / "prompts.txt"
    return [*SMALL, f"output_dir={out}", f"model.path={models / family}", f"prompts.file={prompts}", *extra]


def _recipe(out: Path, models: Path, path: Path = SDXL, family: str = "sdxl", extra: tuple[str, ...] = ()):
    return load_recipe(str(path), _overrides(out, models, family, extra))


def _command(stages: str, out: Path, models: Path, *options: str, recipe: Path = SDXL) -> list[str]:
    family = "cogvideox" if recipe == COGVIDEOX else "sdxl"
    return [sys.executable, str(SCRIPT), stages, str(recipe), *_overrides(out, models, family), *options]


def _run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = run_launch(command, env=env or ENV, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models) -> RunDir:
    """One uninterrupted single-process generate + score run that the other tests compare against."""
    run = RunDir(tmp_path_factory.mktemp("reference") / "run")
    _run(_command("generate,score", run.root, models))
    return run


_all_latents, _assert_same_candidates = all_latents, assert_same_candidates


def test_generate_writes_the_run_directory(reference):
    run = reference
    manifest = pd.read_parquet(run.candidates_parquet)
    assert list(manifest.columns) == ["prompt_id", "sample_idx", "seed", "shard", "offset"]
    assert len(manifest) == 4 * 3
    prompts = pd.read_parquet(run.prompts_parquet)
    assert set(manifest["prompt_id"]) == set(prompts["prompt_id"])  # val prompts too
    assert (prompts["split"] == "val").sum() >= 1
    assert sorted(p.name for p in run.candidates_dir.glob("shard-*")) == [
        f"shard-0000{g}.safetensors" for g in range(4)
    ]
    assert len(list(run.previews_dir.glob("*.png"))) == 2
    assert run.recipe_yaml.exists() and run.negative.exists()
    latents = _all_latents(run)
    # Different seeds give different candidates (the determinism checks below are not vacuous).
    assert not torch.equal(latents[(0, 0)], latents[(0, 1)])
    assert all(torch.isfinite(x).all() for x in latents.values())


def test_same_recipe_gives_identical_candidates(reference, tmp_path, models):
    again = RunDir(tmp_path / "run")
    _run(_command("generate", again.root, models))
    _assert_same_candidates(reference, again)


def test_scores_have_one_row_per_candidate_and_resume_skips_done_shards(reference, tmp_path, models):
    run = reference
    scores = pd.read_parquet(run.scores_parquet)
    manifest = pd.read_parquet(run.candidates_parquet)
    assert list(zip(scores.prompt_id, scores.sample_idx)) == list(
        zip(manifest.prompt_id, manifest.sample_idx)
    )
    assert list(scores.columns[:4]) == ["prompt_id", "sample_idx", "split", "total"]
    assert scores.columns[-1] == "source"
    for prefix in ("dim.", "sub.", "q."):
        assert any(c.startswith(prefix) for c in scores.columns), prefix
    splits = pd.read_parquet(run.prompts_parquet).set_index("prompt_id")["split"]
    assert (scores["split"] == scores["prompt_id"].map(splits)).all()
    assert scores["total"].notna().all()

    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root)
    recipe = _recipe(copy.root, models)
    shard_times = {p: p.stat().st_mtime_ns for p in copy.candidates_dir.glob("shard-*")}
    score_times = {p: p.stat().st_mtime_ns for p in copy.candidates_dir.glob("score-*")}
    assert generate_stage(recipe)["shards generated now"] == 0
    summary = score_stage(recipe)
    assert summary["shards scored now"] == 0 and summary["samples"] == len(manifest)
    assert {p: p.stat().st_mtime_ns for p in shard_times} == shard_times
    assert {p: p.stat().st_mtime_ns for p in score_times} == score_times

    copy.score_shard(2).unlink()
    assert score_stage(recipe)["shards scored now"] == 1
    assert all(p.stat().st_mtime_ns == t for p, t in score_times.items() if p != copy.score_shard(2))
    # Rescored in this process (not started with MKL_CBWR): equal up to float rounding.
    pd.testing.assert_frame_equal(pd.read_parquet(copy.scores_parquet), scores, check_exact=False, rtol=1e-5)


def test_a_changed_recipe_is_refused_in_an_existing_run(reference, tmp_path, models):
    shutil.copytree(reference.root, tmp_path / "run")
    with pytest.raises(StoreError, match=r"shard-00000.*generate\.seed: 0 -> 1"):
        generate_stage(_recipe(tmp_path / "run", models, extra=("generate.seed=1",)))
    with pytest.raises(StoreError, match=r"shard-00000.*generate\.scheduler"):
        generate_stage(_recipe(tmp_path / "run", models, extra=("generate.scheduler=unipc",)))
    with pytest.raises(StoreError, match=r"shard-00000.*generate\.batch_size"):
        generate_stage(_recipe(tmp_path / "run", models, extra=("generate.batch_size=6",)))
    with pytest.raises(StoreError, match=r"prompts\.parquet"):
        generate_stage(_recipe(tmp_path / "run", models, extra=("prompts.limit=3",)))


def test_killed_generate_resumes_to_the_uninterrupted_result(reference, tmp_path, models):
    resumed = RunDir(tmp_path / "run")
    command = _command("generate", resumed.root, models)
    proc = subprocess.Popen(
        [*command, "--sleep-after-shard", "120"], env=ENV, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while not resumed.shard(0).exists():
            assert proc.poll() is None, f"generate exited early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no shard written in time"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not resumed.shard(1).exists() and not resumed.candidates_parquet.exists()
    first_shard_time = resumed.shard(0).stat().st_mtime_ns
    # What a writer killed in the middle of shard 1 leaves behind: a partial temporary file.
    partial = resumed.candidates_dir / ".shard-00001.safetensors.tmp-999-dead.safetensors"
    partial.write_bytes(resumed.shard(0).read_bytes()[:100])

    _run(command)
    assert not partial.exists() and not temp_files(resumed.candidates_dir)
    assert resumed.shard(0).stat().st_mtime_ns == first_shard_time  # kept, not generated again
    _assert_same_candidates(reference, resumed)


_free_port = free_port


@pytest.mark.distributed
def test_two_processes_match_one(reference, tmp_path, models):
    two = RunDir(tmp_path / "run")
    launch = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(_free_port())),
    ]
    done = _run(
        [*launch, *_command("generate,score", two.root, models)[1:]], {**ENV, "ACCELERATE_USE_CPU": "true"}
    )
    assert "rank 0 of 2" in done.stderr
    _assert_same_candidates(reference, two)
    pd.testing.assert_frame_equal(
        pd.read_parquet(reference.scores_parquet), pd.read_parquet(two.scores_parquet), check_exact=True
    )


def test_cogvideox_generates_and_scores_videos(tmp_path, models):
    run = RunDir(tmp_path / "run")
    recipe = _recipe(
        run.root,
        models,
        COGVIDEOX,
        "cogvideox",
        (
            "prompts.limit=2",
            "generate.num_candidates=2",
            "generate.num_inference_steps=2",
            "generate.previews=1",
        ),
    )
    generate_stage(recipe)
    summary = score_stage(recipe)
    info = read_shard_info(run.shard(0))
    latents = CandidateStore(run).latents([0], [1])
    assert latents.ndim == 5  # [B, F, C, h, w]
    assert info.candidates[1][:2] == (0, 1)
    assert len(list(run.previews_dir.glob("*.mp4"))) == 1
    scores = pd.read_parquet(run.scores_parquet)
    assert len(scores) == 4 == summary["samples"]
    assert scores["total"].notna().all()
    assert any(c.startswith("dim.") for c in scores.columns)


# Cheaper sampling: several prompts per denoising batch and another scheduler.
BATCHED = ("generate.prompts_per_shard=2", "generate.batch_size=6", "generate.scheduler=dpmpp_2m")


def test_batching_across_prompts_in_the_stage_keeps_the_candidates(reference, tmp_path, models):
    """Two prompts per batch give the candidates of one prompt per batch (the reference), each from its
    own seeded noise and its own prompt's embeddings. Compared to a subprocess run, hence to rounding
    (tests/test_sampling.py documents the per-family batch tolerance)."""
    run = RunDir(tmp_path / "run")
    generate_stage(_recipe(run.root, models, extra=BATCHED[:2]))
    batched, alone = _all_latents(run), _all_latents(reference)
    assert batched.keys() == alone.keys()
    for key in alone:
        torch.testing.assert_close(batched[key], alone[key], atol=1e-5, rtol=1e-5)
    ids = sorted({k[0] for k in alone})
    ea, eb = CandidateStore(run).embeddings(ids), CandidateStore(reference).embeddings(ids)
    assert ea.keys() == eb.keys()
    for key in ea:
        torch.testing.assert_close(ea[key], eb[key], atol=1e-6, rtol=1e-6)
    assert read_shard_info(run.shard(0)).fingerprint["generate"]["batch_size"] == 6


# Per family: several prompts per batch and another scheduler; CogVideoX also with a cache hook.
CHEAPER = {
    "sdxl": (SDXL, (*BATCHED, "generate.channels_last=true", "generate.attention=sdpa_math")),
    "sdxl-auto": (
        SDXL,
        ("generate.prompts_per_shard=2", "generate.batch_size=auto", "generate.scheduler=unipc"),
    ),
    "cogvideox": (
        COGVIDEOX,
        (
            "prompts.limit=2",
            "generate.num_candidates=2",
            "generate.batch_size=4",
            "generate.prompts_per_shard=2",
            "generate.scheduler=unipc",
            "generate.cache=pab",
            "generate.attention=sdpa_flash",
            "generate.previews=1",
        ),
    ),
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("family", list(CHEAPER))
def test_cheaper_sampling_is_deterministic_and_two_processes_match_one(tmp_path, models, family):
    recipe, options = CHEAPER[family]
    one, two = RunDir(tmp_path / "one"), RunDir(tmp_path / "two")
    _run([*_command("generate", one.root, models, recipe=recipe), *options])
    launch = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(_free_port())),
    ]
    command = [*launch, *_command("generate", two.root, models, recipe=recipe)[1:], *options]
    _run(command, {**ENV, "ACCELERATE_USE_CPU": "true"})
    _assert_same_candidates(one, two)
    info = read_shard_info(one.shard(0))
    chosen = dict(o.removeprefix("generate.").split("=", 1) for o in options)
    assert info.fingerprint["generate"]["scheduler"] == chosen["scheduler"]
    assert str(info.fingerprint["generate"]["batch_size"]) == chosen["batch_size"]
    n = int(
        next(o for o in (*SMALL, *options)[::-1] if o.startswith("generate.num_candidates")).split("=")[1]
    )
    assert [c[0] for c in info.candidates] == [0] * n + [1] * n


def test_score_stage_never_loads_the_denoiser(reference, tmp_path, models, monkeypatch):
    from mpo.backbones.base import DiffusersBackbone

    def refuse(*args, **kwargs):
        raise AssertionError("the score stage loaded the whole pipeline")

    copy = RunDir(tmp_path / "run")
    shutil.copytree(reference.root, copy.root)
    copy.score_shard(1).unlink()
    monkeypatch.setattr(DiffusersBackbone, "load", classmethod(refuse))
    assert score_stage(_recipe(copy.root, models))["shards scored now"] == 1
    pd.testing.assert_frame_equal(
        pd.read_parquet(copy.scores_parquet),
        pd.read_parquet(reference.scores_parquet),
        check_exact=False,
        rtol=1e-5,
    )
