"""Iterative MPO (``rounds`` in the recipe): each round samples from the policy the round before
trained, under one training state; a rerun does nothing; a killed run resumes to the uninterrupted
one's candidates, pairs and weights; 2 processes give the 1-process result."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import mpo.train
from mpo.backbones.registry import load_backbone
from mpo.cli import main
from mpo.config import RecipeError, load_recipe
from mpo.generate import generate_shard, generation_fingerprint, plan_shards
from mpo.policy import load_policy
from mpo.rounds import POLICY_DIR, RECORD, round_prompts, round_recipe, round_seed, rounds_table
from mpo.run import run_all
from mpo.select import SelectConfig, cap_total, select_pairs
from mpo.store import CandidateStore, RunDir, read_parquet
from mpo.train_state import latest_checkpoint, read_progress
from tests.scripts.tiny_runs import ROOT, SDXL, SDXL_SIZE, checkpoint_tensors

ROUNDS = 2
STEPS = 2  # per round


def rounds_overrides(out: Path, models: Path, *extra: str) -> list[str]:
    """A tiny iterative run: 2 rounds of 2 steps, each on its own 3 of 6 train prompts, 1 per shard."""
    return [
        f"output_dir={out}",
        f"model.path={models / 'sdxl'}",
        "prompts.limit=7",
        "prompts.val_count=1",
        "generate.num_candidates=3",
        "generate.num_inference_steps=2",
        f"generate.height={SDXL_SIZE['height']}",
        f"generate.width={SDXL_SIZE['width']}",
        "generate.previews=0",
        "generate.prompts_per_shard=1",
        "select.threshold=0.0",
        f"train.max_steps={ROUNDS * STEPS}",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=3",  # step 1 is pruned; round 0's last one (step 2) stays for the tests
        "train.batch_size=2",
        "eval.every=0",
        "eval.num_prompts=1",
        "eval.samples_per_prompt=1",
        "tracking.tracker=none",
        f"rounds.count={ROUNDS}",
        "rounds.prompts=fresh",
        *extra,
    ]


class Margins(dict):
    """The largest |reward margin| of every optimizer step's pairs, by step (``mpo.train.dpo_step``
    wrapped while a run trains in this process)."""

    def __init__(self) -> None:
        super().__init__()
        self.original = mpo.train.dpo_step

    def __enter__(self) -> Margins:
        def recorded(t, batch):
            out = self.original(t, batch)
            self[t.progress.step + 1] = out.reward_margin.detach().abs().max().item()
            return out

        mpo.train.dpo_step = recorded
        return self

    def __exit__(self, *exc) -> None:
        mpo.train.dpo_step = self.original


@pytest.fixture(scope="module")
def straight(models, tmp_path_factory) -> Path:
    """An uninterrupted iterative run, finished by ``mpo run`` (full fine-tuning, the base as the
    reference); its margins in ``margins.json`` beside it."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("rounds") / "run"
    with Margins() as margins:
        assert main(["run", str(SDXL), *rounds_overrides(out, models)]) == 0
    (out.parent / "margins.json").write_text(json.dumps(margins))
    return out


# ---- the recipe ---------------------------------------------------------------------------------------
def _prompts(train: int, val: int = 2) -> pd.DataFrame:
    ids = range(train + val)
    return pd.DataFrame({"prompt_id": list(ids), "split": ["train"] * train + ["val"] * val})


def _recipe(*extra: str):
    return load_recipe(str(SDXL), ["train.max_steps=6", "rounds.count=3", *extra])


