"""Recipe rules of the trainer's precision and objective keys: each bad value fails at load with one
line naming the key (and the other key it conflicts with)."""

from __future__ import annotations

import pytest

from mpo.config import RecipeError, load_recipe
from tests.scripts.tiny_runs import ROOT

TINY = str(ROOT / "recipes" / "tiny" / "sdxl.yaml")


def _lines(overrides: list[str]) -> list[str]:
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, overrides)
    return [line.strip() for line in str(err.value).splitlines()[1:]]


@pytest.mark.parametrize("word", ["no", "off", "'no'"])
def test_mixed_precision_no_from_the_command_line(word):
    assert load_recipe(TINY, [f"train.mixed_precision={word}"]).train.mixed_precision == "no"


def test_mixed_precision_no_unquoted_in_a_yaml_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"defaults: {TINY}\ntrain:\n  mixed_precision: no\n")
    assert load_recipe(path).train.mixed_precision == "no"


@pytest.mark.parametrize(
    ("precision", "dtype", "wanted"),
    [("bf16", "float32", "bfloat16"), ("bf16", "float16", "bfloat16"), ("fp16", "bfloat16", "float16")],
)
def test_lora_keeps_its_frozen_base_in_the_compute_dtype(precision, dtype, wanted):
    overrides = ["model.finetune=lora", f"train.mixed_precision={precision}", f"model.dtype={dtype}"]
    (line,) = _lines(overrides)
    assert line.startswith(f"model.dtype='{dtype}'")
    assert "train.mixed_precision" in line and f"set model.dtype={wanted}" in line
    assert load_recipe(TINY, [*overrides[:2], f"model.dtype={wanted}"]).model.dtype == wanted


def test_full_fine_tuning_and_no_mixed_precision_take_any_frozen_dtype():
    # Full fine-tuning trains float32 master weights whatever model.dtype says.
    for overrides in (
        ["model.finetune=full", "train.mixed_precision=bf16", "model.dtype=float16"],
        ["model.finetune=full", "train.mixed_precision=no", "model.dtype=bfloat16"],
        ["model.finetune=lora", "train.mixed_precision=no", "model.dtype=bfloat16"],
    ):
        load_recipe(TINY, overrides)


@pytest.mark.parametrize(
    ("override", "start", "allowed"),
    [
        ("train.loss_type=kto", "train.loss_type='kto'", "sigmoid"),
        ("train.sft_weight=-1", "train.sft_weight=-1", ">= 0"),
        ("train.loss_weighting=snr", "train.loss_weighting='snr'", "min_snr"),
        ("train.snr_gamma=0", "train.snr_gamma=0", "> 0"),
        ("train.reference=frozen", "train.reference='frozen'", "precomputed"),
    ],
)
def test_objective_and_reference_keys_are_checked(override, start, allowed):
    (line,) = _lines([override])
    assert line.startswith(start) and allowed in line


@pytest.mark.parametrize(
    ("recipe", "family", "weighting", "allowed"),
    [
        ("sdxl", "sdxl", "sigma_sqrt", "min_snr"),
        ("sdxl", "sdxl", "cosmap", "min_snr"),
        ("sd3", "sd3", "min_snr", "cosmap"),
    ],
)
def test_a_weighting_the_family_schedule_does_not_define_is_refused(recipe, family, weighting, allowed):
    """min_snr is a DDPM (epsilon / v) weighting, sigma_sqrt and cosmap flow-matching ones: another
    family's is one line naming the key, the family and what its schedule defines."""
    with pytest.raises(RecipeError) as err:
        load_recipe(str(ROOT / "recipes" / "tiny" / f"{recipe}.yaml"), [f"train.loss_weighting={weighting}"])
    (line,) = [x.strip() for x in str(err.value).splitlines()[1:]]
    assert line.startswith(f"train.loss_weighting='{weighting}'") and f"model.family='{family}'" in line
    assert allowed in line and weighting not in line.split("supports", 1)[1]


NEW_KEYS = {
    "loss_type": "hinge",
    "sft_weight": 0.5,
    "loss_weighting": "min_snr",
    "snr_gamma": 2.0,
    "reference": "precomputed",
}


def _settings(monkeypatch, overrides: list[str]) -> dict:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import mpo.score
    import mpo.train
    from mpo.store import RunDir

    monkeypatch.setattr(mpo.train, "parquet_hash", lambda path: "h")
    monkeypatch.setattr(mpo.train, "candidates_hash", lambda run: "c")
    monkeypatch.setattr(mpo.score, "reward_fingerprint", lambda recipe: {})
    recipe = load_recipe(TINY, overrides)
    acc = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    return mpo.train.run_settings(recipe, acc, RunDir.from_recipe(recipe))


@pytest.mark.parametrize("key", sorted(NEW_KEYS))
def test_the_objective_and_reference_keys_decide_the_result(key, monkeypatch):
    """Each changes the weights: a checkpoint made with another value is refused (or redone with
    --force), so each must be in the result settings, not in the layout or left out."""
    from mpo.train import result_settings

    before = result_settings(_settings(monkeypatch, []))
    after = result_settings(_settings(monkeypatch, [f"train.{key}={NEW_KEYS[key]}"]))
    assert before["train"][key] != after["train"][key]
    assert {k: v for k, v in before["train"].items() if k != key} == {
        k: v for k, v in after["train"].items() if k != key
    }


def test_the_reference_errors_depend_on_the_base_and_the_data_not_on_the_objective(monkeypatch):
    from mpo.train import reference_settings

    backbone = type("B", (), {"num_train_timesteps": 1000})()
    base = reference_settings(_settings(monkeypatch, []), backbone)
    for same in (
        [f"train.{k}={v}" for k, v in NEW_KEYS.items()],
        ["train.learning_rate=3e-4", "train.beta=100", "train.max_steps=7"],
        ["model.finetune=full"],
    ):
        assert reference_settings(_settings(monkeypatch, same), backbone) == base, same
    for other in (["train.seed=7"], ["train.timestep_range=[0.1,0.9]"], ["train.mixed_precision=bf16"]):
        assert reference_settings(_settings(monkeypatch, other), backbone) != base, other


def test_the_reference_errors_depend_on_the_timestep_density_and_what_the_forward_repeats(monkeypatch):
    """The density and its parameters shape the stream of timesteps; FLUX.1's training forward repeats
    the embedded guidance and the resolution's shift, so for it (and only for it) those generate keys
    decide the reference errors too."""
    from mpo.backbones.flux import FluxBackbone
    from mpo.train import reference_settings

    plain = type("B", (), {"num_train_timesteps": 1000})()
    flux = type(
        "F",
        (),
        {"num_train_timesteps": 1000, "training_generation_keys": FluxBackbone.training_generation_keys},
    )()
    base = {b: reference_settings(_settings(monkeypatch, []), b) for b in (plain, flux)}
    for other in (
        ["train.timestep_sampling=logit_normal"],
        ["train.logit_mean=0.5"],
        ["train.logit_std=0.5"],
        ["train.mode_scale=1.0"],
    ):
        assert reference_settings(_settings(monkeypatch, other), plain) != base[plain], other
    assert "expert" in base[plain]["model"]  # which Wan 2.2 expert is the base (the SDXL recipe has none)
    for key in ("guidance_scale=2.0", "height=32", "width=32"):
        settings = _settings(monkeypatch, [f"generate.{key}"])
        assert reference_settings(settings, plain) == base[plain], key
        assert reference_settings(settings, flux) != base[flux], key
