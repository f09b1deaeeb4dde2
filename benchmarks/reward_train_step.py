"""Reward-training step speed: all questions of a sample over one shared prefix, against one question
per forward (every question its own full prompt, the image re-encoded each time).

::

    python benchmarks/reward_train_step.py                                     # tiny Qwen2-VL, CPU, seconds
    python benchmarks/reward_train_step.py --device cuda --full-size           # Qwen2-VL-2B-sized, bf16, LoRA
    python benchmarks/reward_train_step.py --device cuda --full-size --image-size 1024 --samples 2

One training step = forward, token cross-entropy at every question's answer position, backward, AdamW
step, for ``--samples`` images asked ``--questions`` questions each. The shared-prefix step is the
trainer's (:class:`reward.train_model.AnswerModel`); the baseline runs the same questions one full
forward each (:func:`reward.train_model.one_question_at_a_time`), which is how a trainer that treats
every question-answer pair as its own example pays for them. Both run on the same model in this
process, and the script prints ms per step, samples/s, question rows/s, their ratio, peak GPU memory,
and the largest difference between the two losses (a check that both steps train the same thing).

``--full-size`` builds a random-initialised model with Qwen2-VL-2B's architecture in memory (2.2 B
parameters; no download; see benchmarks/reward_scoring.py), loaded in bf16 with LoRA (rank
``--lora-rank``) on every linear layer of the language model, the adapters in float32 and the
forward under bf16 autocast, as ``reward train`` runs with model.dtype=bfloat16 and
train.mixed_precision=bf16. It needs a CUDA device. The default is the tiny test model, whose timings
are dominated by Python overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch

from reward.backends.tiny_vlm import build_tiny_qwen2_vl
from reward.backends.vlm import VLMBackend, load_processor, parse_dtype
from reward.checklist import load_checklist
from reward.train_loss import token_ce
from reward.train_model import AnswerModel, LoraFinetune, one_question_at_a_time
from reward.types import Sample

try:  # run as a script from the repository root or from benchmarks/
    from reward_scoring import qwen2_vl_2b_model
    from timing import timed
except ImportError:  # pragma: no cover
    from benchmarks.reward_scoring import qwen2_vl_2b_model
    from benchmarks.timing import timed


class _Lora:
    """The recipe fields LoraFinetune reads."""

    def __init__(self, rank: int) -> None:
        self.lora_rank, self.lora_alpha, self.lora_dropout = rank, 2 * rank, 0.0
        self.lora_target_modules, self.train_vision = None, False


def build(args: argparse.Namespace, workdir: Path) -> VLMBackend:
    if not args.full_size:
        path = build_tiny_qwen2_vl(workdir / "tiny")
        processor = load_processor(str(path))
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=parse_dtype(args.dtype or "float32"))
        model = model.to(args.device)
    else:
        path = build_tiny_qwen2_vl(workdir / "processor", min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        processor = load_processor(str(path))
        model = qwen2_vl_2b_model(processor.tokenizer, parse_dtype(args.dtype or "bfloat16"), args.device)
    model = LoraFinetune(_Lora(args.lora_rank)).prepare(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # float32 adapters, as the trainer keeps them under mixed precision
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    total = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {total:,.1f} M parameters, LoRA rank {args.lora_rank}: {trainable:,.2f} M trainable")
    backend = VLMBackend(model, processor, source="benchmark")
    model.train()
    return backend


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--full-size", action="store_true", help="Qwen2-VL-2B-sized random model (needs a GPU)"
    )
    parser.add_argument("--dtype", default=None, help="weights: default float32 (tiny), bfloat16 (full size)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="square side in pixels (448 full, 112 tiny)"
    )
    parser.add_argument("--samples", type=int, default=4, help="images per step")
    parser.add_argument("--questions", type=int, default=30, help="first N questions of image-official")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median)")
    parser.add_argument("--naive-repeats", type=int, default=1, help="timed steps of the slow baseline")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steady on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    side = args.image_size or (448 if args.full_size else 112)
    questions = load_checklist("image-official").question_texts("")[: args.questions]
    cuda = args.device.startswith("cuda")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cuda and args.full_size else contextlib.nullcontext()
    )

    with tempfile.TemporaryDirectory() as tmp:
        backend = build(args, Path(tmp))
        model = backend.model
        answers = AnswerModel(model, backend)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        gen = torch.Generator().manual_seed(0)
        samples = [Sample(torch.rand(3, side, side, generator=gen)) for _ in range(args.samples)]
        rows = [questions] * len(samples)
        target = (torch.arange(len(samples) * len(questions)) % 2).float().to(args.device)
        yes, no = backend.yes_ids[0], backend.no_ids[0]

        def step(forward) -> None:
            with autocast:
                logits = forward(samples, rows)
            loss = token_ce(logits, target, yes, no).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def shared() -> None:
            step(answers)

        def naive() -> None:
            step(lambda s, r: one_question_at_a_time(backend, s, r))

        # The loss difference is read on the same weights: one forward each, before any step.
        with torch.no_grad(), autocast:
            a = token_ce(answers(samples, rows), target, yes, no).mean()
            b = token_ce(one_question_at_a_time(backend, samples, rows), target, yes, no).mean()
        shared()  # warm-up (and the first optimizer step)
        naive()
        results = {}
        for name, fn, repeats in (
            ("shared prefix", shared, args.repeats),
            ("one question", naive, args.naive_repeats),
        ):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(fn, args.device, repeats)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            results[name] = (seconds, peak)
        print(f"{len(samples)} images {side}x{side}, {len(questions)} questions each, device {args.device}")
        print(f"{'step':>14} {'ms/step':>9} {'samples/s':>10} {'rows/s':>8} {'peak GiB':>9}")
        for name, (seconds, peak) in results.items():
            n = len(samples)
            print(
                f"{name:>14} {1e3 * seconds:>9.1f} {n / seconds:>10.2f} {n * len(questions) / seconds:>8.1f} {peak:>9.2f}"
            )
        ratio = results["one question"][0] / results["shared prefix"][0]
        print(
            f"shared prefix is {ratio:.1f}x faster per step; |loss difference| before training {abs(float(a - b)):.1e}"
        )


if __name__ == "__main__":
    main()
