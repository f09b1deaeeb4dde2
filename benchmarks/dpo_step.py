"""Speed of the Diffusion-DPO training step: this project's step against a plain one written the way
the public diffusers-example DPO scripts write it, on the same model, the same inputs, in one run.

::

    python benchmarks/dpo_step.py                              # CPU: mid-size SDXL UNet and CogVideoX
    python benchmarks/dpo_step.py --family sdxl --finetune lora --batch 1 4 --steps 6
    python benchmarks/dpo_step.py --device cuda --full-size    # SDXL 1024 px, CogVideoX-2B 49 frames, bf16

The plain step (:class:`PlainStep`) follows diffusers' ``train_diffusion_dpo_sdxl.py`` (LoRA) and the
original Diffusion-DPO full fine-tuning script: the reference by ``disable_adapters()`` /
``enable_adapters()`` on ``accelerator.unwrap_model(unet)`` (LoRA) or a frozen copy in the compute
dtype (full), time ids rebuilt from host lists every step, the default ``torch.optim.AdamW``, and the
example's per-step ``.item()`` logging. The project's step is :func:`mpo.train.micro_step` on a
trainer from :func:`mpo.train.prepare_step`, around the same denoiser (a copy of the same weights).

Both steps run alternately, in rounds of blocks of a few steps, after a warm-up (at full size on a
GPU one after the other, each on a fresh copy of the weights: two full fine-tuning states of SDXL do
not fit in one GPU). Printed per row: pairs/s of each (medians), their ratio (project / plain speed,
the median over neighbouring blocks, which share the machine's load: above 1 is faster), host reads
per step (``.item()`` and friends: each one a sync on a GPU), and memory: on a GPU the peak allocated;
on a CPU the training state (weights, gradients, optimizer moments, reference copy) plus what autograd
saved for the backward pass of one step. With ``--full-size`` on a GPU also the step's FLOPs
(``torch.utils.flop_counter``) and the share of the bf16 matmul peak measured in this process.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_models import Spec, batches, denoiser, pipeline, spec

from mpo.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- the plain step ---------------------------------------------------------------------------------
class PlainStep:
    """A Diffusion-DPO step as the public diffusers-example scripts write it."""

    def __init__(
        self, s: Spec, module: torch.nn.Module, acc: Any, args: argparse.Namespace, place: bool = True
    ) -> None:
        from diffusers import CogVideoXDDIMScheduler, DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.s, self.acc, self.beta, self.max_grad_norm = s, acc, args.beta, 1.0
        weight_dtype = DTYPES[args.precision]
        self.ref = None
        device = acc.device if place else next(module.parameters()).device
        if args.finetune == "lora":
            module.requires_grad_(False).to(device, weight_dtype)
            targets = ["to_q", "to_k", "to_v", "to_out.0"]
            module.add_adapter(
                LoraConfig(
                    r=s.lora_rank,
                    lora_alpha=s.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=targets,
                )
            )
            cast_training_params(module, torch.float32)
        else:
            module.to(device)
            self.ref = copy.deepcopy(module).requires_grad_(False).to(weight_dtype).eval()
            module.requires_grad_(True)
        if args.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.params = params
        self.model, self.optimizer = acc.prepare(module, optimizer)
        self.lr_scheduler = get_scheduler("constant", self.optimizer)
        if s.family == "sdxl":
            self.noise_scheduler = DDPMScheduler(
                beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
            )
        else:
            self.noise_scheduler = CogVideoXDDIMScheduler(
                beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                rescale_betas_zero_snr=True, snr_shift_scale=3.0, set_alpha_to_one=True, timestep_spacing="trailing",
            )  # fmt: skip
        self.weight_dtype = weight_dtype
        self.lora = args.finetune == "lora"
        self.logs: dict[str, float] = {}

    def forward(self, model: torch.nn.Module, noisy, timesteps, embeds, batch_size: int) -> torch.Tensor:
        if self.s.family == "sdxl":
            side = noisy.shape[-1] * 8

            def compute_time_ids():  # per sample, from host lists, as the example does
                ids = torch.tensor([[side, side, 0, 0, side, side]])
                return ids.to(self.acc.device, dtype=self.weight_dtype)

            time_ids = torch.cat([compute_time_ids() for _ in range(batch_size)]).repeat(2, 1)
            return model(
                noisy,
                timesteps,
                encoder_hidden_states=embeds["prompt_embeds"],
                added_cond_kwargs={"text_embeds": embeds["pooled_prompt_embeds"], "time_ids": time_ids},
                return_dict=False,
            )[0]
        return model(
            hidden_states=noisy,
            encoder_hidden_states=embeds["prompt_embeds"],
            timestep=timesteps,
            return_dict=False,
        )[0]

    def step(self, batch: dict[str, Any], log: bool = True) -> None:
        acc, device, dtype = self.acc, self.acc.device, self.weight_dtype
        with acc.accumulate(self.model):
            latents = torch.cat([batch["latents_w"], batch["latents_l"]]).to(device, dtype)
            noise = batch["noise"].to(device, dtype).repeat(2, *([1] * (latents.dim() - 1)))
            bsz = latents.shape[0] // 2
            timesteps = batch["timestep"].to(device).repeat(2)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            embeds = {
                k: v.to(device, dtype).repeat(2, *([1] * (v.dim() - 1))) for k, v in batch["embeds"].items()
            }
            with acc.autocast():
                model_pred = self.forward(self.model, noisy, timesteps, embeds, bsz)
            if self.s.family == "sdxl":
                target = noise
            else:
                target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
            model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
            model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
            model_losses_w, model_losses_l = model_losses.chunk(2)
            raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
            model_diff = model_losses_w - model_losses_l
            with torch.no_grad():
                if self.lora:
                    acc.unwrap_model(self.model).disable_adapters()
                    reference = self.model
                else:
                    reference = self.ref
                with acc.autocast():
                    ref_preds = self.forward(reference, noisy, timesteps, embeds, bsz)
                ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
                ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
                ref_losses_w, ref_losses_l = ref_loss.chunk(2)
                ref_diff = ref_losses_w - ref_losses_l
                raw_ref_loss = ref_loss.mean()
                if self.lora:
                    acc.unwrap_model(self.model).enable_adapters()
            inside_term = -0.5 * self.beta * (model_diff - ref_diff)
            implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
            loss = -1 * F.logsigmoid(inside_term).mean()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        if acc.sync_gradients and log:
            self.logs = {
                "loss": loss.detach().item(),
                "raw_model_loss": raw_model_loss.detach().item(),
                "ref_loss": raw_ref_loss.detach().item(),
                "implicit_acc": implicit_acc.detach().item(),
                "lr": self.lr_scheduler.get_last_lr()[0],
            }

    def state_bytes(self) -> int:
        return _state_bytes([self.model, *([self.ref] if self.ref is not None else [])], self.optimizer)


# ---- the project's step -------------------------------------------------------------------------------
def project_recipe(s: Spec, args: argparse.Namespace, batch_size: int):
    recipe = ROOT / "recipes" / "tiny" / ("sdxl.yaml" if s.family == "sdxl" else "cogvideox.yaml")
    dtype = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.precision]
    overrides = [
        f"model.finetune={args.finetune}",
        f"model.lora_rank={s.lora_rank}",
        f"model.lora_alpha={s.lora_rank}",
        f"model.dtype={dtype if args.finetune == 'lora' else 'float32'}",
        f"train.mixed_precision={args.precision}",
        f"train.beta={args.beta}",
        "train.learning_rate=1e-6",
        "train.weight_decay=1e-2",
        f"train.batch_size={batch_size}",
        f"train.max_steps={10**6}",
        f"train.reference={args.reference}",
        f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        "tracking.tracker=none",
    ]
    return load_recipe(str(recipe), overrides)


class ProjectStep:
    """mpo.train's micro-step (and the loop's scheduler step) on a trainer built around ``module``."""

    def __init__(
        self, s: Spec, module: torch.nn.Module, acc: Any, args: argparse.Namespace, batch_size: int
    ) -> None:
        import mpo.train
        from mpo.backbones.registry import get_backbone_class
        from mpo.reference import PrecomputedReference

        self.train = mpo.train
        recipe = project_recipe(s, args, batch_size)
        dtype = DTYPES[args.precision] if args.finetune == "lora" else torch.float32
        backbone = get_backbone_class(s.family)(pipeline(s, module.to(dtype)), acc.device)
        self.t = mpo.train.prepare_step(recipe, acc, backbone)
        if args.reference == "precomputed":  # stored errors: the step reads them by position
            self.t.reference = PrecomputedReference(torch.zeros(10**6, 2, device=acc.device))
        self.step_index = 0

    def step(self, batch: dict[str, Any], log: bool = True) -> None:
        self.step_index += 1
        out = self.train.micro_step(self.t, batch, self.step_index, [batch["pair"]])
        self.window = out.scalars()  # what the loop keeps for its next log step
        self.t.lr_used = self.t.scheduler.get_last_lr()[0]
        self.t.scheduler.step()
        self.t.guard.seen.clear()  # the loop looks at log steps; here nothing is non-finite

    def state_bytes(self) -> int:
        ref = self.t.reference.module if hasattr(self.t.reference, "module") else None
        modules = [self.t.model, *([ref] if ref is not None and ref is not self.t.policy else [])]
        return _state_bytes(modules, self.t.optimizer)


# ---- measuring ----------------------------------------------------------------------------------------
def _state_bytes(modules: list[torch.nn.Module], optimizer: Any) -> int:
    seen, total = set(), 0
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tensors += [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    inner = getattr(optimizer, "optimizer", optimizer)
    tensors += [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host (each is a sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def saved_activation_bytes(step, batch) -> int:
    """Bytes autograd keeps for the backward pass during one step (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch, log=False)
    return sum(seen.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in ``dtype``, measured here."""
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def step_flops(step, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch, log=False)
    return counter.get_total_flops()


def time_blocks(side: Any, data: list[dict], steps: int, device: torch.device) -> float:
    """Seconds per step over one block of ``steps`` steps (synchronised at both ends)."""
    sync(device)
    start = time.perf_counter()
    for k in range(steps):
        side.step(data[k % len(data)])
    sync(device)
    return (time.perf_counter() - start) / steps


def describe(name: str, side: Any, data: list[dict], device: torch.device, row: dict[str, Any]) -> None:
    """Host reads of one step, and memory (peak on a GPU; state + saved activations on a CPU)."""
    mode = HostReads()
    with mode:
        side.step(data[0])
    row[f"{name} host reads"] = mode.count
    if device.type == "cuda":
        row[f"{name} peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        saved = saved_activation_bytes(side.step, data[0])
        row[f"{name} state+saved GiB"] = (side.state_bytes() + saved) / 2**30


def measure(s: Spec, args: argparse.Namespace, batch_size: int, acc: Any) -> dict[str, Any]:
    """One row. Both sides live together and alternate block by block, unless they cannot both fit
    (``--full-size`` on a GPU: two SDXL full fine-tuning states do not fit in 80 GB); then one side
    at a time, each on a fresh copy of the same weights."""
    device = acc.device
    base = denoiser(s)
    row: dict[str, Any] = {"batch": batch_size, "M params": sum(p.numel() for p in base.parameters()) / 1e6}
    data = batches(s, batch_size, 4, device)
    makers = {
        "project": lambda: ProjectStep(s, copy.deepcopy(base), acc, args, batch_size),
        "plain": lambda: PlainStep(s, copy.deepcopy(base), acc, args),
    }
    times: dict[str, list[float]] = {name: [] for name in makers}
    flops = None
    if args.full_size and device.type == "cuda":  # one at a time
        for name, make in makers.items():
            side = make()
            for batch in data[:2]:  # warm-up (and lazy allocations)
                side.step(batch)
            torch.cuda.reset_peak_memory_stats(device)
            times[name] = [time_blocks(side, data, args.steps, device) for _ in range(args.rounds)]
            describe(name, side, data, device, row)
            if name == "project":
                flops = step_flops(side.step, data[0])
            del side
            torch.cuda.empty_cache()
    else:
        sides = {name: make() for name, make in makers.items()}
        for side in sides.values():
            for batch in data[:2]:
                side.step(batch)
        for round_ in range(args.rounds):
            for name in list(sides) if round_ % 2 == 0 else list(reversed(sides)):
                times[name].append(time_blocks(sides[name], data, args.steps, device))
        for name, side in sides.items():
            describe(name, side, data, device, row)
    for name in makers:
        row[f"{name} pairs/s"] = batch_size / statistics.median(times[name])
    # The median of the block-by-block ratios: neighbouring blocks share the machine's load.
    row["ratio"] = statistics.median(b / a for a, b in zip(times["project"], times["plain"]))
    if flops is not None:
        peak = matmul_peak(device, DTYPES[args.precision] if args.precision != "no" else torch.float32)
        row["TFLOP/step"] = flops / 1e12
        row["% of peak"] = 100 * flops * row["project pairs/s"] / batch_size / peak
    return row


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["sdxl", "cogvideox"], choices=["sdxl", "cogvideox"])
    parser.add_argument("--finetune", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4], help="pairs per step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="the released SDXL / CogVideoX-2B sizes")
    parser.add_argument(
        "--precision", default=None, choices=list(DTYPES), help="default: bf16 on cuda, no on cpu"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--reference", default="live", choices=["live", "precomputed"])
    parser.add_argument("--beta", type=float, default=5000.0)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed blocks per side")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default on a CPU: 1; more than the free cores is 10x slower)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "no")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    print(
        f"torch {torch.__version__}, {device}, precision {args.precision}, threads {torch.get_num_threads()}"
    )
    families, finetunes = list(args.family), list(args.finetune)
    for family in families:
        s = spec(family, "full" if args.full_size else "mid")
        for finetune in finetunes:
            args.finetune = finetune
            rows = []
            for batch_size in args.batch:
                AcceleratorState._reset_state(reset_partial_state=True)
                acc = Accelerator(mixed_precision=args.precision, cpu=device.type == "cpu")
                rows.append(measure(s, args, batch_size, acc))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print_table(f"{s.label}, {finetune}, reference {args.reference}", rows)


if __name__ == "__main__":
    main()