def test_fresh_rounds_take_disjoint_slices_that_cover_the_train_prompts_and_same_rounds_repeat():
    prompts = _prompts(9)
    fresh = [
        round_prompts(prompts, _recipe("rounds.prompts=fresh"), r)["prompt_id"].tolist() for r in range(3)
    ]
    assert [len(s) for s in fresh] == [3, 3, 3]
    assert sorted(s for f in fresh for s in f) == list(range(9))  # every train prompt once, no held-out one
    assert fresh[0] != [0, 1, 2]  # a seeded permutation, not the file's order
    # More rounds than slices: taken cyclically; fixed share per round.
    recipe = _recipe("rounds.prompts=fresh", "rounds.prompts_per_round=4")
    cycle = [set(round_prompts(prompts, recipe, r)["prompt_id"]) for r in range(3)]
    assert all(len(s) == 4 for s in cycle) and cycle[0] | cycle[1] | cycle[2] == set(range(9))
    same = [
        round_prompts(prompts, _recipe("rounds.prompts_per_round=5"), r)["prompt_id"].tolist()
        for r in range(3)
    ]
    assert same[0] == same[1] == same[2] and len(same[0]) == 5
    with pytest.raises(Exception, match=r"rounds\.prompts_per_round=12"):
        round_prompts(prompts, _recipe("rounds.prompts_per_round=12"), 0)


