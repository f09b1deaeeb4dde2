"""Tiny random-initialised checkpoints of every VLM family the ``vlm`` backend supports.

Each builder writes a folder in the family's hub layout: ``config.json`` and weights
(``save_pretrained``), a tokenizer trained here on a few sentences with the family's special tokens
(and its BOS behaviour), the family's chat template (its turn layout and visual placeholders, reduced
to what a single-turn question needs), ``preprocessor_config.json`` naming the image processor class a
real checkpoint names, ``video_preprocessor_config.json`` for families with video input and
``processor_config.json`` with the processor's own settings (visual tokens per image, ...). Pictures
are resized to a few dozen pixels, so each image or frame costs 4 to 16 visual tokens and a forward
pass takes milliseconds on a CPU. Loading goes through the same ``from_pretrained`` path as a real
checkpoint, with or without torchvision.

Weights are drawn with a larger spread than the library default (``initializer_range`` 0.2) so that
yes/no logits differ clearly between questions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from reward.backends.tiny_vlm import CHAT_TEMPLATE as QWEN2_VL_TEMPLATE
from reward.backends.tiny_vlm import (
    build_tiny_qwen2_vl,
    build_tokenizer,
    chatml_template,
    qwen_tokenizer,
    qwen_vision_token_ids,
    save_tiny_checkpoint,
)
from reward.backends.video_frames import CLIP_MEAN, CLIP_STD, HALF

INIT = 0.2
HIDDEN = 64


def _text(tokenizer, **extra: Any) -> dict[str, Any]:
    """A 2-layer decoder of width 64 (head_dim 16), ids taken from the tokenizer."""
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "initializer_range": INIT,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id
        if tokenizer.bos_token_id is not None
        else tokenizer.pad_token_id,
    }
    config.update(extra)
    return config


def _vision(**extra: Any) -> dict[str, Any]:
    config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "initializer_range": INIT,
    }
    config.update(extra)
    return config


def _model(config: Any, seed: int) -> Any:
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config).eval()


# ---------------------------------------------------------------------------------------- Qwen family
def _qwen_video(size: dict[str, int], patch: int, mean: list[float], std: list[float], kind: str) -> dict:
    return {
        "video_processor_type": kind,
        "size": size,
        "patch_size": patch,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": mean,
        "image_std": std,
        "do_sample_frames": False,
    }


def build_tiny_qwen2_5_vl(path: str | Path, seed: int = 0) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=_text(
            tokenizer,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": HIDDEN,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "initializer_range": INIT,
        },
        **qwen_vision_token_ids(tokenizer),
    )
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    return save_tiny_checkpoint(
        path,
        _model(config, seed),
        tokenizer,
        QWEN2_VL_TEMPLATE,
        Qwen2VLImageProcessorPil(size=pixels, image_mean=CLIP_MEAN, image_std=CLIP_STD),
        "Qwen2VLImageProcessor",
        {"processor_class": "Qwen2_5_VLProcessor"},
        _qwen_video(pixels, 14, CLIP_MEAN, CLIP_STD, "Qwen2VLVideoProcessor"),
    )


# Qwen3-VL: no default system turn.
QWEN3_VL_TEMPLATE = chatml_template(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
)


def build_tiny_qwen3_vl(path: str | Path, seed: int = 0) -> Path:
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig

    path = Path(path)
    tokenizer = qwen_tokenizer()
    config = Qwen3VLConfig(
        text_config=_text(
            tokenizer,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": HIDDEN,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
            "initializer_range": INIT,
        },
        **qwen_vision_token_ids(tokenizer),
    )
    pixels = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
    video = _qwen_video(
        {"shortest_edge": 2 * 64 * 64, "longest_edge": 8 * 128 * 128}, 16, HALF, HALF, "Qwen3VLVideoProcessor"
    )
    return save_tiny_checkpoint(
        path,
        _model(config, seed),
        tokenizer,
        QWEN3_VL_TEMPLATE,
        Qwen2VLImageProcessorPil(size=pixels, patch_size=16, image_mean=HALF, image_std=HALF),
        "Qwen2VLImageProcessorFast",
        {"processor_class": "Qwen3VLProcessor"},
        video,
    )


# ---------------------------------------------------------------------------------------- GLM-4.1V
GLM_TOKENS = (
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|video|>",
)
GLM4V_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif part['type'] == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_glm4v(path: str | Path, seed: int = 0) -> Path:
    from transformers import Glm4vConfig, Glm4vImageProcessorPil

    path = Path(path)
    tokenizer = build_tokenizer(
        GLM_TOKENS,
        eos="<|user|>",
        pad="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Glm4vConfig(
        text_config=_text(
            tokenizer,
            partial_rotary_factor=0.5,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 2],
                "partial_rotary_factor": 0.5,
            },
        ),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "image_size": 56,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": HIDDEN,
            "initializer_range": INIT,
        },
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"),
    )
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    video = _qwen_video(
        {"shortest_edge": 2 * 56 * 56, "longest_edge": 8 * 112 * 112},
        14,
        CLIP_MEAN,
        CLIP_STD,
        "Glm4vVideoProcessor",
    )
    return save_tiny_checkpoint(
        path,
        _model(config, seed),
        tokenizer,
        GLM4V_TEMPLATE,
        Glm4vImageProcessorPil(size=pixels, patch_size=14, image_mean=CLIP_MEAN, image_std=CLIP_STD),
        "Glm4vImageProcessor",
        {"processor_class": "Glm4vProcessor"},
        video,
    )


# ---------------------------------------------------------------------------------------- LLaVA-OneVision
LLAVA_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
LLAVA_OV_TEMPLATE = chatml_template("<image>\n", "<video>\n")


def build_tiny_llava_onevision(path: str | Path, seed: int = 0) -> Path:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil

    path = Path(path)
    tokenizer = build_tokenizer(
        LLAVA_TOKENS, extra_special_tokens={"image_token": "<image>", "video_token": "<video>"}
    )
    ids = tokenizer.convert_tokens_to_ids
    side, patch = 28, 14  # 2x2 patches per 28-pixel tile
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = LlavaOnevisionConfig(
        vision_config=_vision(model_type="siglip_vision_model", image_size=side, patch_size=patch),
        text_config=_text(tokenizer, model_type="qwen2"),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
    size = {"height": side, "width": side}
    video = {
        "video_processor_type": "LlavaOnevisionVideoProcessor",
        "size": size,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_sample_frames": False,
    }
    processor = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": (side // patch) ** 2,
        "vision_feature_select_strategy": "full",
    }
    return save_tiny_checkpoint(
        path,
        _model(config, seed),
        tokenizer,
        LLAVA_OV_TEMPLATE,
        LlavaOnevisionImageProcessorPil(
            size=size, image_grid_pinpoints=pinpoints, image_mean=CLIP_MEAN, image_std=CLIP_STD
        ),
        "LlavaOnevisionImageProcessor",
        processor,
        video,
    )


# ---------------------------------------------------------------------------------------- InternVL
INTERNVL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)
INTERNVL_TEMPLATE = chatml_template("<IMG_CONTEXT>\n", "<video>\n")


def build_tiny_internvl(path: str | Path, seed: int = 0) -> Path:
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig

    path = Path(path)
    tokenizer = build_tokenizer(
        INTERNVL_TOKENS,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    side, patch = 28, 14  # 2x2 patches, pixel-shuffled (ratio 0.5) into one token per tile
    config = InternVLConfig(
        vision_config=_vision(
            model_type="internvl_vision",
            image_size=[side, side],
            patch_size=[patch, patch],
            use_mask_token=False,
        ),
        text_config=_text(tokenizer, model_type="qwen2"),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=1,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    size = {"height": side, "width": side}
    video = {
        "video_processor_type": "InternVLVideoProcessor",
        "size": size,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_sample_frames": False,
    }
    return save_tiny_checkpoint(
        path,
        _model(config, seed),
        tokenizer,
        INTERNVL_TEMPLATE,
        GotOcr2ImageProcessorPil(
            size=size,
            crop_to_patches=True,
            min_patches=1,
            max_patches=4,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
        "GotOcr2ImageProcessor",
        {"processor_class": "InternVLProcessor", "image_seq_length": 1},
        video,
    )


# ---------------------------------------------------------------------------------------- Idefics3 / SmolVLM
def _idefics_tokens(bos: str) -> tuple[str, ...]:
    grid = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
    return (bos, "<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
            "<global-img>", "<video>", *grid)  # fmt: skip


def _idefics_template(start: str) -> str:
    """Idefics3 / SmolVLM turns: "User:<image>question<end_of_utterance>\\nAssistant:"."""
    return (
        start + "{% for message in messages %}"
        "{{ message['role'] | capitalize }}"
        "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
        "{% else %}"
        "{% if message['content'][0]['type'] in ['image', 'video'] %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<image>"
        "{% elif part['type'] == 'video' %}<video>"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}"
        "{% endif %}{% endfor %}{% endif %}"
        "<end_of_utterance>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )


def _build_idefics(path: Path, seed: int, smol: bool) -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ImageProcessorPil,
        SmolVLMConfig,
        SmolVLMImageProcessorPil,
    )

    bos = "<|im_start|>" if smol else "<|begin_of_text|>"
    tokenizer = build_tokenizer(
        _idefics_tokens(bos),
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        bos=bos,
        add_bos=not smol,  # Llama-3's tokenizer prepends <|begin_of_text|>; SmolVLM's adds nothing
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
            **({"video_token": "<video>"} if smol else {}),
        },
    )
    side, patch = 32, 16  # 2x2 patches, pixel-shuffled (scale 2) into one token per tile
    vision = _vision(
        image_size=side, patch_size=patch, model_type="smolvlm_vision" if smol else "idefics3_vision"
    )
    Config = SmolVLMConfig if smol else Idefics3Config
    config = Config(
        vision_config=vision,
        text_config=_text(tokenizer, model_type="llama"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    Image = SmolVLMImageProcessorPil if smol else Idefics3ImageProcessorPil
    image_processor = Image(
        size={"longest_edge": 2 * side},
        max_image_size={"longest_edge": side},
        do_image_splitting=True,
        image_mean=HALF,
        image_std=HALF,
    )
    processor = {"processor_class": "SmolVLMProcessor" if smol else "Idefics3Processor", "image_seq_len": 1}
    video = None
    if smol:
        video = {
            "video_processor_type": "SmolVLMVideoProcessor",
            "size": {"longest_edge": 2 * side},
            "max_image_size": {"longest_edge": side},
            "image_mean": HALF,
            "image_std": HALF,
            "do_sample_frames": False,
        }
    return save_tiny_checkpoint(
        path,
        _model(config, seed),
        tokenizer,
        _idefics_template("<|im_start|>" if smol else "<|begin_of_text|>"),
        image_processor,
        "SmolVLMImageProcessor" if smol else "Idefics3ImageProcessor",
        processor,
        video,
    )


def build_tiny_smolvlm(path: str | Path, seed: int = 0) -> Path:
    return _build_idefics(Path(path), seed, smol=True)


def build_tiny_idefics3(path: str | Path, seed: int = 0) -> Path:
    return _build_idefics(Path(path), seed, smol=False)


# ---------------------------------------------------------------------------------------- Gemma 3
GEMMA_TOKENS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>")  # fmt: skip
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tiny_gemma3(path: str | Path, seed: int = 0, sliding_window: int = 24) -> Path:
    """Gemma 3: bidirectional attention over image tokens (``token_type_ids``), a BOS the template writes
    and the tokenizer would add again, sliding-window layers (``sliding_window`` tokens, shorter than a
    prompt here, so the fast path's handling of them is exercised) and final logit soft-capping."""
    from transformers import Gemma3Config, Gemma3ImageProcessorPil

    path = Path(path)
    tokenizer = build_tokenizer(
        GEMMA_TOKENS,
        eos="<eos>",
        pad="<pad>",
        bos="<bos>",
        add_bos=True,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    ids = tokenizer.convert_tokens_to_ids
    side, patch = 32, 8  # 4x4 patches, average-pooled to 2x2 = 4 tokens per image
    config = Gemma3Config(
        text_config=_text(
            tokenizer,
            model_type="gemma3_text",
            sliding_window=sliding_window,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            # Gemma3ForConditionalGeneration does not apply it (the text-only head does); set, and small,
            # so that a test fails if the fast path and the model's own forward ever disagree about it
            final_logit_softcapping=2.0,
        ),
        vision_config=_vision(model_type="siglip_vision_model", image_size=side, patch_size=patch),
        mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    model = _model(config, seed)
    with torch.no_grad():  # the library starts the image projection at zero: images would not matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, INIT)
    return save_tiny_checkpoint(
        path,
        model,
        tokenizer,
        GEMMA3_TEMPLATE,
        Gemma3ImageProcessorPil(size={"height": side, "width": side}, image_mean=HALF, image_std=HALF),
        "Gemma3ImageProcessor",
        {"processor_class": "Gemma3Processor", "image_seq_length": 4},
    )


TINY_BUILDERS: dict[str, Callable[..., Path]] = {
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
    "glm4v": build_tiny_glm4v,
    "llava_onevision": build_tiny_llava_onevision,
    "internvl": build_tiny_internvl,
    "smolvlm": build_tiny_smolvlm,
    "idefics3": build_tiny_idefics3,
    "gemma3": build_tiny_gemma3,
}
