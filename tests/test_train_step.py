"""What one training step computes, on the tiny SDXL: policy and reference agree at step 0 in every
precision and fine-tuning mode; the reference stays the base model afterwards; winner and loser share
noise and timestep; the recipe's loss variants and timestep weighting reach the loss; the step makes
no host sync and no per-step module walks; bf16 weights still train; targets stay float32."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import default_collate

import mpo.train
import mpo.weights
from mpo.backbones.registry import load_backbone
from mpo.loss import min_snr_weight, per_sample_mse
from mpo.store import RunDir
from mpo.train import train_stage
from mpo.train_data import PairDataset, load_train_pairs, timestep_bounds
from tests.scripts.tiny_runs import COGVIDEOX, COGVIDEOX_SMALL, copy_run, recipe_for

FINETUNE = {
    "full": ["model.finetune=full", "train.learning_rate=1e-3"],
    "lora": ["model.finetune=lora", "model.lora_rank=4", "train.learning_rate=1e-2"],
}
PRECISION = {
    "no": ["train.mixed_precision=no"],
    "bf16": ["train.mixed_precision=bf16"],
    "fp16": ["train.mixed_precision=fp16"],
}
LOW = {"bf16": "bfloat16", "fp16": "float16"}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change once set: each
    test starts (and leaves) without one, so that its recipe's precision applies."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class Recorded:
    """A training run's trainer (kept when the loop starts) and the inputs of every loss call."""

    def __init__(self, monkeypatch) -> None:
        self.trainer = None
        self.calls: list[dict] = []
        loop, loss = mpo.train.train_loop, mpo.train.dpo_loss_from_errors

        def keep(t):
            self.trainer = t
            return loop(t)

        def record(mse_w, mse_l, ref_w, ref_l, beta, weighting=None, **kwargs):
            out = loss(mse_w, mse_l, ref_w, ref_l, beta, weighting, **kwargs)
            detached = [x.detach().clone() for x in (mse_w, mse_l, ref_w, ref_l)]
            self.calls.append({"errors": detached, "weighting": weighting, "out": out.scalars(), **kwargs})
            return out

        monkeypatch.setattr(mpo.train, "train_loop", keep)
        monkeypatch.setattr(mpo.train, "dpo_loss_from_errors", record)

    @property
    def history(self) -> list[dict]:
        return self.trainer.history


def _train(run: Path, models: Path, extra: list[str], monkeypatch) -> Recorded:
    with monkeypatch.context() as m:
        recorded = Recorded(m)
        train_stage(recipe_for(run, models, extra=["eval.every=0", "train.checkpoint_every=0", *extra]))
    return recorded


def _precision_args(finetune: str, precision: str) -> list[str]:
    # LoRA's frozen base is stored in the compute dtype under mixed precision (the recipe check).
    dtype = LOW.get(precision) if finetune == "lora" else None
    return [*PRECISION[precision], *([f"model.dtype={dtype}"] if dtype else [])]


def _batch(run: Path, recipe, positions: list[int]) -> dict:
    """The trainer's micro-batch of these stream positions, rebuilt from the data stream."""
    dataset = PairDataset(RunDir(run), load_train_pairs(RunDir(run)), recipe.train.seed, (0, 1000))
    return default_collate([dataset[p] for p in positions])


