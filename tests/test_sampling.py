"""Sampling settings (scheduler, cache hooks, compile) and batching across prompts, on the tiny
families in memory: recipe errors, determinism, batch invariance, cache tolerances."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpo.backbones.cogvideox import CogVideoXBackbone
from mpo.backbones.registry import get_backbone_class
from mpo.config import RecipeError, load_recipe
from mpo.generate import generation_fingerprint
from mpo.sampling import count_denoiser_calls
from mpo.schema import GenerateConfig
from tests.tiny_sampling import PROMPTS, TinyBackbones, sample

ROOT = Path(__file__).resolve().parents[1]
SDXL = ROOT / "recipes" / "tiny" / "sdxl.yaml"
COGVIDEOX = ROOT / "recipes" / "tiny" / "cogvideox.yaml"
# Batching across prompts, per family: on a CPU in float32 with one thread the tiny models give the
# same bits whatever the batch (asserted to this tolerance, which also covers BLAS builds that block
# a GEMM by batch size). On GPUs cuBLAS may pick other kernels per batch size; differences then stay
# at the dtype's rounding (tests/test_gpu.py).
BATCH_TOLERANCE = {"sdxl": 1e-5, "cogvideox": 1e-5, "wan": 1e-5, "sd3": 1e-5, "flux": 1e-5}


pytestmark = pytest.mark.usefixtures("one_thread")


FAMILIES = ("sdxl", "cogvideox", "wan", "sd3", "flux")
COGVIDEOX_SIZE = CogVideoXBackbone.tiny_size


@pytest.fixture(scope="module")
def backbones() -> dict[str, tuple]:
    return TinyBackbones()


_sample = sample


# ---- recipe errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("recipe", "overrides", "key", "says"),
    [
        (SDXL, ["generate.scheduler=dpm"], "generate.scheduler", "dpmpp_2m"),
        (
            SDXL,
            ["generate.scheduler=unipc", "generate.scheduler_options={foo: 1}"],
            "scheduler_options.foo",
            "UniPC",
        ),
        (
            SDXL,
            ["generate.scheduler=dpmpp_2m", "generate.scheduler_options={algorithm_type: sde-dpmsolver++}"],
            "scheduler_options.algorithm_type",
            "stochastic",
        ),
        (
            SDXL,
            ["generate.scheduler=dpmpp_2m", "generate.scheduler_options={algorithm_type: foo}"],
            "scheduler_options",
            "",
        ),
        (
            SDXL,
            ["generate.scheduler_options={solver_order: 2}"],
            "generate.scheduler_options",
            "other than default",
        ),
        (SDXL, ["generate.scheduler=KDPM2AncestralDiscreteScheduler"], "generate.scheduler", "one of"),
        (SDXL, ["generate.cache=pab"], "generate.cache", "not supported"),
        (SDXL, ["generate.cache=first_block"], "generate.cache", "not supported"),
        (COGVIDEOX, ["generate.cache=tea"], "generate.cache", "one of"),
        (
            COGVIDEOX,
            ["generate.cache=first_block", "generate.cache_options={thresh: 0.1}"],
            "cache_options.thresh",
            "",
        ),
        (COGVIDEOX, ["generate.cache_options={threshold: 0.1}"], "generate.cache_options", "other than none"),
        (SDXL, ["generate.compile=max"], "generate.compile", "regional"),
        (SDXL, ["generate.batch_size=6"], "generate.batch_size", "multiple of generate.num_candidates=4"),
    ],
)
def test_bad_sampling_keys_are_recipe_errors_naming_the_key(recipe, overrides, key, says):
    with pytest.raises(RecipeError) as caught:
        load_recipe(str(recipe), overrides)
    line = next(line for line in str(caught.value).splitlines() if key in line)
    assert says in line


def test_good_sampling_keys_load():
    load_recipe(
        str(SDXL), ["generate.scheduler=dpmpp_2m", "generate.scheduler_options={use_karras_sigmas: true}"]
    )
    load_recipe(str(SDXL), ["generate.batch_size=8", "generate.compile=regional"])
    load_recipe(
        str(COGVIDEOX),
        ["generate.cache=pab", "generate.cache_options={spatial_attention_block_skip_range: 3}"],
    )


def test_fingerprint_names_only_the_sampling_keys_that_are_set():
    plain = generation_fingerprint(load_recipe(str(SDXL)))["generate"]
    assert not {"scheduler", "scheduler_options", "cache", "compile", "batch_size"} & set(plain)
    tuned = generation_fingerprint(
        load_recipe(
            str(SDXL), ["generate.scheduler=unipc", "generate.batch_size=8", "generate.compile=regional"]
        )
    )["generate"]
    assert (tuned["scheduler"], tuned["batch_size"], tuned["compile"]) == ("unipc", 8, "regional")
    same = generation_fingerprint(load_recipe(str(SDXL), ["generate.batch_size=4"]))["generate"]
    assert same == plain  # one prompt per batch is the default


# ---- schedulers ---------------------------------------------------------------------------------------
def test_scheduler_choice_is_used_and_deterministic(backbones):
    backbone, size = backbones["sdxl"]
    default = _sample(backbone, size, PROMPTS[:1])
    assert type(backbone.pipeline().scheduler).__name__ == "EulerDiscreteScheduler"
    dpm = _sample(backbone, size, PROMPTS[:1], scheduler="dpmpp_2m")
    scheduler = backbone.pipeline().scheduler
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert (scheduler.config.algorithm_type, scheduler.config.solver_order) == ("dpmsolver++", 2)
    assert scheduler.config.timestep_spacing == "leading"  # from_config of the checkpoint's scheduler
    assert not torch.allclose(dpm, default, atol=1e-3)
    assert torch.equal(_sample(backbone, size, PROMPTS[:1], scheduler="dpmpp_2m"), dpm)
    # Back to the default: the very same sampler as before any choice.
    assert torch.equal(_sample(backbone, size, PROMPTS[:1]), default)
    assert torch.equal(_sample(backbone, size, PROMPTS[:1], scheduler="euler"), default)
    karras = _sample(
        backbone, size, PROMPTS[:1], scheduler="dpmpp_2m", scheduler_options={"use_karras_sigmas": True}
    )
    assert backbone.pipeline().scheduler.config.use_karras_sigmas and not torch.equal(karras, dpm)
    with count_denoiser_calls(backbone.denoiser) as counter:
        _sample(backbone, size, PROMPTS[:1], num_inference_steps=3)
    assert (counter.calls, counter.rows) == (3, 3 * 2 * 2)  # steps; x2 guidance x2 candidates


def test_a_new_sampler_walks_the_checkpoints_own_schedule(backbones):
    """CogVideoX trains on an SNR-shifted, zero-terminal-SNR schedule that only its own scheduler class
    knows. Euler and DDIM solve the same probability-flow ODE with the same first-order step, so on
    the checkpoint's noise levels they agree closely; without the carried-over betas they do not."""
    backbone, size = backbones["cogvideox"]
    ddim = _sample(backbone, size, PROMPTS[:1])
    euler = _sample(backbone, size, PROMPTS[:1], scheduler="euler")
    assert type(backbone.pipeline().scheduler).__name__ == "EulerDiscreteScheduler"
    torch.testing.assert_close(euler, ddim, atol=2e-3, rtol=2e-3)
    unshifted = _sample(
        backbone, size, PROMPTS[:1], scheduler="euler", scheduler_options={"trained_betas": None}
    )
    assert (unshifted - ddim).abs().max() > 10 * (euler - ddim).abs().max()


