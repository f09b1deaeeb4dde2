"""Tiny random CogVLM2 checkpoints, built in code and saved in the release's own layouts.

Tests, benchmarks and the tiny recipes need real CogVLM2 checkpoints that load through the same
loaders as the official VisionReward releases, but nothing may be downloaded. This module builds:

- a Llama-3-style byte-level BPE tokenizer trained here on a few sentences, with the Llama-3 special
  tokens (``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|reserved_special_token_0|>`` as the vision
  placeholder / pad) and "yes", " yes", "no", ... as single tokens;
- a random :class:`CogVLM2ForCausalLM` of either variant (``tiny_config``: a 2-layer decoder of width
  64 and a 2-layer vision tower of width 32 on 16-pixel images, 6 vision tokens per image or frame),
  with a larger weight spread than the library default so that p(yes) varies between questions, and
  the rotary ``inv_freq`` rounded to bfloat16, as the release stores it;

and writes it as

- :func:`save_remote_layout`: the transformers remote-code layout of VisionReward-Video /
  cogvlm2-*: ``config.json`` with ``auto_map`` and the release's architecture name, sharded
  safetensors with an index, the tokenizer, and modeling_cogvlm.py / visual.py /
  configuration_cogvlm.py files that raise if anything ever imports them (the port must not);
- :func:`save_sat_layout`: the SAT layout of VisionReward-Image: ``model_config.json`` with
  ``eva_args``, ``latest`` and ``<iteration>/mp_rank_00_model_states.pt`` holding ``{"module": ...}``
  under SAT's own module names, spelled out here from the SAT module tree (not derived from the
  converter's table, so the two can disagree and a test catch it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from reward.backends.cogvlm2.config import IMAGE_ARCHITECTURE, VIDEO_ARCHITECTURE, CogVLM2Config

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, "<|eot_id|>")
_CORPUS = [
    "Question: Is the image clear? Short answer: yes",
    "Question: Does the video meet all the requirements stated in the text? Answer: no",
    "Is the composition aesthetically pleasing? Are the colors bright? Is the lighting beautiful?",
    "Does the image avoid being blurry? Is there a human face in the image? Are the details refined?",
    "Is the camera motion highly dynamic? Is the shape of the object not chaotic throughout the video?",
    "Does this figure show a red fox in snow? a cat on a sofa, a city street at night, a bowl of fruit",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23",
] + ["yes no Yes No yes. no. Yes, No,", "yes", "no", "Yes", "No"] * 20
_REMOTE_STUB = (
    '"""Placeholder for the release\'s remote code in a test checkpoint: the native port must never '
    'import it."""\nraise RuntimeError("remote code of a CogVLM2 checkpoint was imported")\n'
)


def tiny_tokenizer() -> Any:
    """Byte-level BPE (Llama-3's scheme: any text is encodable) with Llama-3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    for word in ("yes", " yes", "no", " no", "Yes", " Yes"):
        if len(fast.encode(word, add_special_tokens=False)) != 1:  # the corpus above is meant to ensure it
            raise RuntimeError(f"tiny tokenizer: {word!r} is not a single token")
    return fast


def tiny_config(
    variant: str, tokenizer: Any, adapter_width: int | None = None, **overrides: Any
) -> CogVLM2Config:
    ids = tokenizer.convert_tokens_to_ids
    base: dict[str, Any] = dict(
        variant=variant,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_multi_query_heads=2,
        max_position_embeddings=512,
        template_version="chat",
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "patch_size": 4,
            "image_size": 16,
            "layer_norm_eps": 1e-6,
        },
        adapter_width=adapter_width,
        pad_token_id=ids(PAD),
        bos_token_id=ids(BOS),
        eos_token_id=ids(EOS),
    )
    base.update(overrides)
    return CogVLM2Config(**base)


@torch.no_grad()
def build_tiny_model(
    config: CogVLM2Config, seed: int = 0, spread: float = 0.25, answer_ids: list[int] | None = None
) -> Any:
    """A random model with seeded weights: matrices ~ N(0, spread), norms 1 + N(0, 0.1), biases
    N(0, 0.1); ``inv_freq`` rounded to bfloat16 like the release's checkpoints. The output rows of
    ``answer_ids`` (the yes / no spellings) are scaled by 3, so that, as in a trained reward, the
    greedy first token is often a yes or a no (in a plain random model it almost never is, and the
    official answer rule would answer "no" to everything)."""
    from reward.backends.cogvlm2.modeling import CogVLM2ForCausalLM

    model = CogVLM2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight") or "layernorm" in name or "norm1" in name:
            p.copy_(1 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(spread * noise)
    if answer_ids:
        model.lm_head.weight[answer_ids] *= 3.0
    for name, b in model.named_buffers():
        if name.endswith("inv_freq"):
            b.copy_(b.to(torch.bfloat16).float())
    return model


def tiny_answer_ids(tokenizer: Any) -> list[int]:
    """The single-token yes / no spellings of the tiny tokenizer."""
    words = ("yes", " yes", "Yes", " Yes", "no", " no", "No", " No")
    return sorted({tokenizer.encode(w, add_special_tokens=False)[0] for w in words})


def _remote_config(config: CogVLM2Config) -> dict[str, Any]:
    """config.json as the release's ``CogVLMConfig.to_json_string()`` writes it."""
    vision = dict(config.vision_config)
    vision.update({"dropout_prob": 0.0})
    return {
        "architectures": [IMAGE_ARCHITECTURE if config.variant == "image" else VIDEO_ARCHITECTURE],
        "auto_map": {
            "AutoConfig": "configuration_cogvlm.CogVLMConfig",
            "AutoModelForCausalLM": "modeling_cogvlm."
            + ("CogVLMForCausalLM" if config.variant == "image" else "CogVLMVideoForCausalLM"),
        },
        "vision_config": vision,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_multi_query_heads": config.num_multi_query_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "template_version": "chat",
        "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "vocab_size": config.vocab_size,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_act": "silu",
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
    }


