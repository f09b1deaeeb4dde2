"""Every stage on the tiny flow-matching families (Wan, SD3, FLUX), one set of tests parametrised by
family: deterministic generation, train + export + reload in diffusers (full weights and
``load_lora_weights``), ``mpo run`` of each tiny recipe, and (slow) 1 vs 2 processes and kill + resume.

The tests the SDXL and CogVideoX runs have in test_generate_score / test_train / test_evaluate_export /
test_run, on the families added since, without a copy per family.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, WanPipeline
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import mpo.train
from mpo.cli import main
from mpo.config import load_recipe
from mpo.export import export_stage
from mpo.generate import generate_stage
from mpo.run import run_all
from mpo.score import score_stage
from mpo.select import select_stage
from mpo.store import RunDir, read_parquet
from mpo.train import train_stage
from mpo.train_state import list_checkpoints, read_best
from tests.scripts.processes import run_launch
from tests.scripts.tiny_runs import (
    DETERMINISTIC_ENV,
    ROOT,
    all_latents,
    assert_same_candidates,
    checkpoint_tensors,
    copy_run,
    free_port,
    shared_models,
)

FAMILIES = ("wan", "sd3", "flux")
# `mpo run` end to end: the video family in the default tier, the image ones (the same stages) slow.
RUN_FAMILIES = ("wan", *(pytest.param(f, marks=pytest.mark.slow) for f in ("sd3", "flux")))
PIPELINES = {"wan": WanPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
RECIPES = {f: ROOT / "recipes" / "tiny" / f"{f}.yaml" for f in FAMILIES}
SMALL = [
    "prompts.limit=5",  # 4 train prompts, 1 held out
    "prompts.val_count=1",
    "generate.num_candidates=3",
    "generate.num_inference_steps=3",
    "generate.prompts_per_shard=2",
    "generate.previews=1",
    "eval.num_prompts=1",
    "eval.samples_per_prompt=1",
    "eval.every=0",
    "tracking.tracker=none",
]
FINETUNE = {
    "full": ["model.finetune=full", "train.learning_rate=1e-3"],
    "lora": ["model.finetune=lora", "model.lora_rank=4", "model.lora_alpha=8", "train.learning_rate=1e-2"],
}
Killed = type("Killed", (Exception,), {"__doc__": "Stands in for the job being killed after a checkpoint."})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return shared_models(tmp_path_factory)


def _overrides(family: str, out: Path, models: Path, extra=()) -> list[str]:
    return [*SMALL, f"output_dir={out}", f"model.path={models / family}", *extra]


def _recipe(family: str, out: Path, models: Path, extra=()):
    return load_recipe(str(RECIPES[family]), _overrides(family, out, models, extra))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, models):
    """Per family, one run through generate, score and select (built on first use, then shared)."""
    runs: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in runs:
            out = tmp_path_factory.mktemp(f"prepared-{family}") / "run"
            recipe = _recipe(family, out, models)
            generate_stage(recipe)
            score_stage(recipe)
            select_stage(recipe)
            runs[family] = out
        return runs[family]

    return get


def _run(command: list[str], env: dict[str, str] | None = None, timeout: int = 300):
    done = run_launch(
        command, env=env or DETERMINISTIC_ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


# ---- generation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_deterministic_and_seeded(family, prepared, models, tmp_path):
    run = RunDir(prepared(family))
    again = RunDir(tmp_path / "run")
    summary = generate_stage(_recipe(family, again.root, models))
    assert summary["candidates"] == 5 * 3 and summary["shards"] == 3
    assert_same_candidates(run, again)
    latents = all_latents(run)
    assert not torch.equal(latents[(0, 0)], latents[(0, 1)])  # seeds differ, so the equality is not vacuous
    assert all(torch.isfinite(x).all() for x in latents.values())
    assert len(list(run.previews_dir.iterdir())) == 1
    negative = load_file(str(run.negative))
    assert (negative == {}) == (family == "flux")  # FLUX.1 samples with embedded guidance, no negative
    scores = read_parquet(run.scores_parquet)
    assert len(scores) == 15 and scores["total"].notna().all()
    assert read_parquet(run.pairs_parquet).shape[0] > 0


# ---- train, export, reload --------------------------------------------------------------------------------
def _denoiser_outputs(pipe, family: str) -> torch.Tensor:
    """The exported denoiser on fixed inputs, through the same adapter call the trainer uses."""
    from mpo.backbones import get_backbone_class

    cls = get_backbone_class(family)
    backbone = cls(pipe, "cpu")
    generator = torch.Generator().manual_seed(0)
    from mpo.schema import GenerateConfig

    shape = backbone.latent_shape(GenerateConfig(**cls.tiny_size))
    noisy = torch.randn(1, *shape, generator=generator)
    with torch.no_grad():
        embeds = backbone.encode_prompts(["a red car"])
        return backbone.predict(backbone.denoiser, noisy, torch.tensor([500]), embeds)


def _sample(pipe, family: str) -> torch.Tensor:
    from mpo.backbones import get_backbone_class

    size = get_backbone_class(family).tiny_size
    kwargs = {"num_inference_steps": 2, "output_type": "pt", "generator": torch.Generator().manual_seed(0)}
    out = pipe("a red car", **size, **kwargs)
    return out.frames if family == "wan" else out.images


@pytest.mark.parametrize(
    ("family", "finetune"),
    [
        *((f, "lora") for f in FAMILIES),
        ("wan", "full"),  # full weights of the image families: the same code path, slow tier
        *(pytest.param(f, "full", marks=pytest.mark.slow) for f in ("sd3", "flux")),
    ],
)
def test_train_export_and_reload_in_diffusers(family, finetune, prepared, models, tmp_path):
    run = copy_run(prepared(family), tmp_path / "run")
    extra = [
        *FINETUNE[finetune],
        "train.lr_schedule=constant",
        "train.warmup_steps=0",  # with warmup, the first step's learning rate is 0
        "train.max_steps=2",
        "train.batch_size=2",
        "train.checkpoint_every=1",
        "eval.every=1",
    ]
    recipe = _recipe(family, run, models, extra)
    summary = train_stage(recipe)
    assert summary["steps"] == 2 and summary["final loss"] == summary["final loss"]  # finite
    best = read_best(RunDir(run))
    assert best is not None and [s for s, _ in list_checkpoints(RunDir(run))][-1] == 2

    assert export_stage(recipe)["exported"] is True
    export = run / "export"
    pipe = DiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe, PIPELINES[family])
    sample = _sample(pipe, family)
    assert torch.isfinite(sample).all() and sample.min() >= 0 and sample.max() <= 1

    base = PIPELINES[family].from_pretrained(models / family)
    exported, untrained = _denoiser_outputs(pipe, family), _denoiser_outputs(base, family)
    assert (exported - untrained).abs().max() > 1e-5  # training changed the exported model
    weights = checkpoint_tensors(run / "checkpoints" / best["checkpoint"])
    if finetune == "full":
        state = pipe.transformer.state_dict()
        assert weights and all(torch.equal(state[k.split("/", 1)[1]], v) for k, v in weights.items())
        assert not (export / "lora").exists()
    else:
        assert weights and all(k.startswith("lora/transformer.") and ".lora" in k for k in weights)
        base.load_lora_weights(export / "lora")  # what a user of the adapter does
        torch.testing.assert_close(_denoiser_outputs(base, family), exported, rtol=0, atol=1e-5)
        assert torch.isfinite(_sample(base, family)).all()
    card = (export / "README.md").read_text()
    assert ("text-to-video" if family == "wan" else "text-to-image") in card and "| total |" in card
    header = ModelCard.load(export / "README.md").data  # beside model_index.json, as the hub reads it
    assert (
        family in header.tags
        and header.library_name == "diffusers"
        and (export / "model_index.json").exists()
    )


def test_trainer_draws_timesteps_from_the_recipe_density(prepared, models, tmp_path, monkeypatch):
    """train.timestep_sampling reaches the data stream: logit-normal(1.5, 0.1) puts every index near
    sigmoid(1.5) = 0.82 of the schedule (uniform would spread them over all 1000)."""
    run = copy_run(prepared("sd3"), tmp_path / "run")
    seen: list[int] = []
    original = mpo.train.dpo_step

    def recording(t, batch):
        seen.extend(batch["timestep"].tolist())
        return original(t, batch)

    monkeypatch.setattr(mpo.train, "dpo_step", recording)
    density = ["train.timestep_sampling=logit_normal", "train.logit_mean=1.5", "train.logit_std=0.1"]
    train_stage(
        _recipe(
            "sd3",
            run,
            models,
            [*density, "train.max_steps=4", "train.batch_size=2", "train.checkpoint_every=4"],
        )
    )
    assert len(seen) == 8 and all(760 <= t <= 870 for t in seen), seen  # sigmoid(1.5 +- 3 x 0.1) x 1000


def test_resume_check_covers_the_expert_and_the_timestep_density(prepared, models, tmp_path):
    """A resume with another expert, timestep density or density parameter would train on another
    stream: the settings a checkpoint is checked against differ for each."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    run = prepared("sd3")
    acc = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)

    def settings(*extra):
        return mpo.train.run_settings(_recipe("sd3", run, models, extra), acc, RunDir(run))

    base = settings("train.timestep_sampling=logit_normal")
    assert "expert" in base["model"]  # which Wan 2.2 expert trains (None for one transformer)
    for changed in (
        "train.timestep_sampling=mode",
        "train.logit_mean=0.5",
        "train.logit_std=0.5",
        "train.loss_weighting=sigma_sqrt",
    ):
        assert settings("train.timestep_sampling=logit_normal", changed)["train"] != base["train"], changed