# ---- batching across prompts -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheduler", ["default", "dpmpp_2m"])
def test_batching_across_prompts_gives_the_candidates_of_one_prompt_per_batch(backbones, family, scheduler):
    backbone, size = backbones[family]
    together = _sample(backbone, size, PROMPTS, scheduler=scheduler)
    alone = torch.cat([_sample(backbone, size, [p], scheduler=scheduler) for p in PROMPTS])
    # Each prompt's rows really are that prompt's (the comparison is not of interchangeable rows).
    assert not torch.allclose(alone[:2], alone[2:4], atol=1e-3)
    torch.testing.assert_close(together, alone, atol=BATCH_TOLERANCE[family], rtol=BATCH_TOLERANCE[family])


# ---- cache hooks ----------------------------------------------------------------------------------------
# Relative L2 change of the tiny CogVideoX's latents (8 steps, 2 candidates) against no cache, as
# measured: first-block cache at threshold 0.5 ~0.9 %, pyramid attention broadcast ~0.3 %, FasterCache
# ~1 %. The documented tolerance is 5 %; each hook must also really skip work, or the bound is empty.
CACHE_TOLERANCE = 0.05
CACHES = [
    ("first_block", {"threshold": 0.5}),
    ("pab", {}),
    ("faster", {}),
]


def _attention_calls(denoiser) -> tuple[list, dict]:
    """Count the attention projections that really run (a skipped block or attention never reaches
    its ``to_q``)."""
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    attention = [
        m for m in denoiser.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "to_q")
    ]
    handles = [m.to_q.register_forward_hook(hook) for m in attention]
    return handles, calls


@pytest.mark.parametrize(("cache", "options"), CACHES)
def test_cache_hooks_skip_work_and_change_outputs_only_within_tolerance(backbones, cache, options):
    backbone, size = backbones["cogvideox"]
    handles, calls = _attention_calls(backbone.denoiser)
    try:
        plain = _sample(backbone, size, PROMPTS[:1], num_inference_steps=8)
        full_calls, calls["n"] = calls["n"], 0
        cached = _sample(
            backbone, size, PROMPTS[:1], num_inference_steps=8, cache=cache, cache_options=options
        )
        cached_calls, calls["n"] = calls["n"], 0
        again = _sample(
            backbone, size, PROMPTS[:1], num_inference_steps=8, cache=cache, cache_options=options
        )
    finally:
        for handle in handles:
            handle.remove()
    assert cached_calls < full_calls  # the hook skipped attention
    assert ((cached - plain).norm() / plain.norm()).item() < CACHE_TOLERANCE
    assert torch.equal(again, cached)  # each batch starts from a fresh cache: deterministic
    # Switching the cache off restores the exact uncached sampler.
    assert torch.equal(_sample(backbone, size, PROMPTS[:1], num_inference_steps=8), plain)
    assert backbone.denoiser._cache_config is None


