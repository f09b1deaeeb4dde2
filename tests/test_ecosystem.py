"""What the run hands to the ecosystem, on one tiny LoRA run: the hub-ready export (model card,
ComfyUI LoRA, push_to_hub), the tracker's captioned samples, the run's pictures and the preference
dataset."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

import datasets
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from mpo.backbones.registry import builtin_families
from mpo.export import export_stage
from mpo.lora_formats import COMFYUI_FILE, sgm_unet_module, to_comfyui
from mpo.model_card import base_license, card_data
from mpo.store import read_parquet
from mpo.train import train_stage
from tests.scripts.processes import run_launch
from tests.scripts.tiny_runs import copy_run, recipe_for

LORA = [
    "model.finetune=lora",
    "model.lora_rank=4",
    "model.lora_alpha=8",
    "train.learning_rate=1e-2",
    "train.max_steps=2",
    "train.checkpoint_every=1",
    "eval.every=1",
    "eval.num_prompts=2",
    "eval.grid_size=2",
    "tracking.tracker=wandb",
    "tracking.mode=offline",
    "export.lora_formats=[diffusers,comfyui]",
    "export.license=openrail++",
    "export.push_to_hub.repo_id=me/tiny-sdxl-mpo",
]


class FakeHub:
    """A stand-in for huggingface_hub.HfApi: records every call, and 'uploads' by copying the files
    upload_folder would send (huggingface_hub's own pattern filter) into a local repo folder."""

    calls: ClassVar[list[tuple[str, dict]]] = []
    root: Path | None = None

    def __init__(self, *args, **kwargs) -> None:
        pass

    def create_repo(self, **kwargs):
        FakeHub.calls.append(("create_repo", kwargs))
        return f"https://hub.example/{kwargs['repo_id']}"

    def create_branch(self, **kwargs):
        FakeHub.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        FakeHub.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        target = FakeHub.root / kwargs["repo_id"] / (kwargs["revision"] or "main")
        for name in filter_repo_objects(files, ignore_patterns=kwargs["ignore_patterns"]):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, target / name)
        return type("Commit", (), {"oid": f"commit-{len(FakeHub.calls)}"})()


@pytest.fixture(scope="module")
def lora_run(prepared, models, tmp_path_factory):
    """A LoRA run trained 2 steps (evals at 0, 1, 2; wandb offline), exported and 'pushed'."""
    run = copy_run(prepared, tmp_path_factory.mktemp("eco") / "run")
    recipe = recipe_for(run, models, extra=LORA)
    train_stage(recipe)
    FakeHub.calls, FakeHub.root = [], tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.HfApi", FakeHub)
        summary = export_stage(recipe)
    assert summary["exported"] is True and summary["pushed"] == "https://hub.example/me/tiny-sdxl-mpo"
    return run, recipe


# ---- model card ---------------------------------------------------------------------------------------
def test_model_card_parses_with_huggingface_hub_and_sits_beside_model_index(lora_run):
    run, _ = lora_run
    export = run / "export"
    card = ModelCard.load(export / "README.md")
    data = card.data
    assert data.library_name == "diffusers" and data.pipeline_tag == "text-to-image"
    assert {"diffusion-dpo", "mpo", "visionreward", "sdxl", "lora"} <= set(data.tags)
    assert data.license == "openrail++"  # the local base has no card: the recipe's
    assert data.base_model is None  # a local folder is not a hub id (see the hub-id test below)
    assert (export / "model_index.json").exists()
    # The snippet loads from the card's own repo, and the folder it describes loads as it says.
    assert 'DiffusionPipeline.from_pretrained("me/tiny-sdxl-mpo")' in card.text
    assert 'load_lora_weights("me/tiny-sdxl-mpo", subfolder="lora")' in card.text
    assert isinstance(DiffusionPipeline.from_pretrained(export), StableDiffusionXLPipeline)
    table = read_parquet(run / "eval.parquet").set_index("step")
    step = json.loads((export / "export.json").read_text())["step"]
    assert f"| total | {table.loc[0, 'total']:.4f} | {table.loc[step, 'total']:.4f} |" in card.text
    assert "| pairs |" in card.text and "```yaml" in card.text and "comfyui" in card.text
    assert (
        "ComfyUI / A1111 / kohya: `lora/pytorch_lora_weights_comfyui.safetensors` (kohya key layout)"
        in card.text
    )


