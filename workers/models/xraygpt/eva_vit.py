"""EVA-CLIP ViT-g/14 as MiniGPT-4 / XrayGPT build it, in transformers' ``Blip2VisionModel``.

The reference (``create_eva_vit_g``): patch 14 at 224 px (256 patches + CLS = 257 tokens), absolute position
embeddings, the first 39 of EVA-CLIP-g's blocks (width 1408, 16 heads of 88, MLP 6144 with exact GELU,
pre-LN with eps 1e-6, q and v biases but no k bias), no layer scale, no relative position bias and no final
norm. ``Blip2VisionModel`` is exactly that plus a ``post_layernorm``, which we replace by an identity: the
LayerNorm after the tower is XrayGPT's ``ln_vision`` (eps 1e-5, float32), which lives in the Q-Former bridge.

Published layout (``eva_vit_g.pth``: a raw state dict, no prefix) and our names:
``cls_token`` -> ``embeddings.class_embedding``; ``pos_embed`` -> ``embeddings.position_embedding``;
``patch_embed.proj.*`` -> ``embeddings.patch_embedding.*``; ``blocks.i.norm{1,2}.*`` ->
``encoder.layers.i.layer_norm{1,2}.*``; ``blocks.i.attn.qkv.weight`` -> ``...self_attn.qkv.weight``;
``blocks.i.attn.{q_bias,v_bias}`` -> ``...self_attn.qkv.bias`` = cat(q_bias, 0, v_bias);
``blocks.i.attn.proj.*`` -> ``...self_attn.projection.*``; ``blocks.i.mlp.fc{1,2}.*`` -> ``...mlp.fc{1,2}.*``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel


@dataclass(frozen=True)
class EvaSize:
    """EVA ViT-g as XrayGPT uses it; smaller values make the test model (same code, same key names)."""

    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp: int = 6144  # int(1408 * 4.3637)
    image_size: int = 224
    patch_size: int = 14

    def config(self) -> Blip2VisionConfig:
        return Blip2VisionConfig(
            hidden_size=self.width,
            intermediate_size=self.mlp,
            num_hidden_layers=self.depth,
            num_attention_heads=self.heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            qkv_bias=True,
            attention_dropout=0.0,
        )

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class EvaViT(nn.Module):
    """``[B, 3, 224, 224]`` normalised pixels -> ``[B, 257, 1408]`` features of the last block (no norm)."""

    def __init__(self, size: EvaSize = EvaSize()) -> None:
        super().__init__()
        self.size = size
        self.tower = Blip2VisionModel(size.config())
        self.tower.post_layernorm = nn.Identity()  # type: ignore[assignment]  # the reference has no final norm; ln_vision follows outside

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values=pixels).last_hidden_state


_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.proj.weight": "self_attn.projection.weight",
    "attn.proj.bias": "self_attn.projection.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
}


def published_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Names and shapes the ``eva_vit_g.pth`` layout has for ``EvaViT.tower``'s state dict."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in state.items():
        if key.endswith("self_attn.qkv.bias"):
            index = key.split(".")[2]
            third = (value.shape[0] // 3,)
            shapes[f"blocks.{index}.attn.q_bias"] = shapes[f"blocks.{index}.attn.v_bias"] = third
        else:
            shapes[_published_name(key)] = tuple(value.shape)
    return shapes


def _published_name(key: str) -> str:
    top = {ours: theirs for theirs, ours in _TOP.items()}
    if key in top:
        return top[key]
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
    parts = {ours: theirs for theirs, ours in _BLOCK_PARTS.items()}
    if match is None or match.group(2) not in parts:
        raise ValueError(f"not an EVA ViT key: {key}")
    return f"blocks.{match.group(1)}.{parts[match.group(2)]}"


def from_published(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``eva_vit_g.pth`` tensors (already checked against :func:`published_shapes`) -> ``EvaViT.tower`` keys;
    each block's q_bias and v_bias become the fused qkv bias cat(q_bias, 0, v_bias)."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _TOP:
            renamed[_TOP[key]] = value
            continue
        match = _BLOCK.fullmatch(key)
        if match is None:
            raise ValueError(f"not an EVA ViT key: {key}")
        index, part = match.group(1), match.group(2)
        if part == "attn.q_bias":
            v = state[f"blocks.{index}.attn.v_bias"]
            renamed[f"encoder.layers.{index}.self_attn.qkv.bias"] = torch.cat([value, torch.zeros_like(value), v])
        elif part != "attn.v_bias":
            renamed[f"encoder.layers.{index}.{_BLOCK_PARTS[part]}"] = value
    return renamed


def block_index(key: str) -> int | None:
    """The block a published key belongs to (None for the embeddings)."""
    match = _BLOCK.fullmatch(key)
    return int(match.group(1)) if match else None


def to_published(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``EvaViT.tower`` keys -> the ``eva_vit_g.pth`` layout (for test checkpoints). The k bias must be zero."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("self_attn.qkv.bias"):
            index = key.split(".")[2]
            q, k, v = value.chunk(3)
            if torch.any(k != 0):
                raise ValueError(f"{key}: EVA has no k bias; its middle third must be zero")
            out[f"blocks.{index}.attn.q_bias"], out[f"blocks.{index}.attn.v_bias"] = q.clone(), v.clone()
        else:
            out[_published_name(key)] = value
    return out