def _base_errors(models: Path, recipe, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference errors computed independently, by a freshly loaded base model."""
    backbone = load_backbone(recipe.model, "cpu")
    latents = torch.cat([batch["latents_w"], batch["latents_l"]])
    noise = torch.cat([batch["noise"], batch["noise"]])
    timesteps = torch.cat([batch["timestep"], batch["timestep"]])
    embeds = {k: torch.cat([v, v]) for k, v in batch["embeds"].items()}
    with torch.no_grad():
        noisy = backbone.add_noise(latents, noise, timesteps)
        pred = backbone.predict(backbone.denoiser, noisy, timesteps, embeds)
    return per_sample_mse(pred, backbone.target(latents, noise, timesteps)).chunk(2)


def _step_zero_case(finetune: str, precision: str):
    marks = []
    if precision == "fp16":
        marks = [
            pytest.mark.gpu,
            pytest.mark.skipif(
                not torch.cuda.is_available(),
                reason="accelerate turns fp16 autocast and its GradScaler off on a CPU device: the "
                "combination only exists on a GPU",
            ),
        ]
    return pytest.param(finetune, precision, marks=marks, id=f"{finetune}-{precision}")


@pytest.mark.parametrize(
    ("finetune", "precision"),
    [_step_zero_case(f, p) for f in ("lora", "full") for p in ("no", "bf16", "fp16")],
)
def test_policy_and_reference_agree_at_step_zero_and_the_reference_stays_the_base(
    prepared, models, tmp_path, monkeypatch, finetune, precision
):
    """At step 0 the policy and the reference are one function: loss log 2, margin 0 exactly, at the
    paper's beta 5000 where any difference between them shows. After an update the reference errors
    are still those of the untouched base model, and the policy's are not."""
    run = copy_run(prepared, tmp_path / "run")
    extra = [*FINETUNE[finetune], *_precision_args(finetune, precision), "train.beta=5000"]
    extra += ["train.batch_size=2", "train.max_steps=2", "tracking.log_every=1"]
    recorded = _train(run, models, extra, monkeypatch)
    first = recorded.history[0]
    assert first["train/reward_margin"] == 0.0, first
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-7), first
    assert first["train/model_diff"] == first["train/ref_diff"]
    if precision != "no":
        return  # the independent recomputation below runs in float32
    recipe = recipe_for(run, models, extra=extra)
    ref_w, ref_l = _base_errors(models, recipe, _batch(run, recipe, [2, 3]))
    mse_w, mse_l, got_w, got_l = recorded.calls[1]["errors"]  # step 2, after one update
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_l, ref_l, rtol=1e-5, atol=1e-7)
    moved = (torch.cat([mse_w, mse_l]) - torch.cat([ref_w, ref_l])).abs().max()
    assert moved > 1e-4 * ref_w.abs().max(), "the policy did not move: the comparison above is vacuous"


def test_winner_and_loser_share_noise_and_timestep(prepared, models, tmp_path, monkeypatch):
    """Every denoiser call of a micro-step (policy and reference) sees one input; in it the loser has
    the winner's timestep and noise, and the target is that noise (epsilon)."""
    run = copy_run(prepared, tmp_path / "run")
    from mpo.backbones.sdxl import SDXLBackbone

    calls, targets = [], []
    original_predict = SDXLBackbone.predict
    original_inputs = mpo.train.step_inputs

    def predict(self, denoiser, noisy, timesteps, embeds):
        calls.append((noisy.detach().clone(), timesteps.clone(), self.schedule.scheduler.alphas_cumprod))
        return original_predict(self, denoiser, noisy, timesteps, embeds)

    def step_inputs(t, batch):
        inputs = original_inputs(t, batch)
        targets.append((batch, inputs.target.clone()))
        return inputs

    extra = [*FINETUNE["lora"], "train.batch_size=2", "train.max_steps=2"]
    with monkeypatch.context() as m:
        m.setattr(SDXLBackbone, "predict", predict)
        m.setattr(mpo.train, "step_inputs", step_inputs)
        train_stage(recipe_for(run, models, extra=["eval.every=0", *extra]))
    assert len(targets) == 2 and len(calls) == 4  # two micro-steps: reference and policy in each
    seen_timesteps = []
    for step, (batch, target) in enumerate(targets):
        (noisy, timesteps, alphas), (noisy_2, timesteps_2, _) = calls[2 * step], calls[2 * step + 1]
        assert torch.equal(noisy, noisy_2) and torch.equal(timesteps, timesteps_2)
        winners, losers = timesteps.chunk(2)
        assert torch.equal(winners, losers), f"step {step + 1}: timesteps {timesteps.tolist()}"
        seen_timesteps += winners.tolist()
        x0 = torch.cat([batch["latents_w"], batch["latents_l"]]).float()
        abar = alphas[timesteps].float().view(-1, 1, 1, 1)
        noise = (noisy.float() - abar.sqrt() * x0) / (1 - abar).sqrt()
        noise_w, noise_l = noise.chunk(2)
        torch.testing.assert_close(noise_l, noise_w, rtol=0, atol=1e-3)
        torch.testing.assert_close(target, noise, rtol=0, atol=1e-3)
    assert len(set(seen_timesteps)) > 1, "every pair drew the same timestep: the check is vacuous"