def test_card_header_for_a_hub_base_and_license_from_the_base_card(tmp_path, prepared, models):
    recipe = recipe_for(prepared, models, extra=["model.finetune=lora", "prompts.file=me/prompts"])
    recipe.model.path = "stabilityai/stable-diffusion-xl-base-1.0"
    data = card_data(recipe, "image", lora_only=True)
    assert data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert data.license == "openrail++" and data.base_model_relation == "adapter"
    assert data.datasets == ["me/prompts"]
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    assert base_license(str(base)) == "apache-2.0"
    assert base_license(str(tmp_path)) is None


# ---- ComfyUI / kohya LoRA -----------------------------------------------------------------------------
def _unet_inputs(unet):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    kwargs = {
        "encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, 32, generator=generator),
            "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]),
        },
    }
    return x, torch.tensor([500]), kwargs


def test_comfyui_lora_loads_in_diffusers_and_equals_the_merged_export(lora_run, models):
    run, _ = lora_run
    lora = run / "export" / "lora"
    path = lora / COMFYUI_FILE
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # sgm names, not diffusers'
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    # Keys round-trip: diffusers' own converter turns the kohya file back into our diffusers file.
    ours = convert_unet_state_dict_to_peft(
        {
            k.removeprefix("unet."): v
            for k, v in load_file(str(lora / "pytorch_lora_weights.safetensors")).items()
        }
    )
    base = StableDiffusionXLPipeline.from_pretrained(models / "sdxl")
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=base.unet.config)
    back = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    assert set(alphas.values()) == {8.0}

    # And it loads with diffusers' loader for that format to the same model as the merged export.
    base.load_lora_weights(str(path))
    merged = UNet2DConditionModel.from_pretrained(run / "export" / "unet")
    x, t, kwargs = _unet_inputs(merged)
    with torch.no_grad():
        adapted, exported = base.unet(x, t, **kwargs)[0], merged(x, t, **kwargs)[0]
        base.unet.disable_adapters()
        untrained = base.unet(x, t, **kwargs)[0]
    torch.testing.assert_close(adapted, exported, rtol=0, atol=1e-5)
    assert (exported - untrained).abs().max() > 1e-4  # the adapter is not a no-op


def _sdxl_unet_config():
    """The parts of SDXL base's UNet config the sgm layout depends on."""
    return {
        "layers_per_block": 2,
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    }


@pytest.mark.parametrize(
    "module, kohya",
    [  # names as they appear in public SDXL kohya LoRA files
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        ),
        (
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
            "input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
        ),
        ("mid_block.attentions.0.proj_in", "middle_block_1_proj_in"),
        (
            "up_blocks.0.attentions.2.transformer_blocks.3.ff.net.0.proj",
            "output_blocks_2_1_transformer_blocks_3_ff_net_0_proj",
        ),
        (
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
            "output_blocks_3_1_transformer_blocks_0_attn1_to_k",
        ),
        ("down_blocks.0.resnets.1.conv1", "input_blocks_2_0_in_layers_2"),
        ("mid_block.resnets.1.time_emb_proj", "middle_block_2_emb_layers_1"),
        ("up_blocks.2.resnets.0.conv_shortcut", "output_blocks_6_0_skip_connection"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks_2_2_conv"),
        ("down_blocks.1.downsamplers.0.conv", "input_blocks_6_0_op"),
    ],
)
def test_sgm_names_on_the_real_sdxl_layout(module, kohya):
    assert sgm_unet_module(module, _sdxl_unet_config()).replace(".", "_") == kohya


