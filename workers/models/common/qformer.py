"""BLIP-2's image-to-query bridge as LAVIS checkpoints hold it: ``ln_vision`` -> Q-Former -> 32 query outputs.

The Q-Former is transformers' own ``Blip2QFormerModel`` (query path only, no text FFN), fed with the
``query_tokens`` parameter; LAVIS's ``BertLMHeadModel`` with query embeddings alone computes the same thing
(LayerNorm of the queries, no position embeddings, self-attention, cross-attention on every
``cross_attention_frequency``-th layer, the ``_query`` FFN). ``ln_vision`` is a LayerNorm with eps 1e-5
run in float32 whatever the model's dtype, as LAVIS's fp16-safe LayerNorm does; the Q-Former also runs in
float32 (transformers keeps it so), and its output is cast back by the caller.

LAVIS key layout (``checkpoint["model"]`` of blip2_pretrained_*.pth, RaDialog v1's checkpoint_4.pth):
``query_tokens``, ``ln_vision.*``, ``Qformer.bert.embeddings.LayerNorm.*``,
``Qformer.bert.encoder.layer.N.{attention,crossattention}.{self.{query,key,value},output.{dense,LayerNorm}}.*``
and ``...layer.N.{intermediate_query,output_query}.*``. :func:`from_lavis` renames them to this module's
names and sorts out what the query path does not use (text FFNs, word/position embeddings, the LM head,
the ITC/ITM projections): those are returned by name, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

#: LAVIS keys the query path never reads (the reference loads them with strict=False and leaves them unused).
LAVIS_UNUSED = (
    re.compile(r"Qformer\.cls\..*"),  # the text LM head
    re.compile(r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*"),
    re.compile(r"Qformer\.bert\.embeddings\.position_ids"),  # a buffer
    re.compile(r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*"),  # the text FFN
    re.compile(r"(vision_proj|text_proj|itm_head)\..*"),  # stage-1 contrastive / matching heads
    re.compile(r"temp"),
)


@dataclass(frozen=True)
class QFormerSize:
    """Sizes of the bridge; the defaults are BLIP-2's (bert-base, 32 queries, EVA ViT-g's 1408 features)."""

    vision_width: int = 1408
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    queries: int = 32
    cross_attention_frequency: int = 2

    def config(self) -> Blip2QFormerConfig:
        return Blip2QFormerConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate_size,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            cross_attention_frequency=self.cross_attention_frequency,
            encoder_hidden_size=self.vision_width,
            use_qformer_text_input=False,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )


class Fp32LayerNorm(nn.LayerNorm):
    """A LayerNorm computed in float32 and returned in float32 (LAVIS's ``ln_vision`` under autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())


class QueryBridge(nn.Module):
    """``[B, N, vision_width]`` image features -> ``[B, queries, hidden_size]`` Q-Former outputs (float32)."""

    def __init__(self, size: QFormerSize = QFormerSize()) -> None:
        super().__init__()
        self.size = size
        self.ln_vision = Fp32LayerNorm(size.vision_width, eps=1e-5)
        self.query_tokens = nn.Parameter(torch.zeros(1, size.queries, size.hidden_size))
        self.qformer = Blip2QFormerModel(size.config())
        self.float()  # both halves are float32 by design (see the module docstring)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        image_embeds = self.ln_vision(image_features)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state


def _rename(key: str) -> str:
    """One LAVIS key -> its name in :class:`QueryBridge` (keys outside the bridge come back unchanged)."""
    if key.startswith("Qformer.bert.embeddings.LayerNorm."):
        return "qformer.layernorm." + key.removeprefix("Qformer.bert.embeddings.LayerNorm.")
    if key.startswith("Qformer.bert.encoder."):
        key = "qformer.encoder." + key.removeprefix("Qformer.bert.encoder.")
        return key.replace(".attention.self.", ".attention.attention.").replace(
            ".crossattention.self.", ".crossattention.attention."
        )
    return key


def from_lavis(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Split a LAVIS ``checkpoint["model"]`` dict: (bridge tensors under our names, other keys as they were,
    unused LAVIS keys by name). "Other keys" are for the caller to place or refuse (XrayGPT refuses them)."""
    bridge: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in state.items():
        if any(pattern.fullmatch(key) for pattern in LAVIS_UNUSED):
            unused.append(key)
        elif key in ("query_tokens",) or key.startswith(
            ("ln_vision.", "Qformer.bert.embeddings.LayerNorm.", "Qformer.bert.encoder.")
        ):
            bridge[_rename(key)] = value
        else:
            rest[key] = value
    return bridge, rest, sorted(unused)


def to_lavis(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_lavis` for the bridge's own tensors (test checkpoints are written with it)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("qformer.layernorm."):
            name = "Qformer.bert.embeddings.LayerNorm." + key.removeprefix("qformer.layernorm.")
        elif key.startswith("qformer.encoder."):
            name = "Qformer.bert.encoder." + key.removeprefix("qformer.encoder.")
            name = name.replace(".crossattention.attention.", ".crossattention.self.").replace(
                ".attention.attention.", ".attention.self."
            )
        else:
            name = key
        out[name] = value
    return out