@pytest.mark.parametrize(("loss_type", "at_zero"), [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 0.25)])
def test_recipe_loss_variants_and_min_snr_weighting_reach_the_loss(
    prepared, models, tmp_path, monkeypatch, loss_type, at_zero
):
    run = copy_run(prepared, tmp_path / "run")
    extra = [*FINETUNE["full"], "train.batch_size=2", "train.max_steps=1", f"train.loss_type={loss_type}"]
    extra += ["train.sft_weight=0.5", "train.loss_weighting=min_snr", "train.snr_gamma=0.5"]
    recorded = _train(run, models, extra, monkeypatch)
    (call,) = recorded.calls
    assert call["loss_type"] == loss_type and call["sft_weight"] == 0.5
    recipe = recipe_for(run, models, extra=extra)
    batch = _batch(run, recipe, [0, 1])
    backbone = recorded.trainer.backbone
    expected = min_snr_weight(backbone.schedule.scheduler.alphas_cumprod, batch["timestep"], 0.5, "epsilon")
    torch.testing.assert_close(call["weighting"], expected, rtol=0, atol=0)
    assert (expected < 0.99).any(), f"timesteps {batch['timestep'].tolist()} give weights of 1 only"
    weighted_mse_w = (expected.double() * call["errors"][0].double()).mean()
    logged = recorded.history[0]
    assert logged["train/loss"] == pytest.approx(at_zero + 0.5 * float(weighted_mse_w), rel=1e-6)
    assert logged["train/mse_w"] == pytest.approx(float(weighted_mse_w), rel=1e-6)


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (``.item()``, ``int()``, ``bool()``, ``.tolist()``
    all dispatch ``aten._local_scalar_dense``): on a GPU each is a sync."""

    def __init__(self) -> None:
        super().__init__()
        self.reads, self.paused = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            import traceback

            self.reads.append("".join(traceback.format_stack(limit=12)[:-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("finetune", "reference"),
    [("lora", "live"), ("full", "precomputed")],
    ids=["lora-live", "full-precomputed"],
)
def test_micro_steps_read_nothing_on_the_host_and_walk_no_modules(
    prepared, models, tmp_path, monkeypatch, finetune, reference
):
    """Between log steps, a step with accumulation reads no tensor value on the host, never unwraps
    the model and never calls the module-walking adapter toggles: LoRA with the adapters-off
    reference, and full fine-tuning reading the stored reference errors (computed in setup)."""
    run = copy_run(prepared, tmp_path / "run")
    mode = HostReads()
    walks: list[str] = []
    original_loader = mpo.train.make_dataloader

    def paused(function):
        def wrapper(*args, **kwargs):
            mode.paused += 1
            try:
                return function(*args, **kwargs)
            finally:
                mode.paused -= 1

        return wrapper

    class Loader:  # data loading reads its own host tensors (pair indices): not the step's business
        def __init__(self, loader) -> None:
            self.inner = iter(loader)

        def __iter__(self):
            return self

        __next__ = paused(lambda self: next(self.inner))

    def loader(*args, **kwargs):
        return Loader(original_loader(*args, **kwargs))

    def forbidden(name, then=None):
        def call(*args, **kwargs):
            if not mode.paused:
                walks.append(name)
            return then(*args, **kwargs) if then is not None else None

        return call

    extra = [*FINETUNE[finetune], f"train.reference={reference}", "train.batch_size=2"]
    extra += ["train.gradient_accumulation_steps=2", "train.max_steps=3", "tracking.log_every=3"]
    extra += ["eval.every=0", "train.checkpoint_every=0"]
    recipe = recipe_for(run, models, extra=extra)
    with monkeypatch.context() as m:
        m.setattr(mpo.train, "make_dataloader", loader)
        for name in ("log_train", "run_eval", "checkpoint", "setup"):
            m.setattr(mpo.train, name, paused(getattr(mpo.train, name)))
        from diffusers.loaders.peft import PeftAdapterMixin

        for name in ("disable_adapters", "enable_adapters"):
            m.setattr(PeftAdapterMixin, name, forbidden(name))
        started = [False]
        original_loop = mpo.train.train_loop

        def loop(t):
            m.setattr(t.acc, "unwrap_model", forbidden("unwrap_model", t.acc.unwrap_model))
            started[0] = True
            with mode:
                return original_loop(t)

        m.setattr(mpo.train, "train_loop", loop)
        summary = train_stage(recipe)
    assert started[0] and summary["steps trained now"] == 3
    assert not walks, f"called per micro-step: {sorted(set(walks))}"
    assert not mode.reads, (
        f"{len(mode.reads)} host read(s) in the micro-steps, the first from:\n{mode.reads[0]}"
    )


def test_training_throughput_leaves_out_eval_and_checkpoint_time(prepared, models, tmp_path, monkeypatch):
    import time

    run = copy_run(prepared, tmp_path / "run")
    slow_eval = mpo.train.run_eval

    def run_eval(t, step):
        time.sleep(0.5)
        slow_eval(t, step)

    monkeypatch.setattr(mpo.train, "run_eval", run_eval)
    extra = ["train.batch_size=2", "train.max_steps=2", "eval.every=1", "train.checkpoint_every=0"]
    summary = train_stage(recipe_for(run, models, extra=extra))
    aside = summary["seconds in eval and checkpoints"]
    assert aside >= 1.0  # evals after steps 1 and 2 (the one before step 1 is not in the loop's time)
    # The summary rounds seconds to 0.01 (the rates use the exact times): compare the times the rates
    # imply, to that rounding. Counting the eval in the training rate would be off by >= 1 s.
    training_seconds = 4 / summary["pairs / s (training steps)"]
    assert abs(training_seconds - (summary["seconds"] - aside)) <= 0.011
    assert abs(4 / summary["pairs / s (with eval and checkpoints)"] - summary["seconds"]) <= 0.006


def test_bf16_weights_without_mixed_precision_still_train(prepared, models, tmp_path, monkeypatch):
    """model.dtype=bfloat16 with train.mixed_precision=no: the trained weights are float32 masters,
    so AdamW's steps at the paper's SDXL lr (1.28e-6) change nearly all of them (in bf16 weights 1.5%
    changed)."""
    run = copy_run(prepared, tmp_path / "run")
    extra = ["model.finetune=full", "model.dtype=bfloat16", "train.mixed_precision=no"]
    extra += ["train.learning_rate=1.28e-6", "train.batch_size=2", "train.max_steps=2"]
    with monkeypatch.context() as m:
        initial = {}
        original = mpo.train.setup_optimizer

        def keep(recipe, denoiser, world_size, **kwargs):
            initial.update({n: (p, p.detach().clone()) for n, p in denoiser.named_parameters()})
            return original(recipe, denoiser, world_size, **kwargs)

        m.setattr(mpo.train, "setup_optimizer", keep)
        train_stage(recipe_for(run, models, extra=["eval.every=0", "train.checkpoint_every=0", *extra]))
    assert {p.dtype for p, _ in initial.values()} == {torch.float32}
    changed = sum(int((p.detach() != before).sum()) for p, before in initial.values())
    total = sum(before.numel() for _, before in initial.values())
    assert changed / total > 0.99, f"only {changed / total:.2%} of the weights changed"


def test_v_target_is_float32_when_the_denoiser_runs_in_bf16(tmp_path_factory):
    """Under DeepSpeed bf16 the denoiser's inputs are bf16, but the v-target is computed from float32
    latents and noise and stays float32 (rounded to bf16 it was off by up to 8e-3)."""
    from types import SimpleNamespace

    from tests.scripts.tiny_runs import shared_models

    models = shared_models(tmp_path_factory)
    recipe = recipe_for(tmp_path_factory.mktemp("v"), models, COGVIDEOX, COGVIDEOX_SMALL)
    backbone = load_backbone(recipe.model, "cpu")
    gen = torch.Generator().manual_seed(0)
    shape = (2, *backbone.latent_shape(recipe.generate))
    latents_w, latents_l = (3 * torch.randn(shape, generator=gen) for _ in range(2))
    noise = torch.randn(shape, generator=gen)
    timestep = torch.tensor([400, 999])
    batch = {
        "latents_w": latents_w,
        "latents_l": latents_l,
        "noise": noise,
        "timestep": timestep,
        "embeds": {"prompt_embeds": torch.zeros(2, 4, 8)},
    }
    t = SimpleNamespace(
        acc=SimpleNamespace(device=torch.device("cpu")),
        settings=SimpleNamespace(loss_weighting="none", snr_gamma=5.0),
        backbone=backbone,
        input_dtype=torch.bfloat16,
    )
    inputs = mpo.train.step_inputs(t, batch)
    assert inputs.noisy.dtype == torch.bfloat16 and inputs.target.dtype == torch.float32
    abar = backbone.schedule.scheduler.alphas_cumprod.double()[torch.cat([timestep, timestep])]
    abar = abar.view(-1, 1, 1, 1, 1)
    x0 = torch.cat([latents_w, latents_l]).double()
    eps = torch.cat([noise, noise]).double()
    expected = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    assert (inputs.target.double() - expected).abs().max() < 1e-5


def test_the_frozen_reference_takes_the_dtypes_of_a_policy_prepared_in_bf16(models, tmp_path, monkeypatch):
    """DeepSpeed's bf16 engine casts the module it prepares to bf16, after the float32 reference copy
    was made: the copy must follow, or the two compute different functions (or the copy cannot take
    bf16 inputs at all). Here one CPU process's ``prepare`` is followed by the engine's cast."""
    recipe = recipe_for(tmp_path, models, extra=[*FINETUNE["full"], "train.mixed_precision=bf16"])
    acc = mpo.train.setup_accelerator(recipe)
    prepare = acc.prepare

    def prepare_then_cast(*objects):
        prepared = prepare(*objects)
        prepared[0].to(torch.bfloat16)  # what the bf16 engine does to the module it wraps
        return prepared

    monkeypatch.setattr(acc, "prepare", prepare_then_cast)
    t = mpo.train.prepare_step(recipe, acc)
    policy, frozen = t.policy, t.reference.module
    assert frozen is not policy

    def dtypes(module):
        return {n: x.dtype for n, x in [*module.named_parameters(), *module.named_buffers()]}

    assert dtypes(frozen) == dtypes(policy) and t.input_dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=gen).to(t.input_dtype)
    timesteps = torch.tensor([10, 500])
    embeds = t.backbone.encode_prompts(["a red cat", "a dark forest"])
    with torch.no_grad(), acc.autocast():
        out = [t.backbone.predict(m, noisy, timesteps, embeds) for m in (policy.eval(), frozen)]
    assert torch.equal(out[0], out[1])


def test_lora_switch_gives_the_base_output_and_always_turns_back_on(models, tmp_path):
    from mpo.weights import LoraSwitch, add_lora

    recipe = recipe_for(tmp_path, models, extra=["model.finetune=lora", "model.lora_rank=4"])
    backbone = load_backbone(recipe.model, "cpu")
    base_model = load_backbone(recipe.model, "cpu").denoiser
    denoiser = backbone.denoiser
    add_lora(denoiser, recipe.model, backbone.lora_target_modules)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: its output differs from the base's
    grads = {n: p.requires_grad for n, p in denoiser.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 500])
    embeds = backbone.encode_prompts(["a red cat", "a dark forest"])

    def out(module):
        with torch.no_grad():
            return backbone.predict(module, noisy, timesteps, embeds)

    adapted, base = out(denoiser), out(base_model)
    assert (adapted - base).abs().max() > 1e-3
    switch = LoraSwitch(denoiser)
    with switch.off():
        torch.testing.assert_close(out(denoiser), base, rtol=0, atol=0)
    torch.testing.assert_close(out(denoiser), adapted, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"), switch.off():
        raise RuntimeError("boom")
    torch.testing.assert_close(out(denoiser), adapted, rtol=0, atol=0)
    assert grads == {n: p.requires_grad for n, p in denoiser.named_parameters()}


def test_min_snr_weight_on_the_sdxl_schedule(models, tmp_path):
    """min-SNR-gamma on the tiny SDXL's own DDPM schedule against the formula, in float64."""
    backbone = load_backbone(recipe_for(tmp_path, models).model, "cpu")
    low, high = timestep_bounds([0.0, 1.0], backbone.num_train_timesteps)
    timesteps = torch.arange(low, high)
    got = backbone.loss_weight(timesteps, "min_snr", 5.0)
    abar = backbone.schedule.scheduler.alphas_cumprod.double()[timesteps]
    snr = abar / (1 - abar)
    expected = [min(float(s), 5.0) / float(s) for s in snr]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert backbone.loss_weight(timesteps, "none", 5.0) is None