def test_round_0_samples_with_the_recipes_seed_and_later_rounds_with_their_own():
    recipe = _recipe("generate.seed=7")
    seeds = [round_recipe(recipe, r).generate.seed for r in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert seeds == [round_seed(7, r) for r in range(4)] and round_seed(8, 1) != seeds[1]
    assert recipe.generate.seed == 7  # the run's recipe is left alone


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["train.max_steps=7"], "rounds.count"),
        (["rounds.steps=3"], "rounds.steps"),
        (["rounds.prompts=new"], "rounds.prompts"),
        (["rounds.reference=policy"], "rounds.reference"),
        (["rounds.max_pairs=0"], "rounds.max_pairs"),
        (["rounds.count=-1"], "rounds.count"),
        (["train.resume_from=none"], "train.resume_from"),
    ],
)
def test_bad_rounds_settings_are_refused_naming_the_key(extra, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        _recipe(*extra)


def test_a_rounds_recipe_runs_its_data_stages_only_through_mpo_run(tmp_path, capsys):
    code = main(
        ["generate", str(SDXL), f"output_dir={tmp_path / 'run'}", "train.max_steps=4", "rounds.count=2"]
    )
    assert code == 2
    assert "rounds.count=2" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_the_tiny_rounds_recipe_loads():
    recipe = load_recipe(str(ROOT / "recipes" / "tiny" / "sdxl_rounds.yaml"))
    assert recipe.rounds.count * recipe.rounds.steps == recipe.train.max_steps


def test_the_pair_cap_keeps_the_largest_margins_and_recounts():
    # 3 prompts x 4 candidates, totals ordered on the one dimension: every ordered pair dominates.
    rng = np.random.default_rng(0)
    total = rng.normal(size=12)
    scores = pd.DataFrame(
        {
            "prompt_id": np.repeat([0, 1, 2], 4),
            "sample_idx": np.tile(range(4), 3),
            "total": total,
            "dim.a": total,
        }
    )
    cfg = SelectConfig(rule="mpo", threshold=0.0, cap_strategy="largest_margin")
    pairs, stats = select_pairs(scores, cfg)
    assert len(pairs) == 18
    kept = cap_total(pairs, stats, 5, cfg)
    assert sorted(kept["margin"]) == sorted(pairs["margin"])[-5:]
    per_prompt = kept["prompt_id"].value_counts()
    assert (stats.pairs, stats.removed_by_cap, stats.kept_dominant) == (5, 13, 5)
    assert (
        stats.prompts_without_pairs == 3 - len(per_prompt) and stats.pairs_per_prompt_max == per_prompt.max()
    )
    assert stats.config["max_pairs"] == 5
    cfg = SelectConfig(rule="mpo", threshold=0.0, cap_strategy="random")
    first = cap_total(*select_pairs(scores, cfg), 5, cfg)
    assert first.equals(cap_total(*select_pairs(scores, cfg), 5, cfg)) and len(first) == 5


# ---- a whole iterative run ------------------------------------------------------------------------------
def test_every_round_has_its_folder_and_one_training_runs_across_them(straight):
    root = RunDir(straight)
    records = []
    for index in range(ROUNDS):
        view = root.round_dir(index)
        for path in (view.candidates_parquet, view.scores_parquet, view.pairs_parquet, view.folder / RECORD):
            assert path.exists(), path
        records.append(json.loads((view.folder / RECORD).read_text()))
        assert records[-1]["step"] == (index + 1) * STEPS
    # The rounds' prompts: disjoint slices of the train split.
    ids = [set(read_parquet(root.round_dir(r).candidates_parquet)["prompt_id"]) for r in range(ROUNDS)]
    assert not ids[0] & ids[1]
    train = read_parquet(root.prompts_parquet).query("split == 'train'")["prompt_id"]
    assert ids[0] | ids[1] == set(train)
    # One training: checkpoints at the root, the step counting on across rounds, eval at each round's end.
    step, last = latest_checkpoint(root)
    assert step == ROUNDS * STEPS and read_progress(last).settings["rounds"]["round"] == ROUNDS - 1
    assert read_progress(last).id == records[-1]["checkpoint id"]
    assert read_parquet(root.eval_parquet)["step"].tolist() == [0, STEPS, 2 * STEPS]
    assert not (root.root / "candidates").exists() and not (root.root / "pairs.parquet").exists()
    # Round 1 sampled from the checkpoint round 0 ended on, and its shards say so.
    policy = json.loads((root.round_dir(1).folder / POLICY_DIR / "policy.json").read_text())
    assert policy == {
        "step": STEPS,
        "checkpoint": records[0]["checkpoint"],
        "checkpoint id": records[0]["checkpoint id"],
    }
    assert (root.export / "export.json").exists()
    card = (root.export / "README.md").read_text()
    assert f"{ROUNDS} rounds, each sampling from" in card and "| round | steps | prompts |" in card
    # The per-round table agrees with each round's selection statistics.
    table = rounds_table(root, load_recipe(str(root.recipe_yaml)))
    assert table["round"].tolist() == list(range(ROUNDS))
    for index, row in table.iterrows():
        stats = json.loads((root.round_dir(index).folder / "select_stats.json").read_text())
        assert (row["pairs"], row["#Dom"]) == (stats["pairs"], stats["threshold_pairs_dominant"])
    assert table["eval total"].notna().all()


def sampled_again(run: Path, trained: bool, tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored, again): the latents of round 1's candidates as the run stored them, and as a model
    loaded here from disk samples them with the round's seeds, given round 0's final weights by hand
    from its last checkpoint (``trained``) or left the base."""
    root = RunDir(run)
    recipe = round_recipe(load_recipe(str(root.recipe_yaml)), 1)
    view = root.round_dir(1)
    manifest = read_parquet(view.candidates_parquet).sort_values(["prompt_id", "sample_idx"])
    prompts = (
        read_parquet(root.prompts_parquet).set_index("prompt_id").loc[sorted(set(manifest["prompt_id"]))]
    )
    record = json.loads((root.round_dir(0).folder / RECORD).read_text())
    backbone = load_backbone(recipe.model, torch.device("cpu"))
    if trained:
        load_policy(
            backbone, recipe.model, recipe.model.finetune, root.checkpoints / record["checkpoint"] / "weights"
        )
    again = RunDir(tmp_path / ("trained" if trained else "base"))
    again.candidates_dir.mkdir(parents=True, exist_ok=True)
    negative = CandidateStore(view).negative_embeddings()
    plan = plan_shards(prompts.reset_index(), len(prompts))[0]  # one shard: prompt by prompt, in order
    with torch.no_grad():
        generate_shard(
            backbone, plan, negative, recipe, again, generation_fingerprint(recipe), torch.device("cpu")
        )
    stored = CandidateStore(view).latents(manifest["prompt_id"].tolist(), manifest["sample_idx"].tolist())
    return stored, load_file(str(again.shard(plan.index)))["latents"]


def test_round_1_candidates_are_the_policy_round_0_trained_sampling_them(straight, tmp_path):
    """Made again with a model loaded from disk and given round 0's final weights: the same latents;
    with the base model: other latents (what a round that sampled the base would have stored)."""
    torch.set_num_threads(1)
    stored, again = sampled_again(straight, True, tmp_path)
    assert torch.equal(stored, again)
    stored, base = sampled_again(straight, False, tmp_path)
    assert not torch.allclose(stored, base, atol=1e-4)


@pytest.mark.slow
def test_a_precomputed_base_reference_gives_the_live_ones_margins(straight, models, tmp_path):
    """Full fine-tuning past round 0 no longer holds the base: the pass reads it from disk again."""
    torch.set_num_threads(1)
    out = tmp_path / "run"
    with Margins() as margins:
        assert main(["run", str(SDXL), *rounds_overrides(out, models, "train.reference=precomputed")]) == 0
    live = {int(k): v for k, v in json.loads((straight.parent / "margins.json").read_text()).items()}
    assert margins.keys() == live.keys()
    assert all(margins[k] == pytest.approx(live[k], rel=1e-3, abs=1e-6) for k in live), (margins, live)
    assert (out / "rounds" / "round-001" / "reference").is_dir() and not (out / "reference").exists()


def test_the_reference_stays_the_base_by_default(straight):
    margins = {int(k): v for k, v in json.loads((straight.parent / "margins.json").read_text()).items()}
    assert margins[1] < 1e-4  # step 0: the policy is the base
    assert margins[STEPS + 1] > 1e-3  # round 1's first step: the policy moved away from the base


def curves(run: Path, tag: str) -> list[int]:
    """The steps of a tensorboard scalar, over the run's event files (the tracker's config goes in a
    folder of its own)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for folder in sorted({p.parent for p in run.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder))
        events.Reload()
        steps += [e.step for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []
    return sorted(steps)


MOVING = {
    "lora": [
        "model.finetune=lora",
        "model.lora_rank=4",
        "model.lora_dropout=0.0",
        "train.learning_rate=1e-2",
        "rounds.max_pairs=2",  # of the round's ~9: the cap in all, per round
    ],
    "full": ["model.finetune=full", "train.learning_rate=1e-3"],
}


@pytest.mark.parametrize(
    ("finetune", "reference"),
    [
        ("lora", "live"),
        ("lora", "precomputed"),
        pytest.param("full", "live", marks=pytest.mark.slow),
        pytest.param("full", "precomputed", marks=pytest.mark.slow),
    ],
)
def test_a_moving_reference_is_the_policy_the_round_started_from(finetune, reference, models, tmp_path):
    """``rounds.reference=previous``: at each round's first step the reference computes the policy's
    own function (margin 0, loss log 2), at the step after not, whether it runs next to the policy or
    its errors were computed before the round (``train.reference``); and the next round's candidates
    are sampled from that policy (LoRA: through the adapter)."""
    torch.set_num_threads(1)
    out = tmp_path / "run"
    with Margins() as margins:
        assert (
            main(
                [
                    "run",
                    str(SDXL),
                    *rounds_overrides(
                        out,
                        models,
                        *MOVING[finetune],
                        "rounds.reference=previous",
                        f"train.reference={reference}",
                        "tracking.tracker=tensorboard",
                    ),
                ]
            )
            == 0
        )
    assert margins[1] < 1e-4 and margins[STEPS + 1] < 1e-4, margins
    assert margins[STEPS] > 1e-3 and margins[2 * STEPS] > 1e-3, margins
    stored, again = sampled_again(out, True, tmp_path)
    assert torch.allclose(stored, again, atol=1e-6)
    if finetune == "lora":
        for r in range(ROUNDS):
            stats = json.loads((out / "rounds" / f"round-{r:03d}" / "select_stats.json").read_text())
            assert stats["pairs"] == 2 < stats["pairs"] + stats["removed_by_cap"], stats
            assert len(read_parquet(out / "rounds" / f"round-{r:03d}" / "pairs.parquet")) == 2
    if reference == "precomputed":  # each round's errors, of its own positions only, with the round
        assert [
            len(list((out / "rounds" / f"round-{r:03d}" / "reference").glob("part-*"))) for r in (0, 1)
        ] == [1, 1]
    if (finetune, reference) == (
        "lora",
        "live",
    ):  # the curves: one tracker run, the rounds' pair statistics on the step axis
        assert curves(out, "rounds/#Dom") == [0, STEPS] and curves(out, "rounds/pairs / prompt") == [0, STEPS]
        assert curves(out, "eval/total") == [0, STEPS, 2 * STEPS]
        assert curves(out, "train/loss") == list(range(1, 2 * STEPS + 1))
    stored, base = sampled_again(out, False, tmp_path)
    assert not torch.allclose(stored, base, atol=1e-4)


def test_a_finished_iterative_run_does_nothing_when_run_again(straight, models):
    times = {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.is_file()}
    reports = run_all(load_recipe(str(SDXL), rounds_overrides(straight, models)))
    names = [f"round {r}: {s}" for r in range(ROUNDS) for s in ("generate", "score", "select", "train")]
    assert [r.name for r in reports] == [*names, "export"]
    assert [r.name for r in reports if r.did_work] == []
    for command in ("eval", "export"):  # the training state at the root: the stages that read it work
        assert main([command, str(SDXL), *rounds_overrides(straight, models)]) == 0
    assert {p: p.stat().st_mtime_ns for p in times if p.exists()} == times


def test_a_changed_training_setting_is_refused_and_force_trains_every_round_again(
    straight, models, tmp_path, capsys
):
    """Round 1's candidates depend on round 0's weights: training again makes them again; round 0's,
    sampled from the base, are kept."""
    torch.set_num_threads(1)
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    changed = rounds_overrides(out, models, "train.beta=60")
    assert main(["run", str(SDXL), *changed]) == 2
    assert "train.beta" in capsys.readouterr().err
    root = RunDir(out)
    shard_times = {r: root.round_dir(r).shard(0).stat().st_mtime_ns for r in range(ROUNDS)}
    policy = json.loads((root.round_dir(1).folder / POLICY_DIR / "policy.json").read_text())
    assert main(["run", str(SDXL), *changed, "--force"]) == 0
    assert root.round_dir(0).shard(0).stat().st_mtime_ns == shard_times[0]
    assert root.round_dir(1).shard(0).stat().st_mtime_ns != shard_times[1]
    again = json.loads((root.round_dir(1).folder / POLICY_DIR / "policy.json").read_text())
    assert again["step"] == policy["step"] and again["checkpoint id"] != policy["checkpoint id"]
    assert read_progress(latest_checkpoint(root)[1]).settings["train"]["beta"] == 60


# ---- slow: kills and 2 processes ------------------------------------------------------------------------
ENV_KEYS = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _slowed(out: Path, models: Path, markers: Path) -> subprocess.Popen:
    import os

    script = ROOT / "tests" / "scripts" / "slow_rounds.py"
    command = [
        sys.executable,
        str(script),
        "3",
        str(markers),
        "run",
        str(SDXL),
        *rounds_overrides(out, models),
    ]
    return subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **ENV_KEYS}, stderr=subprocess.PIPE, text=True
    )


