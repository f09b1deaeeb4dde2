"""``mpo recipe --help-keys`` / ``--schema``, ``mpo --version`` and the log-level flags."""

from __future__ import annotations

import json
import logging
from importlib.metadata import version

import pytest
from omegaconf import OmegaConf

from mpo import schema
from mpo.cli import main
from mpo.config import LEAF_KEYS
from mpo.logs import get_logger, setup_logging
from mpo.recipe_help import recipe_keys


def test_help_keys_lists_every_schema_key_with_its_help(capsys):
    assert main(["recipe", "--help-keys"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(LEAF_KEYS)  # every key, in schema order, once
    docs = {d.key: d for d in recipe_keys()}
    assert all(d.help for d in docs.values())
    line = next(line for line in out.splitlines() if line.split()[:1] == ["train.beta"])
    assert "float" in line and "5000.0" in line and "Diffusion-DPO beta" in line
    select_rule = next(line for line in out.splitlines() if line.split()[:1] == ["select.rule"])
    assert "one of mpo, dpo" in select_rule
    assert "export.push_to_hub:" in out  # nested sections are titled with their docstring


def test_schema_json_defaults_are_the_structured_configs(capsys):
    assert main(["recipe", "--schema"]) == 0
    rows = json.loads(capsys.readouterr().out)
    defaults = OmegaConf.to_container(OmegaConf.structured(schema.Recipe), resolve=False)
    for row in rows:
        node = defaults
        for part in row["key"].split("."):
            node = node[part]
        assert row["default"] == node, row["key"]
    types = {row["key"]: row["type"] for row in rows}
    assert types["prompts.val_count"] == "int | null" and types["train.timestep_range"] == "list[float]"


def test_a_key_without_help_is_named():
    from dataclasses import dataclass

    @dataclass
    class Broken:
        documented: int = schema.opt(1, "has help")
        bare: int = 2

    with pytest.raises(TypeError, match=r"x\.bare has no help text"):
        recipe_keys(Broken, "x.")


def test_recipe_needs_a_file_or_a_listing(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["recipe"])
    assert exit_.value.code == 2 and "--help-keys" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mpo {version('mpo-trainer')}"


@pytest.mark.parametrize(
    "argv, level",
    [
        (["recipe", "--help-keys"], logging.INFO),
        (["-v", "recipe", "--help-keys"], logging.DEBUG),
        (["recipe", "--help-keys", "--quiet"], logging.WARNING),
    ],
)
def test_verbosity_flags_set_the_project_log_level(argv, level, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert main(argv) == 0
    assert logging.getLogger("mpo").level == level
    assert logging.getLogger("reward").level == level
    assert ("TQDM_DISABLE" in __import__("os").environ) == (level == logging.WARNING)
    setup_logging("normal")


def test_project_logger_writes_before_and_after_accelerate_state(capsys):
    from accelerate.state import PartialState

    PartialState._reset_state()  # an earlier test of the session may have made one
    setup_logging("verbose")
    log = get_logger("mpo.test")
    log.debug("before state", main_process_only=True)
    PartialState()
    log.info("after state")
    err = capsys.readouterr().err
    assert (
        "DEBUG mpo.test: before state" in err and "INFO mpo.test: [RANK 0] after state" in err
    )  # accelerate names the rank
    setup_logging("normal")
