"""`reward convert`: a released reward checkpoint -> a plain ``save_pretrained`` folder.

::

    reward convert THUDM/VisionReward-Image              # download, convert into the reward cache
    reward convert ckpts/ --out vr-image                 # a local SAT folder or its split tar parts
    reward convert THUDM/VisionReward-Video --out vr-video   # remote-code layout -> native folder

**SAT layout** (VisionReward-Image, SwissArmyTransformer): ``model_config.json`` (architecture
arguments, ``eva_args`` for the vision tower), ``latest`` (the iteration), and
``<iteration>/mp_rank_00_model_states.pt`` holding ``{"module": state_dict}``. The release ships the
folder as a tar split into ``split_part_aa``, ``split_part_ab``, ...; they are read as one stream and
extracted next to the output (never concatenated into one more 40 GB file). The bf16 variant
(VisionReward-Image-bf16) is the same layout with bfloat16 tensors.

Weight names, SAT -> this port (= the transformers release's names):

=============================================================  ===============================================
``transformer.word_embeddings``                                ``model.embed_tokens``
``transformer.layers.{i}.input_layernorm``                     ``model.layers.{i}.input_layernorm``
``transformer.layers.{i}.attention.query_key_value``           ``...self_attn.language_expert_query_key_value``
``transformer.layers.{i}.attention.dense``                     ``...self_attn.language_expert_dense``
``mixins.rotary.vision_query_key_value_list.{i}``              ``...self_attn.vision_expert_query_key_value``
``mixins.rotary.vision_dense_list.{i}``                        ``...self_attn.vision_expert_dense``
``mixins.rotary.rotary_emb.inv_freq`` (one, shared)            ``...self_attn.rotary_emb.inv_freq`` (every layer)
``transformer.layers.{i}.post_attention_layernorm``            ``model.layers.{i}.post_attention_layernorm``
``mixins.mlp.gate_proj.{i}``                                   ``...mlp.language_mlp.gate_proj``
``transformer.layers.{i}.mlp.dense_h_to_4h`` / ``dense_4h_to_h``  ``...mlp.language_mlp.up_proj`` / ``down_proj``
``mixins.mlp.vision_gate_proj.{i}``                            ``...mlp.vision_mlp.gate_proj``
``mixins.mlp.vision_dense_h_to_4h_list.{i}`` / ``_4h_to_h_``   ``...mlp.vision_mlp.up_proj`` / ``down_proj``
``transformer.final_layernorm``                                ``model.norm``
``mixins.lm.lm_head``                                          ``lm_head``
``mixins.eva.vit_model.transformer.word_embeddings`` (row 0)   ``model.vision.patch_embedding.cls_embedding``
``mixins.eva.vit_model.transformer.position_embeddings``       ``model.vision.patch_embedding.position_embedding``
``mixins.eva.vit_model.mixins.patch_embedding.proj``           ``model.vision.patch_embedding.proj``
``mixins.eva.vit_model.transformer.layers.{i}.*``              ``model.vision.transformer.layers.{i}.*``
  (``mlp.dense_h_to_4h`` / ``mlp.dense_4h_to_h``)                (``mlp.fc1`` / ``mlp.fc2``)
``mixins.eva.{conv, linear_proj.*, boi, eoi}``                 ``model.vision.{conv, linear_proj.*, boi, eoi}``
=============================================================  ===============================================

The QKV layouts already agree ([q | k | v], grouped-query in the language model), so no weight is
permuted. The SAT code's convolution keeps the vision width (its GLU widens), so ``adapter_width`` is
read off ``mixins.eva.conv.weight``. The SAT image code does not divide the vision tokens by a scaling
factor and asks with the ``vqa`` template; the converted config records ``template_version: vqa``.

A SAT key this table does not know, a port weight it does not produce, a shape that disagrees with
``model_config.json``, or a missing shard / tar part: one error naming it. The SAT release has no
tokenizer (its script loads ``meta-llama/Meta-Llama-3-8B-Instruct``); ``--tokenizer`` names one and it
is saved into the output folder.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

import torch

from reward.backends.cogvlm2.config import CogVLM2Config, CogVLM2Error

DEFAULT_TOKENIZER = "meta-llama/Meta-Llama-3-8B-Instruct"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "keep": None}

_LAYER = r"(\d+)"
# (SAT pattern, port template); "{0}" is the layer index captured by the pattern.
_SAT_RULES: list[tuple[str, str]] = [
    (r"transformer\.word_embeddings\.weight", "model.embed_tokens.weight"),
    (r"transformer\.final_layernorm\.weight", "model.norm.weight"),
    (r"mixins\.lm\.lm_head\.weight", "lm_head.weight"),
    (rf"transformer\.layers\.{_LAYER}\.input_layernorm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (
        rf"transformer\.layers\.{_LAYER}\.post_attention_layernorm\.weight",
        "model.layers.{0}.post_attention_layernorm.weight",
    ),
    (
        rf"transformer\.layers\.{_LAYER}\.attention\.query_key_value\.weight",
        "model.layers.{0}.self_attn.language_expert_query_key_value.weight",
    ),
    (
        rf"transformer\.layers\.{_LAYER}\.attention\.dense\.weight",
        "model.layers.{0}.self_attn.language_expert_dense.weight",
    ),
    (
        rf"mixins\.rotary\.vision_query_key_value_list\.{_LAYER}\.(weight|bias)",
        "model.layers.{0}.self_attn.vision_expert_query_key_value.{1}",
    ),
    (
        rf"mixins\.rotary\.vision_dense_list\.{_LAYER}\.weight",
        "model.layers.{0}.self_attn.vision_expert_dense.weight",
    ),
    (rf"mixins\.mlp\.gate_proj\.{_LAYER}\.weight", "model.layers.{0}.mlp.language_mlp.gate_proj.weight"),
    (
        rf"transformer\.layers\.{_LAYER}\.mlp\.dense_h_to_4h\.weight",
        "model.layers.{0}.mlp.language_mlp.up_proj.weight",
    ),
    (
        rf"transformer\.layers\.{_LAYER}\.mlp\.dense_4h_to_h\.weight",
        "model.layers.{0}.mlp.language_mlp.down_proj.weight",
    ),
    (rf"mixins\.mlp\.vision_gate_proj\.{_LAYER}\.weight", "model.layers.{0}.mlp.vision_mlp.gate_proj.weight"),
    (
        rf"mixins\.mlp\.vision_dense_h_to_4h_list\.{_LAYER}\.weight",
        "model.layers.{0}.mlp.vision_mlp.up_proj.weight",
    ),
    (
        rf"mixins\.mlp\.vision_dense_4h_to_h_list\.{_LAYER}\.weight",
        "model.layers.{0}.mlp.vision_mlp.down_proj.weight",
    ),
    (
        r"mixins\.eva\.vit_model\.transformer\.position_embeddings\.weight",
        "model.vision.patch_embedding.position_embedding.weight",
    ),
    (
        r"mixins\.eva\.vit_model\.mixins\.patch_embedding\.proj\.(weight|bias)",
        "model.vision.patch_embedding.proj.{0}",
    ),
    (
        rf"mixins\.eva\.vit_model\.transformer\.layers\.{_LAYER}\.(input_layernorm|post_attention_layernorm)\.(weight|bias)",
        "model.vision.transformer.layers.{0}.{1}.{2}",
    ),
    (
        rf"mixins\.eva\.vit_model\.transformer\.layers\.{_LAYER}\.attention\.(query_key_value|dense)\.(weight|bias)",
        "model.vision.transformer.layers.{0}.attention.{1}.{2}",
    ),
    (
        rf"mixins\.eva\.vit_model\.transformer\.layers\.{_LAYER}\.mlp\.dense_h_to_4h\.(weight|bias)",
        "model.vision.transformer.layers.{0}.mlp.fc1.{1}",
    ),
    (
        rf"mixins\.eva\.vit_model\.transformer\.layers\.{_LAYER}\.mlp\.dense_4h_to_h\.(weight|bias)",
        "model.vision.transformer.layers.{0}.mlp.fc2.{1}",
    ),
    (r"mixins\.eva\.conv\.(weight|bias)", "model.vision.conv.{0}"),
    (
        r"mixins\.eva\.linear_proj\.(linear_proj|norm1|dense_h_to_4h|gate_proj|dense_4h_to_h)\.(weight|bias)",
        "model.vision.linear_proj.{0}.{1}",
    ),
    (r"mixins\.eva\.(boi|eoi)", "model.vision.{0}"),
]
_COMPILED = [(re.compile(p + r"$"), t) for p, t in _SAT_RULES]
_SAT_CLS = "mixins.eva.vit_model.transformer.word_embeddings.weight"
_SAT_INV_FREQ = "mixins.rotary.rotary_emb.inv_freq"


# ---------------------------------------------------------------------------------- SAT folder
def read_sat_folder(root: Path) -> tuple[dict[str, Any], Path]:
    """``model_config.json`` and the path of the (single) model-parallel shard of the latest iteration."""
    config_path = root / "model_config.json"
    try:
        model_config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CogVLM2Error(f"{config_path}: cannot read the SAT model config ({err})") from err
    latest = root / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
    else:
        iterations = sorted(
            (p.name for p in root.iterdir() if p.is_dir() and (p.name.isdigit() or p.name == "release")),
            key=lambda n: (n != "release", int(n) if n.isdigit() else 0),
        )
        if not iterations:
            raise CogVLM2Error(
                f"{root}: a SAT folder needs a 'latest' file or an <iteration>/ folder with the weights"
            )
        tag = iterations[-1]
    parallel = int(model_config.get("model_parallel_size", 1) or 1)
    shards = [root / tag / f"mp_rank_{r:02d}_model_states.pt" for r in range(parallel)]
    missing = [s for s in shards if not s.exists()]
    if missing:
        raise CogVLM2Error(
            f"{missing[0]}: missing shard of the SAT checkpoint (iteration {tag!r}, model_parallel_size "
            f"{parallel}); the download or the extraction is incomplete"
        )
    if parallel != 1:
        raise CogVLM2Error(
            f"{root}: model_parallel_size {parallel}; merge the shards to one first with SAT "
            "(VisionReward's utils/merge_model.py), then convert"
        )
    return model_config, shards[0]


def load_sat_state_dict(shard: Path) -> dict[str, torch.Tensor]:
    """The ``module`` state dict of a SAT shard, memory-mapped; no arbitrary pickled code is run."""
    import argparse as _argparse

    torch.serialization.add_safe_globals([_argparse.Namespace])
    try:
        data = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # truncated file, an unknown pickled class, not a torch file
        raise CogVLM2Error(
            f"{shard}: cannot read the SAT weights ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    module = data.get("module") if isinstance(data, dict) else None
    if not isinstance(module, dict):
        raise CogVLM2Error(
            f"{shard}: no 'module' state dict inside (keys {sorted(data)[:5] if isinstance(data, dict) else type(data).__name__})"
        )
    return module


def sat_config(model_config: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> CogVLM2Config:
    """The port's config for a SAT VisionReward-Image checkpoint (widths checked against the weights)."""
    from reward.backends.cogvlm2.loading import SAT_MODEL_CLASSES

    cls = model_config.get("model_class")
    if cls not in SAT_MODEL_CLASSES:
        raise CogVLM2Error(
            f"{source}: model_class {cls!r} is not a CogVLM2 SAT model (known: {list(SAT_MODEL_CLASSES)})"
        )
    eva = model_config.get("eva_args") or {}
    try:
        image_size = eva["image_size"][0] if isinstance(eva["image_size"], list) else int(eva["image_size"])
        vision = {
            "hidden_size": int(eva["hidden_size"]),
            "num_hidden_layers": int(eva["num_layers"]),
            "num_heads": int(eva["num_attention_heads"]),
            "intermediate_size": int(eva["inner_hidden_size"]),
            "patch_size": int(eva["patch_size"]),
            "image_size": int(image_size),
            "in_channels": int(eva.get("in_channels", 3)),
            "layer_norm_eps": float(eva.get("layernorm_epsilon", 1e-6)),
            "hidden_act": "gelu",
        }
        config = CogVLM2Config(
            variant="image",
            vocab_size=int(model_config["vocab_size"]),
            hidden_size=int(model_config["hidden_size"]),
            intermediate_size=int(model_config["inner_hidden_size"]),
            num_hidden_layers=int(model_config["num_layers"]),
            num_attention_heads=int(model_config["num_attention_heads"]),
            num_multi_query_heads=int(
                model_config.get("num_multi_query_heads") or model_config["num_attention_heads"]
            ),
            max_position_embeddings=int(model_config.get("max_sequence_length", 8192)),
            rms_norm_eps=float(model_config.get("layernorm_epsilon", 1e-5)),
            template_version="vqa",
            vision_config=vision,
            adapter_width=int(state["mixins.eva.conv.weight"].shape[0]),
            bos_token_id=model_config.get("bos_token_id", 128000),
            eos_token_id=model_config.get("eos_token_id", 128001),
            pad_token_id=_sat_pad(model_config),
        )
    except KeyError as err:
        raise CogVLM2Error(
            f"{source}: the SAT checkpoint lacks {err.args[0]!r} (model_config.json or weights)"
        ) from err
    if eva.get("use_final_layernorm", False):
        raise CogVLM2Error(
            f"{source}: eva_args.use_final_layernorm is true; the CogVLM2 vision tower has no final norm"
        )
    image_length = model_config.get("image_length")
    if image_length is not None and int(image_length) != config.tokens_per_image - 2:
        raise CogVLM2Error(
            f"{source}: image_length {image_length} does not match image_size {vision['image_size']} / "
            f"patch_size {vision['patch_size']} (expected {config.tokens_per_image - 2})"
        )
    return config


