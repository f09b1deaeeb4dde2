"""CogVLM2 (the official VisionReward architecture) scoring speed: the packed shared prefix against the
release's way. Run through ``benchmarks/reward_scoring.py --backend cogvlm2``::

    python benchmarks/reward_scoring.py --backend cogvlm2                        # tiny + mid-size, CPU
    python benchmarks/reward_scoring.py --backend cogvlm2 --variant image
    python benchmarks/reward_scoring.py --backend cogvlm2 --device cuda --full-size            # video
    python benchmarks/reward_scoring.py --backend cogvlm2 --device cuda --full-size --variant image

Baseline, the release's way (``CogVLM2Backend.answer_naive``): for every question one full forward
over the whole prompt, the image or the video's frames re-encoded by the vision tower each time, and
the full-vocabulary logits at the answer position (the release's ``generate()`` reads its first token
from exactly these; it then goes on to end-of-text, which is not counted here, so the baseline is
timed generously). Fast path (``CogVLM2Backend.answer``): the vision tower and the prefix once per
sample, all questions packed into one sequence per sample over the cached prefix, several samples per
batch. Same model, same samples, same process; the script prints ms per sample for both, their ratio,
samples/s, the fast path's achieved TFLOP/s (``torch.utils.flop_counter``) and its share of
``--peak-tflops``, and the largest p(yes) difference between the two paths.

Models (random weights, built in memory, nothing downloaded; the tiny tokenizer stands in for
Llama-3's, whose ids all fit the full vocabulary):

- ``tiny``: the test model (width 64, 2 layers; 16-px frames, 6 tokens each);
- ``mid``: width 256, 4 layers, through a 2-layer 128-wide tower: 448-px images (258 tokens) or
  224-px frames (66 tokens each);
- ``--full-size``: CogVLM2's own dimensions: Llama-3-8B decoder (4096 x 32 layers, 8 key/value
  heads, vocabulary 128256) with the visual expert for ``--variant image`` (19 B parameters, 1344 px,
  2306 vision tokens) or without it for ``video`` (12 B, 24 frames of 224 px, 67 tokens each), over
  the EVA2-CLIP-E tower (1792 x 63 layers). bf16, needs a GPU with ~50 GB free.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from timing import timed

from reward.backends.cogvlm2.backend import CogVLM2Backend
from reward.backends.cogvlm2.config import CogVLM2Config
from reward.backends.cogvlm2.tiny import build_tiny_model, tiny_answer_ids, tiny_config, tiny_tokenizer
from reward.backends.vlm import parse_dtype
from reward.checklist import load_checklist
from reward.types import Sample

PROMPT = "a red fox standing in fresh snow"


def _mid_config(variant: str, tokenizer) -> CogVLM2Config:
    return tiny_config(
        variant,
        tokenizer,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_multi_query_heads=2,
        max_position_embeddings=4096,
        vision_config={
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_heads": 4,
            "intermediate_size": 256,
            "patch_size": 14,
            "image_size": 448 if variant == "image" else 224,  # 258 / 66 vision tokens
        },
    )


def _full_config(variant: str, tokenizer) -> CogVLM2Config:
    ids = tokenizer.convert_tokens_to_ids
    return CogVLM2Config(
        variant=variant,
        vocab_size=128256,
        max_position_embeddings=8192 if variant == "image" else 2048,
        vision_config={"image_size": 1344 if variant == "image" else 224},  # EVA2-CLIP-E defaults otherwise
        pad_token_id=ids("<|reserved_special_token_0|>"),
        bos_token_id=ids("<|begin_of_text|>"),
        eos_token_id=ids("<|end_of_text|>"),
    )


def build(size: str, variant: str, device: str, dtype: torch.dtype) -> CogVLM2Backend:
    tokenizer = tiny_tokenizer()
    if size == "full":
        from reward.backends.cogvlm2.modeling import CogVLM2ForCausalLM

        config = _full_config(variant, tokenizer)
        torch.manual_seed(0)
        with torch.device(device):
            model = CogVLM2ForCausalLM._from_config(config, dtype=dtype).eval()
    else:
        config = (tiny_config if size == "tiny" else _mid_config)(variant, tokenizer)
        model = build_tiny_model(config, seed=0, answer_ids=tiny_answer_ids(tokenizer)).to(device, dtype)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{size} {variant} CogVLM2: {params:,.1f} M parameters, {str(dtype).split('.')[-1]}, {device}")
    return CogVLM2Backend(model, tokenizer, source=f"random {size}")


def samples_for(variant: str, count: int, frames: int, side: int) -> list[Sample]:
    gen = torch.Generator().manual_seed(0)
    if variant == "image":
        return [Sample(torch.rand(3, side, side, generator=gen), prompt=PROMPT) for _ in range(count)]
    return [
        Sample(torch.rand(frames, 3, side, side, generator=gen), prompt=PROMPT, fps=1.0) for _ in range(count)
    ]


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def run(args: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype or ("bfloat16" if args.full_size else "float32"))
    sizes = ["full"] if args.full_size else ["tiny", "mid"]
    checklist = load_checklist(f"{args.variant}-official")
    print(
        f"{args.variant}-official: {len(checklist.questions)} questions"
        + (" + alignment" if checklist.alignment_question else "")
    )
    for size in sizes:
        backend = build(size, args.variant, args.device, dtype)
        side = {"tiny": 32, "mid": 448, "full": 1344 if args.variant == "image" else 360}[size]
        frames = args.frames or (24 if size == "full" else 4)
        print(
            f"{'samples':>7} {'release way ms/sample':>22} {'packed prefix ms/sample':>24} {'ratio':>7} "
            f"{'FLOP ratio':>10} {'samples/s':>9} {'TFLOP/s':>8} {'% peak':>7} {'max |dp|':>9}"
        )
        for batch in args.batch:
            samples = samples_for(args.variant, batch, frames, side)
            rows = [checklist.question_texts(s.prompt) for s in samples]
            align = (
                [checklist.alignment_text(s.prompt) for s in samples]
                if checklist.alignment_question
                else None
            )
            backend.batch_size = batch
            fast_call = functools.partial(backend.answer, samples, rows, align)
            naive_call = functools.partial(backend.answer_naive, samples, rows, align)
            fast = fast_call()  # warms the model up for both paths
            t_fast = timed(fast_call, args.device, args.repeats)
            # The baseline is timed on its first call: the fast path above already warmed the kernels,
            # and a second pass of the slow path would only double the wait.
            start = time.perf_counter()
            naive = naive_call()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t_naive = time.perf_counter() - start
            if args.naive_repeats > 1:
                t_naive = timed(naive_call, args.device, args.naive_repeats)
            diff = float((fast.p_yes - naive.p_yes).abs().max())
            fast_flops = flops(fast_call)
            # FLOPs of the baseline from one sample's questions, times the samples (all alike)
            one = functools.partial(backend.answer_naive, samples[:1], rows[:1], align[:1] if align else None)
            flop_ratio = flops(one) * batch / fast_flops
            tflops = fast_flops / t_fast / 1e12
            peak = f"{100 * tflops / args.peak_tflops:>6.1f}%" if args.peak_tflops else f"{'-':>7}"
            print(
                f"{batch:>7} {1e3 * t_naive / batch:>22.1f} {1e3 * t_fast / batch:>24.1f} "
                f"{t_naive / t_fast:>7.1f} {flop_ratio:>10.1f} {batch / t_fast:>9.2f} {tflops:>8.3f} {peak} "
                f"{diff:>9.1e}"
            )
        del backend
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variant", default="video", choices=["video", "image"], help="cogvlm2: which release"
    )
    parser.add_argument(
        "--frames", type=int, default=None, help="cogvlm2 video: frames per sample (1 s apart)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's sustained bf16 matmul TFLOP/s, for the %% of peak column (H100: ~700)",
    )
