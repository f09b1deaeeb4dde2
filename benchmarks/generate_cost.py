"""Cost of candidate generation per sampler setting, against the reference sampler in the same run.

::

    python benchmarks/generate_cost.py                                  # tiny SDXL + CogVideoX, CPU
    python benchmarks/generate_cost.py --family cogvideox --prompts 8
    python benchmarks/generate_cost.py --size full --device cuda        # SDXL 1024 px N=8, CogVideoX-2B 49 f N=4
    python benchmarks/generate_cost.py --size full --tiny               # the full-size path, shrunk, one step (CPU)

``--size tiny`` (default): the tiny, briefly pretrained models (built here, as ``model.tiny`` builds
them) run ``mpo calibrate``'s measurement: the reference (the family's default scheduler at
``--reference-steps``) and each setting on the same prompts and seeds, printing denoiser calls and
seconds per candidate, their ratios to the reference, and the pair agreement (Jaccard, kept with the
same winner, Spearman of totals) after scoring with the pixel-statistics reward and MPO selection.

``--size full``: the cost side alone, on random-initialised full-size denoisers (SDXL-base's UNet at
1024 x 1024 with N=8; CogVideoX-2B's transformer at 49 x 480 x 720 with N=4) inside their real
pipelines (small text encoders of the right widths: they run once per prompt, outside the timed
loop). Per setting: seconds per candidate and per step, denoiser FLOPs per step (counted by
``torch.utils.flop_counter``) and the % of the device's peak, measured here with a large matmul in
the model's dtype. Random weights say nothing about agreement, so none is printed. ``--tiny`` shrinks
every width and the resolution and stops after the first step: a CPU check that the path runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import timed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpo.backbones.tiny import clip_tokenizer, t5_tokenizer  # noqa: E402
from mpo.calibrate import REFERENCE, calibrate, denoise_candidates, format_table  # noqa: E402
from mpo.config import load_recipe  # noqa: E402
from mpo.sampling import count_denoiser_calls  # noqa: E402

RECIPES = {
    "sdxl": ROOT / "recipes" / "tiny" / "sdxl.yaml",
    "cogvideox": ROOT / "recipes" / "tiny" / "cogvideox.yaml",
}
SETTINGS = {
    "sdxl": [
        "num_inference_steps=25",
        "scheduler=dpmpp_2m,num_inference_steps=15",
        "scheduler=dpmpp_2m,num_inference_steps=10",
        "scheduler=unipc,num_inference_steps=10",
        "scheduler=unipc,num_inference_steps=10,batch_size=16",
        "scheduler=unipc,num_inference_steps=10,batch_size=auto,channels_last=true",
    ],
    "cogvideox": [
        "num_inference_steps=25",
        "scheduler=dpmpp_2m,num_inference_steps=15",
        "scheduler=unipc,num_inference_steps=10",
        # The cache hooks skip work inside each denoiser call: at the reference's steps, their saving
        # shows in seconds, not in calls.
        "cache=pab,num_inference_steps=50",
        "cache=first_block,cache_options={threshold: 0.1},num_inference_steps=50",
        "scheduler=unipc,num_inference_steps=10,batch_size=16",
        "scheduler=unipc,num_inference_steps=10,batch_size=auto,attention=sdpa_flash",
    ],
}


# ---- tiny: cost and agreement -------------------------------------------------------------------------
def tiny(family: str, prompts: int, reference_steps: int, settings: list[str], threshold: float) -> None:
    from mpo.calibrate import parse_setting

    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"output_dir={tmp}/run",
            f"model.path={tmp}/model",
            f"prompts.file={ROOT}/recipes/tiny/prompts.txt",
        ]
        base = load_recipe(str(RECIPES[family]), common)
        reference = load_recipe(
            str(RECIPES[family]), [*common, f"generate.num_inference_steps={reference_steps}"]
        )
        loaded = [(s, load_recipe(str(RECIPES[family]), [*common, *parse_setting(s)])) for s in settings]
        table = calibrate(base, loaded, reference, prompts)
    print(
        f"\n{family} (tiny, {prompts} prompts x {base.generate.num_candidates}, reference {reference_steps} steps)"
    )
    print(format_table(table, threshold))
    ref = next(r for r in table if r.setting == REFERENCE)
    for r in table:
        print(
            f"  {r.setting}: calls x{r.denoiser_calls / ref.denoiser_calls:.2f}, seconds x{r.seconds / ref.seconds:.2f}"
        )


# ---- full size: cost alone -------------------------------------------------------------------------------
def sdxl_pipeline(small: bool):
    """SDXL-base's UNet and VAE (random weights), two 2-layer CLIP encoders of SDXL's widths."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    width = 8 if small else 1  # divide channels by this
    text = {
        "vocab_size": len(tokenizer),
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "intermediate_size": 256,
    }
    enc1 = CLIPTextModel(CLIPTextConfig(**text, hidden_size=768 // width, num_attention_heads=4))
    enc2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**text, hidden_size=1280 // width, num_attention_heads=4, projection_dim=1280 // width)
    )
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(c // width for c in (320, 640, 1280)),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2) if small else (1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048 // width,
        addition_embed_type="text_time",
        addition_time_embed_dim=256 // width,
        projection_class_embeddings_input_dim=6 * (256 // width) + 1280 // width,
        norm_num_groups=8 if small else 32,
    )
    vae = AutoencoderKL(
        block_out_channels=tuple(c // width for c in (128, 256, 512, 512)),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=8 if small else 32,
        sample_size=1024,
        scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae,
        enc1,
        enc2,
        tokenizer,
        clip_tokenizer(),
        unet,
        scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def cogvideox_pipeline(small: bool):
    """CogVideoX-2B's transformer (30 layers, 30 heads of 64, sincos positions) and 3D VAE, random
    weights; a 1-layer T5 of width 4096 (the transformer's text width)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    length = 226
    tokenizer = t5_tokenizer(length)
    text_width = 64 if small else 4096
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=text_width,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2 if small else 30,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        time_embed_dim=512,
        text_embed_dim=text_width,
        num_layers=2 if small else 30,
        sample_width=90,
        sample_height=60,
        sample_frames=49,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=length,
        use_rotary_positional_embeddings=False,
    )
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(32, 32, 32, 32) if small else (128, 256, 256, 512),
        norm_num_groups=8 if small else 32,
        latent_channels=16,
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0,
    )
    return CogVideoXPipeline(tokenizer, encoder, vae, transformer, scheduler)


FULL = {
    # family: (pipeline builder, generate sizes, N, sizes with --tiny)
    "sdxl": (sdxl_pipeline, {"height": 1024, "width": 1024}, 8, {"height": 64, "width": 64}),
    "cogvideox": (
        cogvideox_pipeline,
        {"height": 480, "width": 720, "num_frames": 49},
        4,
        {"height": 64, "width": 64, "num_frames": 9},
    ),
}


def measured_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of a square matmul in ``dtype``: the attainable peak this run compares steps against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    seconds = timed(lambda: a @ b, str(device), 5)
    return 2 * size**3 / seconds


def step_flops(backbone, embeds, negative, gen, n: int, dtype) -> float:
    """Denoiser FLOPs of one guided step at batch 2N (counted on one forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = backbone.latent_shape(gen)
    device = next(backbone.denoiser.parameters()).device
    noisy = torch.randn(2 * n, *shape, device=device, dtype=dtype)
    rows = {
        k: torch.cat([v.expand(n, *v.shape[1:]), negative[k].expand(n, *v.shape[1:])]).to(device, dtype)
        for k, v in embeds.items()
    }
    t = torch.full((2 * n,), 500, device=device, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.predict(backbone.denoiser, noisy, t, rows)
    return float(counter.get_total_flops())


def full(
    family: str, device: torch.device, dtype: torch.dtype, small: bool, settings: list[str], steps: int
) -> None:
    import pandas as pd
    from omegaconf import OmegaConf

    from mpo.backbones.registry import get_backbone_class
    from mpo.calibrate import parse_setting
    from mpo.schema import GenerateConfig

    builder, sizes, n, small_sizes = FULL[family]
    if small:
        n, sizes, steps, settings = 2, small_sizes, 1, []  # the reference's first step, nothing more
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = builder(small).to(dtype)
    backbone = get_backbone_class(family)(pipe, device)
    prompts = pd.DataFrame({"prompt_id": [0], "prompt": ["a photo of a cat"]})
    negative = backbone.encode_negative()
    embeds = backbone.encode_prompts(["a photo of a cat"])
    base = OmegaConf.structured(GenerateConfig(num_candidates=n, num_inference_steps=steps, **sizes))
    flops = step_flops(backbone, embeds, negative, base, n, dtype)
    peak = measured_peak(device, dtype, 512 if small else 8192)
    print(
        f"\n{family} (full-size architecture{', shrunk' if small else ''}, random weights, {dtype}, N={n}, "
        f"{sizes}): {flops / 1e9:.1f} GFLOP per guided step, measured peak {peak / 1e12:.2f} TFLOP/s"
    )
    if not small:
        denoise_candidates(backbone, prompts, negative, _with(base, num_inference_steps=2), dtype)  # warm-up
    rows = []
    for label, overrides in [(REFERENCE, []), *[(s, parse_setting(s)) for s in settings]]:
        gen = _with(base, **{o.split("=", 1)[0].removeprefix("generate."): _value(o) for o in overrides})
        with count_denoiser_calls(backbone.denoiser) as counter:
            start = time.perf_counter()
            _, _, seconds, _ = denoise_candidates(backbone, prompts, negative, gen, dtype)
            wall = time.perf_counter() - start
        per_step = seconds / counter.calls
        rows.append((label, counter.rows / n, seconds / n, per_step, flops / per_step / peak, wall))
    ref = rows[0]
    for label, calls, per_cand, per_step, fraction, _ in rows:
        print(
            f"  {label:<50} calls/cand {calls:6.1f}  s/cand {per_cand:8.3f} (x{per_cand / ref[2]:.2f})  "
            f"s/step {per_step:7.3f}  {100 * fraction:5.1f}% of peak"
        )


def _value(override: str):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.from_dotlist([override]))["generate"].popitem()[1]


def _with(gen, **changes):
    from omegaconf import OmegaConf

    copy = OmegaConf.create(OmegaConf.to_container(gen))
    for key, value in changes.items():
        copy[key] = value
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--family", choices=("sdxl", "cogvideox", "both"), default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, help="full size: bfloat16 on CUDA, float32 on CPU by default"
    )
    parser.add_argument("--prompts", type=int, default=6, help="tiny: prompts (x N candidates) per setting")
    parser.add_argument("--reference-steps", type=int, default=50)
    parser.add_argument("--agreement", type=float, default=0.9)
    parser.add_argument("--setting", action="append", help="generate.* overrides, as for mpo calibrate")
    parser.add_argument(
        "--tiny", action="store_true", help="full size: shrink the models, run the first step only"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    families = ["sdxl", "cogvideox"] if args.family == "both" else [args.family]
    for family in families:
        settings = args.setting or SETTINGS[family]
        if args.size == "tiny":
            tiny(family, args.prompts, args.reference_steps, settings, args.agreement)
        else:
            device = torch.device(args.device)
            dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
            full(family, device, dtype, args.tiny, settings, args.reference_steps)


if __name__ == "__main__":
    main()
