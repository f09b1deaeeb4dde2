"""SDXL and CogVideoX adapters on their tiny variants: loading, determinism, schedules, pipeline parity."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mpo.backbones import get_backbone_class, load_backbone
from mpo.backbones.cogvideox import CogVideoXBackbone
from mpo.backbones.sdxl import SDXLBackbone
from mpo.backbones.tiny import ensure_tiny, pretrain_tiny_denoiser, save_pipeline_atomically
from mpo.schema import GenerateConfig, ModelConfig

FAMILIES = ("sdxl", "cogvideox")
GEN = {
    "sdxl": GenerateConfig(height=16, width=16, num_inference_steps=4, guidance_scale=5.0),
    "cogvideox": GenerateConfig(height=32, width=32, num_frames=9, num_inference_steps=4, guidance_scale=6.0),
}
IN_MEMORY = {
    "sdxl": (SDXLBackbone.tiny_pipeline, SDXLBackbone),
    "cogvideox": (CogVideoXBackbone.tiny_pipeline, CogVideoXBackbone),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is as fast, and much faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model built once, through load() with model.tiny=true, as a tiny recipe does."""
    root = tmp_path_factory.mktemp("tiny-models")
    for family in FAMILIES:
        load_backbone(ModelConfig(family=family, path=str(root / family), tiny=True))
    return {family: root / family for family in FAMILIES}


@pytest.fixture(scope="session")
def backbones(model_paths):
    return {f: load_backbone(ModelConfig(family=f, path=str(p), tiny=True)) for f, p in model_paths.items()}


def _noise(backbone, family: str, n: int, seed: int = 0) -> torch.Tensor:
    shape = backbone.latent_shape(GEN[family])
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]
    )


def _components(pipe) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


# ---- building and loading -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_loads_back_with_identical_weights(family, tmp_path):
    build, adapter = IN_MEMORY[family]
    built = adapter(build(seed=0))
    pretrain_tiny_denoiser(built, steps=2, seed=0)
    twin = adapter(build(seed=0))
    pretrain_tiny_denoiser(twin, steps=2, seed=0)
    save_pipeline_atomically(built.pipeline(), tmp_path / "model")

    loaded = load_backbone(ModelConfig(family=family, path=str(tmp_path / "model")))
    assert type(loaded) is adapter
    built_parts, loaded_parts = _components(built.pipeline()), _components(loaded.pipeline())
    assert built_parts.keys() == loaded_parts.keys() and len(built_parts) >= 3
    for name, module in built_parts.items():
        expected, got = module.state_dict(), loaded_parts[name].state_dict()
        twin_state = _components(twin.pipeline())[name].state_dict()
        assert expected.keys() == got.keys(), name
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"{name} changed on save/load"
        assert all(torch.equal(expected[k], twin_state[k]) for k in expected), (
            f"{name}: build not deterministic"
        )
    prompts = ["a red cat running", "zebra"]
    for key, value in built.encode_prompts(prompts).items():  # tokenizers survive the round trip too
        assert torch.equal(value, loaded.encode_prompts(prompts)[key])
    assert not list(tmp_path.glob(".*tmp-*")), "temporary build folder left behind"


def test_loaded_backbone_is_frozen_eval_and_in_the_recipe_dtype(model_paths):
    backbone = load_backbone(ModelConfig(family="sdxl", path=str(model_paths["sdxl"]), dtype="bfloat16"))
    assert backbone.denoiser.dtype == torch.bfloat16
    assert not backbone.denoiser.training
    for module in _components(backbone.pipeline()).values():
        assert not any(p.requires_grad for p in module.parameters())


def test_ensure_tiny_keeps_an_existing_model_and_refuses_foreign_folders(model_paths, tmp_path):
    index = model_paths["sdxl"] / "model_index.json"
    before = index.stat().st_mtime_ns
    ensure_tiny(SDXLBackbone, ModelConfig(family="sdxl", path=str(model_paths["sdxl"]), tiny=True))
    assert index.stat().st_mtime_ns == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match=r"model\.path=.*foreign"):
        load_backbone(ModelConfig(family="sdxl", path=str(foreign), tiny=True))


def test_losing_a_build_race_keeps_the_winner(model_paths):
    """A second builder renaming onto a finished model keeps it and cleans up after itself."""
    index = model_paths["cogvideox"] / "model_index.json"
    before = index.stat().st_mtime_ns
    save_pipeline_atomically(CogVideoXBackbone.tiny_pipeline(), model_paths["cogvideox"])
    assert index.stat().st_mtime_ns == before
    assert not list(model_paths["cogvideox"].parent.glob(".*tmp-*"))


