"""Flow-DPO on each flow-matching family's own tensors, against an independent float64 computation.

The trainer's step (:func:`mpo.train.dpo_step`: the backbone's forward process, velocity target and
denoiser call, the LoRA reference with adapters disabled, :func:`mpo.loss.diffusion_dpo_loss`) runs on
real candidate latents sampled by the tiny model, with a policy whose LoRA adapters are perturbed so
that it differs from the reference. The same objective is then computed by hand in float64 from its
definition, per pair::

    sigma   = shift s / (1 + (shift - 1) s),  s = (k + 1) / 1000   (shift from scheduler_config.json)
    x_t     = (1 - sigma) x0 + sigma eps,     v = eps - x0
    err     = mean((f(x_t, 1000 sigma) - v)^2)          for policy and reference, winner and loser
    loss    = -log sigmoid(-beta / 2 * ((err_w - ref_w) - (err_l - ref_l)))

with the denoiser evaluated in float64 on a float64 copy. Loss, logit and gradients must agree.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from mpo.backbones import load_backbone
from mpo.reference import LiveReference
from mpo.schema import GenerateConfig, ModelConfig
from mpo.train import dpo_step
from mpo.weights import LoraSwitch, add_lora
from tests.scripts.tiny_runs import shared_models

FAMILIES = ("wan", "sd3", "flux")
# Chosen with the LoRA perturbation below so that the logits are O(1) with both signs (no saturation).
BETA = {"none": 500.0, "sigma_sqrt": 50.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _training_sigmas(model_dir, use_generation_shift: float | None) -> torch.Tensor:
    """sigma for every training index, in float64, from the checkpoint's scheduler config file."""
    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    if use_generation_shift is not None:
        shift = use_generation_shift
    elif config.get("use_dynamic_shifting"):
        shift = 1.0
    else:
        shift = config.get("shift") or config.get("flow_shift")
    s = (
        torch.arange(1, config["num_train_timesteps"] + 1, dtype=torch.float64)
        / config["num_train_timesteps"]
    )
    return shift * s / (1 + (shift - 1) * s)


def _setup(family: str, tmp_path_factory, weighting: str):
    models = shared_models(tmp_path_factory)
    cfg = ModelConfig(family=family, path=str(models / family), tiny=True, lora_rank=4, lora_alpha=4)
    backbone = load_backbone(cfg)
    size = type(backbone).tiny_size
    gen = GenerateConfig(**size, num_inference_steps=4, guidance_scale=3.5 if family == "flux" else 5.0)
    backbone.use_generation_settings(gen)
    generator = torch.Generator().manual_seed(7)
    shape = backbone.latent_shape(gen)
    prompts = ["a red car in the city", "a dark forest at night"]
    embeds = backbone.encode_prompts(prompts)
    negative = backbone.encode_negative()
    with torch.no_grad():  # real candidates: two per prompt, from the tiny model's own sampler
        latents = torch.cat(
            [
                backbone.sample(
                    {k: v[i : i + 1] for k, v in embeds.items()},
                    negative,
                    torch.randn(2, *shape, generator=generator),
                    gen,
                )
                for i in range(2)
            ]
        )
    denoiser = backbone.denoiser
    add_lora(denoiser, cfg, backbone.lora_target_modules)
    with torch.no_grad():  # a policy that differs from its reference (LoRA B starts at zero)
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    denoiser.train()
    batch = {
        "latents_w": latents[[0, 2]],
        "latents_l": latents[[1, 3]],
        "noise": torch.randn(2, *shape, generator=generator),
        "timestep": torch.tensor([180, 720]),
        "embeds": embeds,
    }
    trainer = SimpleNamespace(
        acc=SimpleNamespace(
            device=torch.device("cpu"),
            unwrap_model=lambda m: m,
            autocast=lambda: torch.autocast("cpu", enabled=False),
        ),
        model=denoiser,
        # The trainer's live reference of a LoRA run: the same network with its adapters switched off.
        reference=LiveReference(backbone, denoiser, LoraSwitch(denoiser)),
        backbone=backbone,
        settings=SimpleNamespace(
            beta=BETA[weighting], loss_type="sigmoid", sft_weight=0.0, loss_weighting=weighting, snr_gamma=5.0
        ),
        input_dtype=torch.float32,
    )
    shift = backbone.schedule.shift if family == "flux" else None  # FLUX: the sampling shift of this size
    return trainer, batch, _training_sigmas(models / family, shift)


def _float64_objective(trainer, batch, sigmas: torch.Tensor, weighting: str):
    """The Flow-DPO loss per pair from its definition, and the policy's float64 copy (for gradients)."""
    backbone = trainer.backbone
    policy = copy.deepcopy(trainer.model).double()
    embeds = {k: v.double() for k, v in batch["embeds"].items()}
    noise = batch["noise"].double()
    t = batch["timestep"]
    sigma = sigmas[t]
    view = (-1,) + (1,) * (noise.dim() - 1)

    def err(x0: torch.Tensor, reference: bool) -> torch.Tensor:
        x0 = x0.double()
        noisy = (1 - sigma.view(view)) * x0 + sigma.view(view) * noise
        velocity = noise - x0
        if reference:
            policy.disable_adapters()
        try:
            pred = backbone.call_denoiser(policy, noisy, sigma * 1000, embeds)
        finally:
            policy.enable_adapters()
        per_pair = (pred - velocity).square().flatten(1).mean(1)
        if weighting == "sigma_sqrt":
            per_pair = per_pair / sigma.square()
        return per_pair

    with torch.no_grad():
        ref_w, ref_l = err(batch["latents_w"], True), err(batch["latents_l"], True)
    err_w, err_l = err(batch["latents_w"], False), err(batch["latents_l"], False)
    logit = -BETA[weighting] / 2 * ((err_w - ref_w) - (err_l - ref_l))
    loss = torch.nn.functional.softplus(-logit)  # -log sigmoid(logit), without overflow
    return loss, logit, (err_w, err_l, ref_w, ref_l), policy


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_flow_dpo_step_matches_float64_on_the_family_tensors(family, weighting, tmp_path_factory):
    trainer, batch, sigmas = _setup(family, tmp_path_factory, weighting)
    out = dpo_step(trainer, batch)
    loss64, logit64, errors64, policy64 = _float64_objective(trainer, batch, sigmas, weighting)

    assert out.per_pair_loss.dtype == torch.float32
    fields = (out.mse_w, out.mse_l, out.ref_mse_w, out.ref_mse_l)
    for got, want in zip(fields, errors64):
        torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=0)
    # The logit amplifies float32 error differences by beta / 2; both signs and O(1) magnitudes occur.
    torch.testing.assert_close(
        out.reward_margin.double(), logit64.detach(), rtol=0, atol=5e-3 * max(1.0, logit64.abs().max().item())
    )
    torch.testing.assert_close(out.per_pair_loss.double(), loss64.detach(), rtol=0, atol=5e-3)
    assert (out.reward_margin.abs() > 1e-3).all() and not math.isclose(
        out.loss.item(), math.log(2), abs_tol=1e-4
    )

    # The training signal: gradients of the mean loss on the LoRA parameters agree too.
    out.loss.backward()
    loss64.mean().backward()
    mine = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    theirs = dict(policy64.named_parameters())
    assert mine and all(g is not None for g in mine.values())
    scale = max(g.abs().max().item() for g in mine.values())
    worst = max((mine[n].double() - theirs[n].grad).abs().max().item() for n in mine)
    assert scale > 0 and worst < 1e-2 * scale, f"gradients differ by {worst} (largest {scale})"