def test_every_sdxl_attention_and_resnet_layer_round_trips_through_diffusers(tmp_path):
    """All LoRA-able layers of the full-size SDXL UNet (built on the meta device: no weights),
    converted to kohya names and back through diffusers' own SDXL converter."""
    from accelerate import init_empty_weights

    config = {
        "sample_size": 128,
        "cross_attention_dim": 2048,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "use_linear_projection": True,
    }
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    layers = {}
    for name, module in unet.named_modules():
        if (
            isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
            and ".norm" not in name
            and ("attentions" in name or "resnets" in name or "samplers" in name)
        ):
            for which in ("lora_A", "lora_B"):  # a distinct value per tensor: a swapped name shows
                layers[f"unet.{name}.{which}.weight"] = torch.full((1, 1), float(len(layers)))
    kohya = to_comfyui(layers, "unet", "sgm-unet", unet.config, alpha=4)
    state, _ = StableDiffusionXLPipeline.lora_state_dict(kohya, unet_config=unet.config)
    back = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    assert len(layers) > 1500
    assert set(back) == {k.removeprefix("unet.") for k in layers}
    assert all(torch.equal(back[k.removeprefix("unet.")], v) for k, v in layers.items())


# ---- push to hub ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", builtin_families())
def test_the_comfyui_file_is_offered_where_a_convention_exists_and_refused_with_its_reason_elsewhere(family):
    from mpo.backbones.registry import get_backbone_class
    from mpo.config import RecipeError, load_recipe
    from tests.scripts.tiny_runs import ROOT

    recipe = ROOT / "recipes" / "tiny" / f"{family}.yaml"
    overrides = ["model.finetune=lora", "export.lora_formats=[diffusers,comfyui]"]
    if get_backbone_class(family).comfyui_lora is None:
        with pytest.raises(RecipeError, match=rf"export.lora_formats.*{family}.*no ComfyUI LoRA convention"):
            load_recipe(str(recipe), overrides)
    else:
        assert list(load_recipe(str(recipe), overrides).export.lora_formats) == ["diffusers", "comfyui"]
    assert (get_backbone_class(family).comfyui_lora is not None) == (family in ("sdxl", "flux", "wan"))
    if family == "sd3":  # the refusal says why: ComfyUI reads SD3's diffusers file as it is
        with pytest.raises(RecipeError, match=r"ComfyUI loads the diffusers file"):
            load_recipe(str(recipe), overrides)


