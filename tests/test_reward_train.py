"""The reward trainer on a tiny Qwen2-VL: the shared prefix trains exactly like one question at a
time, the loss reads the scorer's own answer position, kill and resume gives the uninterrupted
weights, a damaged file stops training without losing a step, and the export loads as reward.model_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import reward.train
from mpo.config import RecipeError
from mpo.store import RunDir
from mpo.train_state import list_checkpoints
from reward import train_data as td
from reward.backends.tiny_vlm import build_tiny_qwen2_vl
from reward.backends.vlm import VLMBackend
from reward.checklist import load_checklist
from reward.cli import main
from reward.synthetic import write_shapes
from reward.train import train_stage
from reward.train_config import load_train_recipe
from reward.train_loss import binary_ce, pooled_answer_logits, token_ce
from reward.train_model import AnswerModel, finetune_mode, load_vlm, one_question_at_a_time, scorer_for
from reward.types import Sample

ROOT = Path(__file__).resolve().parents[1]
TINY_QA = ROOT / "recipes" / "reward" / "tiny_qa.yaml"


class Killed(Exception):
    """Stands in for the job being killed right after a checkpoint."""


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_vlm") / "model", seed=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return write_shapes(tmp_path_factory.mktemp("shapes"), count=24)


def recipe(run: Path, model: Path, shapes: dict[str, Path], *extra: str):
    return load_train_recipe(
        TINY_QA,
        [
            f"output_dir={run}",
            f"model.path={model}",
            f"data.checklist={shapes['checklist']}",
            f"data.annotations=[{shapes['annotations']}]",
            "data.val_fraction=0.25",
            "train.lr_schedule=constant",
            "train.warmup_steps=0",
            "train.batch_size=4",
            "train.max_steps=4",
            "eval.batch_size=8",
            *extra,
        ],
    )


def _model_cfg(path: Path, shapes: dict[str, Path], finetune: str):
    return recipe(Path("unused"), path, shapes, f"model.finetune={finetune}", "model.train_vision=true").model


def _samples() -> tuple[list[Sample], list[list[str]]]:
    """Images of three sizes and a 3-second video, asked different numbers of questions."""
    gen = torch.Generator().manual_seed(3)
    samples = [
        Sample(torch.rand(3, 40, 60, generator=gen), id="a"),
        Sample(torch.rand(3, 100, 90, generator=gen), id="b"),
        Sample(torch.rand(24, 3, 32, 48, generator=gen), fps=8.0, id="v"),
        Sample(torch.rand(3, 64, 64, generator=gen), id="c"),
    ]
    checklist = load_checklist("image-official")
    texts = checklist.question_texts("")
    questions = [texts[3:6], texts[10:11], ["Is the video stable?", "Is the motion smooth?"], texts[0:4]]
    return samples, questions


# ---- the loss ---------------------------------------------------------------------------------------
def test_token_ce_is_next_token_cross_entropy_and_splits_into_binary_ce():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=gen, dtype=torch.float64) * 3
    hard = torch.tensor([1.0, 0, 1, 0, 1, 1], dtype=torch.float64)
    answer = torch.where(hard == 1, 2, 7)
    expected = F.cross_entropy(logits, answer, reduction="none")
    torch.testing.assert_close(
        token_ce(logits, hard, 2, 7).double(), expected.float().double(), atol=1e-6, rtol=0
    )
    # soft targets: BCE of the two-way answer plus the mass left off the two answer tokens
    soft = torch.rand(6, generator=gen, dtype=torch.float64)
    p = logits.softmax(-1)
    q = p[:, 2] / (p[:, 2] + p[:, 7])
    bce = -(soft * q.log() + (1 - soft) * (1 - q).log())
    torch.testing.assert_close(
        token_ce(logits, soft, 2, 7).double(),
        (bce - (p[:, 2] + p[:, 7]).log()).float().double(),
        atol=1e-5,
        rtol=0,
    )


def test_binary_ce_reads_p_yes_like_the_scorer():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, -3.0, 1.0, 4.0]])
    yes, no = pooled_answer_logits(logits, [0, 1], [2, 3], "max")
    torch.testing.assert_close(yes, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(no, torch.tensor([0.0, 4.0]))
    p = torch.sigmoid(yes - no)
    target = torch.tensor([1.0, 0.25])
    expected = -(target * p.log() + (1 - target) * (1 - p).log())
    torch.testing.assert_close(binary_ce(yes, no, target), expected)
    lse_yes, _ = pooled_answer_logits(logits, [0, 1], [2, 3], "logsumexp")
    torch.testing.assert_close(lse_yes, torch.logsumexp(logits[:, :2], -1))


# ---- train-time prefix sharing ---------------------------------------------------------------------
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_shared_prefix_gives_the_loss_and_gradients_of_one_question_at_a_time(tiny_vlm, shapes, finetune):
    torch.manual_seed(0)
    cfg = _model_cfg(tiny_vlm, shapes, finetune)
    vlm, processor = load_vlm(cfg, "cpu")
    vlm = finetune_mode(cfg).prepare(vlm)
    if finetune == "lora":  # peft starts B at zero; move it so that the adapters shape the gradients
        for name, p in vlm.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    backend = scorer_for(vlm, processor, cfg, str(tiny_vlm), 24, 8)
    vlm.train()
    samples, questions = _samples()
    rows = sum(len(q) for q in questions)
    target = (torch.arange(rows) % 3 == 0).float()
    yes, no = backend.yes_ids[0], backend.no_ids[0]
    params = [(n, p) for n, p in vlm.named_parameters() if p.requires_grad]
    assert params and (finetune == "full" or all("lora_" in n for n, _ in params))

    def loss_and_grads(logits):
        loss = token_ce(logits, target, yes, no).sum()
        grads = torch.autograd.grad(loss, [p for _, p in params])
        return loss.detach(), grads

    shared_logits = AnswerModel(vlm, backend)(samples, questions)
    assert shared_logits.shape == (rows, len(backend.tokenizer))
    shared_loss, shared_grads = loss_and_grads(shared_logits)
    naive_loss, naive_grads = loss_and_grads(one_question_at_a_time(backend, samples, questions))
    torch.testing.assert_close(shared_loss, naive_loss, atol=1e-5 * float(naive_loss), rtol=0)
    # float32 sums in a different order: equal to 1e-5 of each tensor's gradient scale (the random tiny
    # model's gradients reach hundreds, so a fixed absolute tolerance would mean 1e-7 relative).
    for (name, _), a, b in zip(params, shared_grads, naive_grads):
        scale = max(float(b.abs().max()), 1.0)
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=0, msg=name)
    # The gradient reaches the shared part: the vision tower's parameters get one.
    visual = [g for (n, _), g in zip(params, shared_grads) if "visual" in n]
    assert visual and max(float(g.abs().max()) for g in visual) > 0


def test_training_forward_reads_the_scorers_p_yes(tiny_vlm, shapes):
    cfg = _model_cfg(tiny_vlm, shapes, "lora")
    vlm, processor = load_vlm(cfg, "cpu")
    backend = scorer_for(vlm, processor, cfg, str(tiny_vlm), 24, 8)
    samples, _ = _samples()
    rows = [load_checklist("image-official").question_texts("")[:5]] * len(samples)
    with torch.no_grad():
        trained_view = backend.p_yes(AnswerModel(vlm, backend)(samples, rows)).view(len(samples), 5)
    scorer_view = backend.answer(samples, rows).p_yes
    torch.testing.assert_close(trained_view, scorer_view, atol=1e-6, rtol=0)
    assert scorer_view.std() > 0.05  # the random model discriminates, or equality would prove little


def test_sliding_window_training_runs_one_sample_per_prefix_pass_like_the_scorer(tmp_path):
    """Gemma 3 with a 24-token sliding window, shorter than these prompts: one right-padded prefix pass
    would shift the window of the shorter prefixes, so the training forward, like the scorer, runs one
    sample per pass and equals one question at a time. Agreeing on one padded pass (what a process
    would be told if the others decided so) visibly changes the logits: the fallback is what matters."""
    from reward.backends.tiny_vlms import build_tiny_gemma3

    torch.set_num_threads(1)
    backend = VLMBackend.from_pretrained(
        build_tiny_gemma3(tmp_path / "gemma3"), dtype="float32", device="cpu"
    )
    samples, questions = _samples()
    images = [0, 1, 3]  # Gemma 3 takes no video
    samples, questions = [samples[i] for i in images], [questions[i] for i in images]
    votes: list[bool] = []
    with torch.no_grad():
        reference = one_question_at_a_time(backend, samples, questions)
        shared = AnswerModel(backend.model, backend, agree=lambda flag: votes.append(flag) or flag)(
            samples, questions
        )
        padded = AnswerModel(backend.model, backend, agree=lambda flag: False)(samples, questions)
    assert votes == [True]
    assert shared.shape == reference.shape == (8, len(backend.tokenizer))
    torch.testing.assert_close(shared, reference, atol=1e-4, rtol=0)
    assert (padded - reference).abs().max() > 1e-2


# ---- runs ---------------------------------------------------------------------------------------------
LORA_WITH_DROPOUT = ["model.lora_dropout=0.1", "train.lr_schedule=linear", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_vlm, shapes) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("straight") / "run"
    summary = train_stage(recipe(run, tiny_vlm, shapes, *LORA_WITH_DROPOUT, "train.checkpoint_every=2"))
    return run, summary


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(
        str(run / "checkpoints" / f"step-{step}" / "weights" / "adapter" / "adapter_model.safetensors")
    )


def test_kill_and_resume_gives_the_uninterrupted_weights(straight, tiny_vlm, shapes, tmp_path, monkeypatch):
    run, summary = straight
    assert summary["steps trained now"] == 4 and summary["resumed from step"] == "-"
    recorded = load_train_recipe(run / "recipe.yaml")  # the run's resolved recipe loads from anywhere
    assert recorded.train.max_steps == 4 and Path(recorded.data.annotations[0]).is_absolute()
    start = _initial_adapter(tiny_vlm, shapes, tmp_path)
    final = _weights(run, 4)
    assert final.keys() == start.keys() and all("lora_" in k for k in final)
    unchanged = [k for k in final if torch.equal(final[k], start[k])]
    assert not unchanged, f"{len(unchanged)} adapter tensors did not train, e.g. {unchanged[:3]}"

    resumed = tmp_path / "resumed"
    original = reward.train.checkpoint

    def checkpoint_then_die(t):
        original(t)
        if t.progress.step == 2:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(reward.train, "checkpoint", checkpoint_then_die)
        with pytest.raises(Killed):
            train_stage(recipe(resumed, tiny_vlm, shapes, *LORA_WITH_DROPOUT, "train.checkpoint_every=2"))
    assert [s for s, _ in list_checkpoints(RunDir(resumed))] == [2]
    again = train_stage(recipe(resumed, tiny_vlm, shapes, *LORA_WITH_DROPOUT, "train.checkpoint_every=2"))
    assert again["resumed from step"] == 2 and again["steps trained now"] == 2
    for key, value in final.items():
        torch.testing.assert_close(_weights(resumed, 4)[key], value, atol=1e-6, rtol=0, msg=key)
    curve = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    resumed_curve = [json.loads(line) for line in (resumed / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [r["step"] for r in resumed_curve] == [0, 4]
    assert resumed_curve[-1]["mean_abs_dp"] == pytest.approx(curve[-1]["mean_abs_dp"], abs=1e-6)
    # a finished run is not trained again
    assert train_stage(recipe(resumed, tiny_vlm, shapes, *LORA_WITH_DROPOUT))["trained"] is False


def _initial_adapter(tiny_vlm: Path, shapes, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The adapter as set up before the first step (same seed), in the checkpoint's key layout."""
    from peft.utils import get_peft_model_state_dict

    from reward.train import setup_accelerator, setup_model

    r = recipe(tmp_path / "initial", tiny_vlm, shapes, *LORA_WITH_DROPOUT)
    _, mode, _ = setup_model(r, setup_accelerator(r))
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(mode.peft_model).items()}


