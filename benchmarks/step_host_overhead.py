"""Host time per micro-step of the DPO step beyond the denoiser's own kernel launches, on the real SDXL
UNet (2.57 B) and CogVideoX-2B transformer (1.69 B) structures.

::

    python benchmarks/step_host_overhead.py                 # both families, LoRA and full
    python benchmarks/step_host_overhead.py --family sdxl --finetune lora --reps 50

On a GPU the host queues a step's kernels while the device runs the previous ones; whatever the host
does besides launching the denoiser's kernels (walking 7,500 modules to toggle adapters, unwrapping
the model, waiting on a ``.item()``) is time the GPU may sit idle, most of all at one pair per GPU.
To see that host work alone, the denoisers are built with their real structure on the ``meta``
device (every module and LoRA layer, no memory), their ``forward`` becomes one multiplication by a
trainable scalar, and the step's own tensors are tiny CPU tensors (8 x 8 latents), whose eager ops
cost about what a kernel launch does: what is left is the step's Python and its few dozen small ops,
plus whatever walks the real structures (560 LoRA layers in SDXL's UNet, 120 in CogVideoX-2B's
transformer, at the default targets). The meta device itself is no proxy for launches: its ops run
Python shape functions of ~0.3 ms each.

Measured per micro-step, medians: this project's :func:`mpo.train.micro_step` (a micro-step inside
gradient accumulation, and the last one, which also clips and hands the device-side skip flag to the
optimizer; the optimizer's own kernel is left out: fused AdamW is one launch per dtype), the same for
the plain diffusers-example step of benchmarks/dpo_step.py (without its ``.item()`` logging, which
cannot run on meta: on a GPU those are syncs on top), and the pieces the plain step pays that the
project's does not. Goal: under 5 ms per micro-step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_models import batches, denoiser, pipeline, spec
from dpo_step import PlainStep, project_recipe

META = torch.device("meta")


def stub_forward(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """The denoiser's forward becomes one multiply by a trainable scalar (so backward has a graph)."""

    def forward(self, *args, **kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        return (sample * weight,)

    module.forward = types.MethodType(forward, module)


def accelerator() -> Any:
    """Accumulation 2 (a micro-step inside the accumulation, then the last one), and no placement:
    the meta denoisers stay on meta, the step's tensors on the CPU."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, device_placement=False, gradient_accumulation_steps=2)


def median_ms(function, reps: int) -> float:
    function()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def timed_pair(first, second, reps: int) -> tuple[float, float]:
    """Medians (ms) of ``first`` (a micro-step inside accumulation) and ``second`` (the last one)."""
    inside, last = [], []
    for _ in range(reps):
        start = time.perf_counter()
        first()
        middle = time.perf_counter()
        second()
        inside.append((middle - start) * 1000)
        last.append((time.perf_counter() - middle) * 1000)
    return statistics.median(inside), statistics.median(last)


def measure(family: str, finetune: str, reps: int) -> dict[str, Any]:
    import mpo.train
    from mpo.backbones.registry import get_backbone_class

    s = spec(family, "full")
    small = dataclasses.replace(  # the step's own tensors: tiny, so that their ops cost a launch
        s,
        latent_shape=(*s.latent_shape[:-2], 8, 8),
        embeds={k: (1,) * len(v) for k, v in s.embeds.items()},
    )
    data = batches(small, 1, 2, "cpu")
    args = argparse.Namespace(
        finetune=finetune, precision="no", beta=5000.0, reference="live", gradient_checkpointing=False
    )
    row: dict[str, Any] = {"family": family, "finetune": finetune}
    weight = torch.nn.Parameter(torch.ones(()))

    # The project's step.
    acc = accelerator()
    with torch.device(META):
        module = denoiser(s)
    backbone = get_backbone_class(family)(pipeline(s, module), META)
    t = mpo.train.prepare_step(project_recipe(s, args, 1), acc, backbone)
    for target in {id(t.policy): t.policy, id(t.reference.module): t.reference.module}.values():
        stub_forward(target, weight)
    t.trainable = [weight]  # what the stub trains (the meta weights get no gradient)
    inner = t.optimizer.optimizer
    inner._step_supports_amp_scaling, inner.step = True, lambda *a, **k: None  # its kernel is left out
    row["LoRA layers"] = len(t.switch.layers) if t.switch is not None else 0

    window = []

    def project_first():  # what the loop does per micro-step
        window.append(mpo.train.micro_step(t, data[0], 1, [data[0]["pair"]]).scalars())

    def project_last():  # ... and per optimizer step
        window.append(mpo.train.micro_step(t, data[1], 1, [data[0]["pair"], data[1]["pair"]]).scalars())
        t.lr_used = t.scheduler.get_last_lr()[0]
        t.scheduler.step()
        t.guard.seen.clear()
        window.clear()

    row["project ms"], row["project ms (last)"] = timed_pair(project_first, project_last, reps)

    # The plain step on another copy of the same structure.
    acc = accelerator()
    with torch.device(META):
        module = denoiser(s)
    plain = PlainStep(s, module, acc, args, place=False)
    for target in (plain.model, *([plain.ref] if plain.ref is not None else [])):
        stub_forward(target, weight)
    plain.params = [weight]
    plain.optimizer.optimizer.step = lambda *a, **k: None
    row["plain ms"], row["plain ms (last)"] = timed_pair(
        lambda: plain.step(data[0], log=False), lambda: plain.step(data[1], log=False), reps
    )

    # What the plain step pays per micro-step that the project's does not.
    model = plain.model
    if finetune == "lora":

        def toggles():
            model.disable_adapters()
            model.enable_adapters()

        def switch_cycle():
            with t.switch.off():
                pass

        row["disable+enable_adapters ms"] = median_ms(toggles, reps)
        row["LoraSwitch off+on ms"] = median_ms(switch_cycle, reps)
    row["2 x unwrap_model ms"] = median_ms(lambda: (acc.unwrap_model(model), acc.unwrap_model(model)), reps)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["sdxl", "cogvideox"], choices=["sdxl", "cogvideox"])
    parser.add_argument("--finetune", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(f, ft, args.reps) for f in args.family for ft in args.finetune]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(f"torch {torch.__version__}; host ms per micro-step, medians of {args.reps}; goal < 5 ms")
    print(" | ".join(keys))
    for row in rows:
        print(
            " | ".join(
                f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "-")) for k in keys
            )
        )


if __name__ == "__main__":
    main()
