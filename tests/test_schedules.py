"""Training schedules against diffusers' own schedulers and closed forms: the flow-matching sigma table
and shift, the forward process and velocity target, timestep sampling densities, loss weights."""

from __future__ import annotations

import pickle

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from mpo.backbones.schedules import DDPMSchedule, FlowMatchSchedule, TimestepSampler, timestep_bounds
from mpo.schema import TrainConfig


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_flow_sigmas_are_diffusers_training_sigmas_in_increasing_order(shift):
    schedule = FlowMatchSchedule(1000, shift)
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    torch.testing.assert_close(schedule.sigmas, theirs.sigmas.flip(0).float(), rtol=0, atol=1e-6)
    # What the denoiser is fed is the scheduler's own timestep for that sigma.
    torch.testing.assert_close(
        schedule.model_timesteps(torch.arange(1000)), theirs.timesteps.flip(0).float(), rtol=0, atol=1e-3
    )
    assert schedule.sigmas[-1] == 1.0 and bool((schedule.sigmas.diff() > 0).all())


def test_flow_schedule_reads_the_checkpoint_scheduler_config():
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    wan = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
    ).config
    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config
    assert FlowMatchSchedule.from_scheduler_config(sd3).shift == 3.0
    assert FlowMatchSchedule.from_scheduler_config(wan).shift == 5.0
    assert FlowMatchSchedule.from_scheduler_config(flux).shift == 1.0  # it shifts by resolution when sampling


def test_flow_forward_process_target_and_snr_in_float64():
    schedule = FlowMatchSchedule(1000, 3.0)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)
    t = torch.tensor([0, 499, 999])
    s = torch.tensor([1, 500, 1000], dtype=torch.float64) / 1000
    sigma = (3 * s / (1 + 2 * s)).view(-1, 1, 1, 1)
    noisy = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(noisy.double(), (1 - sigma) * x0 + sigma * noise, rtol=0, atol=1e-6)
    torch.testing.assert_close(schedule.target(x0, noise, t).double(), noise.double() - x0.double())
    torch.testing.assert_close(
        schedule.snr(t).double(), ((1 - sigma) / sigma).square().flatten(), rtol=1e-5, atol=0
    )
    # bf16 latents: float32 arithmetic inside, the latents' dtype out.
    assert schedule.add_noise(x0.bfloat16(), noise.bfloat16(), t).dtype == torch.bfloat16


def test_flow_loss_weights():
    schedule = FlowMatchSchedule(1000, 1.0)
    t = torch.tensor([99, 499, 899])
    sigma = (t + 1).double() / 1000
    assert schedule.loss_weight(t, "none") is None
    torch.testing.assert_close(schedule.loss_weight(t, "sigma_sqrt").double(), sigma**-2, rtol=1e-5, atol=0)
    cosmap = 2 / (torch.pi * (1 - 2 * sigma + 2 * sigma**2))
    torch.testing.assert_close(schedule.loss_weight(t, "cosmap").double(), cosmap, rtol=1e-5, atol=0)
    with pytest.raises(
        ValueError, match=r"train\.loss_weighting='min_snr'.*allowed: \['none', 'sigma_sqrt', 'cosmap'\]"
    ):
        schedule.loss_weight(t, "min_snr")


def test_ddpm_schedule_is_the_scheduler_and_refuses_flow_configs():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = DDPMSchedule(scheduler)
    t = torch.tensor([10, 500, 990])
    abar = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(schedule.snr(t), abar / (1 - abar))
    assert torch.equal(schedule.model_timesteps(t), t) and schedule.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type='flow_prediction'"):
        DDPMSchedule(UniPCMultistepScheduler(prediction_type="flow_prediction"))
    with pytest.raises(ValueError, match=r"train\.loss_weighting='cosmap'"):
        schedule.loss_weight(t, "cosmap")


def test_ddpm_min_snr_weight_follows_the_checkpoint_prediction_type():
    """CogVideoX's v-prediction scheduler (the released config: SNR-shifted, zero terminal SNR) gets
    min(SNR, gamma) / (SNR + 1), not the epsilon form min(SNR, gamma) / SNR."""
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0
    )
    schedule = DDPMSchedule(scheduler)
    t = torch.tensor([0, 300, 700, 999])
    abar = scheduler.alphas_cumprod.double()[t]
    snr = abar / (1 - abar)
    got = schedule.loss_weight(t, "min_snr", 5.0).double()
    torch.testing.assert_close(got, snr.clamp(max=5.0) / (snr + 1), rtol=1e-5, atol=1e-7)
    assert snr[0] > 5.0 and got[-1] == 0.0  # the clip and the zero-SNR end both occur


def _draws(sampler: TimestepSampler, n: int = 4000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.stack([sampler(generator) for _ in range(n)])


def test_uniform_sampling_is_the_former_randint_draw():
    """Existing runs resume onto the same stream: uniform draws are torch.randint on the generator."""
    sampler = TimestepSampler(100, 900)
    for seed in range(5):
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(sampler(a), torch.randint(100, 900, (), generator=b))


def test_logit_normal_and_mode_densities_stay_in_range_and_concentrate_where_they_should():
    uniform = _draws(TimestepSampler(0, 1000)).double()
    logit = _draws(TimestepSampler(0, 1000, "logit_normal", logit_mean=0.0, logit_std=1.0)).double()
    shifted = _draws(TimestepSampler(0, 1000, "logit_normal", logit_mean=1.0, logit_std=1.0)).double()
    narrow = _draws(TimestepSampler(200, 400, "logit_normal")).double()
    for draws in (uniform, logit, shifted):
        assert draws.min() >= 0 and draws.max() <= 999
    assert narrow.min() >= 200 and narrow.max() <= 399
    middle = lambda d: ((d > 250) & (d < 750)).double().mean()  # noqa: E731
    assert middle(uniform) == pytest.approx(0.5, abs=0.04)
    assert middle(logit) > 0.6  # sigmoid(N(0, 1)) puts ~68% of its mass in (0.25, 0.75)
    # The median of sigmoid(N(m, 1)) is sigmoid(m): 731 for m = 1.
    assert shifted.median().item() == pytest.approx(731, abs=25)
    mode = _draws(TimestepSampler(0, 1000, "mode", mode_scale=1.29)).double()
    assert mode.min() >= 0 and mode.max() <= 999 and middle(mode) > middle(uniform)


def test_sampler_from_the_recipe_with_bounds_and_pickling():
    schedule = FlowMatchSchedule(1000, 3.0)
    train = TrainConfig(timestep_range=[0.2, 0.9], timestep_sampling="logit_normal", logit_std=0.5)
    sampler = schedule.timestep_sampler(train)
    assert (sampler.low, sampler.high, sampler.density, sampler.logit_std) == (200, 900, "logit_normal", 0.5)
    assert schedule.timestep_sampler(train, bounds=(875, 1000)).low == 875  # one expert's noise range
    with pytest.raises(ValueError, match=r"does not overlap the trained denoiser's timesteps \[950, 1000\)"):
        schedule.timestep_sampler(train, bounds=(950, 1000))
    assert pickle.loads(pickle.dumps(sampler)) == sampler  # DataLoader workers receive it
    with pytest.raises(ValueError, match=r"train\.timestep_sampling='cosine'"):
        TimestepSampler(0, 10, "cosine")
    assert timestep_bounds([0.0, 1.0], 1000) == (0, 1000)