# FLUX.1 (embedded guidance, packed latents, the resolution's shift) in the default tier; the others slow.
STEP_ZERO_FAMILIES = [pytest.param(f, marks=pytest.mark.slow) if f != "flux" else f for f in FAMILIES]


@pytest.mark.parametrize("family", STEP_ZERO_FAMILIES)
def test_step_zero_agreement_and_the_precomputed_reference_gives_the_live_run(
    family, prepared, models, tmp_path, monkeypatch
):
    """At step 0 the policy and the reference are one function for a flow family too (loss log 2 and
    margin 0 exactly, at beta 5000 where any difference shows), with the family's density and loss
    weighting; a precomputed reference gives the live run's every logged value."""
    extra = [
        *FINETUNE["lora"],
        "train.beta=5000",
        "train.batch_size=2",
        "train.max_steps=2",
        "train.checkpoint_every=2",
        "tracking.log_every=1",
        "train.timestep_sampling=logit_normal",
        "train.loss_weighting=sigma_sqrt",
        "train.warmup_steps=0",  # the first update moves the policy
    ]
    loop, histories = mpo.train.train_loop, {}
    for reference in ("live", "precomputed"):
        kept = []

        def keep(t, kept=kept):
            kept.append(t)
            return loop(t)

        monkeypatch.setattr(mpo.train, "train_loop", keep)
        run = copy_run(prepared(family), tmp_path / reference)
        train_stage(_recipe(family, run, models, [*extra, f"train.reference={reference}"]))
        histories[reference] = kept[0].history
    first = histories["live"][0]
    assert first["train/reward_margin"] == 0.0, first
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-7), first
    assert first["train/model_diff"] == first["train/ref_diff"]
    assert [h["step"] for h in histories["live"]] == [1, 2]
    assert histories["live"] == histories["precomputed"]
    assert (
        histories["live"][-1]["train/reward_margin"] != 0.0
    )  # the policy moved: the equality is not vacuous