def test_export_loads_as_the_vlm_reward_and_answers_like_the_trained_model(
    straight, tiny_vlm, shapes, tmp_path
):
    run, _ = straight
    model_dir = run / "model"
    assert (model_dir / "model.safetensors").exists() and not (model_dir / "adapter_config.json").exists()
    backend = VLMBackend.from_pretrained(model_dir, dtype="float32", device="cpu")
    # the trained model, rebuilt from the last checkpoint's adapter
    from peft import PeftModel

    base, processor = load_vlm(recipe(run, tiny_vlm, shapes).model, "cpu")
    tuned = PeftModel.from_pretrained(base, str(run / "checkpoints" / "step-4" / "weights" / "adapter"))
    reference = VLMBackend(tuned.get_base_model(), processor, source="checkpoint")
    data = td.read_annotations([shapes["annotations"]], load_checklist(shapes["checklist"]))
    samples = [td.load_sample(s, 24) for s in data.samples[:6]]
    rows = [load_checklist(shapes["checklist"]).question_texts("")] * len(samples)
    torch.testing.assert_close(
        backend.answer(samples, rows).p_yes, reference.answer(samples, rows).p_yes, atol=1e-5, rtol=0
    )
    # the trainer's own held-out numbers are what the export gives through the scorer
    import pandas as pd

    from reward.answer_eval import compare, score_samples

    split = pd.read_parquet(run / "split.parquet")
    val = set(split.loc[split["split"] == "val", "sample"])
    held_out = td.QAData(data.checklist, data.samples, [r for r in data.rows if r.sample in val])
    table = score_samples(data.checklist, backend, [data.samples[i] for i in sorted(val)], 24, 8)
    last = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    result = compare(table, held_out, "export")
    assert result["rows"] == last["rows"] and result["accuracy"] == pytest.approx(last["accuracy"])
    assert result["mean_abs_dp"] == pytest.approx(last["mean_abs_dp"], abs=1e-5)

    # a recipe's reward section names it like any other VLM
    from omegaconf import OmegaConf

    from mpo.schema import RewardConfig
    from reward.visionreward import VisionReward

    section = OmegaConf.structured(
        RewardConfig(
            checklist=str(shapes["checklist"]), backend="vlm", model_path=str(model_dir), dtype="float32"
        )
    )
    assert VisionReward.from_config(section, device="cpu").score(samples[:2]).p_yes.shape == (2, 4)