LAUNCHES = ("ddp", "zero2", "zero3")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("launch", LAUNCHES)
def test_policy_and_reference_agree_at_step_zero_on_two_processes(
    prepared, models, tmp_path, launch, finetune, precision
):
    """The step-0 identity under DDP, ZeRO-2 and ZeRO-3 with 2 processes (DeepSpeed bf16 holds the
    module in bf16 itself: the reference follows it)."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from tests.scripts.tiny_runs import ROOT, SDXL, SDXL_SMALL

    config = ROOT / "launch" / ("cpu_ddp.yaml" if launch == "ddp" else "cpu_deepspeed_zero2.yaml")
    if launch == "zero3":
        text = config.read_text().replace(
            "launch/deepspeed/zero2.json", str(ROOT / "launch/deepspeed/zero3.json")
        )
        config = tmp_path / "zero3.yaml"
        config.write_text(text)
    run = copy_run(prepared, tmp_path / "run")
    overrides = [*SDXL_SMALL, f"output_dir={run}", f"model.path={models / 'sdxl'}", "eval.num_prompts=2"]
    overrides += [*FINETUNE[finetune], *_precision_args(finetune, precision), "train.beta=5000"]
    overrides += ["train.batch_size=1", "train.max_steps=1", "train.checkpoint_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)  # with it, DeepSpeed is dropped
    if launch == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate's multi-GPU launcher, on the CPU
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(port), str(ROOT / "tests" / "scripts" / "train_run.py"), str(SDXL), *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((run / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    expected = "MULTI_CPU" if launch == "ddp" else "DEEPSPEED"
    assert [r["distributed_type"] for r in ranks] == [expected] * 2 and ranks[0]["num_processes"] == 2
    for rank in ranks:
        first = rank["history"][0]
        assert first["train/reward_margin"] == 0.0, first
        assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-7), first
