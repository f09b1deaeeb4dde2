"""Held-out evaluation, the best-checkpoint pick and the export, on the tiny SDXL."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

import mpo.evaluate
from mpo.backbones import load_backbone
from mpo.evaluate import _my_items, cached_embeddings, eval_prompts, eval_stage, evaluate, record
from mpo.export import export_stage
from mpo.seeds import candidate_noise, candidate_seed
from mpo.store import RunDir, read_parquet
from mpo.train import train_stage
from mpo.train_state import list_checkpoints, read_best
from reward.visionreward import VisionReward
from tests.scripts.tiny_runs import checkpoint_tensors, copy_run, recipe_for

EVAL = ["eval.num_prompts=2", "eval.samples_per_prompt=2", "eval.grid_size=3"]


def test_evaluate_means_the_rewards_of_seeded_samples(prepared, models):
    recipe = recipe_for(prepared, models, extra=EVAL)
    run = RunDir(prepared)
    backbone = load_backbone(recipe.model)
    reward = VisionReward.from_config(recipe.reward)
    prompts = eval_prompts(run, recipe)
    assert len(prompts) == 2 and set(prompts["split"]) == {"val"}
    embeddings, negative = cached_embeddings(run, prompts)
    result = evaluate(backbone, reward, prompts, recipe, embeddings=embeddings, negative=negative)

    # The same numbers from the public pieces: seeded noise -> sample -> decode -> reward.
    totals, dims = [], []
    for p, text in zip(prompts["prompt_id"], prompts["prompt"]):
        for i in range(2):
            noise = candidate_noise(
                backbone.latent_shape(recipe.generate), candidate_seed(recipe.eval.seed, p, i)
            )
            pixels = backbone.decode(
                backbone.sample(backbone.encode_prompts([text]), negative, noise[None], recipe.generate)
            )
            from reward.types import Sample

            scores = reward.score([Sample(pixels=pixels[0].float(), prompt=text)])
            totals.append(scores.total.item())
            dims.append(scores.dimensions[0])
    assert result["samples"] == 4
    assert result["total"] == pytest.approx(sum(totals) / 4, abs=1e-5)
    names = reward.checklist.dimensions
    assert [k for k in result if k.startswith("dim.")] == [f"dim.{n}" for n in names]
    judged = torch.stack(dims).double().nanmean(0)
    for n, value in zip(names, judged.tolist()):
        assert result[f"dim.{n}"] == pytest.approx(value, abs=1e-5, nan_ok=True)
    assert result["grid"].shape == (16, 16 * 3, 3) and result["grid"].dtype.name == "uint8"

    again = evaluate(backbone, reward, prompts, recipe, embeddings=embeddings, negative=negative)
    assert {k: v for k, v in again.items() if k not in ("grid", "previews")} == pytest.approx(
        {k: v for k, v in result.items() if k not in ("grid", "previews")}, nan_ok=True
    )
    other = recipe_for(prepared, models, extra=[*EVAL, "eval.seed=99"])
    moved = evaluate(backbone, reward, prompts, other, embeddings=embeddings, negative=negative)
    assert moved["total"] != result["total"]  # the seed matters, so the equalities above are not vacuous


def test_items_split_evenly_over_processes_with_unscored_padding():
    items = [(p, "x", i) for p in range(3) for i in range(2)]  # 6 items over 4 processes
    shares = [_my_items(items, SimpleNamespace(process_index=r, num_processes=4)) for r in range(4)]
    assert {len(s) for s in shares} == {2}  # the same number of sampling batches everywhere
    real = [item for share in shares for item, keep in share if keep]
    assert sorted(real) == sorted(items)


def test_record_replaces_the_row_of_a_step(tmp_path):
    run = RunDir(tmp_path)
    record(run, 0, {"total": 1.0, "dim.a": 0.5, "samples": 2, "grid": None})
    record(run, 5, {"total": 2.0, "dim.a": 0.7, "samples": 2, "grid": None})
    table = record(run, 5, {"total": 3.0, "dim.a": 0.9, "samples": 2, "grid": None})
    assert table["step"].tolist() == [0, 5] and table["total"].tolist() == [1.0, 3.0]
    pd.testing.assert_frame_equal(read_parquet(run.eval_parquet), table)


def test_best_checkpoint_is_kept_and_pointed_to(prepared, models, tmp_path, monkeypatch):
    run = copy_run(prepared, tmp_path / "run")
    extra = ["train.max_steps=5", "train.checkpoint_every=3", "train.keep_checkpoints=1", "eval.every=1"]
    # Validation totals peak at step 2 whatever the tiny model does, so that "best" is not "last".
    offsets = iter([0.0, 0.3, 0.9, 0.5, 0.2, 0.1])
    original = mpo.evaluate.evaluate

    def scripted(*args, **kwargs):
        result = original(*args, **kwargs)
        return {**result, "total": next(offsets)}

    with monkeypatch.context() as m:
        m.setattr(mpo.evaluate, "evaluate", scripted)
        train_stage(recipe_for(run, models, extra=extra))
    table = read_parquet(run / "eval.parquet")
    assert table["step"].tolist() == [0, 1, 2, 3, 4, 5]
    best = read_best(RunDir(run))
    assert best == {"checkpoint": "step-2", "step": 2, "total": 0.9}
    assert [s for s, _ in list_checkpoints(RunDir(run))] == [2, 5]  # the last one and the best one
    assert sorted(p.name for p in (run / "eval").glob("*.png")) == [f"samples-step-{s}.png" for s in range(6)]

    again = train_stage(recipe_for(run, models, extra=extra))
    assert again["steps trained now"] == 0
    pd.testing.assert_frame_equal(read_parquet(run / "eval.parquet"), table)


FINETUNE = {
    "full": ["model.finetune=full", "train.learning_rate=1e-3"],
    "lora": ["model.finetune=lora", "model.lora_rank=4", "model.lora_alpha=8", "train.learning_rate=1e-2"],
}


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_export_loads_in_diffusers_and_matches_the_trained_model(prepared, models, tmp_path, finetune):
    run = copy_run(prepared, tmp_path / "run")
    extra = [*FINETUNE[finetune], *EVAL, "train.max_steps=2", "train.checkpoint_every=1", "eval.every=1"]
    recipe = recipe_for(run, models, extra=extra)
    train_stage(recipe)
    best = read_best(RunDir(run))

    # eval: the training run measured the best checkpoint with these settings already: nothing to do.
    assert eval_stage(recipe)["evaluated now"] is False
    # Measured again, the best checkpoint reloaded through diffusers' loaders gives the same numbers.
    summary = eval_stage(recipe, force=True)
    assert summary["step"] == best["step"]
    assert summary["total"] == pytest.approx(best["total"], abs=1e-5)

    assert export_stage(recipe)["exported"] is True
    export = run / "export"
    pipe = DiffusionPipeline.from_pretrained(export)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    image = _generate(pipe)
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()

    base = StableDiffusionXLPipeline.from_pretrained(models / "sdxl")
    x, t, kwargs = _unet_inputs(base)
    with torch.no_grad():
        exported, untrained = pipe.unet(x, t, **kwargs)[0], base.unet(x, t, **kwargs)[0]
    assert (exported - untrained).abs().max() > 1e-4  # training changed the exported model
    if finetune == "full":
        trained = checkpoint_tensors(run / "checkpoints" / best["checkpoint"])
        state = pipe.unet.state_dict()
        assert all(torch.equal(state[k.split("/", 1)[1]], v) for k, v in trained.items())
        assert not (export / "lora").exists()
    else:
        assert sorted(p.name for p in (export / "lora").iterdir()) == ["pytorch_lora_weights.safetensors"]
        base.load_lora_weights(export, subfolder="lora")  # what a user of the adapter does
        with torch.no_grad():
            adapted = base.unet(x, t, **kwargs)[0]
        torch.testing.assert_close(exported, adapted, rtol=0, atol=1e-5)  # merged == base + adapter
        assert torch.isfinite(_generate(base)).all()

    card = (export / "README.md").read_text()
    table = read_parquet(run / "eval.parquet").set_index("step")
    assert f"| total | {table.loc[0, 'total']:.4f} | {table.loc[best['step'], 'total']:.4f} |" in card
    assert "| dim.quality |" in card and "| pairs |" in card and "```yaml" in card
    assert json.loads((export / "export.json").read_text())["checkpoint"] == best["checkpoint"]
    assert export_stage(recipe)["exported"] is False  # up to date: skipped


def _generate(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a red car", num_inference_steps=2, height=16, width=16, generator=generator, output_type="pt"
    ).images


def _unet_inputs(pipe):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    embeds = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=generator)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
    kwargs = {
        "encoder_hidden_states": embeds,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
    }
    return x, torch.tensor([500]), kwargs


def test_lora_checkpoint_weights_are_the_diffusers_lora_format(prepared, models, tmp_path):
    run = copy_run(prepared, tmp_path / "run")
    train_stage(recipe_for(run, models, extra=[*FINETUNE["lora"], "train.max_steps=1"]))
    path = run / "checkpoints" / "step-1" / "weights" / "lora" / "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(path)))
    assert keys and all(k.startswith("unet.") and ".lora" in k for k in keys)
