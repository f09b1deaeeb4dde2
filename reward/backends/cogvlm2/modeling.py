"""A native CogVLM2 (image and video variants): the Llama-3 decoder with the visual expert, on torch and
transformers building blocks. No code of the checkpoint is executed.

What the release does, and this port reproduces:

- **Token types.** Each position is LANGUAGE (0) or VISION (1). A vision position's embedding is the
  vision tower's output (placed in order over all VISION positions of the batch); language positions
  embed their token id.
- **Visual expert** (image variant). A position uses the vision weights (QKV with bias, output
  projection, MLP) when it and the *next* position are both VISION: the begin-of-image vector and the
  patches do, the end-of-image vector (followed by text) and every text token use the language weights.
  The video variant has no vision weights: every position uses the language ones.
- **Positions** (:func:`position_ids`): the begin- and end-of-image vectors count as text; all patches
  between them share one position. So an image of 2306 vision tokens spans 3 positions, and a video
  frame (66 tokens + its time index) spans 4.
- **Rotary embedding** over the whole head (NeoX halves, base 500000) with the inverse frequencies of
  each layer's ``rotary_emb.inv_freq`` buffer, which the release stores in its checkpoint (in bf16) and
  this port loads; the angle ``position * inv_freq`` is formed in the model's compute dtype, as the
  release's ``pos_idx_in_fp32=False`` does, and the rotation is applied in float32.
- **RMSNorm** multiplies by its weight in float32 and casts after, like the release.

Speed-ups that do not change the arithmetic: the expert routing (which rows use which weights) is
computed once per forward as index lists (one host sync), not per layer by boolean masks; grouped-query
attention runs in SDPA without repeating the key/value heads; ``prefix`` / ``logits_at`` let the reward
backend run a cached prefix and read only the answer positions (see ``backend.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from reward.backends.cogvlm2.config import CogVLM2Config
from reward.backends.cogvlm2.vision import EVA2CLIPModel

LANGUAGE, VISION = 0, 1


def expert_mask(token_types: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` token types -> ``[B, L]`` bool: positions that use the vision weights."""
    mask = torch.zeros_like(token_types, dtype=torch.bool)
    mask[:, :-1] = (token_types[:, :-1] == VISION) & (token_types[:, 1:] == VISION)
    return mask


def position_ids(token_types: torch.Tensor) -> torch.Tensor:
    """Position ids of one unpadded sequence ``[L]`` (or a batch ``[B, L]`` without padding).

    Runs of VISION tokens: their first and last token count as text (begin/end of image); every token
    in between shares the position of the run's second token.
    """
    types = token_types if token_types.ndim == 2 else token_types[None]
    t = types.clone()
    vis = types == VISION
    edge = torch.zeros_like(vis)
    edge[:, 1:] |= vis[:, 1:] & ~vis[:, :-1]
    edge[:, 0] |= vis[:, 0]
    edge[:, :-1] |= vis[:, :-1] & ~vis[:, 1:]
    edge[:, -1] |= vis[:, -1]
    t[edge] = LANGUAGE
    step = torch.zeros_like(types, dtype=torch.long)
    step[:, 1:] = ((t[:, 1:] == LANGUAGE) | ((t[:, 1:] == VISION) & (t[:, :-1] == LANGUAGE))).long()
    out = step.cumsum(-1)
    return out if token_types.ndim == 2 else out[0]


