"""A tiny random-initialised Qwen2-VL, built in code and saved like a hub checkpoint.

Tests and benchmarks need a real image-text-to-text model that loads through the same
``from_pretrained`` path as Qwen2-VL-2B, but nothing may be downloaded. :func:`build_tiny_qwen2_vl`
writes one to a folder: the model config (2 decoder layers, hidden size 64, a 2-block vision tower with
14-pixel patches), a byte-level BPE tokenizer trained here on a few sentences (so "yes", "Yes",
" yes", "no", ... are single tokens, as in Qwen's vocabulary) with Qwen2-VL's special tokens, a chat
template in Qwen2-VL's layout, and image/video processor settings that resize pictures to between
56x56 and 112x112 pixels (4 to 16 visual tokens), so a forward pass takes milliseconds on a CPU.

Weights are drawn from a seeded generator with a larger spread than the library default, so that the
random model's yes/no logits differ clearly between questions (a model whose p(yes) is 0.5 +- 1e-6
everywhere would make answer-equivalence tests meaningless).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def chatml_template(image: str, video: str, system: str | None = None) -> str:
    """A chat template in the ChatML turn layout (``<|im_start|>role\n ... <|im_end|>\n``, the
    assistant turn opened by the generation prompt) whose content parts put ``image`` / ``video`` where
    a picture / clip stands; ``system``, if given, is the system turn written when the conversation
    starts without one (Qwen2-VL's default)."""
    default_system = (
        "{% if loop.first and message['role'] != 'system' %}"
        f"<|im_start|>system\n{system}<|im_end|>\n"
        "{% endif %}"
        if system is not None
        else ""
    )
    return (
        "{% for message in messages %}" + default_system + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{image}"
        f"{{% elif part['type'] == 'video' %}}{video}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}"
        "{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# Qwen2-VL's conversation layout: a default system turn, visual placeholders wrapped in
# <|vision_start|>/<|vision_end|>.
CHAT_TEMPLATE = chatml_template(
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|vision_start|><|video_pad|><|vision_end|>",
    system="You are a helpful assistant.",
)

# What the tokenizer is trained on: checklist-style questions and both answers in every spelling the
# reward reads, repeated so that each answer spelling becomes one token.
_CORPUS = [
    "Is the image clear? Is the subject in focus? Are the colors rich and bright?",
    "Does the image show the prompt? Does this figure show a cat on a red sofa?",
    "Is the video stable? Is the motion smooth? Does the video meet all the requirements?",
    "Are there any letters present? Is the lighting natural? Is the composition symmetrical?",
    "Are the details not rough? Is there noise or blur in the picture? Is the face distorted?",
    "You are a helpful assistant. Answer the question about the picture with one word.",
    "a photo of a dog, a mountain lake at sunset, a city street at night, a bowl of fruit",
] + ["yes no Yes No yes. no. Yes, No,", "Yes", "No", "yes", "no"] * 20


def build_tokenizer(
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
    *,
    eos: str = "<|im_end|>",
    pad: str = "<|endoftext|>",
    bos: str | None = None,
    add_bos: bool = False,
    extra_special_tokens: dict[str, str] | None = None,
):
    """Byte-level BPE (Qwen's scheme: any byte string is encodable) with a family's special tokens.

    ``add_bos`` makes the tokenizer prepend ``bos`` to everything it encodes with special tokens, as
    Llama-3 and Gemma tokenizers do (so a chat template that writes BOS itself must be tokenised with
    ``add_special_tokens=False``, or the prompt starts with two).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=1,
        special_tokens=list(dict.fromkeys(special_tokens)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        **({"bos_token": bos} if bos else {}),
        extra_special_tokens=extra_special_tokens or {},
    )
    for word in ("yes", "Yes", " yes", "no", "No", " no"):
        ids = fast.encode(word, add_special_tokens=False)
        if len(ids) != 1:  # the corpus above is meant to guarantee this
            raise RuntimeError(f"tiny tokenizer: {word!r} is not a single token ({ids})")
    return fast


def qwen_tokenizer():
    """The tiny tokenizer with the Qwen VL families' special tokens (image / video placeholders)."""
    return build_tokenizer(
        SPECIAL_TOKENS, extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    )


def qwen_vision_token_ids(tokenizer) -> dict[str, int]:
    """The placeholder and vision start / end token ids a Qwen VL config names."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def build_tiny_qwen2_vl(
    path: str | Path, seed: int = 0, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112
) -> Path:
    """Build, save and return a tiny Qwen2-VL checkpoint folder (model, tokenizer, processors).

    ``min_pixels`` / ``max_pixels`` bound the area pictures are resized to (Qwen2-VL-2B's own
    processor uses 56*56 and 28*28*1280); a benchmark of a full-size model raises them.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    hidden = 64
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            # head_dim 16 -> 8 rotary frequencies, split over (time, height, width)
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
            "initializer_range": 0.2,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": 0.2,
        },
        **qwen_vision_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    video_config = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "processor_class": "Qwen2VLProcessor",
        "size": {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "do_sample_frames": False,
    }
    return save_tiny_checkpoint(
        path,
        model,
        tokenizer,
        CHAT_TEMPLATE,
        Qwen2VLImageProcessorPil(**pixels),
        None,
        {"processor_class": "Qwen2VLProcessor"},
        video_config,
    )


def save_tiny_checkpoint(
    path: Path,
    model: Any,
    tokenizer: Any,
    template: str,
    image_processor: Any,
    image_processor_type: str | None,
    processor: dict[str, Any],
    video: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny checkpoint folder in the hub layout, piece by piece rather than through the
    library's processor class (building that may need the torchvision-backed video processor, which
    CPU-only installs lack; loading the folder back with AutoProcessor gives the same processor).

    ``image_processor_type`` replaces the saved image processor's class name with the one a hub
    checkpoint names (None keeps it); ``processor`` is ``processor_config.json``; ``video``, if given,
    ``video_preprocessor_config.json``."""
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    if image_processor_type is not None:
        config_file = path / "preprocessor_config.json"
        image_config = json.loads(config_file.read_text())
        image_config["image_processor_type"] = image_processor_type
        config_file.write_text(json.dumps(image_config, indent=2))
    (path / "chat_template.jinja").write_text(template)
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2))
    if video is not None:
        (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return path
