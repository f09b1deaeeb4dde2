"""Every family's adapter on its tiny variant: loading, determinism, schedules, pipeline parity."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from mpo.backbones import get_backbone_class, load_backbone
from mpo.backbones.base import ModelPathError
from mpo.backbones.cogvideox import CogVideoXBackbone
from mpo.backbones.sdxl import SDXLBackbone
from mpo.backbones.tiny import ensure_tiny, pretrain_tiny_denoiser, save_pipeline_atomically
from mpo.schema import GenerateConfig, ModelConfig
from tests.scripts.tiny_runs import shared_models

FAMILIES = ("sdxl", "cogvideox", "wan", "sd3", "flux")
FLOW = ("wan", "sd3", "flux")
GUIDANCE = {"sdxl": 5.0, "cogvideox": 6.0, "wan": 5.0, "sd3": 5.0, "flux": 3.5}
GEN = {
    f: GenerateConfig(**get_backbone_class(f).tiny_size, num_inference_steps=4, guidance_scale=GUIDANCE[f])
    for f in FAMILIES
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model built once per session, through load() with model.tiny=true, as a tiny
    recipe does (the same folders the stage tests use)."""
    root = shared_models(tmp_path_factory)
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
# Two builds and a save per family: the Wan and SD3 ones (about 10 s each) run in the slow tier.
@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if f in ("wan", "sd3") else f for f in FAMILIES]
)
def test_saved_model_loads_back_with_identical_weights(family, tmp_path):
    adapter = get_backbone_class(family)
    built = adapter(adapter.tiny_pipeline(seed=0))
    pretrain_tiny_denoiser(built, steps=2, seed=0)
    twin = adapter(adapter.tiny_pipeline(seed=0))
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
    with pytest.raises(ModelPathError, match=r"model\.path=.*missing.*model\.tiny=true"):
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


EMBEDDINGS = {  # the tiny encoders' widths; SD3: 77 CLIP positions then 16 T5 positions
    "wan": {"prompt_embeds": (16, 32)},
    "sd3": {"prompt_embeds": (77 + 16, 32), "pooled_prompt_embeds": (32,)},
    "flux": {"prompt_embeds": (16, 32), "pooled_prompt_embeds": (32,)},
}


