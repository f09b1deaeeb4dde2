"""The EVA2-CLIP vision tower and the adapter that turns its patches into CogVLM2 vision tokens.

Per image (or video frame) ``[3, S, S]``:

1. 14x14 patches -> ``proj`` (a convolution), a learned class token in front, learned absolute
   position embeddings added (``num_positions`` = patches + 1);
2. transformer layers with the *post-sublayer* LayerNorm of EVA2-CLIP-E: ``x + LN1(attn(x))`` then
   ``x + LN2(mlp(x))`` (no pre-norm, no final norm), bidirectional attention, exact-erf GELU MLP;
3. the class token dropped, the patch grid folded 2x2 by a stride-2 convolution (``conv``), then the
   GLU projector (linear -> LayerNorm -> GELU -> SiLU-gated MLP) to the language width;
4. learned begin/end-of-image vectors (``boi`` / ``eoi``) around the grid.

Module and parameter names are the release's (``model.vision.*`` in the transformers layout), so a
checkpoint loads by name. The SAT release lays the same weights out under ``mixins.eva.*``
(:mod:`reward.convert` maps them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reward.backends.cogvlm2.config import CogVLM2Config


class PatchEmbedding(nn.Module):
    def __init__(self, vision: dict) -> None:
        super().__init__()
        width, patch = vision["hidden_size"], vision["patch_size"]
        self.proj = nn.Conv2d(vision["in_channels"], width, kernel_size=patch, stride=patch)
        self.cls_embedding = nn.Parameter(torch.zeros(1, width))
        self.position_embedding = nn.Embedding(vision["num_positions"], width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)
        cls = self.cls_embedding.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(
                f"vision tower: {x.shape[1] - 1} patches but {self.position_embedding.num_embeddings - 1} "
                "position embeddings (images must be resized to the checkpoint's image_size)"
            )
        return x + self.position_embedding.weight.unsqueeze(0)


class VisionAttention(nn.Module):
    def __init__(self, vision: dict) -> None:
        super().__init__()
        width = vision["hidden_size"]
        self.num_heads = vision["num_heads"]
        self.query_key_value = nn.Linear(width, 3 * width)
        self.dense = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        # Feature layout [q | k | v], each [heads, head_dim]: the release's reshape(B, L, 3, H, D).
        qkv = self.query_key_value(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, vision: dict) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision["hidden_size"], vision["intermediate_size"])
        self.fc2 = nn.Linear(vision["intermediate_size"], vision["hidden_size"])
        if vision.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"vision tower: hidden_act {vision['hidden_act']!r} is not supported (gelu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, vision: dict) -> None:
        super().__init__()
        eps = vision["layer_norm_eps"]
        self.input_layernorm = nn.LayerNorm(vision["hidden_size"], eps=eps)
        self.attention = VisionAttention(vision)
        self.mlp = VisionMLP(vision)
        self.post_attention_layernorm = nn.LayerNorm(vision["hidden_size"], eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class VisionTransformer(nn.Module):
    def __init__(self, vision: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(vision) for _ in range(vision["num_hidden_layers"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """The projector: ``adapter_width`` -> language width, then a SiLU-gated MLP."""

    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__()
        width = config.hidden_size
        self.linear_proj = nn.Linear(config.adapter_width, width, bias=False)
        self.norm1 = nn.LayerNorm(width)
        self.dense_h_to_4h = nn.Linear(width, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(width, config.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """Images or frames ``[N, 3, S, S]`` (normalised) -> vision tokens ``[N, tokens_per_image, hidden]``."""

    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__()
        vision = config.vision_config
        self.patch_embedding = PatchEmbedding(vision)
        self.transformer = VisionTransformer(vision)
        self.linear_proj = GLU(config)
        self.conv = nn.Conv2d(vision["hidden_size"], config.adapter_width, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(images))[:, 1:]
        batch, patches, width = x.shape
        side = int(patches**0.5)
        x = self.conv(x.transpose(1, 2).reshape(batch, width, side, side))
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        return torch.cat([self.boi.expand(batch, -1, -1), x, self.eoi.expand(batch, -1, -1)], dim=1)
