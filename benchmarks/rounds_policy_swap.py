"""A round's sampling model: the policy put into the model kept across rounds, against the base read
from disk again and given the policy (what a round that rebuilt its model would pay).

::

    python benchmarks/rounds_policy_swap.py                                   # tiny SDXL, full weights
    python benchmarks/rounds_policy_swap.py --finetune lora
    python benchmarks/rounds_policy_swap.py --recipe recipes/sdxl/mpo.yaml --device cuda   # the real model

Both paths end with the same weights in the denoiser (checked: the largest difference is printed).
The script prints seconds per round boundary for each and their ratio. The tiny model's load is
mostly Python and file opening; a real SDXL reads ~7 GB per load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mpo.backbones.registry import load_backbone
from mpo.config import load_recipe
from mpo.policy import load_policy
from mpo.weights import add_lora, save_weights

ROOT = Path(__file__).resolve().parents[1]


def trained_weights(recipe, device: torch.device, folder: Path) -> Path:
    """Weights as a checkpoint holds them: the denoiser (or an adapter) moved away from the base."""
    backbone = load_backbone(recipe.model, device)
    denoiser = backbone.denoiser
    if recipe.model.finetune == "lora":
        add_lora(denoiser, recipe.model, backbone.lora_target_modules)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in denoiser.parameters():
            if recipe.model.finetune == "full" or p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=generator).to(p.device, p.dtype))
    save_weights(backbone, denoiser, denoiser.state_dict(), recipe.model.finetune, folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny" / "sdxl.yaml"))
    parser.add_argument("--finetune", choices=("full", "lora"), default="full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"model.finetune={args.finetune}"]
        if "tiny" in args.recipe:
            overrides.append(f"model.path={Path(tmp) / 'tiny-sdxl'}")
        recipe = load_recipe(args.recipe, overrides)
        device = torch.device(args.device)
        weights = trained_weights(recipe, device, Path(tmp) / "weights")
        kept = load_backbone(recipe.model, device)
        swap, reload = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            load_policy(kept, recipe.model, args.finetune, weights)
            swap.append(time.perf_counter() - started)
            started = time.perf_counter()
            fresh = load_backbone(recipe.model, device)
            load_policy(fresh, recipe.model, args.finetune, weights)
            reload.append(time.perf_counter() - started)
        a, b = kept.denoiser.state_dict(), fresh.denoiser.state_dict()
        apart = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    s, r = statistics.median(swap), statistics.median(reload)
    print(
        f"{args.finetune}: policy into the kept model {s * 1e3:.1f} ms; base from disk + policy {r * 1e3:.1f} ms"
    )
    print(f"ratio (reload / kept): {r / s:.1f}x   largest weight difference between the two: {apart:.2e}")


if __name__ == "__main__":
    main()
