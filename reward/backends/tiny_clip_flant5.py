"""A tiny random CLIP-FlanT5, written in the release's checkpoint layout (``zhiqiulin/clip-flant5-xxl``).

For tests and benchmarks of the VQAScore alignment term without downloading 11B parameters:
``config.json`` is a T5 config with ``model_type: clip_t5`` and the ``mm_*`` keys; the weights use the
release's names (T5 keys as they are, the CLIP tower under ``vision_tower.vision_tower.vision_model.*``, the MLP
projector under ``mm_projector.{0,2}.*``, and the ``embed_tokens.weight`` alias the release's model
class saves), sharded with an index so that loading by weight name across files is exercised;
``mm_vision_tower`` points to a local folder with the tower's config and CLIP image processor (and
its weights too when ``tower_weights_in_checkpoint`` is False, the other layout the loader accepts).
A T5-style tokenizer (unigram pieces with ``▁``, ``</s>`` closing every text) is trained here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: Does this figure show a red fox in snow? Please answer yes or no.",
    "a photo of a dog, a mountain lake at sunset, a city street at night, a bowl of fruit",
] + ["Yes", "No", "yes", "no", "Yes No yes no"] * 50


def build_tokenizer():
    """A unigram vocabulary of the corpus' words ("▁word") and single characters, T5's special tokens
    (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and ``</s>`` appended to every text, as T5's tokenizer does."""
    import re

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in CORPUS for w in re.findall(r"\w+|[^\w\s]", line)})
    chars = sorted({c for line in CORPUS for c in line if not c.isspace()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"▁{w}", -1.0) for w in words] + [(w, -2.0) for w in words]
    vocab += [("▁", -5.0)] + [(c, -8.0) for c in chars if (c, -2.0) not in vocab]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    if len(fast("Yes")["input_ids"]) != 2:  # "▁Yes" + "</s>", as with Flan-T5's tokenizer
        raise RuntimeError(f"tiny T5 tokenizer: 'Yes' is not one piece ({fast('Yes')['input_ids']})")
    return fast


def build_tiny_clip_flant5(
    path: str | Path, seed: int = 0, tower_weights_in_checkpoint: bool = True, safetensors: bool = True
) -> Path:
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, T5Config
    from transformers import T5ForConditionalGeneration as T5

    path = Path(path)
    tower_dir = path.parent / f"{path.name}-clip-tower"
    path.mkdir(parents=True, exist_ok=True)
    tower_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    t5_config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,  # Flan-T5
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        initializer_factor=0.6,  # answers that vary with the inputs, scores well inside (0, 1)
    )
    t5 = T5(t5_config).eval()
    vision_config = CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=16,
        initializer_factor=4.0,
    )
    vision = CLIPVisionModel(vision_config).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))

    vision_config.save_pretrained(tower_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(tower_dir)
    t5_weights = {k: v.contiguous() for k, v in t5.state_dict().items()}
    extra = {"mm_projector." + k: v for k, v in projector.state_dict().items()}
    extra["embed_tokens.weight"] = t5_weights["shared.weight"].clone()  # the release's class saves this alias
    if tower_weights_in_checkpoint:
        # the release's names: CLIPVisionModel's weights under vision_model.* (as transformers saved them then)
        tower = {k.removeprefix("vision_model."): v for k, v in vision.state_dict().items()}
        extra.update({"vision_tower.vision_tower.vision_model." + k: v for k, v in tower.items()})
    else:
        vision.save_pretrained(tower_dir)
    shards = {"t5": t5_weights, "mm": extra}
    suffix = "safetensors" if safetensors else "bin"
    stem = "model" if safetensors else "pytorch_model"
    weight_map = {}
    for i, (_, state) in enumerate(shards.items(), 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{suffix}"
        state = {k: v.clone().contiguous() for k, v in state.items()}
        if safetensors:
            save_file(state, str(path / name), metadata={"format": "pt"})
        else:
            torch.save(state, path / name)
        weight_map.update(dict.fromkeys(state, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2))

    config = t5_config.to_dict()
    config.update(
        {
            "model_type": "clip_t5",
            "architectures": ["CLIPT5ForConditionalGeneration"],
            "mm_vision_tower": str(tower_dir),
            "mm_hidden_size": 24,
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "image_aspect_ratio": "pad",
            "use_mm_proj": True,
        }
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(path)
    return path
