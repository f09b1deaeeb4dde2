"""The ``mpo`` command line: each command reaches its stage with the loaded recipe, ``select --scores``
works without a recipe, ``recipe`` prints YAML that loads back, and recipe errors exit 2 without a
traceback while other errors propagate."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from mpo.cli import STAGES, main
from mpo.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY_SDXL = str(ROOT / "recipes" / "tiny" / "sdxl.yaml")


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, tuple]]:
    """Every stage module replaced by a fake that records what it was called with."""
    seen: list[tuple[str, tuple]] = []
    for module, function in STAGES.values():
        fake = types.ModuleType(module)
        setattr(
            fake, function, lambda recipe, *args, _name=function, **kwargs: seen.append((_name, (recipe,)))
        )
        if module == "mpo.select":
            fake.select_from_file = lambda *args: seen.append(("select_from_file", args))
        monkeypatch.setitem(sys.modules, module, fake)
    return seen


@pytest.mark.parametrize("command", list(STAGES))
def test_each_command_calls_its_stage(command: str, calls, tmp_path):
    assert (
        main([command, TINY_SDXL, "train.max_steps=3", "select.threshold=0.2", f"output_dir={tmp_path}"]) == 0
    )
    ((function, (recipe,)),) = calls
    assert function == STAGES[command][1]
    assert recipe.train.max_steps == 3 and recipe.select.threshold == 0.2
    assert recipe.name == "tiny-sdxl"  # the rest comes from the file


def test_select_from_scores_file_without_recipe(calls, tmp_path):
    scores, out = tmp_path / "scores.parquet", tmp_path / "pairs.parquet"
    args = ["select", "--scores", str(scores), "--out", str(out), "select.threshold=0.5", "select.rule=dpo"]
    assert main(args) == 0
    ((function, (scores_arg, out_arg, cfg)),) = calls
    assert function == "select_from_file" and (scores_arg, out_arg) == (str(scores), str(out))
    assert (cfg.threshold, cfg.rule, cfg.level) == (0.5, "dpo", "dimension")


def test_select_scores_refuses_other_sections(calls, tmp_path, capsys):
    args = ["select", "--scores", "s.parquet", "--out", "p.parquet", "train.max_steps=3"]
    assert main(args) == 2
    assert "train.max_steps" in capsys.readouterr().err and not calls


@pytest.mark.parametrize(
    "args",
    [
        ["select", "--scores", "s.parquet"],  # no --out
        ["select", "--out", "p.parquet", TINY_SDXL],  # --out without --scores
        ["select"],  # neither a recipe nor --scores
        ["select", "--scores", "s.parquet", "--out", "p.parquet", TINY_SDXL],  # both
        ["generate"],  # no recipe
        ["fly", TINY_SDXL],  # no such command
    ],
)
def test_usage_errors_exit_2(args, calls):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and not calls


def test_recipe_prints_yaml_that_loads_back(tmp_path, capsys):
    assert main(["recipe", TINY_SDXL, "name=printed", "generate.num_candidates=6"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    again = load_recipe(printed)
    assert again.name == "printed" and again.output_dir == "runs/printed"
    assert again.generate.num_candidates == 6
    assert again == load_recipe(TINY_SDXL, ["name=printed", "generate.num_candidates=6"])


def test_recipe_error_exits_2_with_the_key(calls, capsys):
    assert main(["train", TINY_SDXL, "generate.num_candidates=1", "train.lr_schedule=onecycle"]) == 2
    err = capsys.readouterr().err
    assert "generate.num_candidates=1" in err and "train.lr_schedule='onecycle'" in err
    assert "Traceback" not in err and not calls


def test_other_errors_propagate(monkeypatch, tmp_path):
    fake = types.ModuleType("mpo.train")

    def train_stage(recipe, accelerator=None, force=False):
        raise RuntimeError("out of memory")

    fake.train_stage = train_stage
    monkeypatch.setitem(sys.modules, "mpo.train", fake)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["train", TINY_SDXL, f"output_dir={tmp_path}"])
    assert not (tmp_path / ".mpo.lock").exists()  # released on the way out


def test_module_entry_point_exit_status(tmp_path):
    """``python -m mpo.cli`` (what ``accelerate launch -m`` runs) exits 2 on a recipe error."""
    result = subprocess.run(
        [sys.executable, "-m", "mpo.cli", "generate", str(tmp_path / "missing.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "missing.yaml" in result.stderr and "Traceback" not in result.stderr