def _kill_when(process: subprocess.Popen, marker: Path, timeout: float = 240) -> None:
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert process.poll() is None, f"exited before {marker.name}: {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no {marker.name} in time"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def assert_same_run(a: Path, b: Path) -> None:
    """The same candidates (latents bit for bit), pairs and final weights."""
    ra, rb = RunDir(a), RunDir(b)
    for index in range(ROUNDS):
        va, vb = ra.round_dir(index), rb.round_dir(index)
        pd.testing.assert_frame_equal(
            read_parquet(va.candidates_parquet), read_parquet(vb.candidates_parquet)
        )
        pd.testing.assert_frame_equal(read_parquet(va.pairs_parquet), read_parquet(vb.pairs_parquet))
        manifest = read_parquet(va.candidates_parquet)
        ids, idx = manifest["prompt_id"].tolist(), manifest["sample_idx"].tolist()
        assert torch.equal(CandidateStore(va).latents(ids, idx), CandidateStore(vb).latents(ids, idx)), index
    final = f"step-{ROUNDS * STEPS}"
    wa, wb = checkpoint_tensors(ra.checkpoints / final), checkpoint_tensors(rb.checkpoints / final)
    assert wa.keys() == wb.keys() and wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:3]


@pytest.mark.slow
def test_killed_mid_generate_of_round_1_and_mid_train_of_round_1_resumes_to_the_uninterrupted_run(
    straight, models, tmp_path
):
    out, markers = tmp_path / "run", tmp_path / "markers"
    # Killed after round 1's first shard, while it sleeps before the second.
    _kill_when(_slowed(out, models, markers), markers / "round-001-shard-00000.safetensors")
    view = RunDir(out).round_dir(1)
    assert view.shard(0).exists() and not view.shard(1).exists()
    first = view.shard(0).stat().st_mtime_ns
    # Killed again in round 1's second step (its first checkpointed), then finished undisturbed.
    _kill_when(_slowed(out, models, markers), markers / f"step-{STEPS + 2}")
    assert view.shard(0).stat().st_mtime_ns == first  # kept, not sampled again
    assert latest_checkpoint(RunDir(out))[0] == STEPS + 1
    assert main(["run", str(SDXL), *rounds_overrides(out, models)]) == 0
    assert_same_run(straight, out)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "cpu_deepspeed_zero2.yaml"])
