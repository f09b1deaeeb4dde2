"""Checklist scoring speed: the shared-prefix batch against one generate() per question.

::

    python benchmarks/reward_scoring.py                                  # tiny Qwen2-VL, CPU, seconds
    python benchmarks/reward_scoring.py --device cuda --full-size        # Qwen2-VL-2B-sized, bf16
    python benchmarks/reward_scoring.py --device cuda --full-size --image-size 1024
    python benchmarks/reward_scoring.py --backend cogvlm2          # the official VisionReward architecture

The baseline is the release's way: for every question, ``generate(max_new_tokens=1)`` over the full
prompt, the image re-encoded each time (``VLMBackend.answer_naive(use_generate=True)``). The fast
path is ``VLMBackend.answer``: one encode and one prefix pass per image, all questions as one batch
over the cached prefix. Both run on the same model in this process, for 1 image and for a batch of 8
images, and the script prints ms per image for each, their ratio, images per second, and the largest
p(yes) difference between the two (a check that the fast numbers are the same answers).

``--full-size`` builds a random-initialised model with Qwen2-VL-2B's architecture in memory
(2.2 B parameters; no download) and uses Qwen2-VL's own image-size limits, so a 448-pixel image gives
256 visual tokens. The default is the tiny test model, whose timings are dominated by Python overhead.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import reward_scoring_cogvlm2
import torch
from timing import timed

from reward.backends.tiny_vlm import build_tiny_qwen2_vl
from reward.backends.vlm import VLMBackend, load_processor, parse_dtype
from reward.checklist import load_checklist
from reward.types import Sample

PROMPT = "a red fox standing in fresh snow"


def qwen2_vl_2b_model(tokenizer, dtype: torch.dtype, device: str):
    """Qwen2-VL-2B's architecture (text 1536 x 28 layers, vision 1280 x 32 blocks), random weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24],
            },
            "rms_norm_eps": 1e-6,
            "pad_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
        },
        vision_config={
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 1536,
            "num_heads": 16,
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):  # weights are created in place, in the target dtype
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = token_id("<|endoftext|>")
    return model.eval()


def build_backend(args: argparse.Namespace, workdir: Path) -> VLMBackend:
    if not args.full_size:
        path = build_tiny_qwen2_vl(workdir / "tiny")
        return VLMBackend.from_pretrained(path, dtype=args.dtype or "float32", device=args.device)
    # The tiny folder supplies the tokenizer, chat template and a processor with Qwen2-VL's limits.
    path = build_tiny_qwen2_vl(workdir / "processor", min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    processor = load_processor(str(path))
    model = qwen2_vl_2b_model(processor.tokenizer, parse_dtype(args.dtype or "bfloat16"), args.device)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"Qwen2-VL-2B-sized model: {params:.2f} B parameters, {args.dtype or 'bfloat16'}")
    return VLMBackend(model, processor, source="random qwen2-vl-2b-sized")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--full-size", action="store_true", help="Qwen2-VL-2B-sized random model (needs a GPU)"
    )
    parser.add_argument("--dtype", default=None, help="default: float32 (tiny), bfloat16 (full size)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="square side in pixels (448 full, 112 tiny)"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="images per call")
    parser.add_argument("--questions", type=int, default=30, help="first N questions of image-official")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--naive-repeats", type=int, default=1, help="timed runs of the slow baseline")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steady on a shared machine)")
    parser.add_argument(
        "--backend", default="vlm", choices=["vlm", "cogvlm2"], help="see reward_scoring_cogvlm2.py"
    )
    reward_scoring_cogvlm2.add_arguments(parser)
    args = parser.parse_args()
    if args.backend == "cogvlm2":
        reward_scoring_cogvlm2.run(args)
        return
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    side = args.image_size or (448 if args.full_size else 112)
    checklist = load_checklist("image-official")
    questions, align = checklist.question_texts(PROMPT)[: args.questions], checklist.alignment_text(PROMPT)

    with tempfile.TemporaryDirectory() as tmp:
        backend = build_backend(args, Path(tmp))
        gen = torch.Generator().manual_seed(0)
        print(f"{len(questions)} questions + alignment, {side}x{side} images, device {args.device}")
        print(
            f"{'images':>6} {'generate/question ms/img':>25} {'shared prefix ms/img':>21} {'ratio':>7} "
            f"{'img/s':>7} {'max |dp|':>9}"
        )
        for batch in args.batch:
            samples = [Sample(torch.rand(3, side, side, generator=gen), prompt=PROMPT) for _ in range(batch)]
            rows, aligns = [questions] * batch, [align] * batch
            backend.batch_size = batch
            fast = backend.answer(samples, rows, aligns)  # also the warm-up runs
            naive = backend.answer_naive(samples, rows, aligns, use_generate=True)
            diff = float((fast.p_yes - naive.p_yes).abs().max())
            fast_call = functools.partial(backend.answer, samples, rows, aligns)
            naive_call = functools.partial(backend.answer_naive, samples, rows, aligns, use_generate=True)
            t_fast = timed(fast_call, args.device, args.repeats)
            t_naive = timed(naive_call, args.device, args.naive_repeats)
            print(
                f"{batch:>6} {1e3 * t_naive / batch:>25.1f} {1e3 * t_fast / batch:>21.1f} "
                f"{t_naive / t_fast:>7.1f} {batch / t_fast:>7.1f} {diff:>9.1e}"
            )


if __name__ == "__main__":
    main()
