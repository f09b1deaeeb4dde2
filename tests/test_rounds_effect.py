"""Iterative MPO against one offline round, on the brightness-only checklist of the training-effect
test: the same training steps, the same number of generated candidates in all, the same seeds.

Offline: 8 train prompts x 4 candidates from the base, then 60 steps. Rounds: 2 rounds, each 4 fresh
train prompts x 4 candidates sampled from the current policy, then 30 steps. Both must move the
held-out brightness up; the rounds must not end below the offline run by more than the noise of 16
held-out samples. The numbers are printed (``pytest -s``).

What it showed on the tiny SDXL: no gain from regenerating. The dimension saturates near its maximum
of 2 within a few dozen steps, and both end there: held-out brightness 1.426 before; 20 steps: offline
1.790, rounds 1.761; 60 steps: offline 1.933, rounds 1.926 (1.844 after round 0's 30 steps); 200
steps: offline 1.903, rounds 1.909. So the test holds what does hold (the direction, and no
regression beyond the noise), not that rounds move it further.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpo.config import load_recipe
from mpo.run import run_all
from mpo.store import read_parquet
from tests.scripts.tiny_runs import SDXL, shared_models
from tests.test_training_effect import CHECKLIST, SETTINGS

STEPS = 60
ROUNDS = 2


def _recipe(out: Path, models: Path, checklist: Path, *extra: str):
    return load_recipe(
        str(SDXL),
        [
            *SETTINGS,
            f"output_dir={out}",
            f"model.path={models / 'sdxl'}",
            f"reward.checklist={checklist}",
            f"train.max_steps={STEPS}",
            "train.timestep_sampling=uniform",
            *extra,
        ],
    )


def _brightness(run: Path) -> dict[int, float]:
    return read_parquet(run / "eval.parquet").set_index("step")["dim.brightness"].to_dict()


@pytest.mark.slow
def test_rounds_move_held_out_brightness_at_least_as_far_as_one_offline_round(tmp_path_factory):
    torch.set_num_threads(1)
    models = shared_models(tmp_path_factory)
    root = tmp_path_factory.mktemp("rounds-effect")
    checklist = root / "bright.yaml"
    checklist.write_text(CHECKLIST.format(name="brightness-bright", sign=""))

    offline, rounds = root / "offline", root / "rounds"
    run_all(_recipe(offline, models, checklist, f"train.checkpoint_every={STEPS}"))
    run_all(
        _recipe(
            rounds,
            models,
            checklist,
            f"train.checkpoint_every={STEPS // ROUNDS}",
            f"rounds.count={ROUNDS}",
            "rounds.prompts=fresh",  # 4 prompts a round: 2 x 4 x 4 = 32 candidates, as offline's 8 x 4
        )
    )
    a, b = _brightness(offline), _brightness(rounds)
    print(f"held-out brightness: before {a[0]:.4f}; offline -> {a[STEPS]:.4f}; rounds -> {b}")
    assert a[0] == pytest.approx(b[0], abs=1e-6)  # the same base and eval seeds
    assert a[STEPS] > a[0] + 0.05 and b[STEPS] > b[0] + 0.05
    assert b[STEPS] > a[STEPS] - 0.05
