"""The denoiser's work per block, counted in multiply-accumulates of its linear and convolution layers.

A cache hook (first-block cache, FasterCache, pyramid attention broadcast) saves time by not running
parts of some blocks at some steps. Seconds say how much it saved on this machine; this says where,
on any machine: every ``nn.Linear`` and ``nn.Conv*`` inside a block adds the MACs of each call that
really runs (a skipped block or a broadcast attention never reaches its projections), so the
fraction of a block's reference work that still runs is the cache's saving in that block. Attention
scores (``q k^T`` and the weighted sum) have no weights and are not counted; in the families here
they grow with the tokens like the projections do, and they are skipped together with them.

The blocks are the denoiser's repeated blocks (diffusers' ``_repeated_blocks``, else the family's
``SamplingSupport.compile_blocks``), in module order; work outside them (embeddings, the first and
last layers) is the ``rest``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

REST = "rest"


def _macs(module: nn.Module, output) -> int:
    """Multiply-accumulates of one call of a linear or convolution layer, from its output."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    kernel = math.prod(module.kernel_size)
    return output.numel() * (module.in_channels // module.groups) * kernel


@dataclass
class BlockWork:
    """MACs per block name, in module order, plus ``rest``."""

    names: list[str] = field(default_factory=list)
    macs: dict[str, int] = field(default_factory=dict)

    def total(self) -> int:
        return sum(self.macs.values())

    def fractions(self, reference: BlockWork) -> dict[str, float]:
        """Of each block's work in ``reference`` (same denoiser, same candidates), the share that ran."""
        return {name: self.macs.get(name, 0) / ref for name, ref in reference.macs.items() if ref > 0}


def repeated_blocks(denoiser: nn.Module, block_classes: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every repeated block: the classes the model declares, else ``block_classes``."""
    declared = tuple(getattr(denoiser, "_repeated_blocks", None) or ()) or tuple(block_classes)
    return [(name, m) for name, m in denoiser.named_modules() if type(m).__name__ in declared]


@contextmanager
def count_block_work(denoiser: nn.Module, block_classes: Sequence[str] = ()) -> Iterator[BlockWork]:
    """Count the MACs that run in each block of ``denoiser`` while the context is open."""
    work = BlockWork()
    owner: dict[int, str] = {}
    for name, block in repeated_blocks(denoiser, block_classes):
        work.names.append(name)
        work.macs[name] = 0
        for module in block.modules():
            owner.setdefault(id(module), name)
    work.names.append(REST)
    work.macs[REST] = 0
    handles = []
    for module in denoiser.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            name = owner.get(id(module), REST)

            def hook(mod, _inputs, output, name=name):
                work.macs[name] += _macs(mod, output)

            handles.append(module.register_forward_hook(hook))
    try:
        yield work
    finally:
        for handle in handles:
            handle.remove()


def format_fractions(fractions: dict[str, float], width: int = 12) -> str:
    """``b0 100 b1 38 ... rest 100``: percent of the reference's work that ran, blocks numbered in
    module order (long lists are folded into runs of equal rounding)."""
    items = [
        (REST if name == REST else f"b{i}", round(100 * f)) for i, (name, f) in enumerate(fractions.items())
    ]
    runs: list[tuple[str, str, int]] = []
    for label, value in items:
        if runs and runs[-1][2] == value and label != REST and runs[-1][1] != REST:
            runs[-1] = (runs[-1][0], label, value)
        else:
            runs.append((label, label, value))
    parts = [f"{a}-{b} {v}" if a != b else f"{a} {v}" for a, b, v in runs]
    return " ".join(parts[: width * 2])
