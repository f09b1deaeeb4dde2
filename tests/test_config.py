"""Recipe loading: every shipped recipe validates; defaults chains, override precedence, every kind of
error names its key, value, source and what is allowed; recipe.yaml round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar

import pytest
from omegaconf import OmegaConf

from mpo.backbones import registry
from mpo.config import (
    CAP_STRATEGIES,
    FINETUNE_MODES,
    LR_SCHEDULES,
    MIXED_PRECISION,
    MODEL_DTYPES,
    SELECT_LEVELS,
    SELECT_RULES,
    TRACKERS,
    Recipe,
    RecipeError,
    load_recipe,
    load_select_config,
    resolve_paths,
    save_resolved,
    to_yaml,
)
from reward.checklist import load_checklist

ROOT = Path(__file__).resolve().parents[1]
# recipes/reward/ holds reward-training recipes, another schema (tests/test_reward_train.py loads them).
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "reward")
TINY_SDXL = ROOT / "recipes" / "tiny" / "sdxl.yaml"
TINY_VIDEO = ROOT / "recipes" / "tiny" / "cogvideox.yaml"
LAUNCH_CONFIGS = {
    "launch/single_gpu.yaml",
    "launch/multi_gpu.yaml",
    "launch/deepspeed_zero2.yaml",
    "launch/deepspeed_zero3.yaml",
    "launch/multi_node.yaml",
}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _error(path: Path | str, overrides: list[str] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def _problem_lines(message: str) -> list[str]:
    return [line.strip() for line in message.splitlines()[1:]]


# ---- the shipped recipes ----------------------------------------------------------------------------
def test_recipes_are_found():
    names = {str(p.relative_to(ROOT / "recipes")) for p in RECIPES}
    assert {"tiny/sdxl.yaml", "tiny/cogvideox.yaml", "sdxl/mpo.yaml", "cogvideox-2b/mpo.yaml"} <= names
    assert {"cogvideox-5b/dpo.yaml", "cogvideox-5b/mpo.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_loads_and_validates(path: Path):
    recipe = load_recipe(path)
    assert OmegaConf.get_type(recipe) is Recipe
    assert recipe.output_dir == f"runs/{recipe.name}"
    assert recipe.launch_config in LAUNCH_CONFIGS
    header = path.read_text().split("\n\n")[0]
    # The header's launch command names this very file (catches a header copied from another recipe).
    assert str(path.relative_to(ROOT)) in header and "mpo" in header


def test_recipe_names_are_unique():
    names = [load_recipe(p).name for p in RECIPES]
    assert len(names) == len(set(names))


def test_paper_hyperparameters():
    sdxl = load_recipe(ROOT / "recipes/sdxl/mpo.yaml")
    assert sdxl.model.path == "stabilityai/stable-diffusion-xl-base-1.0" and sdxl.model.finetune == "full"
    assert (sdxl.generate.num_candidates, sdxl.train.beta, sdxl.train.learning_rate) == (8, 5000.0, 5e-9)
    assert sdxl.train.scale_lr and sdxl.train.lr_schedule == "constant" and sdxl.train.warmup_steps == 100
    assert (
        sdxl.train.max_steps == 3000
        and sdxl.train.batch_size * sdxl.train.gradient_accumulation_steps * 64 == 256
    )

    video = load_recipe(ROOT / "recipes/cogvideox-2b/mpo.yaml")
    assert video.model.path == "THUDM/CogVideoX-2b" and video.generate.num_candidates == 4
    assert (video.train.learning_rate, video.train.beta, video.train.max_steps) == (5e-6, 500.0, 500)
    assert video.train.lr_schedule == "linear" and video.train.warmup_steps == 100
    assert video.train.batch_size * video.train.gradient_accumulation_steps * 8 == 32
    assert video.train.checkpoint_every == 40 and video.eval.every == 40 and video.export.which == "best"
    assert (video.generate.num_frames, video.generate.height, video.generate.width) == (49, 480, 720)

    dpo, mpo = (load_recipe(ROOT / f"recipes/cogvideox-5b/{m}.yaml") for m in ("dpo", "mpo"))
    for r in (dpo, mpo):
        assert r.model.path == "THUDM/CogVideoX-5b"
        assert (r.train.learning_rate, r.train.beta, r.train.max_steps) == (2e-6, 500.0, 300)
        assert r.train.batch_size * r.train.gradient_accumulation_steps * 8 == 64
    assert (dpo.select.rule, mpo.select.rule) == ("dpo", "mpo")
    # The paper's 0.8 / 0.6 on the summed total, on our mean-over-29-questions scale.
    assert dpo.select.threshold == pytest.approx(0.8 / 29, abs=1e-4)
    assert mpo.select.threshold == pytest.approx(0.6 / 29, abs=1e-4)
    differing = {
        k
        for k, v in OmegaConf.to_container(dpo).items()
        if v != OmegaConf.to_container(mpo)[k] and k not in {"name", "output_dir"}
    }
    assert differing == {"select"}


# ---- defaults chains and precedence -----------------------------------------------------------------
def test_defaults_chain_and_override_precedence(tmp_path, monkeypatch):
    _write(
        tmp_path / "bases/root.yaml",
        "model: {path: root-model}\nprompts: {file: p.txt}\ntrain: {beta: 1.0}\n",
    )
    _write(tmp_path / "bases/a.yaml", "defaults: root.yaml\ntrain: {beta: 2.0, max_steps: 7}\n")
    _write(tmp_path / "bases/b.yaml", "train: {beta: 3.0}\ngenerate: {num_candidates: 5}\n")
    top = _write(
        tmp_path / "exp/top.yaml",
        "defaults: [../bases/a.yaml, ../bases/b.yaml]\nname: top\ngenerate: {num_candidates: 6, seed: 9}\n",
    )
    monkeypatch.chdir(tmp_path / "exp")  # defaults are relative to the file, not to the cwd
    recipe = load_recipe(top, ["generate.seed=11", "train.max_steps=8"])
    assert recipe.model.path == "root-model"  # from the root of the chain
    assert recipe.train.beta == 3.0  # the later default wins over the earlier one
    assert recipe.generate.num_candidates == 6  # the file wins over its defaults
    assert recipe.generate.seed == 11 and recipe.train.max_steps == 8  # overrides win over all
    assert recipe.output_dir == "runs/top"
    assert recipe.generate.height == Recipe().generate.height  # untouched keys keep the dataclass default


def test_name_override_flows_into_output_dir():
    assert load_recipe(TINY_SDXL, ["name=experiment-7"]).output_dir == "runs/experiment-7"
    assert load_recipe(TINY_SDXL, ["output_dir=/scratch/${name}-x"]).output_dir == "/scratch/tiny-sdxl-x"


def test_list_override():
    recipe = load_recipe(
        TINY_SDXL, ["select.dimensions=[composition,quality]", "train.timestep_range=[0.2,0.8]"]
    )
    assert list(recipe.select.dimensions) == ["composition", "quality"]
    assert list(recipe.train.timestep_range) == [0.2, 0.8]


def test_defaults_cycle_is_an_error(tmp_path):
    _write(tmp_path / "a.yaml", "defaults: b.yaml\n")
    _write(tmp_path / "b.yaml", "defaults: [c.yaml]\n")
    _write(tmp_path / "c.yaml", "defaults: a.yaml\n")
    message = _error(tmp_path / "a.yaml")
    assert "cycle" in message and all(f"{n}.yaml" in message for n in "abc")


def test_missing_default_names_both_files(tmp_path):
    top = _write(tmp_path / "top.yaml", "defaults: nowhere.yaml\n")
    message = _error(top)
    assert "nowhere.yaml" in message and "top.yaml" in message and "no such" in message


def test_bad_defaults_value(tmp_path):
    message = _error(_write(tmp_path / "top.yaml", "defaults: {a: 1}\n"))
    assert "defaults" in message and "list of file names" in message


def test_yaml_syntax_error_names_the_file(tmp_path):
    message = _error(_write(tmp_path / "broken.yaml", "model: [unclosed\n"))
    assert "broken.yaml" in message and "YAML" in message


# ---- errors -----------------------------------------------------------------------------------------
def test_unknown_keys_suggest_the_closest(tmp_path):
    bad = _write(
        tmp_path / "bad.yaml", f"defaults: {TINY_SDXL}\ngenerate: {{num_candiates: 3}}\ntrian: {{beta: 1}}\n"
    )
    lines = _problem_lines(_error(bad, ["select.treshold=0.1"]))
    assert len(lines) == 3
    assert any(
        "generate.num_candiates=3" in ln and "bad.yaml" in ln and "generate.num_candidates?" in ln
        for ln in lines
    )
    assert any(ln.startswith("trian.beta=1") and "did you mean train.beta?" in ln for ln in lines)
    assert any("select.treshold" in ln and "override" in ln and "select.threshold?" in ln for ln in lines)


def test_unknown_key_without_close_match_lists_the_section():
    (line,) = _problem_lines(_error(TINY_SDXL, ["eval.zzzzzz=1"]))
    assert "eval.zzzzzz" in line and "eval.every" in line and "eval.grid_size" in line


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("generate.num_candidates=abc", "Integer"),
        ("train.learning_rate=fast", "Float"),
        ("model.tiny=maybe", "bool"),
        ("train.timestep_range=[low,1]", "Float"),
        ("model=3", "ModelConfig"),
    ],
)
def test_wrong_types(override: str, reason: str):
    key = override.partition("=")[0]
    (line,) = _problem_lines(_error(TINY_SDXL, [override]))
    assert line.startswith(key) and "wrong type" in line and reason in line
    assert f"override {override!r}" in line


def test_wrong_type_in_a_file_is_cleared_by_a_later_override(tmp_path):
    bad = _write(tmp_path / "bad.yaml", f"defaults: {TINY_SDXL}\ngenerate: {{num_candidates: many}}\n")
    assert "generate.num_candidates='many' (" in _error(bad)
    assert load_recipe(bad, ["generate.num_candidates=5"]).generate.num_candidates == 5


def _choice_cases() -> list[tuple[str, str, tuple[str, ...]]]:
    return [
        ("model.dtype", "float64", MODEL_DTYPES),
        ("reward.dtype", "int8", MODEL_DTYPES),
        ("model.finetune", "half", FINETUNE_MODES),
        ("select.rule", "best", SELECT_RULES),
        ("select.level", "pixel", SELECT_LEVELS),
        ("select.cap_strategy", "first", CAP_STRATEGIES),
        ("train.lr_schedule", "onecycle", LR_SCHEDULES),
        ("train.mixed_precision", "fp8", MIXED_PRECISION),
        ("train.attention", "flash", ("sdpa", "xformers")),
        ("tracking.tracker", "mlflow", TRACKERS),
    ]


@pytest.mark.parametrize(("key", "value", "allowed"), _choice_cases(), ids=lambda c: str(c))
def test_choice_fields(key: str, value: str, allowed: tuple[str, ...]):
    (line,) = _problem_lines(_error(TINY_SDXL, [f"{key}={value}"]))
    assert line.startswith(f"{key}={value!r}") and str(list(allowed)) in line


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("generate.num_candidates=1", ">= 2"),
        ("select.threshold=-0.1", ">= 0"),
        ("prompts.val_fraction=1.0", "in [0, 1)"),
        ("prompts.val_fraction=-0.5", "in [0, 1)"),
        ("train.learning_rate=0", "> 0"),
        ("train.beta=-5", "> 0"),
        ("train.max_steps=0", ">= 1"),
        ("train.batch_size=0", ">= 1"),
        ("train.gradient_accumulation_steps=0", ">= 1"),
        ("generate.num_inference_steps=0", ">= 1"),
        ("generate.prompts_per_shard=0", ">= 1"),
        ("eval.every=-1", ">= 0"),
        ("train.checkpoint_every=-10", ">= 0"),
        ("generate.height=0", ">= 1"),
        ("generate.width=-64", ">= 1"),
        ("select.max_pairs_per_prompt=0", ">= 1 or null"),
        ("train.timestep_range=[0.9,0.1]", "0 <= low < high <= 1"),
        ("model.lora_target_modules=[]", "non-empty list"),
    ],
)
def test_impossible_values(override: str, allowed: str):
    key, _, value = override.partition("=")
    (line,) = _problem_lines(_error(TINY_SDXL, [override]))
    assert line.startswith(f"{key}=") and value.strip("[]").split(",")[0] in line and allowed in line


def test_all_problems_are_reported_together(tmp_path):
    bad = _write(tmp_path / "bad.yaml", f"defaults: {TINY_SDXL}\ntrain: {{lr_schedule: onecycle}}\n")
    message = _error(bad, ["generate.num_candidates=1", "select.threshold=-1", "nonsense=1"])
    assert message.splitlines()[0] == f"{bad}: 4 problems"
    lines = _problem_lines(message)
    assert len(lines) == 4
    assert any(ln.startswith("train.lr_schedule='onecycle'") and str(bad) in ln for ln in lines)
    assert any(ln.startswith("generate.num_candidates=1") for ln in lines)
    assert any(ln.startswith("select.threshold=-1") for ln in lines)
    assert any(ln.startswith("nonsense=1") for ln in lines)


def test_missing_required_values(tmp_path):
    bare = _write(tmp_path / "bare.yaml", "name: bare\n")
    lines = _problem_lines(_error(bare))
    assert {ln.split(" ")[0] for ln in lines} == {"model.path", "prompts.file"}
    assert all("required" in ln for ln in lines)


def test_interpolation_error_names_the_key():
    (line,) = _problem_lines(_error(TINY_SDXL, ["output_dir=runs/${nmae}"]))
    assert line.startswith("output_dir='runs/${nmae}'") and "nmae" in line


def test_unknown_family_lists_known_ones():
    (line,) = _problem_lines(_error(TINY_SDXL, ["model.family=pixart"]))
    assert line.startswith("model.family='pixart'") and "'sdxl'" in line and "'cogvideox'" in line


def test_family_specific_generate_checks():
    lines = _problem_lines(_error(TINY_VIDEO, ["generate.num_frames=10"]))
    assert len(lines) == 1 and lines[0].startswith("generate.num_frames=10") and "cogvideox" in lines[0]
    load_recipe(TINY_VIDEO, ["generate.num_frames=13"])  # 4k + 1


class _FakeVideo:
    """A registered family whose own check names a bare key (no ``generate.`` prefix)."""

    modality: ClassVar[str] = "video"

    @classmethod
    def check_generate_config(cls, gen) -> list[tuple[str, str]]:
        return [("fps", "must be 16 for this model")] if gen.fps != 16 else []

    @classmethod
    def check_model_config(cls, model) -> list[tuple[str, str]]:
        return []

    @classmethod
    def check_train_config(cls, train) -> list[tuple[str, str]]:
        return []


def test_family_check_keys_are_qualified(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "fake-video", _FakeVideo)
    (line,) = _problem_lines(_error(TINY_VIDEO, ["model.family=fake-video"]))
    assert line.startswith(f"generate.fps=8 ({TINY_VIDEO})") and "must be 16" in line
    assert load_recipe(TINY_VIDEO, ["model.family=fake-video", "generate.fps=16"]).generate.fps == 16


def test_checklist_must_match_the_modality():
    (line,) = _problem_lines(_error(TINY_SDXL, ["reward.checklist=video-full"]))
    assert line.startswith("reward.checklist='video-full'") and "image checklist" in line


def test_unknown_checklist_and_vlm_without_model():
    lines = _problem_lines(_error(TINY_SDXL, ["reward.checklist=image-ful", "reward.backend=vlm"]))
    assert any(ln.startswith("reward.checklist='image-ful'") and "image-full" in ln for ln in lines)
    assert any(ln.startswith("reward.model_path") and "vlm" in ln for ln in lines)
    (line,) = _problem_lines(_error(TINY_SDXL, ["reward.backend=clip"]))
    assert "pixel-stats" in line and "vlm" in line


def test_weights_file_must_exist_and_fit_the_checklist(tmp_path):
    (line,) = _problem_lines(_error(TINY_SDXL, [f"reward.weights={tmp_path / 'none.json'}"]))
    assert line.startswith("reward.weights=") and "no such file" in line
    fitted = load_checklist("image-full").weights_dict()
    good = tmp_path / "good.json"
    good.write_text(json.dumps(fitted))
    assert load_recipe(TINY_SDXL, [f"reward.weights={good}"]).reward.weights == str(good)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**fitted, "checklist": "video-full"}))
    (line,) = _problem_lines(_error(TINY_SDXL, [f"reward.weights={other}"]))
    assert (
        line.startswith(f"reward.weights={str(other)!r}") and "does not fit" in line and "video-full" in line
    )


def test_empty_sections_change_nothing(tmp_path):
    recipe = _write(tmp_path / "r.yaml", f"defaults: {TINY_SDXL}\ntrain:\neval: {{}}\n")
    assert load_recipe(recipe) == load_recipe(TINY_SDXL)
    (line,) = _problem_lines(_error(_write(tmp_path / "u.yaml", f"defaults: {TINY_SDXL}\nextras: {{}}\n")))
    assert line.startswith("extras={}") and "unknown key" in line


def test_bad_override_syntax():
    (line,) = _problem_lines(_error(TINY_SDXL, ["train.max_steps"]))
    assert line.startswith("train.max_steps") and "key=value" in line


# ---- select section without a recipe ----------------------------------------------------------------
def test_select_config_without_recipe():
    cfg = load_select_config(["select.threshold=0.5", "select.rule=dpo"])
    assert (cfg.threshold, cfg.rule, cfg.level) == (0.5, "dpo", "dimension")
    with pytest.raises(RecipeError) as info:
        load_select_config(["model.path=x", "select.level=pixel"])
    lines = _problem_lines(str(info.value))
    assert len(lines) == 2
    assert any(ln.startswith("model.path") and "only select.*" in ln for ln in lines)
    assert any(ln.startswith("select.level='pixel'") and str(list(SELECT_LEVELS)) in ln for ln in lines)


# ---- paths and recipe.yaml --------------------------------------------------------------------------
def test_resolve_paths_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vlm").mkdir()
    (tmp_path / "w.json").write_text(json.dumps(load_checklist("image-official").weights_dict()))
    recipe = load_recipe(
        ROOT / "recipes/sdxl/mpo.yaml",
        ["prompts.file=data/p.txt", "reward.weights=w.json", "reward.model_path=vlm"],
    )
    resolved = resolve_paths(recipe)
    assert resolved.prompts.file == str(tmp_path / "data/p.txt")
    assert resolved.reward.weights == str(tmp_path / "w.json")
    assert resolved.reward.model_path == str(tmp_path / "vlm")  # exists here: local
    assert resolved.model.path == "stabilityai/stable-diffusion-xl-base-1.0"  # a hub id stays
    assert resolved.reward.checklist == "image-official"  # a bundled name stays
    assert recipe.prompts.file == "data/p.txt"  # the original is not modified
    tiny = resolve_paths(load_recipe(TINY_SDXL))
    assert tiny.model.path == str(tmp_path / "runs/_models/tiny-sdxl")  # built there: local


def test_recipe_yaml_round_trip(tmp_path):
    recipe = load_recipe(TINY_VIDEO, ["train.max_steps=3", "select.dimensions=[stability]"])
    path = save_resolved(recipe, tmp_path / "run")
    assert path == tmp_path / "run" / "recipe.yaml"
    assert [p.name for p in path.parent.iterdir()] == ["recipe.yaml"]  # no temporary file left behind
    again = load_recipe(path)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(resolve_paths(recipe), resolve=True)
    assert os.path.isabs(again.prompts.file) and again.train.max_steps == 3
    assert to_yaml(again) == to_yaml(resolve_paths(recipe))
    # Saving to an explicit file name works too (what a stage that knows the file path passes).
    assert save_resolved(recipe, tmp_path / "other.yaml") == tmp_path / "other.yaml"
    assert load_recipe(tmp_path / "other.yaml").name == recipe.name
