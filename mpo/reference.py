"""The reference model of Diffusion-DPO, in the forms a run can choose, behind one method: the
reference's squared errors for a micro-batch of pairs.

- :class:`LiveReference` over a frozen copy (full fine-tuning, ``train.reference: live``): a copy of the
  denoiser made after its trainable weights were put in float32, and cast to the dtypes of the
  *prepared* policy (DeepSpeed bf16 holds the module in bf16). It therefore computes, at step 0, the
  very function the policy computes: the same weights in the same dtypes, under the same autocast, on
  the same inputs, so the loss is exactly log 2 and the margin exactly 0. (A copy kept in the compute
  dtype while the policy runs float32 master weights under autocast differs wherever autocast leaves
  an op in float32 or reads a weight elementwise: margins of +-0.7 at beta 5000 at step 0.) The
  price is the copy's memory in the policy's dtypes; ``precomputed`` removes it.
- :class:`LiveReference` over the policy with its LoRA adapters switched off (LoRA): the same network,
  the same weights, no copy.
- :class:`PrecomputedReference` (``train.reference: precomputed``): the errors of every stream position
  the run will train on, computed once before the first step by :func:`precompute_reference` with the
  live reference of the run (the policy itself at step 0, in eval mode like the copy; or adapters
  off), stored under ``<run>/reference/``, and read back by position. The step then runs the policy
  only, and full fine-tuning keeps no second copy of the denoiser in memory. The pass runs the same
  micro-batches on the same processes as training will, so in float32 the losses equal the live
  reference's exactly.

Layout of ``reference/``: ``part-<fp>-w<W>r<r>-<k>.safetensors`` holds the positions of chunk ``k``
(``CHUNK_MICRO_STEPS`` micro-steps) that process ``r`` of ``W`` trains on, and their two errors.
``<fp>`` is a digest of what the errors depend on (model, pairs, seed, timestep range, dtypes), so a
run with other settings never reads them. Each part is written atomically: a killed pass resumes at
the first missing chunk. A resumed run reads the stored errors whatever its process count; training
past the planned ``train.max_steps`` computes the missing ones where the reference is still at hand
(LoRA: adapters off) and refuses otherwise (full fine-tuning: the base weights are gone by then).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mpo.distributed import gather, wait_for_everyone
from mpo.loss import per_sample_mse
from mpo.store import StoreError, atomic_write
from mpo.weights import LoraSwitch

REFERENCE_DIR = "reference"
CHUNK_MICRO_STEPS = 1024


@dataclass
class StepInputs:
    """What one micro-batch of ``B`` pairs feeds the denoiser, stacked ``[win; lose]`` (``2B`` rows)."""

    noisy: torch.Tensor  # in the denoiser's input dtype
    timesteps: torch.Tensor
    embeds: dict[str, torch.Tensor]
    target: torch.Tensor  # float32, whatever the compute dtype
    weighting: torch.Tensor | None  # [B] timestep weight, or None (constant)


class LiveReference:
    """A reference network run next to the policy: a frozen copy, or the policy with adapters off."""

    def __init__(self, backbone: Any, module: nn.Module, switch: LoraSwitch | None = None) -> None:
        self.backbone, self.module, self.switch = backbone, module, switch

    def errors(self, batch: dict[str, Any], inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref_mse_w, ref_mse_l), ``[B]`` each, float32, unweighted."""
        off = self.switch.off() if self.switch is not None else contextlib.nullcontext()
        with torch.no_grad(), off:
            pred = self.backbone.predict(self.module, inputs.noisy, inputs.timesteps, inputs.embeds)
        return per_sample_mse(pred, inputs.target).chunk(2)


