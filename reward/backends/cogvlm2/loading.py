"""Finding and loading CogVLM2 checkpoints in the layouts they are released in, without remote code.

Layouts (:func:`detect_layout`):

- ``remote``: the transformers *remote-code* layout of THUDM's releases (VisionReward-Video,
  cogvlm2-*): ``config.json`` with ``auto_map`` and ``architectures: [CogVLMForCausalLM |
  CogVLMVideoForCausalLM]``, modeling_cogvlm.py / visual.py (never imported here), safetensors shards,
  the Llama-3 tokenizer. The port's module tree uses the release's weight names, so the shards load
  by name into :class:`CogVLM2ForCausalLM` with a config translated from the JSON.
- ``native``: a folder written by this project (``model_type: cogvlm2``), e.g. by ``reward convert``.
- ``sat``: the SwissArmyTransformer layout of VisionReward-Image (``model_config.json``, ``latest``,
  ``<iteration>/mp_rank_00_model_states.pt``), or its release archive (split tar parts). These are
  converted once by ``reward convert`` (:mod:`reward.convert`); a hub id whose converted copy is in
  :func:`converted_dir` loads from there, so recipes keep naming ``THUDM/VisionReward-Image``.

Every load checks the weight names against the port: a missing or unexpected weight is an error that
names the first one (the rotary ``inv_freq`` buffers are the exception: recomputed when absent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from reward.backends.cogvlm2.config import CogVLM2Config, CogVLM2Error, config_from_remote

SAT_MODEL_CLASSES = ("VisualLlamaEVA",)
# Hub releases in the SAT layout (split tar parts, no config.json): found by name, so that loading one
# that has not been converted yet says how to convert it.
SAT_RELEASES = (
    "THUDM/VisionReward-Image",
    "THUDM/VisionReward-Image-bf16",
    "zai-org/VisionReward-Image",
    "zai-org/VisionReward-Image-bf16",
)
_INV_FREQ = "rotary_emb.inv_freq"


def converted_dir(repo_id: str) -> Path:
    """Where ``reward convert <hub id>`` writes its output unless told otherwise, and where loading a
    hub id looks first (``$MPO_REWARD_CACHE``, default ``$HF_HOME/mpo/converted``)."""
    root = os.environ.get("MPO_REWARD_CACHE")
    if not root:
        from huggingface_hub.constants import HF_HOME

        root = os.path.join(HF_HOME, "mpo", "converted")
    return Path(root) / repo_id.replace("/", "--")


def _looks_like_hub_id(path: str) -> bool:
    return not Path(path).exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))


def read_config_json(path: str) -> dict[str, Any] | None:
    """``config.json`` of a local folder or a hub repo (cached or downloaded), or None if it has none."""
    local = Path(path)
    if local.is_dir():
        file = local / "config.json"
        return json.loads(file.read_text()) if file.exists() else None
    if not _looks_like_hub_id(path):
        return None
    from transformers.utils import cached_file

    try:
        file = cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return json.loads(Path(file).read_text()) if file else None


def find_sat_root(folder: Path) -> Path | None:
    """The folder (``folder`` or one below it) holding a SAT ``model_config.json``."""
    if (folder / "model_config.json").exists():
        return folder
    for found in sorted(folder.glob("*/model_config.json")) + sorted(folder.glob("*/*/model_config.json")):
        return found.parent
    return None


def detect_layout(path: str | Path) -> tuple[str, Path | str] | None:
    """(layout, where) for a CogVLM2 checkpoint, or None when ``path`` is some other model.

    ``where`` is the folder to load (for ``sat`` the SAT root; for a hub id with a converted copy, that
    copy's folder)."""
    path = str(path)
    if _looks_like_hub_id(path) and (converted_dir(path) / "config.json").exists():
        return detect_layout(converted_dir(path))
    if path in SAT_RELEASES:
        return "sat-hub", path
    local = Path(path)
    if local.is_dir():
        sat = find_sat_root(local)
        if sat is not None and not (local / "config.json").exists():
            return "sat", sat
        if not (local / "config.json").exists() and (
            list(local.glob("**/split_part_*")) or list(local.glob("*.tar"))
        ):
            return "sat-archive", local
    data = read_config_json(path)
    if data is None:
        return None
    if data.get("model_type") == CogVLM2Config.model_type:
        return "native", path
    from reward.backends.cogvlm2.config import REMOTE_ARCHITECTURES

    if set(data.get("architectures") or []) & set(REMOTE_ARCHITECTURES):
        return "remote", path
    return None


def is_cogvlm2_checkpoint(path: str | Path | None) -> bool:
    """True when ``path`` (folder or hub id) is a CogVLM2 checkpoint in any layout this port reads."""
    if not path:
        return False
    try:
        return detect_layout(path) is not None
    except (OSError, ValueError):
        return False


def load_config(path: str | Path) -> CogVLM2Config:
    found = detect_layout(path)
    if found is None:
        raise CogVLM2Error(_unknown_family(path))
    layout, where = found
    if layout == "sat-hub":
        raise CogVLM2Error(
            f"{path} is released in the SAT (SwissArmyTransformer) layout: convert it once with "
            f"`reward convert {path}` (it is written to {converted_dir(str(path))}, where loading "
            f"{path} then finds it)"
        )
    if layout in ("sat", "sat-archive"):
        raise CogVLM2Error(
            f"{path}: a SAT (SwissArmyTransformer) checkpoint; convert it once with "
            f"`reward convert {path} --out FOLDER` and load FOLDER"
        )
    data = read_config_json(str(where))
    if layout == "native":
        return CogVLM2Config.from_dict(data)
    return config_from_remote(data, str(path))


def _unknown_family(path: str | Path) -> str:
    data = read_config_json(str(path))
    if data is None:
        return (
            f"{path}: no config.json (transformers layout) or model_config.json (SAT layout) found; "
            "not a CogVLM2 checkpoint (a hub id needs to be downloaded or in the local cache)"
        )
    return (
        f"{path}: not a CogVLM2 checkpoint (model_type {data.get('model_type')!r}, architectures "
        f"{data.get('architectures')}); the cogvlm2 backend reads CogVLMForCausalLM / "
        "CogVLMVideoForCausalLM (transformers layout), VisualLlamaEVA (SAT layout) or a converted folder"
    )


def check_weight_names(missing: set[str] | list[str], unexpected: set[str] | list[str], source: str) -> None:
    """One error naming the first missing (then unexpected) weight; absent ``inv_freq`` is allowed."""
    missing = sorted(k for k in missing if not k.endswith(_INV_FREQ))
    unexpected = sorted(unexpected)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CogVLM2Error(
            f"{source}: weight {missing[0]!r} is missing from the checkpoint{more}; not a matching CogVLM2 layout"
        )
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CogVLM2Error(
            f"{source}: unexpected weight {unexpected[0]!r} in the checkpoint{more}; not a matching CogVLM2 layout"
        )


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> Any:
    """The port with the checkpoint's weights (remote-code or native layout), in eval mode."""
    import transformers

    from reward.backends.cogvlm2.modeling import CogVLM2ForCausalLM

    config = load_config(path)
    _, where = detect_layout(path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report is replaced by check_weight_names
    try:
        model, info = CogVLM2ForCausalLM.from_pretrained(
            str(where),
            config=config,
            dtype=dtype,
            device_map=str(device),
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, naming the weight
        )
    except (OSError, RuntimeError) as err:  # no weights, truncated shard, wrong shapes
        raise CogVLM2Error(
            f"{path}: cannot load the weights ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    finally:
        transformers.logging.set_verbosity(verbosity)
    check_weight_names(info["missing_keys"], info["unexpected_keys"], str(path))
    if info.get("mismatched_keys"):
        first = sorted(info["mismatched_keys"])[0]
        name, shapes = first, ""
        if isinstance(first, tuple):
            name, shapes = first[0], f" ({tuple(first[1])} in the checkpoint, {tuple(first[2])} in the port)"
        raise CogVLM2Error(f"{path}: weight {name!r} has a shape that does not fit config.json{shapes}")
    return model.eval()


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    found = detect_layout(path)
    where = found[1] if found else path
    try:
        return AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise CogVLM2Error(f"{path}: no usable tokenizer ({err})") from err