def test_rounds_on_two_processes_give_the_one_process_run(config, straight, models, tmp_path):
    from tests.test_launch_run import assert_same_training, launch

    out = tmp_path / "run"
    result = launch(
        ROOT / "launch" / config,
        ["run", str(SDXL), *rounds_overrides(out, models, "train.batch_size=1")],
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2500:] + result.stderr[-3500:]
    assert result.stdout.count("mpo run ->") == 1
    ra, rb = RunDir(straight), RunDir(out)
    # Round 0 samples the base: the same latents. Round 1 samples a policy that 2 processes trained
    # (equal up to float rounding): far closer to the 1-process round 1 than the base's samples are.
    one, base = sampled_again(straight, False, tmp_path)
    two, _ = sampled_again(out, False, tmp_path)
    assert (two - one).norm() < 0.1 * (base - one).norm()
    for index in range(ROUNDS):
        va, vb = ra.round_dir(index), rb.round_dir(index)
        manifest = read_parquet(va.candidates_parquet)
        ids, idx = manifest["prompt_id"].tolist(), manifest["sample_idx"].tolist()
        if index == 0:
            assert torch.allclose(
                CandidateStore(va).latents(ids, idx), CandidateStore(vb).latents(ids, idx), atol=1e-5
            )
        pd.testing.assert_frame_equal(
            read_parquet(va.pairs_parquet)[["prompt_id", "win", "lose"]],
            read_parquet(vb.pairs_parquet)[["prompt_id", "win", "lose"]],
        )
    final = f"step-{ROUNDS * STEPS}"
    base = load_file(str(models / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert_same_training(
        checkpoint_tensors(ra.checkpoints / final),
        checkpoint_tensors(rb.checkpoints / final),
        {f"denoiser/{k}": v for k, v in base.items()},
    )


@pytest.mark.slow
def test_the_tiny_rounds_recipe_runs_three_rounds(models, tmp_path):
    torch.set_num_threads(1)
    recipe = ROOT / "recipes" / "tiny" / "sdxl_rounds.yaml"
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(recipe),
                f"output_dir={out}",
                f"model.path={models / 'sdxl'}",
                "tracking.tracker=none",
            ]
        )
        == 0
    )
    table = rounds_table(RunDir(out), load_recipe(str(recipe)))
    assert table["round"].tolist() == [0, 1, 2] and (table["pairs"] > 0).all()
    assert read_parquet(out / "eval.parquet")["step"].tolist() == [0, 4, 8, 12]