class PrecomputedReference:
    """Reference errors looked up by stream position in a table that lives on the device."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # [positions, 2] float32: ref_mse_w, ref_mse_l

    def errors(self, batch: dict[str, Any], inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        positions = batch["position"].to(self.table.device, non_blocking=True)
        rows = self.table[positions]
        return rows[:, 0], rows[:, 1]


def match_dtypes(copy: nn.Module, policy: nn.Module) -> None:
    """Give every parameter and buffer of ``copy`` the dtype of the same-named one of ``policy``."""
    mine = dict(copy.named_parameters())
    mine.update(dict(copy.named_buffers()))
    theirs = dict(policy.named_parameters())
    theirs.update(dict(policy.named_buffers()))
    for name, tensor in mine.items():
        wanted = theirs[name].dtype
        if tensor.dtype != wanted:
            tensor.data = tensor.data.to(wanted)


# ---- precomputed errors -----------------------------------------------------------------------------
def fingerprint_of(settings: dict[str, Any], pairs: Any) -> tuple[str, str]:
    """(digest, JSON) of the settings and the pair table (prompt_id, win, lose rows) errors depend on."""
    text = json.dumps(settings, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode())
    digest.update(repr(pairs.to_numpy().tolist()).encode())
    return digest.hexdigest()[:12], text


@dataclass
class Plan:
    """Which positions this process trains on: micro-step ``k`` takes ``[(k W + r) B, (k W + r + 1) B)``."""

    micro_steps: int  # micro-steps the run plans (max_steps x accumulation)
    batch_size: int
    rank: int
    world_size: int

    @property
    def positions(self) -> int:
        return self.micro_steps * self.batch_size * self.world_size

    def chunk_positions(self, chunk: int) -> torch.Tensor:
        first, last = chunk * CHUNK_MICRO_STEPS, min((chunk + 1) * CHUNK_MICRO_STEPS, self.micro_steps)
        steps = torch.arange(first, last)
        starts = (steps * self.world_size + self.rank) * self.batch_size
        return (starts[:, None] + torch.arange(self.batch_size)).reshape(-1)

    @property
    def chunks(self) -> int:
        return -(-self.micro_steps // CHUNK_MICRO_STEPS)


def part_name(digest: str, plan: Plan, chunk: int) -> str:
    return f"part-{digest}-w{plan.world_size}r{plan.rank}-{chunk:05d}.safetensors"


def read_parts(folder: Path, digest: str, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table [positions, 2], covered [positions] bool) from every part of this fingerprint."""
    table = torch.zeros(positions, 2)
    covered = torch.zeros(positions, dtype=torch.bool)
    for path in sorted(folder.glob(f"part-{digest}-*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                where, errors = handle.get_tensor("positions"), handle.get_tensor("errors")
        except Exception as err:  # a torn file cannot exist (atomic writes); anything else is named
            raise StoreError(f"{path}: unreadable reference errors ({err}); delete it to recompute") from err
        keep = where < positions
        table[where[keep]] = errors[keep].float()
        covered[where[keep]] = True
    return table, covered


def precompute_reference(
    folder: Path,
    digest: str,
    fingerprint: str,
    plan: Plan,
    batches_from: Callable[[int], Iterator[dict[str, Any]]],
    inputs_of: Callable[[dict[str, Any]], StepInputs],
    reference: LiveReference | None,
    autocast: Callable[[], Any],
    accelerator: Any,
    progress: Callable[[int, int], None] | None = None,
) -> PrecomputedReference:
    """Compute the missing chunks of this process's planned positions, then load every process's.

    batches_from(micro_step): this process's micro-batches from that micro-step on.
    reference: what computes the errors (the policy at step 0, or adapters off); None where it is no
        longer available, and then every planned position must be stored already.
    Every process runs the forwards of a chunk that any process lacks (ZeRO-3 gathers parameters
    collectively, so all must take part), writing only its own part.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _, covered = read_parts(folder, digest, plan.positions)
    mine = [not bool(covered[plan.chunk_positions(k)].all()) for k in range(plan.chunks)]
    # An exchange, not a collective of the training group: an error on any process (an unreadable
    # part) reaches every process here (:mod:`mpo.distributed`).
    each = gather(accelerator, mine)
    todo = [k for k in range(plan.chunks) if any(m[k] for m in each)]
    if todo and reference is None:
        raise StoreError(
            f"{folder}: no stored reference errors for {len(todo)} chunk(s) of the planned steps (the run "
            f"plans {plan.micro_steps} micro-steps), and full fine-tuning no longer holds the base weights "
            "to compute them; train with train.reference=live, or train.max_steps at most what was "
            "precomputed"
        )
    for done, chunk in enumerate(todo):
        wanted = plan.chunk_positions(chunk)
        errors: list[torch.Tensor] = []
        batches = batches_from(chunk * CHUNK_MICRO_STEPS)
        for i in range(len(wanted) // plan.batch_size):
            batch = next(batches)
            expected = wanted[i * plan.batch_size : (i + 1) * plan.batch_size]
            if not torch.equal(batch["position"].cpu(), expected):
                raise RuntimeError(
                    f"reference pass: got positions {batch['position'].tolist()}, planned {expected.tolist()}"
                )
            inputs = inputs_of(batch)
            with autocast():
                ref_w, ref_l = reference.errors(batch, inputs)
            errors.append(torch.stack([ref_w, ref_l], dim=1).float())  # on the device until the chunk ends
        got = torch.cat(errors).cpu()
        metadata = {"fingerprint": fingerprint, "chunk": str(chunk)}
        with atomic_write(folder / part_name(digest, plan, chunk)) as tmp:
            save_file({"positions": wanted.contiguous(), "errors": got.contiguous()}, str(tmp), metadata)
        if progress is not None:
            progress(done + 1, len(todo))
    wait_for_everyone(accelerator)  # every part written, or every process stops with the error
    table, covered = read_parts(folder, digest, plan.positions)
    if not bool(covered.all()):
        first = int((~covered).nonzero()[0])
        raise StoreError(f"{folder}: reference errors missing from stream position {first} on")
    return PrecomputedReference(table.to(accelerator.device))
