"""Flow-DPO training step on full-size flow-matching transformers: seconds per step and peak memory.

::

    python benchmarks/flow_dpo_step.py --device cuda                       # Wan 2.1 1.3B + SD3.5 Medium
    python benchmarks/flow_dpo_step.py --device cuda --model wan --finetune lora full
    python benchmarks/flow_dpo_step.py --device cuda --model sd3 --pairs 1 2 4
    python benchmarks/flow_dpo_step.py --size tiny                          # the tiny models, CPU, seconds

What runs is the trainer's own step (:func:`mpo.train.prepare_step` builds it, :func:`mpo.train.micro_step`
runs it: shared noise and timestep, one
policy forward on the stacked ``[winner; loser]`` batch, one reference forward without gradients:
LoRA adapters disabled, or a frozen copy for full fine-tuning), then backward, gradient clipping
and an AdamW step, in bf16 autocast with gradient checkpointing, as a recipe with
``train.mixed_precision: bf16`` and ``train.gradient_checkpointing: true`` runs it. Each transformer
has its release's architecture and random weights, built in place on the device (no download); no
text encoder or VAE is built, since the step runs on cached embeddings (random, of the release's
shapes) and cached latents.

- ``wan``: Wan 2.1 T2V 1.3B (1.42 B parameters), 81 frames at 480 x 832: 21 x 60 x 104 latents,
  32,760 tokens per sample, 512 text tokens.
- ``sd3``: SD3.5 Medium (MM-DiT-X, 2.24 B parameters), 1024 x 1024: 4,096 image + 333 text tokens.

The baseline in the same process is the GPU itself: a large bf16 matmul measures the card's sustained
rate, and every configuration prints its FLOPs per step (``torch.utils.flop_counter``) and the
fraction of that rate it reaches, beside s/step, pairs/s and peak GiB. ``--no-checkpointing`` adds
the same step without gradient checkpointing, for the memory it saves and the time it costs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

WAN_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}
SD35_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}


def build(model: str, size: str, device: str, dtype: torch.dtype):
    """The family's backbone around a pipeline holding only its transformer (and scheduler), plus one
    pair's cached inputs: (backbone, latent shape, embeddings of one prompt)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    from mpo.backbones import get_backbone_class

    cls = get_backbone_class(model)
    torch.manual_seed(0)
    if size == "tiny":
        pipe = cls.tiny_pipeline()
        transformer = pipe.transformer.to(device, dtype)
        shape = {"wan": (4, 3, 8, 8), "sd3": (4, 8, 8)}[model]
        text = {"wan": (16, 32), "sd3": (93, 32)}[model]
        pooled = 32
    else:
        with torch.device(device):  # weights created in place, in the target dtype
            if model == "wan":
                transformer = WanTransformer3DModel(**WAN_1_3B).to(dtype)
            else:
                transformer = SD3Transformer2DModel(**SD35_MEDIUM).to(dtype)
        shape = {"wan": (16, 21, 60, 104), "sd3": (16, 128, 128)}[model]
        text = {"wan": (512, 4096), "sd3": (77 + 256, 4096)}[model]
        pooled = 2048
    if model == "wan":
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
        pipe = WanPipeline(
            tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer
        )
        embeds = {"prompt_embeds": torch.randn(1, *text)}
    else:
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
            tokenizer_3=None,
        )  # fmt: skip
        embeds = {"prompt_embeds": torch.randn(1, *text), "pooled_prompt_embeds": torch.randn(1, pooled)}
    return cls(pipe, device), shape, embeds