# ---- mpo run ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", RUN_FAMILIES)
def test_mpo_run_tiny_recipe_end_to_end_then_rerun_skips_everything(family, models, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        f"model.path={models / family}",
        "prompts.limit=6",
        "generate.num_candidates=3",
        "generate.num_inference_steps=2",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "eval.every=2",
        "eval.num_prompts=1",
        "eval.samples_per_prompt=1",
        "tracking.tracker=none",
    ]
    assert main(["run", str(RECIPES[family]), *overrides]) == 0
    assert "held-out reward: step 0 -> step" in capsys.readouterr().out
    assert read_parquet(out / "eval.parquet")["step"].tolist() == [0, 2]
    pipe = DiffusionPipeline.from_pretrained(out / "export")
    assert isinstance(pipe, PIPELINES[family]) and torch.isfinite(_sample(pipe, family)).all()
    reports = run_all(load_recipe(str(RECIPES[family]), overrides))
    assert [r.did_work for r in reports] == [False] * 5, [(r.name, r.did_work) for r in reports]


# ---- 1 vs 2 processes, kill and resume (slow) ----------------------------------------------------------------
def _launch(config: str) -> list[str]:
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / config)),
        *("--main_process_port", str(free_port())),
    ]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_match_one(family, models, tmp_path):
    """generate, score, select and train under 2 DDP processes give the 1-process candidates and
    scores bit for bit, the same pairs, and the 1-process weights (same pairs, noise and averaged
    gradient)."""
    one, two = RunDir(tmp_path / "one"), RunDir(tmp_path / "two")
    extra = [*FINETUNE["lora"], "train.max_steps=2", "train.checkpoint_every=2", "train.lr_schedule=constant"]
    stages = [
        str(ROOT / "tests" / "scripts" / "run_stage.py"),
        "generate,score,select,train",
        str(RECIPES[family]),
    ]
    _run([sys.executable, *stages, *_overrides(family, one.root, models, [*extra, "train.batch_size=2"])])
    cpu = {**DETERMINISTIC_ENV, "ACCELERATE_USE_CPU": "true"}
    done = _run(
        [
            *_launch("cpu_ddp.yaml"),
            *stages,
            *_overrides(family, two.root, models, [*extra, "train.batch_size=1"]),
        ],
        cpu,
    )
    assert "rank 0 of 2" in done.stderr
    assert_same_candidates(one, two)
    assert read_parquet(one.scores_parquet).equals(read_parquet(two.scores_parquet))
    assert read_parquet(one.pairs_parquet).equals(read_parquet(two.pairs_parquet))
    a = checkpoint_tensors(one.root / "checkpoints" / "step-2")
    b = checkpoint_tensors(two.root / "checkpoints" / "step-2")
    assert a.keys() == b.keys() and a
    moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)  # B starts at zero
    apart = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-4 and apart < 0.05 * moved, (
        f"1 vs 2 processes differ by {apart}; training moved {moved}"
    )


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_killed_generate_and_train_resume_to_the_uninterrupted_result(family, models, tmp_path, monkeypatch):
    # generate, SIGKILLed after its first shard, then resumed: the files of an uninterrupted run.
    stage = [
        sys.executable,
        str(ROOT / "tests" / "scripts" / "run_stage.py"),
        "generate",
        str(RECIPES[family]),
    ]
    straight, resumed = RunDir(tmp_path / "straight"), RunDir(tmp_path / "resumed")
    _run([*stage, *_overrides(family, straight.root, models)])
    command = [*stage, *_overrides(family, resumed.root, models)]
    proc = subprocess.Popen(
        [*command, "--sleep-after-shard", "120"],
        env=DETERMINISTIC_ENV,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
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
    _run(command)
    assert_same_candidates(straight, resumed)

    # train, killed right after its step-2 checkpoint, then resumed: the uninterrupted weights.
    extra = [*FINETUNE["lora"], "model.lora_dropout=0.1", "train.max_steps=4", "train.batch_size=2",
             "train.checkpoint_every=2", "train.lr_schedule=linear", "train.warmup_steps=1"]  # fmt: skip
    for run in (straight, resumed):
        score_stage(_recipe(family, run.root, models))
        select_stage(_recipe(family, run.root, models))
    train_stage(_recipe(family, straight.root, models, extra))
    original = mpo.train.checkpoint

    def checkpoint_then_die(t):
        original(t)
        if t.progress.step == 2:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(mpo.train, "checkpoint", checkpoint_then_die)
        with pytest.raises(Killed):
            train_stage(_recipe(family, resumed.root, models, extra))
    summary = train_stage(_recipe(family, resumed.root, models, extra))
    assert summary["resumed from step"] == 2 and summary["steps trained now"] == 2
    a = checkpoint_tensors(straight.root / "checkpoints" / "step-4")
    b = checkpoint_tensors(resumed.root / "checkpoints" / "step-4")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


# ---- Wan 2.2 A14B: two experts, one trained per run ------------------------------------------------------
@pytest.fixture(scope="module")
def two_experts(models, tmp_path_factory) -> Path:
    """The tiny Wan made two-expert the way Wan 2.2 A14B is: transformer (high noise) and transformer_2
    (low noise, here a perturbed copy so that the two differ) switched at boundary_ratio 0.875."""
    import copy

    from mpo.backbones import load_backbone
    from mpo.schema import ModelConfig

    base = load_backbone(ModelConfig(family="wan", path=str(models / "wan"), tiny=True)).pipeline()
    low = copy.deepcopy(base.transformer)
    with torch.no_grad():
        for param in low.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    pipe = WanPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
        transformer=base.transformer, transformer_2=low, boundary_ratio=0.875,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("wan22") / "model"
    pipe.save_pretrained(path)
    return path


def _expert_recipe(path: Path, out: Path, expert: str | None, extra=()):
    expert_key = [] if expert is None else [f"model.expert={expert}"]
    return load_recipe(
        str(RECIPES["wan"]),
        [*SMALL, f"output_dir={out}", f"model.path={path}", "model.tiny=false", *expert_key, *extra],
    )


def test_wan_two_experts_need_a_named_expert_and_sample_with_both(two_experts, tmp_path):
    from mpo.backbones import load_backbone
    from mpo.config import RecipeError

    with pytest.raises(ValueError, match=r"two-expert Wan 2\.2 .*set model\.expert"):
        load_backbone(_expert_recipe(two_experts, tmp_path / "a", None).model)
    with pytest.raises(RecipeError, match=r"model\.expert='middle'.*'high_noise', 'low_noise'"):
        _expert_recipe(two_experts, tmp_path / "b", "middle")
    with pytest.raises(RecipeError, match=r"model\.expert='high_noise'.*one denoiser"):
        load_recipe(str(RECIPES["sd3"]), ["model.expert=high_noise"])

    high = load_backbone(_expert_recipe(two_experts, tmp_path / "c", "high_noise").model)
    low = load_backbone(_expert_recipe(two_experts, tmp_path / "d", "low_noise").model)
    assert high.denoiser is high.pipeline().transformer and low.denoiser is low.pipeline().transformer_2
    train = load_recipe(str(RECIPES["wan"])).train
    a, b = high.timestep_sampler(train), low.timestep_sampler(train)
    assert (a.high, b.low) == (1000, 0) and a.low == b.high  # the two sides of the boundary
    assert (
        high.schedule.model_timesteps(torch.tensor([a.low - 1, a.low])).tolist()[0]
        < 875
        <= float(high.schedule.model_timesteps(torch.tensor([a.low])))
    )
    calls = {"transformer": 0, "transformer_2": 0}
    pipe = high.pipeline()
    hooks = [
        getattr(pipe, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
        for name in calls
    ]
    try:
        gen = load_recipe(str(RECIPES["wan"]), ["generate.num_inference_steps=8"]).generate
        high.sample(
            high.encode_prompts(["a cat"]),
            high.encode_negative(),
            torch.randn(1, *high.latent_shape(gen)),
            gen,
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0


@pytest.mark.parametrize("finetune", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_wan_low_noise_expert_trains_alone_and_exports_in_the_diffusers_layout(
    two_experts, finetune, tmp_path
):
    out = tmp_path / "run"
    extra = [*FINETUNE[finetune], "train.lr_schedule=constant", "train.warmup_steps=0", "train.max_steps=2",
             "train.batch_size=2", "train.checkpoint_every=2", "export.which=last"]  # fmt: skip
    if finetune == "lora":
        extra.append("export.lora_formats=[diffusers,comfyui]")
    recipe = _expert_recipe(two_experts, out, "low_noise", extra)
    generate_stage(recipe)
    score_stage(recipe)
    select_stage(recipe)
    train_stage(recipe)
    export_stage(recipe)
    base = WanPipeline.from_pretrained(two_experts)
    exported = WanPipeline.from_pretrained(out / "export")
    state = lambda module: module.state_dict()  # noqa: E731
    untouched = state(base.transformer)
    assert all(
        torch.equal(v, state(exported.transformer)[k]) for k, v in untouched.items()
    )  # high: as it was
    moved = max(
        (v - state(base.transformer_2)[k]).abs().max().item()
        for k, v in state(exported.transformer_2).items()
    )
    assert moved > 1e-5  # the low-noise expert trained
    if finetune == "lora":
        keys = list(load_file(str(out / "export" / "lora" / "pytorch_lora_weights.safetensors")))
        assert keys and all(k.startswith("transformer.") for k in keys)  # diffusers' Wan 2.2 layout
        base.load_lora_weights(out / "export" / "lora", load_into_transformer_2=True)
        x = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            merged = exported.transformer_2(x, torch.tensor([100.0]), text, return_dict=False)[0]
            adapted = base.transformer_2(x, torch.tensor([100.0]), text, return_dict=False)[0]
        torch.testing.assert_close(adapted, merged, rtol=0, atol=1e-5)
        card = (out / "export" / "README.md").read_text()
        assert "load_into_transformer_2=True" in card and "(original Wan key layout)" in card
        # The original-Wan-layout file of the same expert, through diffusers' reader of that layout.
        comfyui = WanPipeline.from_pretrained(two_experts)
        comfyui.load_lora_weights(
            out / "export" / "lora" / "pytorch_lora_weights_comfyui.safetensors", load_into_transformer_2=True
        )
        with torch.no_grad():
            from_comfyui = comfyui.transformer_2(x, torch.tensor([100.0]), text, return_dict=False)[0]
        torch.testing.assert_close(from_comfyui, merged, rtol=0, atol=1e-5)
