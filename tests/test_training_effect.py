"""MPO training moves the reward it is trained on, on held-out seeds, and in the direction it is told.

A checklist reduced to one dimension that pixel statistics can judge (brightness: "Are the colors
bright?", "Are the colors not dark?") scores the candidates of a tiny model (SDXL: epsilon target;
SD3: flow matching, the velocity target); pairs are selected and the model is fine-tuned with
Diffusion-DPO. Trained once with brighter samples winning and once with
darker samples winning (the same questions with negated weights), the held-out brightness must rise
in the first run, fall in the second, and the two must end apart: a drift that moves both the same way
(what a model that learns nothing from the pairs shows) fails.

Settings: what a throwaway experiment found to give a real effect at this scale (full fine-tuning,
lr 1e-4, beta 50, 8 pairs per step, 200 steps (SD3: 80), 8 train prompts x 4 candidates, a briefly pretrained
tiny base); the numbers it gives are printed (``pytest -s``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mpo.config import load_recipe
from mpo.generate import generate_stage
from mpo.score import score_stage
from mpo.select import select_stage
from mpo.store import read_parquet
from mpo.train import train_stage
from tests.scripts.tiny_runs import ROOT, SDXL, SDXL_SIZE, shared_models

CHECKLIST = """\
name: {name}
modality: image
scoring: {{answers: soft, gates: soft, reduction: sum}}
dimensions:
  - name: brightness
    sub_dimensions:
      - name: color_brightness
        options: [bright, ordinary, dark]
        questions:
          - {{id: colors_bright, text: "Are the colors bright?", option: bright}}
          - {{id: colors_not_dark, text: "Are the colors not dark?", option: ordinary}}
weights: {{values: [{sign}1.0, {sign}1.0], intercept: 0.0}}
"""

SETTINGS = [
    "prompts.limit=12",
    "prompts.val_count=4",  # 8 train prompts, 4 held out
    "generate.num_candidates=4",
    "generate.num_inference_steps=15",
    f"generate.height={SDXL_SIZE['height']}",  # the tiny SD3 uses the same size
    f"generate.width={SDXL_SIZE['width']}",
    "generate.previews=0",
    "select.rule=mpo",
    "select.threshold=0.0",
    "model.finetune=full",
    "train.learning_rate=1e-4",
    "train.beta=50",
    "train.batch_size=8",
    "train.lr_schedule=constant",
    "eval.every=0",  # before and after training only
    "eval.num_prompts=4",
    "eval.samples_per_prompt=4",  # 16 held-out samples from fixed seeds
    "eval.seed=1234",
    "tracking.tracker=none",
]


RECIPES = {"sdxl": SDXL, "sd3": ROOT / "recipes" / "tiny" / "sd3.yaml"}
STEPS = {"sdxl": 200, "sd3": 80}  # the flow model moves faster at this scale


def _recipe(family: str, out: Path, models: Path, checklist: Path):
    return load_recipe(
        str(RECIPES[family]),
        [
            *SETTINGS,
            f"output_dir={out}",
            f"model.path={models / family}",
            f"reward.checklist={checklist}",
            "train.timestep_sampling=uniform",
            f"train.max_steps={STEPS[family]}",
            f"train.checkpoint_every={STEPS[family]}",
        ],
    )


# The flow run (about 45 s) is in the slow tier; SDXL keeps the effect in the default one.
@pytest.mark.parametrize("family", ["sdxl", pytest.param("sd3", marks=pytest.mark.slow)])
def test_mpo_moves_held_out_brightness_the_way_the_preference_says(family, tmp_path_factory):
    torch.set_num_threads(1)
    models = shared_models(tmp_path_factory)
    root = tmp_path_factory.mktemp("effect")
    checklists = {}
    for name, sign in (("bright", ""), ("dark", "-")):
        checklists[name] = root / f"{name}.yaml"
        checklists[name].write_text(CHECKLIST.format(name=f"brightness-{name}", sign=sign))

    # The candidates do not depend on the reward: generate once, score and train twice.
    bright, dark = root / "bright", root / "dark"
    generate_stage(_recipe(family, bright, models, checklists["bright"]))
    shutil.copytree(bright, dark)
    results = {}
    for name, run in (("bright", bright), ("dark", dark)):
        recipe = _recipe(family, run, models, checklists[name])
        score_stage(recipe)
        stats = select_stage(recipe)
        assert stats.pairs >= 40  # 8 prompts x 6 candidate pairs, nearly all ordered by brightness
        summary = train_stage(recipe)
        assert summary["steps"] == STEPS[family]
        table = read_parquet(run / "eval.parquet").set_index("step")
        sign = 1.0 if name == "bright" else -1.0  # the dark run's reward is minus brightness
        results[name] = (
            sign * table.loc[0, "dim.brightness"],
            sign * table.loc[STEPS[family], "dim.brightness"],
        )

    (before, bright_after), (before_dark, dark_after) = results["bright"], results["dark"]
    print(
        f"{family} held-out brightness: before {before:.4f}; bright wins -> {bright_after:.4f}; dark wins -> {dark_after:.4f}"
    )
    assert before == pytest.approx(before_dark, abs=1e-6)  # the same untrained model and seeds
    # Seen here (the dimension is 2 p(bright) - 1 + 2 p(not dark) - 1): SDXL 1.426 before, 1.903 bright,
    # 0.857 dark.
    assert bright_after > before + 0.05
    assert dark_after < before - 0.05
    assert bright_after - dark_after > 0.15