def _sat_pad(model_config: dict[str, Any]) -> int:
    """SAT's LLaMA default pad id is -1 (none); the release's scripts then use 128002."""
    pad = model_config.get("pad_token_id")
    return 128002 if pad is None or int(pad) < 0 else int(pad)


def sat_to_native(
    state: dict[str, torch.Tensor], config: CogVLM2Config, source: str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """SAT state dict -> the port's state dict (names in the module doc)."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor, sat_name: str) -> None:
        if name in out:
            raise CogVLM2Error(f"{source}: SAT weight {sat_name!r} maps onto {name!r} twice")
        out[name] = tensor if dtype is None else tensor.to(dtype)

    for key, tensor in state.items():
        if key == _SAT_CLS:
            put("model.vision.patch_embedding.cls_embedding", tensor[:1].clone(), key)
            continue
        if key == _SAT_INV_FREQ:
            for i in range(config.num_hidden_layers):
                put(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", tensor.clone(), key)
            continue
        for pattern, template in _COMPILED:
            match = pattern.match(key)
            if match:
                put(template.format(*match.groups()), tensor, key)
                break
        else:
            raise CogVLM2Error(
                f"{source}: unexpected SAT weight {key!r} (not part of a CogVLM2 image checkpoint)"
            )
    return out


# ---------------------------------------------------------------------------------- archives
class _Concatenated(io.RawIOBase):
    """The split parts of a tar as one readable stream."""

    def __init__(self, parts: list[Path]) -> None:
        self.parts = iter(parts)
        self.current = None
        self._next()

    def _next(self) -> None:
        if self.current is not None:
            self.current.close()
        part = next(self.parts, None)
        self.current = open(part, "rb") if part is not None else None  # noqa: SIM115 (closed in _next)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.current is not None:
            n = self.current.readinto(buffer)
            if n:
                return n
            self._next()
        return 0


def split_parts(folder: Path) -> list[Path]:
    """``split_part_*`` files in order; a gap in the suffix sequence is an error naming the missing part."""
    parts = sorted(folder.glob("**/split_part_*"))
    if not parts:
        return []
    suffixes = [p.name[len("split_part_") :] for p in parts]
    if all(s.isalpha() and len(s) == len(suffixes[0]) for s in suffixes):
        expected = [_alpha_suffix(i, len(suffixes[0])) for i in range(len(suffixes))]
        for have, want in zip(suffixes, expected):
            if have != want:
                raise CogVLM2Error(
                    f"{parts[0].parent / ('split_part_' + want)}: missing part of the split checkpoint archive"
                )
    elif all(s.isdigit() for s in suffixes):
        for i, s in enumerate(suffixes):
            if int(s) != int(suffixes[0]) + i:
                raise CogVLM2Error(
                    f"{parts[0].parent}: missing part {int(suffixes[0]) + i} of the split checkpoint archive"
                )
    return parts


def _alpha_suffix(index: int, width: int) -> str:
    letters = []
    for _ in range(width):
        index, r = divmod(index, 26)
        letters.append(chr(ord("a") + r))
    return "".join(reversed(letters))


def extract_archive(folder: Path, work: Path) -> Path:
    """Extract split tar parts (or a single .tar) under ``work``; returns the SAT root found there."""
    from reward.backends.cogvlm2.loading import find_sat_root

    parts = split_parts(folder)
    tars = sorted(folder.glob("*.tar"))
    if not parts and not tars:
        raise CogVLM2Error(f"{folder}: no SAT model_config.json, split_part_* files or .tar archive found")
    stream = _Concatenated(parts) if parts else open(tars[0], "rb")  # noqa: SIM115 (closed below)
    work.mkdir(parents=True, exist_ok=True)
    what = f"{len(parts)} split parts in {folder}" if parts else str(tars[0])
    try:
        with tarfile.open(fileobj=io.BufferedReader(stream, 1 << 20), mode="r|*") as archive:
            for member in archive:
                archive.extract(member, work, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise CogVLM2Error(
            f"{what}: the archive is incomplete or damaged ({err}); download the missing parts again"
        ) from err
    finally:
        stream.close()
    root = find_sat_root(work)
    if root is None:
        raise CogVLM2Error(f"{what}: the archive holds no SAT model_config.json")
    return root


# ---------------------------------------------------------------------------------- conversion
def convert_sat(root: Path, out: Path, tokenizer: str, dtype: torch.dtype | None, source: str) -> Path:
    """A SAT folder -> a native save_pretrained folder (weights, config, tokenizer)."""
    from transformers import AutoTokenizer

    from reward.backends.cogvlm2.modeling import CogVLM2ForCausalLM

    model_config, shard = read_sat_folder(root)
    state = load_sat_state_dict(shard)
    config = sat_config(model_config, state, source)
    weights = sat_to_native(state, config, source, dtype)
    with torch.device("meta"):
        model = CogVLM2ForCausalLM(config)
    expected = model.state_dict()
    from reward.backends.cogvlm2.loading import check_weight_names

    check_weight_names(set(expected) - set(weights), set(weights) - set(expected), source)
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CogVLM2Error(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, model_config.json implies "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(weights, strict=True, assign=True)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as err:
        raise CogVLM2Error(
            f"{tokenizer}: cannot load the tokenizer for the SAT checkpoint ({err}); pass --tokenizer"
        ) from err
    _save(model, tok, out)
    return out


def convert_loaded(path: str, out: Path, dtype: torch.dtype | None) -> Path:
    """A remote-code (or native) folder -> a native folder: loaded by name, saved without remote code."""
    from reward.backends.cogvlm2.loading import load_model, load_tokenizer

    model = load_model(path, dtype=dtype or torch.bfloat16, device="cpu")
    _save(model, load_tokenizer(path), out)
    return out


def _save(model: Any, tokenizer: Any, out: Path) -> None:
    """Write to ``out`` atomically: a temporary folder renamed into place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def convert(
    src: str,
    out: str | Path | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
    dtype: str = "bfloat16",
    work_dir: str | Path | None = None,
) -> Path:
    """Convert ``src`` (folder, archive folder or hub id) into a native folder; returns its path."""
    from reward.backends.cogvlm2.loading import (
        _looks_like_hub_id,
        converted_dir,
        detect_layout,
        find_sat_root,
    )

    if dtype not in DTYPES:
        raise CogVLM2Error(f"--dtype {dtype!r}: one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    hub = _looks_like_hub_id(src)
    if out is None:
        if not hub:
            raise CogVLM2Error(f"{src}: give --out FOLDER for a local checkpoint")
        out = converted_dir(src)
    out = Path(out)
    local = Path(src)
    if hub:
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(src))
        except Exception as err:  # offline, gated, unknown repo
            raise CogVLM2Error(f"{src}: cannot download ({type(err).__name__}: {err})") from err
    if not local.exists():
        raise CogVLM2Error(f"{src}: no such folder")
    found = detect_layout(local)
    if found is not None and found[0] in ("remote", "native"):
        return convert_loaded(str(local), out, torch_dtype)
    root = find_sat_root(local) if local.is_dir() else None
    if root is not None:
        return convert_sat(root, out, tokenizer, torch_dtype, src)
    if found is None and not (list(local.glob("**/split_part_*")) or list(local.glob("*.tar"))):
        from reward.backends.cogvlm2.loading import _unknown_family

        raise CogVLM2Error(_unknown_family(local))
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".extract")
    try:
        root = extract_archive(local, work)
        return convert_sat(root, out, tokenizer, torch_dtype, src)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cmd_convert(args: argparse.Namespace) -> int:
    path = convert(args.src, args.out, tokenizer=args.tokenizer, dtype=args.dtype, work_dir=args.work_dir)
    print(f"converted {args.src} -> {path} (load it with reward.model_path={path} or --model {path})")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``reward convert`` on the reward CLI's subparsers."""
    p = sub.add_parser(
        "convert", help="a released reward checkpoint (SAT, remote-code) -> a transformers folder"
    )
    p.add_argument("src", help="hub id, SAT folder, folder of split_part_* files, or remote-code folder")
    p.add_argument(
        "--out", help="output folder (default for a hub id: the reward cache, where loading finds it)"
    )
    p.add_argument(
        "--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer for a SAT checkpoint (it ships none)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="dtype of the saved weights")
    p.add_argument(
        "--work-dir", help="where split parts are extracted (default: beside --out; removed after)"
    )
    p.set_defaults(func=cmd_convert)
