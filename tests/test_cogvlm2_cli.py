"""The official-checkpoint path from the command line: `reward score` follows the model, bad input exits
2 with one line naming it, `mpo run` scores with a CogVLM2 reward end to end, and `reward verify`
compares the port with a checkpoint's remote code run in another Python process.

`reward verify` is built for an environment that still runs THUDM's remote code (transformers
4.40-4.43); that cannot exist here. Its test runs the release's runner script in a second process
against a stand-in remote code (modeling files that wrap this port), which checks the plumbing, the
comparison and the report, not the release's own numbers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mpo.config import load_recipe
from mpo.run import run_all
from mpo.schema import RewardConfig
from mpo.store import read_parquet
from reward.backends import build_backend
from reward.backends.alignment import AlignedBackend
from reward.backends.cogvlm2.backend import CogVLM2Backend
from reward.backends.cogvlm2.tiny import build_tiny_cogvlm2
from reward.backends.tiny_clip_flant5 import build_tiny_clip_flant5
from reward.backends.vqascore import VQAScoreBackend
from reward.cli import main
from reward.media import save_video
from reward.types import Sample
from reward.visionreward import VisionReward
from tests.scripts.tiny_runs import COGVIDEOX, COGVIDEOX_SIZE, shared_models

PROMPT = "a red fox in snow"


@pytest.fixture(scope="module")
def video_model(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return build_tiny_cogvlm2(tmp_path_factory.mktemp("cogvlm2") / "video", variant="video", seed=5)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[list[str], Path]:
    folder = tmp_path_factory.mktemp("clips")
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i, frames in enumerate((16, 24)):
        path = folder / f"clip{i}.mp4"
        save_video(path, torch.rand(frames, 3, 32, 48, generator=gen), fps=8)
        paths.append(str(path))
    prompts = folder / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na cat on a sofa\n")
    return paths, prompts


def test_reward_score_follows_the_model_without_backend(tmp_path, video_model, clips):
    paths, prompts = clips
    out = tmp_path / "scores.parquet"
    args = ["score", "--checklist", "video-official", "--model", str(video_model), "--videos", *paths]
    assert (
        main([*args, "--prompts", str(prompts), "--out", str(out), "--dtype", "float32", "--device", "cpu"])
        == 0
    )
    frame = pd.read_parquet(out)
    assert len(frame) == 2 and frame["source"].str.startswith("cogvlm2:").all()
    q = frame[[c for c in frame.columns if c.startswith("q.")]].to_numpy()
    assert q.shape == (2, 29) and ((q > 0) & (q < 1)).all()


def test_reward_score_refuses_a_model_it_would_ignore(tmp_path, video_model, clips, capsys):
    paths, _ = clips
    args = ["score", "--checklist", "video-official", "--backend", "pixel-stats", "--model", str(video_model)]
    assert main([*args, "--videos", *paths, "--out", str(tmp_path / "s.parquet")]) == 2
    err = capsys.readouterr().err
    assert "pixel statistics use no model" in err and str(video_model) in err
    assert not (tmp_path / "s.parquet").exists()


def test_bad_input_exits_2_naming_it(tmp_path, video_model, clips, capsys):
    paths, _ = clips
    long = tmp_path / "long.txt"
    long.write_text("a fox " * 300 + "\n" + PROMPT + "\n")
    args = ["score", "--checklist", "video-official", "--model", str(video_model), "--videos", *paths]
    assert (
        main([*args, "--prompts", str(long), "--out", str(tmp_path / "s.parquet"), "--dtype", "float32"]) == 2
    )
    assert f"sample {paths[0]}: the prompt is" in capsys.readouterr().err
    other = tmp_path / "qwen"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]})
    )
    args = ["score", "--checklist", "video-official", "--backend", "cogvlm2", "--model", str(other)]
    assert main([*args, "--videos", *paths, "--out", str(tmp_path / "s.parquet")]) == 2
    assert "not a CogVLM2 checkpoint" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err


def test_recipe_reward_with_backend_vlm_builds_the_cogvlm2_backend(video_model):
    cfg = RewardConfig(
        checklist="video-official", backend="vlm", model_path=str(video_model), dtype="float32"
    )
    reward = VisionReward.from_config(cfg, device="cpu")
    assert isinstance(reward.backend, CogVLM2Backend) and reward.backend.config.variant == "video"
    backend = build_backend("cogvlm2", model_path=str(video_model), dtype="float32", device="cpu")
    assert isinstance(backend, CogVLM2Backend)


def test_mpo_run_with_a_tiny_cogvlm2_reward(tmp_path_factory, tmp_path, video_model):
    models = shared_models(tmp_path_factory)
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        f"model.path={models / 'cogvideox'}",
        "prompts.limit=4",
        "generate.num_candidates=3",
        "generate.num_inference_steps=2",
        *(f"generate.{k}={v}" for k, v in COGVIDEOX_SIZE.items()),
        "reward.backend=vlm",
        f"reward.model_path={video_model}",
        "reward.checklist=video-full",
        "reward.dtype=float32",
        "reward.batch_size=3",
        "select.rule=dpo",  # 9-dimension dominance among 3 random-reward candidates is rare
        "select.threshold=0.0",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "eval.every=0",
        "tracking.tracker=none",
    ]
    reports = run_all(load_recipe(str(COGVIDEOX), overrides))
    assert [r.did_work for r in reports] == [True] * 5
    scores = read_parquet(out / "scores.parquet")
    assert scores["source"].str.startswith("cogvlm2:").all() and len(scores) == 12
    q = scores[[c for c in scores.columns if c.startswith("q.")]]
    assert q.shape[1] == 64 and q.notna().all().all() and q.std().max() > 0
    assert len(read_parquet(out / "pairs.parquet")) > 0
    assert (out / "export" / "model_index.json").exists()


_STAND_IN = '''"""Stand-in for the release's remote code (tests only): the native port behind the release's
interface (``CogVLMConfig``, ``CogVLMVideoForCausalLM`` with ``build_conversation_input_ids``)."""
import torch
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from reward.backends.cogvlm2.config import config_from_remote
from reward.backends.cogvlm2.inputs import PromptBuilder, video_pixels
from reward.backends.cogvlm2.modeling import CogVLM2ForCausalLM

SHIFT = {shift}


class CogVLMConfig(PretrainedConfig):
    model_type = "cogvlm_stand_in"


class CogVLMVideoForCausalLM(CogVLM2ForCausalLM):
    config_class = CogVLMConfig

    def __init__(self, config):
        super().__init__(config_from_remote(config.to_dict(), "stand-in"))

    def build_conversation_input_ids(self, tokenizer, *, query, history=None, images=None, template_version=None):
        builder = PromptBuilder(self.config, tokenizer, template_version)
        pixels = video_pixels(images[0].permute(1, 0, 2, 3), self.config.vision_config["image_size"])
        ids, types = builder.row(pixels.shape[0], "video", query)
        return {{"input_ids": torch.tensor(ids), "token_type_ids": torch.tensor(types),
                "attention_mask": torch.ones(len(ids), dtype=torch.long), "images": [pixels]}}

    def forward(self, input_ids, token_type_ids, attention_mask, images):
        logits = super().forward(input_ids=input_ids, token_type_ids=token_type_ids, images=images[0][0])
        return CausalLMOutputWithPast(logits=logits + SHIFT)
'''


@pytest.mark.slow  # two Python processes (~10 s each); the slow tier runs it
@pytest.mark.parametrize("shift,expected", [(0.0, 0), (0.5, 1)])
def test_reward_verify_against_a_remote_code_process(tmp_path, video_model, clips, capsys, shift, expected):
    model = tmp_path / "remote"
    shutil.copytree(video_model, model)
    code = _STAND_IN.format(shift=shift)
    for name in ("modeling_cogvlm.py", "configuration_cogvlm.py"):
        (model / name).write_text(code)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_cogvlm.CogVLMConfig",
        "AutoModelForCausalLM": "modeling_cogvlm.CogVLMVideoForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))
    paths, _ = clips
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    args = ["verify", "--model", str(model), "--remote-python", sys.executable, "--videos", paths[0]]
    status = main([*args, "--prompts", str(tmp_path / "p.txt"), "--questions", "4", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert status == expected, printed
    assert "token layout: identical on all 4 prompts" in printed
    largest = float(printed.split("largest |logit difference|: ")[1].split()[0])
    assert (largest < 1e-4) if shift == 0 else abs(largest - shift) < 1e-4


@pytest.mark.parametrize(
    "recipe,variant",
    [
        ("recipes/sdxl/mpo.yaml", "image"),
        ("recipes/cogvideox-2b/mpo.yaml", "video"),
        ("recipes/cogvideox-5b/base.yaml", "video"),
    ],
)
def test_paper_recipes_score_with_their_reward_as_written(tmp_path, monkeypatch, recipe, variant):
    """The recipes name the hub releases; once converted (here: tiny stand-ins written where `reward
    convert <hub id>` writes), their reward sections build the cogvlm2 backend and score. The image
    recipe's VQAScore model (a hub id that cannot be fetched here) is replaced by a tiny CLIP-FlanT5."""
    monkeypatch.setenv("MPO_REWARD_CACHE", str(tmp_path / "cache"))
    cfg = load_recipe(recipe, ["reward.dtype=float32"]).reward
    assert cfg.backend == "vlm" and cfg.model_path.startswith("THUDM/VisionReward-")
    build_tiny_cogvlm2(tmp_path / "cache" / cfg.model_path.replace("/", "--"), variant=variant, seed=6)
    if cfg.alignment_model_path is not None:
        assert cfg.alignment_model_path == "zhiqiulin/clip-flant5-xxl"
        cfg.alignment_model_path = str(build_tiny_clip_flant5(tmp_path / "clip-flant5"))
    reward = VisionReward.from_config(cfg, device="cpu")
    backend = reward.backend
    if cfg.alignment_model_path is not None:
        assert isinstance(backend, AlignedBackend) and isinstance(backend.alignment, VQAScoreBackend)
        backend = backend.backend
    assert isinstance(backend, CogVLM2Backend) and backend.config.variant == variant
    pixels = torch.rand(3, 24, 24) if variant == "image" else torch.rand(8, 3, 24, 24)
    scores = reward.score([Sample(pixels, prompt=PROMPT, fps=4.0, id="s")])
    assert torch.isfinite(scores.total).all() and scores.source.startswith("cogvlm2:")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_score_with_cogvlm2_like_one(tmp_path_factory, tmp_path, video_model):
    """generate + score under `accelerate launch` with 2 CPU processes, the reward a tiny CogVLM2:
    every rank loads it, scores its shards, and the scores equal a one-process run's."""
    import os
    import socket
    import subprocess

    models = shared_models(tmp_path_factory)
    script = Path(__file__).resolve().parent / "scripts" / "run_stage.py"

    def overrides(out: Path) -> list[str]:
        return [
            f"output_dir={out}",
            f"model.path={models / 'cogvideox'}",
            "prompts.limit=4",
            "generate.num_candidates=2",
            "generate.num_inference_steps=2",
            "generate.prompts_per_shard=1",
            *(f"generate.{k}={v}" for k, v in COGVIDEOX_SIZE.items()),
            "reward.backend=vlm",
            f"reward.model_path={video_model}",
            "reward.checklist=video-official",
            "reward.dtype=float32",
            "tracking.tracker=none",
        ]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, str(script), "generate,score", str(COGVIDEOX), *overrides(one)],
        env=env,
        check=True,
        capture_output=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
    ]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    done = subprocess.run(
        [*launch, str(script), "generate,score", str(COGVIDEOX), *overrides(two)],
        env={**env, "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2" in done.stderr
    a, b = read_parquet(one / "scores.parquet"), read_parquet(two / "scores.parquet")
    assert a["source"].str.startswith("cogvlm2:").all() and len(a) == 8
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6)