@pytest.mark.parametrize("family", FLOW)
def test_flow_family_prompt_embeddings(family, backbones):
    backbone = backbones[family]
    embeds = backbone.encode_prompts(["a red cat", "the blue sea"])
    assert {k: tuple(v.shape[1:]) for k, v in embeds.items()} == EMBEDDINGS[family]
    alone = backbone.encode_prompts(["the blue sea"])
    assert all(torch.allclose(alone[k][0], embeds[k][1], atol=1e-6) for k in embeds)  # cacheable per prompt
    assert not torch.allclose(embeds["prompt_embeds"][0], embeds["prompt_embeds"][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_candidate_does_not_depend_on_its_batch(family, backbones):
    backbone = backbones[family]
    noise = _noise(backbone, family, 4)
    embeds, negative = backbone.encode_prompts(["a dark forest at night"]), backbone.encode_negative()
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
    fails this (SDXL: latents blow up to std ~7; CogVideoX: channel means barely move), and a random
    VAE's norms wash the offsets out of the decoded colours (hence the flow families' fitted tiny
    decoders)."""
    backbone = backbones[family]
    latents = backbone.sample(
        backbone.encode_prompts(["a cat"]),
        backbone.encode_negative(),
        _noise(backbone, family, 8),
        GEN[family],
    )
    channel_dim = backbone.channel_dim + 1  # batch first
    means = latents.mean(dim=[d for d in range(1, latents.dim()) if d != channel_dim])
    assert 0.7 < latents.std() < 2.0
    assert means.std(dim=0).mean() > 0.2
    pixels = backbone.decode(latents)
    assert pixels.mean(dim=list(range(1, pixels.dim()))).std() > 0.02


PIXELS = {  # decoded shape of two samples at the tiny sizes
    "sdxl": (2, 3, 16, 16),
    "cogvideox": (2, 9, 3, 32, 32),
    "wan": (2, 9, 3, 32, 32),
    "sd3": (2, 3, 16, 16),
    "flux": (2, 3, 16, 16),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_shapes_and_range(family, backbones):
    backbone = backbones[family]
    pixels = backbone.decode(_noise(backbone, family, 2))
    assert pixels.shape == PIXELS[family] and pixels.dtype == torch.float32
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.std() > 0.01
    assert not torch.allclose(pixels[0], pixels[1])


def test_latent_shapes_and_generate_checks(backbones):
    expected = {
        "sdxl": (4, 8, 8),
        "cogvideox": (3, 4, 8, 8),
        "wan": (4, 3, 8, 8),
        "sd3": (4, 8, 8),
        "flux": (4, 8, 8),
    }
    assert {f: backbones[f].latent_shape(GEN[f]) for f in FAMILIES} == expected
    kinds = {f: backbones[f].prediction_type for f in FAMILIES}
    assert kinds == {
        "sdxl": "epsilon",
        "cogvideox": "v_prediction",
        "wan": "flow",
        "sd3": "flow",
        "flux": "flow",
    }

    for video in ("cogvideox", "wan"):
        cls = get_backbone_class(video)
        assert cls.check_generate_config(GenerateConfig(num_frames=49, height=480, width=720)) == []
        problems = cls.check_generate_config(GenerateConfig(num_frames=10, height=480, width=720))
        assert [key for key, _ in problems] == ["generate.num_frames"] and "4k+1" in problems[0][1]
        problems = cls.check_generate_config(GenerateConfig(num_frames=49, height=488, width=720))
        assert [key for key, _ in problems] == ["generate.height"]
        with pytest.raises(ValueError, match=r"generate\.num_frames=10"):
            backbones[video].latent_shape(GenerateConfig(height=32, width=32, num_frames=10))
    assert [k for k, _ in SDXLBackbone.check_generate_config(GenerateConfig(height=1020, width=1024))] == [
        "generate.height"
    ]
    for image in ("sd3", "flux"):  # VAE factor 8 x 2 x 2 patches
        cls = get_backbone_class(image)
        assert cls.check_generate_config(GenerateConfig(height=1024, width=768)) == []
        assert [k for k, _ in cls.check_generate_config(GenerateConfig(height=1024, width=1000))] == [
            "generate.width"
        ]
        with pytest.raises(ValueError, match=r"generate\.height=18"):
            backbones[image].latent_shape(GenerateConfig(height=18, width=16))


def test_negative_prompt_hook(backbones):
    """Classifier-free guidance against the empty prompt, except FLUX.1 (embedded guidance)."""
    for family in ("sdxl", "cogvideox", "wan", "sd3"):
        negative = backbones[family].encode_negative()
        empty = backbones[family].encode_prompts([""])
        assert negative.keys() == empty.keys() and all(torch.equal(negative[k], empty[k]) for k in empty)
    assert backbones["flux"].negative_prompt is None and backbones["flux"].encode_negative() == {}


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


def _flow_sigmas(config, n: int) -> torch.Tensor:
    """The training sigmas in float64, from the checkpoint's scheduler config: s = (k+1)/N shifted by
    the config's shift (SD3: shift; Wan: flow_shift; FLUX: unshifted, it shifts at sampling time)."""
    get = config.get
    shift = 1.0 if get("use_dynamic_shifting", False) else (get("shift", None) or get("flow_shift", None))
    s = torch.arange(1, n + 1, dtype=torch.float64) / n
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("family", FAMILIES)
def test_add_noise_and_target_follow_the_schedule(family, backbones):
    backbone = backbones[family]
    config = backbone.pipeline().scheduler.config
    generator = torch.Generator().manual_seed(3)
    shape = (4, *backbone.latent_shape(GEN[family]))
    x0, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    n = backbone.num_train_timesteps
    timesteps = torch.tensor([0, 250, 700, n - 1])
    view = (-1,) + (1,) * (len(shape) - 1)
    if family in FLOW:
        sigma = _flow_sigmas(config, n)[timesteps].view(view)
        alpha, expected_target = 1 - sigma, noise.double() - x0.double()
    else:
        abar = (
            _scaled_linear_alphas_cumprod(config) if family == "sdxl" else _cogvideox_alphas_cumprod(config)
        )
        alpha, sigma = abar[timesteps].sqrt().view(view), (1 - abar[timesteps]).sqrt().view(view)
        expected_target = noise.double() if family == "sdxl" else alpha * noise - sigma * x0

    noisy = backbone.add_noise(x0, noise, timesteps)
    assert torch.allclose(noisy.double(), alpha * x0 + sigma * noise, atol=1e-5)
    target = backbone.target(x0, noise, timesteps)
    assert torch.allclose(target.double(), expected_target, atol=1e-5)
    if family in ("cogvideox", *FLOW):  # the last step is pure noise
        assert torch.allclose(noisy[-1], noise[-1], atol=1e-5)
    if family in FLOW:  # and the denoiser is fed sigma * 1000, the pipelines' timesteps
        fed = backbone.schedule.model_timesteps(timesteps)
        assert torch.allclose(fed.double(), sigma.flatten() * 1000, atol=1e-3)


STACKED = ("sdxl", "cogvideox", "sd3")  # pipelines that run guidance as one stacked call


def _replay(family: str, backbone, args, kwargs, output):
    """The captured denoiser call in the adapter's terms: (latents, pipeline timestep, prediction)."""
    latents = args[0] if args else kwargs["hidden_states"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    if family == "flux":  # packed [B, tokens, 64] and timestep / 1000 inside the pipeline
        size = backbone.latent_shape(GEN[family])[1:]
        return backbone._unpack(latents, *size), timestep * 1000, backbone._unpack(output, *size)
    return latents, timestep, output


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_matches_the_pipeline_denoiser_call(family, backbones):
    """Capture the denoiser's first call inside the pipeline (with guidance: [negative, prompt] rows)
    and replay its latents and timestep through the adapter, which rebuilds the rest (SDXL time ids,
    CogVideoX rotary embeddings, FLUX position ids, packing and guidance) itself."""
    backbone = backbones[family]
    calls = []

    def capture(module, args, kwargs, output):
        calls.append((args, kwargs, output[0] if isinstance(output, tuple) else output.sample))

    prompt, negative = backbone.encode_prompts(["a red car in the city"]), backbone.encode_negative()
    handle = backbone.denoiser.register_forward_hook(capture, with_kwargs=True)
    try:
        backbone.sample(prompt, negative, _noise(backbone, family, 2), GEN[family])
    finally:
        handle.remove()
    latents, timestep, output = _replay(family, backbone, *calls[0])
    if family in STACKED:  # one call on [negative rows, prompt rows]; Wan and FLUX: prompt rows alone
        rows = latents.shape[0] // 2
        embeds = {
            k: torch.cat([negative[k].expand(rows, *v.shape[1:]), v.expand(rows, *v.shape[1:])])
            for k, v in prompt.items()
        }
    else:
        embeds = {k: v.expand(latents.shape[0], *v.shape[1:]) for k, v in prompt.items()}
    with torch.no_grad():
        replayed = backbone.call_denoiser(backbone.denoiser, latents, timestep, embeds)
    assert replayed.shape == output.shape
    assert torch.allclose(replayed, output, atol=1e-5)
    if family in ("sdxl", "cogvideox"):  # DDPM: the trainer's integer indices are the timesteps
        indices = timestep.long().expand(latents.shape[0])
        assert torch.equal(timestep, timestep.round())
        with torch.no_grad():
            assert torch.allclose(
                backbone.predict(backbone.denoiser, latents, indices, embeds), output, atol=1e-6
            )


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


def test_flux_training_repeats_the_generation_guidance_and_sampling_shift(model_paths):
    """use_generation_settings: the training forward gets the embedded guidance the candidates were
    sampled with, and the training sigmas are the pipeline's own, shifted for this resolution."""
    flux = load_backbone(ModelConfig(family="flux", path=str(model_paths["flux"])))
    gen = GenerateConfig(**flux.tiny_size, num_inference_steps=10, guidance_scale=2.0)
    flux.use_generation_settings(gen)
    pipe = flux.pipeline()
    calls = []
    handle = flux.denoiser.register_forward_hook(
        lambda m, a, kw, out: calls.append((kw, out[0])), with_kwargs=True
    )
    try:
        flux.sample(flux.encode_prompts(["a red car"]), {}, _noise(flux, "flux", 1), gen)
    finally:
        handle.remove()
    kwargs, output = calls[0]
    assert kwargs["guidance"].tolist() == [2.0]
    latents, timestep, output = _replay("flux", flux, (), kwargs, output)
    with torch.no_grad():
        replayed = flux.call_denoiser(flux.denoiser, latents, timestep, flux.encode_prompts(["a red car"]))
    torch.testing.assert_close(replayed, output, rtol=0, atol=1e-5)

    # The sampler's sigmas at this size (dynamic shift mu) are the training table's at s = 1.0, 0.9, ...
    sigmas = [1 - i / 10 for i in range(10)]
    pipe.scheduler.set_timesteps(sigmas=sigmas, mu=math.log(flux.schedule.shift))
    indices = torch.tensor([round(s * 1000) - 1 for s in sigmas])
    torch.testing.assert_close(
        flux.schedule.sigmas[indices], pipe.scheduler.sigmas[:-1].float(), rtol=0, atol=1e-6
    )
    seq = (gen.height // 2 // 2) * (gen.width // 2 // 2)  # packed tokens of the tiny VAE's latents
    config = pipe.scheduler.config
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    mu = config.base_shift + slope * (seq - config.base_image_seq_len)
    assert flux.schedule.shift == pytest.approx(math.exp(mu))


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_and_decode_give_the_pipelines_own_output(family, backbones):
    """sample() then decode() is what the pipeline itself returns for the same initial noise (its own
    latent normalisation, packing, frame layout and post-processing to [0, 1])."""
    backbone = backbones[family]
    pipe, gen = backbone.pipeline(), GEN[family]
    noise = _noise(backbone, family, 1)
    embeds, negative = backbone.encode_prompts(["a red car in the city"]), backbone.encode_negative()
    ours = backbone.decode(backbone.sample(embeds, negative, noise, gen))
    size = {k: getattr(gen, k) for k in backbone.tiny_size}
    initial = backbone._pack(noise) if family == "flux" else noise
    # The tiny text encoders are shorter than the releases' (where the adapters use the pipelines' own
    # default lengths): the pipeline is told the adapter's length. Its default negative prompt is ours.
    length = getattr(backbone, "max_text_length", None)
    kwargs = {} if length is None else {"max_sequence_length": length}
    out = pipe(
        "a red car in the city", **kwargs, **size, num_inference_steps=gen.num_inference_steps,
        guidance_scale=gen.guidance_scale, latents=initial, output_type="pt",
    )  # fmt: skip
    theirs = out.frames if backbone.modality == "video" else out.images
    if family == "cogvideox":
        theirs = theirs.float()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=2e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_lora_targets_adapt_every_attention_projection(family, model_paths):
    from mpo.weights import add_lora

    backbone = load_backbone(ModelConfig(family=family, path=str(model_paths[family])))
    targets = backbone.lora_target_modules
    linear = {n for n, m in backbone.denoiser.named_modules() if isinstance(m, torch.nn.Linear)}
    projections = {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}  # add_*: the text stream
    attention = {n for n in linear if ".attn" in n and n.rsplit(".", 1)[-1] in projections}
    add_lora(backbone.denoiser, ModelConfig(lora_rank=2), targets)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in backbone.denoiser.named_parameters() if ".lora_A" in n}
    for target in targets:  # each default name matches modules of this architecture
        assert any(name.endswith(target) for name in adapted), f"{family}: {target} adapts nothing"
    assert attention and attention <= adapted  # every attention's q / k / v (both streams of joint ones)


@pytest.mark.parametrize("family", FLOW)
def test_gradient_checkpointing_gives_the_same_gradients(family, model_paths):
    from mpo.weights import add_lora

    grads = []
    for checkpointing in (False, True):
        backbone = load_backbone(ModelConfig(family=family, path=str(model_paths[family])))
        torch.manual_seed(0)  # the same LoRA A initialisation in both
        add_lora(backbone.denoiser, ModelConfig(lora_rank=2), backbone.lora_target_modules)
        with torch.no_grad():
            for name, param in backbone.denoiser.named_parameters():
                if "lora_B" in name:
                    param.fill_(0.01)
        if checkpointing:
            backbone.enable_gradient_checkpointing()
            assert backbone.denoiser.is_gradient_checkpointing
        backbone.denoiser.train()
        noisy = _noise(backbone, family, 2)
        embeds = backbone.encode_prompts(["a cat", "a dog"])
        backbone.predict(
            backbone.denoiser, noisy, torch.tensor([100, 800]), embeds
        ).square().mean().backward()
        grads.append({n: p.grad for n, p in backbone.denoiser.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_loads_completely_with_diffusers_load_lora_weights(family, model_paths, tmp_path):
    """The checkpoint's adapter, loaded into a fresh pipeline with ``load_lora_weights`` (what a user
    of the export does), gives the trained policy's own predictions: no adapted layer is lost."""
    from mpo.weights import add_lora, save_weights

    cfg = ModelConfig(family=family, path=str(model_paths[family]), lora_rank=2)
    policy = load_backbone(cfg)
    torch.manual_seed(0)
    add_lora(policy.denoiser, cfg, policy.lora_target_modules)
    with torch.no_grad():
        for name, param in policy.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapted = {n for n, _ in policy.denoiser.named_parameters() if "lora_A" in n}
    save_weights(policy, policy.denoiser, policy.denoiser.state_dict(), "lora", tmp_path)

    fresh = load_backbone(cfg)
    fresh.pipeline().load_lora_weights(tmp_path / "lora", **fresh.lora_load_kwargs)
    loaded = {n for n, _ in fresh.denoiser.named_parameters() if "lora_A" in n}
    assert len(loaded) == len(adapted) > 0, f"{len(adapted) - len(loaded)} adapted layers were not loaded"
    noisy, embeds = _noise(policy, family, 1), policy.encode_prompts(["a red car"])
    with torch.no_grad():
        want = policy.predict(policy.denoiser, noisy, torch.tensor([300]), embeds)
        got = fresh.predict(fresh.denoiser, noisy, torch.tensor([300]), embeds)
        policy.denoiser.disable_adapters()
        base = policy.predict(policy.denoiser, noisy, torch.tensor([300]), embeds)
    assert (want - base).abs().max() > 1e-4  # the adapter matters, so the equality is not vacuous
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