def test_adapter_export_and_full_fine_tuning(tiny_vlm, shapes, tmp_path):
    adapter = tmp_path / "adapter"
    train_stage(
        recipe(
            adapter,
            tiny_vlm,
            shapes,
            "train.max_steps=1",
            "export.merge_lora=false",
            "eval.limit=1",
            "train.loss=binary",
            "model.answer_reduce=logsumexp",
        )
    )
    config = json.loads((adapter / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_vlm)
    with_adapter = VLMBackend.from_pretrained(adapter / "model", dtype="float32", device="cpu")
    lora = {n: p for n, p in with_adapter.model.named_parameters() if "lora_B" in n}
    assert lora and any(float(p.abs().max()) > 0 for p in lora.values())  # the trained adapter, attached

    full = tmp_path / "full"
    extra = ["model.finetune=full", "model.train_vision=false", "train.learning_rate=1e-3", "train.max_steps=2",
             "eval.limit=1"]  # fmt: skip
    summary = train_stage(recipe(full, tiny_vlm, shapes, *extra))
    assert summary["steps trained now"] == 2
    trained = load_file(str(full / "model" / "model.safetensors"))
    base = load_file(str(tiny_vlm / "model.safetensors"))
    language = [k for k in base if "visual" not in k and k in trained]
    moved = [k for k in language if not torch.equal(trained[k], base[k])]
    assert len(moved) == len(language), f"{len(language) - len(moved)} language-model tensors did not train"
    assert all(torch.equal(trained[k], base[k]) for k in base if "visual" in k)  # model.train_vision=false
    VLMBackend.from_pretrained(full / "model", dtype="float32", device="cpu")


def test_a_file_damaged_inside_stops_training_naming_it_and_nothing_is_lost(
    straight, tiny_vlm, shapes, tmp_path, capsys
):
    run, _ = straight
    data_dir = tmp_path / "data"
    shutil.copytree(shapes["annotations"].parent, data_dir)
    copy = {"checklist": data_dir / "checklist.yaml", "annotations": data_dir / "annotations.jsonl"}
    r = recipe(tmp_path / "damaged", tiny_vlm, copy, *LORA_WITH_DROPOUT, "train.checkpoint_every=0")
    data = td.read_annotations([copy["annotations"]], load_checklist(copy["checklist"]))
    split = td.split_samples(data.samples, 0.25, None, 0)
    train = td.TrainSet.build(data, split, r.data.balance, r.train.seed)
    victim = data.samples[train.sample_at(9)]  # read in step 3 (4 samples a step)
    good = victim.media.read_bytes()
    victim.media.write_bytes(good[: len(good) // 2])  # the header reads, the pixels do not

    overrides = [f"output_dir={r.output_dir}", f"model.path={tiny_vlm}", f"data.checklist={copy['checklist']}",
                 f"data.annotations=[{copy['annotations']}]", "data.val_fraction=0.25", "train.batch_size=4",
                 "train.max_steps=4", "eval.batch_size=8", "train.checkpoint_every=0", *LORA_WITH_DROPOUT]  # fmt: skip
    assert main(["train", str(TINY_QA), *overrides]) == 2
    err = capsys.readouterr().err
    assert f"{victim.where}: image {victim.media}: cannot be decoded" in err
    assert "training stopped before step 3; checkpoint step-2 holds the 2 steps done" in err
    assert [s for s, _ in list_checkpoints(RunDir(r.output_dir))] == [2]

    victim.media.write_bytes(good)
    summary = train_stage(r)
    assert summary["resumed from step"] == 2
    for key, value in _weights(run, 4).items():
        torch.testing.assert_close(_weights(Path(r.output_dir), 4)[key], value, atol=1e-6, rtol=0, msg=key)


def test_resume_on_changed_data_is_refused(straight, tiny_vlm, shapes, tmp_path):
    run, _ = straight
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "model")
    changed = tmp_path / "fewer.jsonl"
    changed.write_text("\n".join(shapes["annotations"].read_text().splitlines()[:-3]) + "\n")
    media_root = f"data.media_root={shapes['annotations'].parent}"
    r = recipe(
        copy,
        tiny_vlm,
        {**shapes, "annotations": changed},
        *LORA_WITH_DROPOUT,
        "train.max_steps=6",
        media_root,
    )
    from mpo.train_state import CheckpointError

    with pytest.raises(CheckpointError, match=r"data \(samples, split, rows\)"):
        train_stage(r)


# ---- recipes and the command line -------------------------------------------------------------------
RECIPES = sorted((ROOT / "recipes" / "reward").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_reward_recipe_loads_and_names_itself_in_its_header(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # recipe paths start at the working directory: give the tiny ones data
    write_shapes(tmp_path / "runs" / "_data" / "shapes", count=4)
    r = load_train_recipe(path)
    assert r.output_dir == f"runs/{r.name}"
    assert (ROOT / r.launch_config).is_file()
    header = path.read_text().split("\n\n")[0]
    assert str(path.relative_to(ROOT)) in header and "reward " in header


def test_recipe_errors_name_key_value_and_source(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_train_recipe(
            TINY_QA,
            [
                "data.checklist=image-full",
                "train.lossy=1",
                "train.loss=mse",
                "data.balance=maybe",
                "train.answer_words=[yes]",
            ],
        )
    text = str(info.value)
    assert (
        "4 problems" in text
        and "train.lossy=1 (override 'train.lossy=1'): unknown key; did you mean train.loss?" in text
    )
    assert "train.loss='mse' (override 'train.loss=mse'): must be one of ['token_ce', 'binary']" in text
    assert "data.balance='maybe'" in text and "train.answer_words=['True']" in text and "quoted" in text


def test_reward_recipe_prints_the_resolved_recipe_which_loads_back(tmp_path, capsys):
    assert main(["recipe", str(TINY_QA), "data.checklist=image-full", "train.max_steps=7"]) == 0
    text = capsys.readouterr().out
    saved = tmp_path / "recipe.yaml"
    saved.write_text(text)
    again = load_train_recipe(saved)
    assert again.train.max_steps == 7 and again.output_dir == "runs/tiny-reward-qa"


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, tiny_vlm):
    assert main(["train", str(TINY_QA), "train.max_steps=0"]) == 2
    assert "train.max_steps=0" in capsys.readouterr().err
    missing = tmp_path / "none.jsonl"
    assert main(["train", str(TINY_QA), f"data.annotations=[{missing}]", f"output_dir={tmp_path / 'r'}", "data.checklist=image-full",
                 f"model.path={tiny_vlm}"]) == 2  # fmt: skip
    assert f"{missing}: no such file" in capsys.readouterr().err
    assert main(["distill", str(TINY_QA), f"output_dir={tmp_path / 'r'}", "data.checklist=image-full"]) == 2
    assert "reward distill needs data.teacher_scores" in capsys.readouterr().err


def test_videos_train_with_dataloader_workers_and_curves_reach_tensorboard(tiny_vlm, tmp_path):
    """Video samples (one frame per second, the scorer's sampling) through a worker process, a
    video checklist with [[prompt]] questions, and the held-out curve as tensorboard scalars."""
    from reward.media import save_video

    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(4):
        save_video(tmp_path / f"clip{i}.mp4", torch.rand(12, 3, 32, 32, generator=gen), fps=4)  # 3 seconds
        for q in (
            0,
            22,
        ):  # "Does the video meet all the requirements stated in the text "[[prompt]]"?", stability
            rows.append(
                {
                    "video": f"clip{i}.mp4",
                    "prompt": f"a cat {i}",
                    "question": q,
                    "answer": ["no", "yes"][(i + q) % 2],
                }
            )
    annotations = tmp_path / "videos.jsonl"
    annotations.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = tmp_path / "run"
    r = load_train_recipe(
        TINY_QA,
        [f"output_dir={run}", f"model.path={tiny_vlm}", "data.checklist=video-official",
         f"data.annotations=[{annotations}]", "data.val_count=1", "data.max_frames=2", "train.batch_size=2",
         "train.max_steps=2", "train.lr_schedule=constant", "train.warmup_steps=0", "train.num_workers=1",
         "tracking.tracker=tensorboard"],
    )  # fmt: skip
    summary = train_stage(r)
    assert summary["steps trained now"] == 2 and summary["question rows (held out)"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run.rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "eval/accuracy", "eval/mean_abs_dp"} <= tags
    backend = VLMBackend.from_pretrained(run / "model", dtype="float32", device="cpu", max_frames=2)
    sample = td.load_sample(
        td.read_annotations([annotations], load_checklist("video-official")).samples[0], 2
    )
    assert sample.pixels.shape[0] == 2 and backend.answer(
        [sample], [["Is the video stable?"]]
    ).p_yes.shape == (1, 1)
