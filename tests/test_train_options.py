"""Training options that need no training run: lr schedules, TF32, the 8-bit optimizer's clear
error, resume_from validation, the wandb run id file. (EMA, resume_from and the VAE override on a
real run are in test_ecosystem.py, which shares its tiny run.)"""

from __future__ import annotations

import sys

import pytest
import torch

from mpo.config import RecipeError, load_recipe
from mpo.schema import LR_SCHEDULES
from mpo.store import RunDir
from mpo.tracking import wandb_run_id
from mpo.train import setup_scheduler
from mpo.train_options import OptionError, apply_tf32, make_optimizer
from tests.scripts.tiny_runs import SDXL


def _lr_curve(overrides: list[str], steps: int = 10) -> list[float]:
    recipe = load_recipe(str(SDXL), ["train.learning_rate=1.0", f"train.max_steps={steps}", *overrides])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = setup_scheduler(recipe, optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_every_diffusers_schedule_is_accepted_and_shapes_the_lr():
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULES) == {s.value for s in SchedulerType}
    assert _lr_curve(["train.lr_schedule=constant"]) == [1.0] * 10
    assert _lr_curve(["train.lr_schedule=linear"])[5] == pytest.approx(0.5)
    assert _lr_curve(["train.lr_schedule=cosine"])[5] == pytest.approx(0.5)
    restarts = _lr_curve(["train.lr_schedule=cosine_with_restarts", "train.lr_num_cycles=2"])
    assert (
        restarts[5] == pytest.approx(1.0) and restarts[4] < 0.2
    )  # the second cycle starts again at the peak
    poly = _lr_curve(["train.lr_schedule=polynomial", "train.lr_power=2.0"])
    assert poly[5] == pytest.approx((1 - 1e-7) * 0.25 + 1e-7)
    warm = _lr_curve(["train.lr_schedule=constant", "train.warmup_steps=4"])
    assert warm[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    piecewise = _lr_curve(["train.lr_schedule=piecewise_constant", "train.lr_step_rules='1:3,0.1:6,0.01'"])
    assert piecewise == pytest.approx([1.0] * 3 + [0.1] * 3 + [0.01] * 4)


def test_piecewise_schedule_needs_its_rules():
    with pytest.raises(RecipeError, match=r"train\.lr_schedule='piecewise_constant'.*lr_step_rules"):
        load_recipe(str(SDXL), ["train.lr_schedule=piecewise_constant"])


def test_tf32_switch():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        apply_tf32(load_recipe(str(SDXL), ["train.allow_tf32=true"]))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_tf32(load_recipe(str(SDXL), []))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_8bit_adamw_without_bitsandbytes_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(RecipeError) as err:
        load_recipe(str(SDXL), ["train.optimizer=adamw_8bit"])
    assert "train.optimizer='adamw_8bit'" in str(err.value) and "mpo-trainer[bnb]" in str(err.value)
    recipe = load_recipe(str(SDXL), [])
    recipe.train.optimizer = "adamw_8bit"
    with pytest.raises(OptionError, match=r"needs bitsandbytes: pip install 'mpo-trainer\[bnb\]'"):
        make_optimizer(recipe, [torch.nn.Parameter(torch.zeros(1))], 1e-3)


def test_8bit_adamw_is_bitsandbytes_own(monkeypatch):
    made = {}

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            made.update(kwargs)
            super().__init__(params, **kwargs)

    fake = type(sys)("bitsandbytes")
    fake.optim = type(sys)("bitsandbytes.optim")
    fake.optim.AdamW8bit = AdamW8bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    recipe = load_recipe(str(SDXL), ["train.weight_decay=0.01", "train.adam_beta2=0.99"])
    recipe.train.optimizer = "adamw_8bit"
    optimizer = make_optimizer(recipe, [torch.nn.Parameter(torch.zeros(1))], 1e-3)
    assert isinstance(optimizer, AdamW8bit)
    assert made == {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}


def test_resume_from_a_folder_that_is_no_checkpoint_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.resume_from=.*not latest, none, or a checkpoint folder"):
        load_recipe(str(SDXL), [f"train.resume_from={tmp_path}"])
    (tmp_path / "progress.json").write_text("{}")
    assert load_recipe(str(SDXL), [f"train.resume_from={tmp_path}"]).train.resume_from == str(tmp_path)


def test_wandb_run_id_is_made_once_and_kept(tmp_path):
    run = RunDir(tmp_path)
    first = wandb_run_id(run)
    assert first.isalnum() and first == first.lower() and len(first) >= 8
    assert wandb_run_id(run) == first == (tmp_path / "wandb" / "run_id").read_text().strip()