def save_remote_layout(model: Any, tokenizer: Any, path: str | Path, shards: int = 2) -> Path:
    """Write ``model`` in the transformers remote-code layout (weights by the release's names)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for k in state:
        if k.endswith("inv_freq"):
            state[k] = state[k].to(torch.bfloat16)  # stored in bf16, as the release does
    names = sorted(state)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i * per : (i + 1) * per]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (path / "config.json").write_text(json.dumps(_remote_config(model.config), indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id})
    )
    for stub in ("modeling_cogvlm.py", "visual.py", "configuration_cogvlm.py", "util.py"):
        (path / stub).write_text(_REMOTE_STUB)
    tokenizer.save_pretrained(path)
    return path


def sat_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The image model's weights under SAT's module names (VisualLlamaEVA with its mixins)."""
    cfg = model.config
    if cfg.variant != "image":
        raise ValueError("the SAT layout holds the image variant (VisionReward-Image)")
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {
        "transformer.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.final_layernorm.weight": sd["model.norm.weight"],
        "mixins.lm.lm_head.weight": sd["lm_head.weight"],
        "mixins.rotary.rotary_emb.inv_freq": sd["model.layers.0.self_attn.rotary_emb.inv_freq"],
    }
    for i in range(cfg.num_hidden_layers):
        layer, attn, mlp = f"model.layers.{i}", f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        sat = f"transformer.layers.{i}"
        out[f"{sat}.input_layernorm.weight"] = sd[f"{layer}.input_layernorm.weight"]
        out[f"{sat}.post_attention_layernorm.weight"] = sd[f"{layer}.post_attention_layernorm.weight"]
        out[f"{sat}.attention.query_key_value.weight"] = sd[f"{attn}.language_expert_query_key_value.weight"]
        out[f"{sat}.attention.dense.weight"] = sd[f"{attn}.language_expert_dense.weight"]
        out[f"{sat}.mlp.dense_h_to_4h.weight"] = sd[f"{mlp}.language_mlp.up_proj.weight"]
        out[f"{sat}.mlp.dense_4h_to_h.weight"] = sd[f"{mlp}.language_mlp.down_proj.weight"]
        out[f"mixins.mlp.gate_proj.{i}.weight"] = sd[f"{mlp}.language_mlp.gate_proj.weight"]
        out[f"mixins.mlp.vision_dense_h_to_4h_list.{i}.weight"] = sd[f"{mlp}.vision_mlp.up_proj.weight"]
        out[f"mixins.mlp.vision_dense_4h_to_h_list.{i}.weight"] = sd[f"{mlp}.vision_mlp.down_proj.weight"]
        out[f"mixins.mlp.vision_gate_proj.{i}.weight"] = sd[f"{mlp}.vision_mlp.gate_proj.weight"]
        out[f"mixins.rotary.vision_query_key_value_list.{i}.weight"] = sd[
            f"{attn}.vision_expert_query_key_value.weight"
        ]
        out[f"mixins.rotary.vision_query_key_value_list.{i}.bias"] = sd[
            f"{attn}.vision_expert_query_key_value.bias"
        ]
        out[f"mixins.rotary.vision_dense_list.{i}.weight"] = sd[f"{attn}.vision_expert_dense.weight"]
    eva, vis = "mixins.eva.vit_model", "model.vision"
    # SAT's ViT takes its class token from word_embeddings[input_ids=0] (vocabulary of one row).
    out[f"{eva}.transformer.word_embeddings.weight"] = sd[f"{vis}.patch_embedding.cls_embedding"]
    out[f"{eva}.transformer.position_embeddings.weight"] = sd[
        f"{vis}.patch_embedding.position_embedding.weight"
    ]
    out[f"{eva}.mixins.patch_embedding.proj.weight"] = sd[f"{vis}.patch_embedding.proj.weight"]
    out[f"{eva}.mixins.patch_embedding.proj.bias"] = sd[f"{vis}.patch_embedding.proj.bias"]
    for i in range(cfg.vision_config["num_hidden_layers"]):
        sat, port = f"{eva}.transformer.layers.{i}", f"{vis}.transformer.layers.{i}"
        for part in ("weight", "bias"):
            out[f"{sat}.input_layernorm.{part}"] = sd[f"{port}.input_layernorm.{part}"]
            out[f"{sat}.post_attention_layernorm.{part}"] = sd[f"{port}.post_attention_layernorm.{part}"]
            out[f"{sat}.attention.query_key_value.{part}"] = sd[f"{port}.attention.query_key_value.{part}"]
            out[f"{sat}.attention.dense.{part}"] = sd[f"{port}.attention.dense.{part}"]
            out[f"{sat}.mlp.dense_h_to_4h.{part}"] = sd[f"{port}.mlp.fc1.{part}"]
            out[f"{sat}.mlp.dense_4h_to_h.{part}"] = sd[f"{port}.mlp.fc2.{part}"]
    out["mixins.eva.conv.weight"] = sd[f"{vis}.conv.weight"]
    out["mixins.eva.conv.bias"] = sd[f"{vis}.conv.bias"]
    for part in (
        "linear_proj.weight",
        "norm1.weight",
        "norm1.bias",
        "dense_h_to_4h.weight",
        "gate_proj.weight",
        "dense_4h_to_h.weight",
    ):
        out[f"mixins.eva.linear_proj.{part}"] = sd[f"{vis}.linear_proj.{part}"]
    out["mixins.eva.boi"] = sd[f"{vis}.boi"]
    out["mixins.eva.eoi"] = sd[f"{vis}.eoi"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def sat_model_config(config: CogVLM2Config) -> dict[str, Any]:
    """model_config.json as SAT's ``save_checkpoint`` writes it for VisualLlamaEVA."""
    v = config.vision_config
    return {
        "model_class": "VisualLlamaEVA",
        "tokenizer_type": "Meta-Llama-3-8B-Instruct",
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "layernorm_order": "pre",
        "model_parallel_size": 1,
        "max_sequence_length": config.max_position_embeddings,
        "use_bias": False,
        "inner_hidden_size": config.intermediate_size,
        "num_multi_query_heads": config.num_multi_query_heads,
        "image_length": config.tokens_per_image - 2,
        "image_size": v["image_size"],
        "eva_args": {
            "model_class": "EVA2CLIPModel",
            "num_layers": v["num_hidden_layers"],
            "hidden_size": v["hidden_size"],
            "num_attention_heads": v["num_heads"],
            "vocab_size": 1,
            "layernorm_order": "post",
            "model_parallel_size": 1,
            "max_sequence_length": v["num_positions"],
            "inner_hidden_size": v["intermediate_size"],
            "use_final_layernorm": False,
            "layernorm_epsilon": v["layer_norm_eps"],
            "image_size": [v["image_size"], v["image_size"]],
            "pre_len": 1,
            "post_len": 0,
            "in_channels": v["in_channels"],
            "patch_size": v["patch_size"],
        },
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


def save_sat_layout(
    model: Any, path: str | Path, iteration: int = 1, dtype: torch.dtype | None = None
) -> Path:
    """Write the image ``model`` in the SAT layout (``dtype``: e.g. bfloat16 for the bf16 release)."""
    path = Path(path)
    (path / str(iteration)).mkdir(parents=True, exist_ok=True)
    state = sat_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    torch.save({"module": state}, path / str(iteration) / "mp_rank_00_model_states.pt")
    (path / "latest").write_text(str(iteration))
    (path / "model_config.json").write_text(json.dumps(sat_model_config(model.config), indent=4))
    return path


def build_tiny_cogvlm2(path: str | Path, variant: str = "video", seed: int = 0) -> Path:
    """Build a tiny CogVLM2 of ``variant`` and save it in the remote-code layout at ``path``."""
    tokenizer = tiny_tokenizer()
    model = build_tiny_model(
        tiny_config(variant, tokenizer), seed=seed, answer_ids=tiny_answer_ids(tokenizer)
    )
    return save_remote_layout(model, tokenizer, path)


def main() -> None:
    """``python -m reward.backends.cogvlm2.tiny PATH [--variant video|image] [--layout remote|sat]``."""
    import argparse

    parser = argparse.ArgumentParser(description="write a tiny random CogVLM2 in a release layout")
    parser.add_argument("path")
    parser.add_argument("--variant", default="video", choices=["video", "image"])
    parser.add_argument("--layout", default="remote", choices=["remote", "sat"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.layout == "remote":
        print(build_tiny_cogvlm2(args.path, variant=args.variant, seed=args.seed))
        return
    tokenizer = tiny_tokenizer()
    config = tiny_config("image", tokenizer, adapter_width=32)
    model = build_tiny_model(config, seed=args.seed, answer_ids=tiny_answer_ids(tokenizer))
    print(save_sat_layout(model, args.path))
    tokenizer.save_pretrained(Path(args.path) / "tokenizer")


if __name__ == "__main__":
    main()