FLOW_LR = {"full": "train.learning_rate=1e-3", "lora": "train.learning_rate=1e-2"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux", "wan"])
def test_flow_families_run_rounds_and_sample_from_the_trained_policy(family, models, tmp_path):
    """The rounds go through the backbone adapter only: a flow-matching family (Wan: video, LoRA)
    samples round 1 from round 0's weights as it does from the base."""
    from mpo.backbones.registry import get_backbone_class

    torch.set_num_threads(1)
    recipe = ROOT / "recipes" / "tiny" / f"{family}.yaml"
    finetune = load_recipe(str(recipe)).model.finetune
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        f"model.path={models / family}",
        "prompts.limit=5",
        "prompts.val_count=1",
        "generate.num_candidates=3",
        "generate.num_inference_steps=2",
        *(f"generate.{k}={v}" for k, v in get_backbone_class(family).tiny_size.items()),
        "generate.previews=0",
        "select.threshold=0.0",
        "train.max_steps=2",
        "train.batch_size=2",
        FLOW_LR[finetune],
        "train.lr_schedule=constant",
        "train.warmup_steps=0",  # round 0's one step moves the policy
        "eval.every=0",
        "eval.num_prompts=1",
        "eval.samples_per_prompt=1",
        "tracking.tracker=none",
        "rounds.count=2",
    ]
    assert main(["run", str(recipe), *overrides]) == 0
    stored, again = sampled_again(out, True, tmp_path)
    assert torch.allclose(stored, again, atol=1e-6)
    stored, base = sampled_again(out, False, tmp_path)
    assert not torch.allclose(stored, base, atol=1e-4)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_moving_precomputed_reference_under_zero3_gives_the_one_process_run(models, tmp_path):
    """Full fine-tuning with ZeRO-3 (the policy sharded across ranks): each round's reference errors
    are computed from the gathered weights the round started from, and the run equals 1 process."""
    from tests.test_launch_run import ZERO2, assert_same_training, launch

    config = tmp_path / "zero3.yaml"
    config.write_text(
        ZERO2.read_text().replace(
            "launch/deepspeed/zero2.json", str(ROOT / "launch" / "deepspeed" / "zero3.json")
        )
    )
    moving = (*MOVING["full"], "rounds.reference=previous", "train.reference=precomputed")
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    assert main(["run", str(SDXL), *rounds_overrides(one, models, *moving)]) == 0
    result = launch(
        config, ["run", str(SDXL), *rounds_overrides(two, models, *moving, "train.batch_size=1")], timeout=600
    )
    assert result.returncode == 0, result.stdout[-2500:] + result.stderr[-3500:]
    for out, ranks in ((one, 1), (two, 2)):  # each round's errors, one part per rank
        parts = [len(list((out / "rounds" / f"round-{r:03d}" / "reference").glob("part-*"))) for r in (0, 1)]
        assert parts == [ranks, ranks]
    final = f"step-{ROUNDS * STEPS}"
    base = load_file(str(models / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert_same_training(
        checkpoint_tensors(RunDir(one).checkpoints / final),
        checkpoint_tensors(RunDir(two).checkpoints / final),
        {f"denoiser/{k}": v for k, v in base.items()},
    )