def test_load_errors_name_the_key(model_paths, tmp_path):
    with pytest.raises(ValueError, match=r"holds a CogVideoXPipeline but model\.family='sdxl'"):
        load_backbone(ModelConfig(family="sdxl", path=str(model_paths["cogvideox"])))
    with pytest.raises(OSError, match=r"model\.path=.*missing.*model\.tiny=true"):
        load_backbone(ModelConfig(family="sdxl", path=str(tmp_path / "missing")))
    with pytest.raises(KeyError, match=r"model\.family='pixart'.*known: \[.*'cogvideox'.*'sdxl'"):
        get_backbone_class("pixart")


# ---- conditioning and sampling ----------------------------------------------------------------------------
def test_sdxl_prompt_embeddings(backbones):
    backbone = backbones["sdxl"]
    pipe = backbone.pipeline()
    embeds = backbone.encode_prompts(["a red cat", "the blue sea"])
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert embeds["prompt_embeds"].shape == (2, 77, width)
    assert embeds["pooled_prompt_embeds"].shape == (2, pipe.text_encoder_2.config.projection_dim)
    alone = backbone.encode_prompts(["the blue sea"])
    assert all(torch.allclose(alone[k][0], embeds[k][1], atol=1e-6) for k in embeds)  # cacheable per prompt
    assert not torch.allclose(embeds["prompt_embeds"][0], embeds["prompt_embeds"][1])
    # The pipeline's own unconditional branch (force_zeros_for_empty_prompt) is zeros.
    empty = backbone.encode_prompts([""])
    assert all(torch.count_nonzero(v) == 0 for v in empty.values())


def test_cogvideox_prompt_embeddings(backbones):
    backbone = backbones["cogvideox"]
    config = backbone.pipeline().transformer.config
    embeds = backbone.encode_prompts(["a red cat", ""])["prompt_embeds"]
    assert embeds.shape == (2, config.max_text_seq_length, config.text_embed_dim)
    assert not torch.allclose(embeds[0], embeds[1])
    assert torch.count_nonzero(embeds[1]) > 0  # T5 encodes the empty prompt, as the pipeline does


@pytest.mark.parametrize("family", FAMILIES)
def test_candidate_does_not_depend_on_its_batch(family, backbones):
    backbone = backbones[family]
    noise = _noise(backbone, family, 4)
    embeds, negative = backbone.encode_prompts(["a dark forest at night"]), backbone.encode_prompts([""])
    rng = torch.get_rng_state()
    batch = backbone.sample(embeds, negative, noise, GEN[family])
    alone = backbone.sample(embeds, negative, noise[2:3], GEN[family])
    assert torch.equal(torch.get_rng_state(), rng), "sampling drew from the global RNG"
    assert batch.shape == noise.shape
    assert (batch[2] - alone[0]).abs().max() < 1e-5
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_tiny_samples_carry_structure(family, backbones):
    """Pretraining taught "per-channel offset + unit noise": unit-scale latents whose channel means
    differ between candidates, hence candidates of visibly different brightness. A random denoiser
    fails this (SDXL: latents blow up to std ~7; CogVideoX: channel means barely move)."""
    backbone = backbones[family]
    latents = backbone.sample(
        backbone.encode_prompts(["a cat"]),
        backbone.encode_prompts([""]),
        _noise(backbone, family, 8),
        GEN[family],
    )
    channel_dim = backbone.channel_dim + 1  # batch first
    means = latents.mean(dim=[d for d in range(1, latents.dim()) if d != channel_dim])
    assert 0.7 < latents.std() < 2.0
    assert means.std(dim=0).mean() > 0.2
    pixels = backbone.decode(latents)
    assert pixels.mean(dim=list(range(1, pixels.dim()))).std() > 0.02


def test_decode_shapes_and_range(backbones):
    sdxl, video = backbones["sdxl"], backbones["cogvideox"]
    images = sdxl.decode(_noise(sdxl, "sdxl", 2))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    clips = video.decode(_noise(video, "cogvideox", 2))
    assert clips.shape == (2, 9, 3, 32, 32) and clips.dtype == torch.float32
    for pixels in (images, clips):
        assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.std() > 0.01
        assert not torch.allclose(pixels[0], pixels[1])


def test_latent_shapes_and_generate_checks(backbones):
    assert backbones["sdxl"].latent_shape(GEN["sdxl"]) == (4, 8, 8)
    assert backbones["cogvideox"].latent_shape(GEN["cogvideox"]) == (3, 4, 8, 8)
    assert backbones["sdxl"].prediction_type == "epsilon"
    assert backbones["cogvideox"].prediction_type == "v_prediction"

    assert CogVideoXBackbone.check_generate_config(GenerateConfig(num_frames=49, height=480, width=720)) == []
    problems = CogVideoXBackbone.check_generate_config(GenerateConfig(num_frames=10, height=480, width=720))
    assert [key for key, _ in problems] == ["generate.num_frames"] and "4k+1" in problems[0][1]
    problems = CogVideoXBackbone.check_generate_config(GenerateConfig(num_frames=49, height=488, width=720))
    assert [key for key, _ in problems] == ["generate.height"]
    assert [k for k, _ in SDXLBackbone.check_generate_config(GenerateConfig(height=1020, width=1024))] == [
        "generate.height"
    ]
    with pytest.raises(ValueError, match=r"generate\.num_frames=10"):
        backbones["cogvideox"].latent_shape(GenerateConfig(height=32, width=32, num_frames=10))