class ExpertRoute:
    """Which flattened rows of a ``[B, L, ...]`` activation use the vision weights (computed once)."""

    def __init__(self, vision_mask: torch.Tensor | None) -> None:
        self.vision_rows: torch.Tensor | None = None
        self.language_rows: torch.Tensor | None = None
        if vision_mask is not None:
            flat = vision_mask.reshape(-1)
            rows = flat.nonzero().squeeze(1)
            if rows.numel():  # one host sync per forward
                self.vision_rows = rows
                self.language_rows = (~flat).nonzero().squeeze(1)

    def __call__(self, x: torch.Tensor, language: nn.Module, vision: nn.Module | None) -> torch.Tensor:
        if self.vision_rows is None or vision is None:
            return language(x)
        batch, length, _ = x.shape
        flat = x.reshape(batch * length, -1)
        lang = language(flat.index_select(0, self.language_rows))
        out = lang.new_empty(batch * length, lang.shape[-1])
        out.index_copy_(0, self.language_rows, lang)
        out.index_copy_(0, self.vision_rows, vision(flat.index_select(0, self.vision_rows)))
        return out.view(batch, length, -1)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Holds ``inv_freq`` (a persistent buffer: the release's checkpoints carry it)."""

    def __init__(self, dim: int, base: float) -> None:
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=True)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, L]`` positions -> cos, sin ``[B, 1, L, dim]`` in ``dtype`` (angles formed in ``dtype``)."""
        inv = self.inv_freq.to(dtype)
        freqs = positions.to(dtype)[..., None] * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos.float() + rotated * sin.float()).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        if config.hidden_act != "silu":
            raise ValueError(f"cogvlm2: hidden_act {config.hidden_act!r} is not supported (silu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__()
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config) if config.vision_expert else None

    def forward(self, x: torch.Tensor, route: ExpertRoute) -> torch.Tensor:
        return route(x, self.language_mlp, self.vision_mlp)


@dataclass
class LayerCache:
    """Keys and values of one layer (after the rotation): ``[B, kv_heads, P, head_dim]``."""

    key: torch.Tensor
    value: torch.Tensor


class VisionExpertAttention(nn.Module):
    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_multi_query_heads
        self.head_dim = config.head_dim
        qkv = width + 2 * self.kv_heads * self.head_dim
        self.language_expert_query_key_value = nn.Linear(width, qkv, bias=False)
        self.language_expert_dense = nn.Linear(width, width, bias=False)
        if config.vision_expert:
            self.vision_expert_query_key_value = nn.Linear(width, qkv, bias=True)
            self.vision_expert_dense = nn.Linear(width, width, bias=False)
        else:
            self.vision_expert_query_key_value = None
            self.vision_expert_dense = None
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope_theta)

    def forward(
        self,
        x: torch.Tensor,
        route: ExpertRoute,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        past: LayerCache | None,
    ) -> tuple[torch.Tensor, LayerCache]:
        batch, length, _ = x.shape
        qkv = route(x, self.language_expert_query_key_value, self.vision_expert_query_key_value)
        d = self.head_dim
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = q.view(batch, length, self.heads, d).transpose(1, 2)
        k = k.view(batch, length, self.kv_heads, d).transpose(1, 2)
        v = v.view(batch, length, self.kv_heads, d).transpose(1, 2)
        cos, sin = self.rotary_emb.cos_sin(positions, x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        new = LayerCache(k, v)
        if past is not None and mask is None:
            raise ValueError("cogvlm2: attention over a cached prefix needs an explicit mask")
        if past is not None:
            k, v = torch.cat([past.key, k], dim=2), torch.cat([past.value, v], dim=2)
        gqa = self.heads != self.kv_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return route(out, self.language_expert_dense, self.vision_expert_dense), new


class DecoderLayer(nn.Module):
    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = VisionExpertAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = VisionExpertMLP(config)

    def forward(self, x, route, positions, mask, past):
        h, cache = self.self_attn(self.input_layernorm(x), route, positions, mask, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), route), cache


class CogVLM2PreTrainedModel(PreTrainedModel):
    config_class = CogVLM2Config
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer", "VisionLayer"]
    # Recomputed when a copy of a checkpoint lacks them.
    _keys_to_ignore_on_load_missing: ClassVar[list[str]] = [r"rotary_emb\.inv_freq"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(module.compute_inv_freq(module.inv_freq.device))
        elif isinstance(module, EVA2CLIPModel):
            for p in (module.boi, module.eoi, module.patch_embedding.cls_embedding):
                nn.init.normal_(p, mean=0.0, std=std)


class CogVLM2Model(CogVLM2PreTrainedModel):
    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)
        self.post_init()

    def embed(
        self, input_ids: torch.Tensor, token_types: torch.Tensor | None, images: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings with the vision tower's output at every VISION position (in order)."""
        x = self.embed_tokens(input_ids)
        if images is None:
            return x
        features = self.vision(images.to(x.dtype)).flatten(0, 1).to(x.dtype)
        where = token_types == VISION
        if int(where.sum()) != features.shape[0]:
            raise ValueError(
                f"cogvlm2: {int(where.sum())} vision positions but {features.shape[0]} vision tokens "
                f"from {images.shape[0]} images/frames"
            )
        return x.index_put((where,), features)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        token_types: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        past: list[LayerCache] | None = None,
    ) -> tuple[torch.Tensor, list[LayerCache]]:
        """Decoder over ``[B, L, hidden]`` embeddings -> normed hidden states and each layer's new keys
        and values. ``mask``: ``[B, 1, L, P + L]`` bool (True = attend) or None for plain causal."""
        route = ExpertRoute(
            expert_mask(token_types) if token_types is not None and self.config.vision_expert else None
        )
        x = inputs_embeds
        caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, route, positions, mask, None if past is None else past[i])
            caches.append(cache)
        return self.norm(x), caches


class CogVLM2ForCausalLM(CogVLM2PreTrainedModel):
    """``model`` (decoder + ``model.vision``) and ``lm_head``: the release's module tree."""

    def __init__(self, config: CogVLM2Config) -> None:
        super().__init__(config)
        self.model = CogVLM2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The release's full forward: logits ``[B, L, vocab]`` (float32), or ``[B, 1, vocab]`` at the
        last position with ``last_only`` (what a first generated token is read from).

        ``images``: every image / frame of the batch stacked ``[N, 3, S, S]``, in the order of the
        VISION positions. ``attention_mask`` ``[B, L]`` (1 = real token) allows right padding;
        positions are then computed per row over its real tokens.
        """
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        if position_ids is None:
            position_ids = batch_position_ids(types, attention_mask)
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            length = input_ids.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        embeds = self.model.embed(input_ids, types, images)
        hidden, _ = self.model(embeds, position_ids, types, mask)
        return self.lm_head(hidden[:, -1:] if last_only else hidden).float()


def batch_position_ids(token_types: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, L]`` positions of right-padded rows, each computed over its real tokens only."""
    if attention_mask is None:
        return position_ids(token_types)
    out = torch.zeros_like(token_types, dtype=torch.long)
    for i, n in enumerate(attention_mask.sum(-1).tolist()):
        out[i, :n] = position_ids(token_types[i, :n])
    return out


def register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` open folders this project wrote (``model_type:
    cogvlm2``), e.g. the output of ``reward convert``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(CogVLM2Config.model_type, CogVLM2Config, exist_ok=True)
    AutoModelForCausalLM.register(CogVLM2Config, CogVLM2ForCausalLM, exist_ok=True)


register_auto_classes()