def make_trainer(backbone, model: str, finetune: str, rank: int, checkpointing: bool, device: str):
    """The trainer's own step (:func:`mpo.train.prepare_step`: float32 masters, the live reference,
    the optimizer and lr schedule, the finiteness guard) around ``backbone``, from the family's tiny
    recipe with the benchmark's settings."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import mpo.train
    from mpo.config import load_recipe

    precision = "bf16" if device.startswith("cuda") else "no"
    frozen = "bfloat16" if finetune == "lora" and precision == "bf16" else "float32"
    recipe = load_recipe(
        str(ROOT / "recipes" / "tiny" / f"{model}.yaml"),
        [
            f"model.finetune={finetune}",
            f"model.lora_rank={rank}",
            f"model.lora_alpha={rank}",
            f"model.dtype={frozen}",
            f"train.mixed_precision={precision}",
            "train.beta=500",
            "train.learning_rate=1e-6",
            f"train.max_steps={10**6}",
            f"train.gradient_checkpointing={str(checkpointing).lower()}",
            "tracking.tracker=none",
        ],
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(mixed_precision=precision, cpu=not device.startswith("cuda"))
    return mpo.train.prepare_step(recipe, acc, backbone)


def batch_of(shape, embeds, pairs: int):
    generator = torch.Generator().manual_seed(0)
    return {
        "latents_w": torch.randn(pairs, *shape, generator=generator),
        "latents_l": torch.randn(pairs, *shape, generator=generator),
        "noise": torch.randn(pairs, *shape, generator=generator),
        "timestep": torch.randint(0, 1000, (pairs,), generator=generator),
        "pair": torch.zeros(pairs, 3, dtype=torch.long),
        "position": torch.arange(pairs),
        "embeds": {k: v.expand(pairs, *v.shape[1:]) for k, v in embeds.items()},
    }


def step(trainer, batch, index: int) -> torch.Tensor:
    """One optimizer step of the training loop: forward, backward, clip, update, lr schedule."""
    from mpo.train import micro_step

    out = micro_step(trainer, batch, index, [batch["pair"]])
    trainer.scheduler.step()
    trainer.guard.seen.clear()  # the loop inspects these at log steps; nothing here is non-finite
    return out.loss.detach()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """Sustained TFLOP/s of a large matmul: the ceiling every step below is measured against."""
    n = 8192 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, repeats = time.perf_counter(), 20 if device.startswith("cuda") else 3
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def measure(args, model: str, finetune: str, pairs: int, checkpointing: bool, peak: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    device, compute = args.device, torch.bfloat16
    weights = compute if args.device.startswith("cuda") else torch.float32
    backbone, shape, embeds = build(model, args.size, device, weights)
    trainer = make_trainer(backbone, model, finetune, args.rank, checkpointing, device)
    batch = batch_of(shape, embeds, pairs)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        index = 0
        for index in range(1, args.warmup + 1):
            step(trainer, batch, index)
        with FlopCounterMode(display=False) as counter:
            step(trainer, batch, index + 1)
        times = []
        first = index + 2
        for index in range(first, first + args.steps):
            sync(device)
            start = time.perf_counter()
            loss = step(trainer, batch, index)
            sync(device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"model": model, "finetune": finetune, "pairs": pairs, "ckpt": checkpointing, "oom": True}
    seconds = statistics.median(times)
    flops = counter.get_total_flops()
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return {
        "model": model,
        "finetune": finetune,
        "pairs": pairs,
        "ckpt": checkpointing,
        "s/step": seconds,
        "pairs/s": pairs / seconds,
        "TFLOP/step": flops / 1e12,
        "of peak": flops / seconds / 1e12 / peak,
        "peak GiB": memory,
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--size", choices=["full", "tiny"], default=None, help="default: full on cuda, tiny on cpu"
    )
    parser.add_argument("--model", nargs="+", choices=["wan", "sd3"], default=["wan", "sd3"])
    parser.add_argument("--finetune", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--pairs", nargs="+", type=int, default=[1])
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank")
    parser.add_argument("--no-checkpointing", action="store_true", help="also run without checkpointing")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    args.size = args.size or ("full" if args.device.startswith("cuda") else "tiny")
    if args.size == "full" and not args.device.startswith("cuda"):
        parser.error("--size full needs --device cuda (1.4-2.2 B parameters, 32k-token videos)")
    torch.backends.cuda.matmul.allow_tf32 = True

    peak = matmul_rate(args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    print(f"device {args.device}: sustained matmul {peak:.3g} TFLOP/s (the ceiling below)", flush=True)
    rows = []
    for model in args.model:
        for finetune in args.finetune:
            for pairs in args.pairs:
                for checkpointing in (True, False) if args.no_checkpointing else (True,):
                    rows.append(measure(args, model, finetune, pairs, checkpointing, peak))
                    print(rows[-1], flush=True)
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
    print()
    print(
        f"{'model':6} {'tune':5} {'pairs':>5} {'ckpt':>5} {'s/step':>8} {'pairs/s':>8} {'TFLOP':>7} {'of peak':>8} {'GiB':>6}"
    )
    for r in rows:
        if r.get("oom"):
            print(f"{r['model']:6} {r['finetune']:5} {r['pairs']:>5} {r['ckpt']!s:>5}   out of memory")
            continue
        print(
            f"{r['model']:6} {r['finetune']:5} {r['pairs']:>5} {r['ckpt']!s:>5} {r['s/step']:>8.3f} "
            f"{r['pairs/s']:>8.3f} {r['TFLOP/step']:>7.1f} {r['of peak']:>8.1%} {r['peak GiB']:>6.1f}"
        )


if __name__ == "__main__":
    main()