# ---- training schedule --------------------------------------------------------------------------------------
def _scaled_linear_alphas_cumprod(config) -> torch.Tensor:
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps) ** 2
    return torch.cumprod(1 - betas.double(), dim=0)


def _cogvideox_alphas_cumprod(config) -> torch.Tensor:
    """SNR shifted by snr_shift_scale, then rescaled to zero terminal SNR (Lin et al. 2024, Alg. 1)."""
    abar = _scaled_linear_alphas_cumprod(config)
    abar = abar / (config.snr_shift_scale + (1 - config.snr_shift_scale) * abar)
    root = abar.sqrt()
    first, last = root[0].item(), root[-1].item()
    return ((root - last) * first / (first - last)) ** 2


@pytest.mark.parametrize("family", FAMILIES)
def test_add_noise_and_target_follow_the_schedule(family, backbones):
    backbone = backbones[family]
    config = backbone.pipeline().scheduler.config
    abar = _scaled_linear_alphas_cumprod(config) if family == "sdxl" else _cogvideox_alphas_cumprod(config)
    generator = torch.Generator().manual_seed(3)
    shape = (4, *backbone.latent_shape(GEN[family]))
    x0, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    timesteps = torch.tensor([0, 250, 700, backbone.num_train_timesteps - 1])
    view = (-1,) + (1,) * (len(shape) - 1)
    alpha, sigma = abar[timesteps].sqrt().view(view), (1 - abar[timesteps]).sqrt().view(view)

    noisy = backbone.add_noise(x0, noise, timesteps)
    assert torch.allclose(noisy.double(), alpha * x0 + sigma * noise, atol=1e-5)
    target = backbone.target(x0, noise, timesteps)
    expected = noise.double() if family == "sdxl" else alpha * noise - sigma * x0
    assert torch.allclose(target.double(), expected, atol=1e-5)
    if family == "cogvideox":  # zero terminal SNR: the last step is pure noise, its v-target is -x0
        assert torch.allclose(noisy[-1], noise[-1], atol=1e-5) and torch.allclose(
            target[-1], -x0[-1], atol=1e-5
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_matches_the_pipeline_denoiser_call(family, backbones):
    """Capture the denoiser's first call inside the pipeline (with guidance: [negative, prompt] rows)
    and replay its latents and timestep through predict(), which rebuilds the rest (SDXL time ids,
    CogVideoX rotary embeddings) itself."""
    backbone = backbones[family]
    calls = []

    def capture(module, args, kwargs, output):
        calls.append((args, kwargs, output[0] if isinstance(output, tuple) else output.sample))

    prompt, negative = backbone.encode_prompts(["a red car in the city"]), backbone.encode_prompts([""])
    handle = backbone.denoiser.register_forward_hook(capture, with_kwargs=True)
    try:
        backbone.sample(prompt, negative, _noise(backbone, family, 2), GEN[family])
    finally:
        handle.remove()
    args, kwargs, output = calls[0]
    latents = args[0] if args else kwargs["hidden_states"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    timesteps = timestep.long().expand(latents.shape[0])  # integer indices, as the trainer passes them
    rows = latents.shape[0] // 2  # the pipeline stacks [negative rows, prompt rows]
    embeds = {
        k: torch.cat([negative[k].expand(rows, *v.shape[1:]), v.expand(rows, *v.shape[1:])])
        for k, v in prompt.items()
    }
    with torch.no_grad():
        predicted = backbone.predict(backbone.denoiser, latents, timesteps, embeds)
    assert predicted.shape == output.shape
    assert torch.allclose(predicted, output, atol=1e-6)
    assert torch.equal(timestep, timestep.round())  # the sampler's timesteps are integer-valued


def test_set_denoiser_changes_what_samples(backbones):
    backbone = backbones["sdxl"]
    original = backbone.denoiser
    noise, embeds, negative = (
        _noise(backbone, "sdxl", 1),
        backbone.encode_prompts(["a"]),
        backbone.encode_prompts([""]),
    )
    before = backbone.sample(embeds, negative, noise, GEN["sdxl"])
    perturbed = copy.deepcopy(original)
    with torch.no_grad():
        perturbed.conv_out.bias.add_(0.5)
    backbone.set_denoiser(perturbed)
    try:
        assert backbone.pipeline().unet is perturbed
        assert not torch.allclose(backbone.sample(embeds, negative, noise, GEN["sdxl"]), before)
    finally:
        backbone.set_denoiser(original)
    assert torch.equal(backbone.sample(embeds, negative, noise, GEN["sdxl"]), before)