def test_push_to_hub_makes_the_expected_calls_with_the_export_files(lora_run, models):
    run, recipe = lora_run
    names = [name for name, _ in FakeHub.calls]
    assert names == ["create_repo", "upload_folder"]  # no revision: no branch
    create, upload = (kwargs for _, kwargs in FakeHub.calls)
    assert create == {"repo_id": "me/tiny-sdxl-mpo", "repo_type": "model", "private": True, "exist_ok": True}
    assert Path(upload["folder_path"]) == run / "export" and upload["revision"] is None
    assert "step" in upload["commit_message"] and recipe.name in upload["commit_message"]
    hub = FakeHub.root / "me/tiny-sdxl-mpo" / "main"
    assert (hub / "README.md").exists() and (hub / "model_index.json").exists()
    assert (hub / "lora" / COMFYUI_FILE).exists() and not (hub / "export.json").exists()
    assert isinstance(DiffusionPipeline.from_pretrained(hub), StableDiffusionXLPipeline)
    pushed = json.loads((run / "export_push.json").read_text())
    assert pushed["repo_id"] == "me/tiny-sdxl-mpo" and pushed["commit"].startswith("commit-")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.HfApi", FakeHub)
        FakeHub.calls = []
        assert export_stage(recipe)["pushed"] == "me/tiny-sdxl-mpo (up to date)"
        assert FakeHub.calls == []  # already there: nothing is sent again
        branch = recipe_for(run, models, extra=[*LORA, "export.push_to_hub.revision=dpo-step-2"])
        export_stage(branch)
    assert [name for name, _ in FakeHub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert FakeHub.calls[1][1]["branch"] == "dpo-step-2" and FakeHub.calls[2][1]["revision"] == "dpo-step-2"


def test_a_failed_upload_names_the_repo_and_keeps_the_export(lora_run, models, tmp_path):
    from mpo.hub import HubError, push_export

    class Down(FakeHub):
        def upload_folder(self, **kwargs):
            raise ConnectionError("hub unreachable")

    run, recipe = lora_run
    with pytest.raises(
        HubError, match=r"'me/tiny-sdxl-mpo': upload failed \(ConnectionError: hub unreachable\)"
    ):
        push_export(
            run / "export", recipe.export.push_to_hub, {"checkpoint": "x", "step": 1}, "r", api=Down()
        )
    assert (run / "export" / "model_index.json").exists()


# ---- the tracker ----------------------------------------------------------------------------------------
def _wandb_records(run: Path) -> list[dict]:
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    out = subprocess.run(
        ["wandb", "leet", "inspect", "--json", str(log)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_wandb_gets_one_captioned_image_per_eval_sample(lora_run):
    run, _ = lora_run
    history = [r["history"]["item"] for r in _wandb_records(run) if r["type"] == "history"]
    with_samples = [h for h in history if "eval/samples._type" in h]
    assert [h["_step"] for h in with_samples] == [0, 1, 2]
    prompts = read_parquet(run / "prompts.parquet").set_index("prompt_id")
    val = prompts[prompts["split"] == "val"].sort_index()["prompt"].tolist()[:2]
    for h in with_samples:
        assert h["eval/samples.count"] == 2
        captions = h["eval/samples.captions"]
        assert [c.split(" (step")[0] for c in captions] == val
        assert all(f"(step {h['_step']}, reward " in c for c in captions)
    files = sorted((run / "wandb").glob("offline-run-*/files/media/images/eval/samples_*.png"))
    assert len(files) == 6


# ---- the run's pictures ---------------------------------------------------------------------------------
def test_training_ends_by_writing_the_report_pictures(lora_run):
    run, _ = lora_run
    written = sorted((run / "report").glob("*.png"))  # the train stage's closing report
    names = sorted(p.name for p in written)
    assert {"curve-total.png", "curve-quality.png", "curve-composition.png", "pairs.png"} <= set(names)
    assert "curve-alignment.png" not in names  # pixel statistics cannot judge alignment: no empty chart
    val = sorted(int(p.stem.split("-")[0]) for p in (run / "eval" / "step-0").glob("*-0.png"))
    assert len(val) == 2  # the eval prompts whose samples were logged
    assert [n for n in names if n.startswith("before-after-")] == [f"before-after-{p}.png" for p in val]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_mpo_report_command_reads_the_run_directory(lora_run, capsys):
    from mpo.cli import main

    run, _ = lora_run
    shutil.rmtree(run / "report", ignore_errors=True)
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(run / "report" / "curve-total.png") in printed and (run / "report" / "pairs.png").exists()
    assert main(["report", str(run / "missing")]) == 2


# ---- the preference dataset -------------------------------------------------------------------------------
def test_export_dataset_is_a_preference_dataset_with_decoded_images(lora_run, models, tmp_path):
    from mpo.backbones.registry import load_backbone
    from mpo.export_dataset import export_dataset
    from mpo.store import CandidateStore

    run, recipe = lora_run
    out = tmp_path / "prefs"
    summary = export_dataset(recipe, out, candidates=True)
    data = datasets.load_from_disk(str(out))
    pairs, scores = read_parquet(run / "pairs.parquet"), read_parquet(run / "scores.parquet")
    assert set(data) == {"pairs", "candidates"} and summary["pairs rows"] == len(pairs)
    assert len(data["pairs"]) == len(pairs) and len(data["candidates"]) == len(scores)
    row = data["pairs"][0]
    assert row["prompt_id"] == pairs["prompt_id"][0] and (row["win_idx"], row["lose_idx"]) == (
        pairs["win"][0],
        pairs["lose"][0],
    )
    assert (
        row["margin"] == pytest.approx(pairs["margin"][0]) and row["rule"] == "mpo" and row["label_0"] == 1.0
    )
    by_key = scores.set_index(["prompt_id", "sample_idx"])
    win = by_key.loc[(row["prompt_id"], row["win_idx"])]
    assert row["win_scores"]["total"] == pytest.approx(win["total"])
    assert row["win_scores"]["quality"] == pytest.approx(win["dim.quality"])
    assert row["win_scores"]["alignment"] is None  # not judged by this backend
    assert row["win_scores"]["total"] - row["lose_scores"]["total"] == pytest.approx(row["margin"])
    # The winner's image is its cached latents through the VAE.
    backbone = load_backbone(recipe.model)
    latents = CandidateStore(run).latents([row["prompt_id"]], [row["win_idx"]])
    with torch.no_grad():
        expected = (backbone.decode(latents).float().clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
    assert isinstance(row["win"], Image.Image)
    np.testing.assert_array_equal(np.asarray(row["win"]), expected.astype(np.uint8))
    assert not np.array_equal(np.asarray(row["win"]), np.asarray(row["lose"]))


def test_export_dataset_pushes_the_saved_splits_to_a_private_hub_dataset(lora_run, tmp_path, monkeypatch):
    from mpo.export_dataset import export_dataset

    pushed = []
    monkeypatch.setattr(
        datasets.DatasetDict, "push_to_hub", lambda self, repo, **kw: pushed.append((self, repo, kw))
    )
    _, recipe = lora_run
    summary = export_dataset(recipe, tmp_path / "prefs", push_to_hub="me/tiny-prefs")
    ((data, repo, kwargs),) = pushed
    assert repo == "me/tiny-prefs" and kwargs == {"private": True} and summary["pushed"] == "me/tiny-prefs"
    saved = datasets.load_from_disk(str(tmp_path / "prefs"))
    assert list(data) == list(saved) == ["pairs"] and data["pairs"]["win_idx"] == saved["pairs"]["win_idx"]


# ---- training options on a run -------------------------------------------------------------------------
EMA = [
    "model.finetune=lora",
    "model.lora_rank=4",
    "train.learning_rate=1e-2",
    "train.max_steps=3",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=3",
    "train.ema=true",
    "train.ema_decay=0.9",
    "eval.every=0",
    "eval.num_prompts=1",
    "export.which=last",
]


def _lora_file(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "lora" / "pytorch_lora_weights.safetensors"))


def test_ema_weights_differ_from_the_raw_ones_resume_exactly_and_are_exported(prepared, models, tmp_path):
    run = copy_run(prepared, tmp_path / "run")
    recipe = recipe_for(run, models, extra=EMA)
    train_stage(recipe)
    step3 = run / "checkpoints" / "step-3"
    raw, ema = _lora_file(step3 / "weights"), _lora_file(step3 / "weights_ema")
    assert raw.keys() == ema.keys()
    ups = [k for k in raw if "lora.up" in k or "lora_B" in k]
    assert ups and all((raw[k] - ema[k]).abs().max() > 1e-6 for k in ups)  # the average lags the weights
    assert all(ema[k].abs().max() > 0 for k in ups)  # and moved off the zero init
    # The average of each optimizer step, from the raw weights of steps 1-3: EMAModel's decay at its
    # k-th update is min(train.ema_decay, k / (k + 9)) (its ramp; 0 at the first: the weights).
    raws = [_lora_file(run / "checkpoints" / f"step-{s}" / "weights") for s in (1, 2, 3)]
    expected = raws[0]
    for k, weights in ((2, raws[1]), (3, raws[2])):
        decay = min(0.9, k / (k + 9))
        expected = {n: decay * expected[n] + (1 - decay) * weights[n] for n in expected}
    for n in ups:
        torch.testing.assert_close(ema[n], expected[n], rtol=1e-5, atol=1e-7, msg=n)

    # A resume from step 2 restores the EMA state: step 3's EMA weights are the uninterrupted ones.
    resumed = copy_run(prepared, tmp_path / "resumed")
    shutil.copytree(run / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "step-3")
    assert train_stage(recipe_for(resumed, models, extra=EMA))["resumed from step"] == 2
    again = _lora_file(resumed / "checkpoints" / "step-3" / "weights_ema")
    assert all(torch.allclose(again[k], ema[k], atol=1e-7) for k in ema)

    export_stage(recipe)
    exported = _lora_file(run / "export")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert json.loads((run / "export" / "export.json").read_text())["ema"] is True
    pipe = DiffusionPipeline.from_pretrained(
        run / "export"
    )  # the EMA adapter merged in, as diffusers loads it
    assert isinstance(pipe, StableDiffusionXLPipeline)


def test_ema_steps_once_per_optimizer_step_under_accumulation(prepared, models, tmp_path):
    """With 2 micro-steps per optimizer step, the average takes one update per optimizer step."""
    run = copy_run(prepared, tmp_path / "run")
    train_stage(
        recipe_for(run, models, extra=[*EMA, "train.max_steps=2", "train.gradient_accumulation_steps=2"])
    )
    raws = [_lora_file(run / "checkpoints" / f"step-{s}" / "weights") for s in (1, 2)]
    ema = _lora_file(run / "checkpoints" / "step-2" / "weights_ema")
    decay = min(0.9, 2 / (2 + 9))  # its second update; the first copies the weights
    ups = [k for k in ema if "lora.up" in k or "lora_B" in k]
    assert ups
    for n in ups:
        expected = decay * raws[0][n] + (1 - decay) * raws[1][n]
        torch.testing.assert_close(ema[n], expected, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.slow
def test_resume_from_another_runs_checkpoint_and_from_none(lora_run, prepared, models, tmp_path):
    from mpo.train_options import OptionError

    source, _ = lora_run
    run = copy_run(prepared, tmp_path / "run")
    same = [*LORA[:-3], "tracking.tracker=none"]  # the source's settings: its checkpoint is accepted
    extra = [*same, f"train.resume_from={source / 'checkpoints' / 'step-1'}"]
    summary = train_stage(recipe_for(run, models, extra=extra))
    assert summary["resumed from step"] == 1 and summary["steps trained now"] == 1
    own = load_file(run / "checkpoints" / "step-2" / "weights" / "lora" / "pytorch_lora_weights.safetensors")
    theirs = load_file(
        source / "checkpoints" / "step-2" / "weights" / "lora" / "pytorch_lora_weights.safetensors"
    )
    assert own.keys() == theirs.keys() and all(
        torch.equal(own[k], theirs[k]) for k in own
    )  # = continuing there
    # A restart with the same recipe continues from the run's own checkpoints, not the other run's.
    assert train_stage(recipe_for(run, models, extra=extra))["trained"] is False
    # none never discards checkpoints unasked; with force it trains again from step 0.
    fresh = [*same, "train.resume_from=none"]
    with pytest.raises(OptionError, match="add --force"):
        train_stage(recipe_for(run, models, extra=fresh))
    summary = train_stage(recipe_for(run, models, extra=fresh), force=True)
    assert summary["resumed from step"] == "-" and summary["steps trained now"] == 2
    # Going back to an earlier checkpoint of this run is refused while later ones exist.
    back = [*same, f"train.resume_from={run / 'checkpoints' / 'step-1'}"]
    with pytest.raises(OptionError, match="delete the ones after step-1"):
        train_stage(recipe_for(run, models, extra=back))


@pytest.mark.slow
def test_wandb_resumes_into_the_same_run_and_a_failed_setup_starts_none(lora_run, prepared, models, tmp_path):
    from mpo.train_state import CheckpointError

    source, _ = lora_run
    run = copy_run(prepared, tmp_path / "run")
    extra = [*LORA[:-3], "eval.every=0", "train.max_steps=1"]
    train_stage(recipe_for(run, models, extra=extra))
    train_stage(recipe_for(run, models, extra=[*extra[:-1], "train.max_steps=2"]))  # a restart
    run_id = (run / "wandb" / "run_id").read_text().strip()
    logs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(logs) == 2 and all(p.name.endswith(f"-{run_id}") for p in logs)

    # A setup that fails (a checkpoint of a LoRA run given to a full fine-tuning) opens no run.
    other = copy_run(prepared, tmp_path / "other")
    bad = [
        *extra[:-1],
        "train.max_steps=2",
        "model.finetune=full",
        f"train.resume_from={source / 'checkpoints' / 'step-1'}",
    ]
    with pytest.raises(CheckpointError, match="other settings"):
        train_stage(recipe_for(other, models, extra=bad))
    assert not (other / "wandb").exists()


@pytest.mark.parametrize(
    "family", ["sdxl", "wan"]
)  # AutoencoderKL / AutoencoderKLWan: the VAE's config names it
def test_vae_override_replaces_the_pipelines_vae(family, models, tmp_path):
    from diffusers import AutoModel

    from mpo.backbones.registry import load_backbone
    from mpo.schema import ModelConfig

    load_backbone(ModelConfig(family=family, path=str(models / family), tiny=True))  # built once per session
    vae = AutoModel.from_pretrained(str(models / family / "vae"))
    name, bias = next(
        (n, p) for n, p in vae.named_parameters() if n.startswith("decoder.") and n.endswith("bias")
    )
    with torch.no_grad():
        bias.add_(0.5)
    vae.save_pretrained(tmp_path / "my-vae")
    backbone = load_backbone(
        ModelConfig(family=family, path=str(models / family), vae_path=str(tmp_path / "my-vae"))
    )
    loaded = backbone.pipeline().vae
    assert type(loaded) is type(vae)
    torch.testing.assert_close(dict(loaded.named_parameters())[name], bias)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("launch", ["cpu_ddp.yaml", "cpu_deepspeed_zero2.yaml"])
def test_two_processes_train_with_ema_wandb_and_pictures(prepared, models, tmp_path, launch):
    """EMA, the wandb run, eval pictures and the report under accelerate launch with 2 processes:
    every rank exits 0, and the EMA weights are the 1-process run's (same pairs and mean gradient)."""
    import os
    import socket
    import sys

    from tests.scripts.tiny_runs import ROOT, SDXL, SDXL_SMALL

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = [*EMA[:-2], "train.max_steps=2", "eval.every=1", "eval.num_prompts=2", "tracking.tracker=wandb",
             "tracking.mode=offline"]  # fmt: skip
    two = copy_run(prepared, tmp_path / "two")
    overrides = [
        *SDXL_SMALL,
        f"output_dir={two}",
        f"model.path={models / 'sdxl'}",
        *extra,
        "train.batch_size=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    if "deepspeed" in launch:
        env.pop("ACCELERATE_USE_CPU", None)  # with it, accelerate drops DeepSpeed
    else:
        env["ACCELERATE_USE_CPU"] = "true"  # without it, each CPU process would train alone (refused)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / launch),
        "--main_process_port", str(port), str(ROOT / "tests" / "scripts" / "train_run.py"), str(SDXL), *overrides,
    ]  # fmt: skip
    result = run_launch(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((two / "wandb").glob("offline-run-*"))) == 1  # the main process's run only
    assert (two / "report" / "curve-total.png").exists() and (
        two / "eval" / "step-0" / "samples.json"
    ).exists()
    one = copy_run(prepared, tmp_path / "one")
    train_stage(recipe_for(one, models, extra=[*extra[:-2], "tracking.tracker=none", "train.batch_size=2"]))
    a = _lora_file(one / "checkpoints" / "step-2" / "weights_ema")
    b = _lora_file(two / "checkpoints" / "step-2" / "weights_ema")
    assert a.keys() == b.keys()
    moved = max(a[k].abs().max().item() for k in a if "lora.up" in k or "lora_B" in k)
    apart = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-4 and apart < 0.05 * moved, f"1 vs 2 processes: EMA differs by {apart} (moved {moved})"