def test_unsupported_compile_is_a_recipe_error():
    from mpo.sampling import SamplingSupport, check_sampling

    gen = GenerateConfig(compile="regional")
    problems = check_sampling(gen, SamplingSupport(regional_compile=False))
    assert [key for key, _ in problems] == ["generate.compile"] and "use full" in problems[0][1]
    assert check_sampling(gen, SamplingSupport()) == []


# ---- compile ---------------------------------------------------------------------------------------------
# torch.compile (inductor) of the repeated blocks changes float32 results only by kernel fusion
# rounding: measured max |diff| 3e-6 on the tiny CogVideoX (1e-5 on the tiny SDXL). Compiling takes
# ~40 s on a CPU, hence slow.
COMPILE_TOLERANCE = 1e-4


@pytest.mark.slow
def test_regional_compile_keeps_the_candidates_within_rounding():
    backbone, size = CogVideoXBackbone(CogVideoXBackbone.tiny_pipeline()), COGVIDEOX_SIZE
    plain = _sample(backbone, size, PROMPTS[:2])
    compiled = _sample(backbone, size, PROMPTS[:2], compile="regional")
    blocks = [m for m in backbone.denoiser.modules() if type(m).__name__ == "CogVideoXBlock"]
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    torch.testing.assert_close(compiled, plain, atol=COMPILE_TOLERANCE, rtol=COMPILE_TOLERANCE)
    assert torch.equal(_sample(backbone, size, PROMPTS[:2], compile="regional"), compiled)


# ---- flow-matching families ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["wan", "sd3", "flux"])
@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "unipc", "euler"])
def test_flow_families_sample_with_the_chosen_solver_on_their_shift(backbones, family, scheduler):
    backbone, size = backbones[family]
    default = _sample(backbone, size, PROMPTS[:1])
    own = backbone.pipeline().scheduler.config
    shift = own.get("shift", own.get("flow_shift"))
    chosen = _sample(backbone, size, PROMPTS[:1], scheduler=scheduler)
    config = backbone.pipeline().scheduler.config
    if scheduler == "euler":
        assert type(backbone.pipeline().scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert config.shift == shift
    else:
        assert (config.use_flow_sigmas, config.prediction_type) == (True, "flow_prediction")
        if own.get("use_dynamic_shifting"):  # FLUX: the shift follows the resolution, as in its own sampler
            assert config.use_dynamic_shifting
        else:
            assert config.flow_shift == shift
    assert torch.isfinite(chosen).all()
    assert torch.equal(_sample(backbone, size, PROMPTS[:1], scheduler=scheduler), chosen)
    assert torch.equal(_sample(backbone, size, PROMPTS[:1]), default)  # back to the family's own


@pytest.mark.parametrize("family", ["wan", "flux"])
@pytest.mark.parametrize(("cache", "options"), [("first_block", {"threshold": 0.5}), ("pab", {})])
def test_flow_families_cache_hooks_skip_work_within_tolerance(backbones, family, cache, options):
    backbone, size = backbones[family]
    handles, calls = _attention_calls(backbone.denoiser)
    try:
        plain = _sample(backbone, size, PROMPTS[:1], num_inference_steps=8)
        full_calls, calls["n"] = calls["n"], 0
        cached = _sample(
            backbone, size, PROMPTS[:1], num_inference_steps=8, cache=cache, cache_options=options
        )
        cached_calls = calls["n"]
    finally:
        for handle in handles:
            handle.remove()
        _sample(backbone, size, PROMPTS[:1], num_inference_steps=1)  # the cache off again
    assert cached_calls < full_calls
    assert ((cached - plain).norm() / plain.norm()).item() < CACHE_TOLERANCE


def test_unsupported_cache_on_sd3_is_a_recipe_error():
    from mpo.sampling import check_sampling

    problems = check_sampling(GenerateConfig(cache="first_block"), get_backbone_class("sd3").sampling_support)
    assert problems and problems[0][0] == "generate.cache" and "not supported" in problems[0][1]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_decoder_alone_decodes_the_pixels_of_the_full_pipeline(tmp_path, family):
    from mpo.backbones.registry import load_backbone, load_decoder
    from mpo.schema import ModelConfig

    cls = get_backbone_class(family)
    cls.tiny_pipeline().save_pretrained(tmp_path / family)
    cfg = ModelConfig(family=family, path=str(tmp_path / family))
    decoder, full = load_decoder(cfg), load_backbone(cfg)
    loaded = {name for name, part in decoder.pipeline().components.items() if part is not None}
    assert loaded == {"vae", "scheduler"}  # no denoiser, no text encoder read from disk
    shape = full.latent_shape(GenerateConfig(**cls.tiny_size))
    latents = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decoder.decode(latents), full.decode(latents))
