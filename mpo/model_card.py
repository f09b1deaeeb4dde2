"""The export's model card, built with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData``.

The card is ``README.md`` at the root of ``export/``, beside ``model_index.json``: the hub shows it as
the repo's page, and its YAML header (base_model, license, library_name, pipeline_tag, tags, datasets)
is what the hub indexes. Its usage snippet loads from the folder the card sits in (the hub repo
when ``export.push_to_hub.repo_id`` is set, else the export folder), so the page and
``DiffusionPipeline.from_pretrained(export_dir)`` agree.

The license is the base model's where it can be read (the base folder's own card, or a few well
known bases), else ``export.license``; a card without one says so rather than guess.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from omegaconf import OmegaConf

from mpo.prompts import is_hub_dataset_id

# Licenses of public base models that a recipe names by hub id (read offline, when the base's
# own card cannot be fetched).
KNOWN_LICENSES = {
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "THUDM/CogVideoX-2b": "apache-2.0",
    "zai-org/CogVideoX-2b": "apache-2.0",
    "THUDM/CogVideoX-5b": "other",
    "zai-org/CogVideoX-5b": "other",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "apache-2.0",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": "apache-2.0",
    "stabilityai/stable-diffusion-3-medium-diffusers": "other",
    "stabilityai/stable-diffusion-3.5-medium": "other",
    "stabilityai/stable-diffusion-3.5-large": "other",
    "black-forest-labs/FLUX.1-dev": "other",
    "black-forest-labs/FLUX.1-schnell": "apache-2.0",
}
TAGS = ("diffusers", "diffusion-dpo", "mpo", "visionreward")


def base_license(path: str) -> str | None:
    """The license in the base model's own card (a local folder's README.md), or a known one."""
    card = Path(path) / "README.md"
    if card.is_file():
        try:
            found = ModelCard.load(card).data.license
        except Exception:  # an unparsable card is not a reason to fail the export
            found = None
        if found:
            return str(found)
    return KNOWN_LICENSES.get(str(path))


def card_data(recipe: Any, modality: str, lora_only: bool) -> ModelCardData:
    """The YAML header the hub indexes."""
    lora = recipe.model.finetune == "lora"
    tags = [*TAGS, recipe.model.family, "text-to-video" if modality == "video" else "text-to-image"]
    if lora:
        tags.append("lora")
    datasets = [recipe.prompts.file] if is_hub_dataset_id(str(recipe.prompts.file)) else None
    base = str(recipe.model.path)
    return ModelCardData(
        base_model=None if Path(base).exists() else base,  # a local folder is no hub id
        base_model_relation="adapter" if lora_only else "finetune",
        license=base_license(base) or recipe.export.license,
        library_name="diffusers",
        pipeline_tag="text-to-video" if modality == "video" else "text-to-image",
        tags=tags,
        datasets=datasets,
    )


def usage(
    recipe: Any,
    where: str,
    pipeline_here: bool,
    lora: bool,
    comfyui: dict[str, str] | None,
    modality: str,
    lora_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """The ``## Use`` section: load from the card's own folder (or hub repo). ``lora_kwargs``: what
    the family's ``load_lora_weights`` needs besides the folder (e.g. ``load_into_transformer_2=True``
    for the low-noise expert of Wan 2.2 A14B). ``comfyui``: the ComfyUI file's ``tools`` and
    ``layout`` (None: not written)."""
    extra = "".join(f", {k}={v!r}" for k, v in (lora_kwargs or {}).items())
    prompt = '"a red car driving on a mountain road"'
    lines = ["## Use", "", "```python", "from diffusers import DiffusionPipeline", ""]
    if pipeline_here:
        lines.append(f'pipe = DiffusionPipeline.from_pretrained("{where}")')
    if lora:
        if pipeline_here:
            lines.append("# or the adapter on the base model:")
        lines += [
            f'pipe = DiffusionPipeline.from_pretrained("{recipe.model.path}")',
            f'pipe.load_lora_weights("{where}", subfolder="lora"{extra})',
        ]
    out = "frames = pipe(prompt).frames[0]" if modality == "video" else "image = pipe(prompt).images[0]"
    lines += [f"prompt = {prompt}", out, "```"]
    if comfyui:
        lines += [
            "",
            f"{comfyui['tools']}: `lora/pytorch_lora_weights_comfyui.safetensors` ({comfyui['layout']}) "
            "goes into `ComfyUI/models/loras/`; load it with a LoraLoaderModelOnly node on the base model.",
        ]
    return lines


def build_card(
    recipe: Any,
    *,
    modality: str,
    record: dict[str, Any],
    scores: Any,
    pair_stats: dict[str, Any] | None,
    where: str,
    pipeline_here: bool,
    fmt: Any,
    lora_kwargs: dict[str, Any] | None = None,
    short: Any,
    pair_lines: list[str] | None = None,
    comfyui: dict[str, str] | None = None,
) -> ModelCard:
    """The card of one export: header, how to load it, what it was trained on, what it changed.
    ``pair_lines``: the preference-pair section in place of ``pair_stats`` (an iterative run's rounds);
    ``comfyui``: the ComfyUI LoRA file's ``tools`` and ``layout``, where the export wrote one."""
    lora = recipe.model.finetune == "lora"
    data = card_data(recipe, modality, lora_only=lora and not pipeline_here)
    lines = [
        f"# {recipe.name}",
        "",
        f"{recipe.model.family} ({recipe.model.path}) aligned with multi-dimensional preference optimisation: "
        f"Diffusion-DPO (beta {recipe.train.beta}) on pairs selected by `{recipe.select.rule}` at the "
        f"`{recipe.select.level}` level from the `{recipe.reward.checklist}` checklist "
        f"(`{recipe.reward.backend}` backend). {'LoRA' if lora else 'Full fine-tuning'}; this is checkpoint "
        f"`{record['checkpoint']}` ({record['which']}, step {record['step']}).",
        "",
        *usage(recipe, where, pipeline_here, lora, comfyui, modality, lora_kwargs),
        "",
        "## Held-out reward per dimension",
        "",
    ]
    if scores.empty:
        lines.append("No evaluation was recorded (eval.parquet is missing).")
    else:
        lines += [
            f"Mean over the held-out prompts, before training (step 0) and at step {scores.attrs['step']}.",
            "",
            "| metric | before | after | change |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r.metric} | {fmt(r.before)} | {fmt(r.after)} | {fmt(r.change, '+')} |"
            for r in scores.itertuples()
        ]
        if scores["after"].isna().any():
            lines += ["", "n/a: the reward's backend cannot judge that dimension."]
    lines += ["", "## Preference pairs", ""]
    if pair_lines is not None:
        lines += pair_lines
    elif pair_stats is None:
        lines.append("The pair statistics (select_stats.json) are missing.")
    else:
        lines += ["| statistic | value |", "|---|---|"]
        lines += [f"| {k} | {short(v)} |" for k, v in pair_stats.items() if k not in ("config", "source")]
    if not data.license:
        lines += ["", "License: not known for this base model; set `export.license` in the recipe."]
    recipe_yaml = OmegaConf.to_yaml(OmegaConf.create(recipe), resolve=True)
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def read_pair_stats(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None
