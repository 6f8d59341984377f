"""The XrayGPT modules put together: image -> 32 embeddings in the LLM's space, spliced at ``<ImageHere>``.

Attribute names follow the reference's ``MiniGPT4`` where the published files name them
(``visual_encoder``, ``ln_vision`` + ``query_tokens`` + ``Qformer`` inside :attr:`bridge`, ``llama_proj``,
``llama_model``). Precision: the vision tower runs in the model's dtype, ``ln_vision`` and the Q-Former in
float32 (the reference's fp16-safe LayerNorm; transformers keeps the Q-Former in float32), ``llama_proj``
in float32, and the result is cast to the LLM's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import LlamaForCausalLM

from workers.models.common.qformer import QFormerSize, QueryBridge
from workers.models.xraygpt.eva_vit import EvaSize, EvaViT


class XrayGPT(nn.Module):
    """Vision tower, bridge and projection; the ``LlamaForCausalLM`` is attached once loaded (reference order:
    vision files first, then the LLM, then the projection)."""

    def __init__(
        self,
        llm_hidden: int,
        eva: EvaSize | None = None,
        qformer: QFormerSize | None = None,
        llama_model: LlamaForCausalLM | None = None,
    ):
        super().__init__()
        eva = eva or EvaSize()
        qformer = qformer or QFormerSize(vision_width=eva.width)
        if qformer.vision_width != eva.width:
            raise ValueError(f"the Q-Former reads {qformer.vision_width} features, the ViT gives {eva.width}")
        self.visual_encoder = EvaViT(eva)
        self.bridge = QueryBridge(qformer)
        self.llama_proj = nn.Linear(qformer.hidden_size, llm_hidden)
        self.llama_model = llama_model

    def attach(self, llama_model: LlamaForCausalLM) -> None:
        if llama_model.config.hidden_size != self.llama_proj.out_features:
            raise ValueError(
                f"llama_proj gives {self.llama_proj.out_features} features, the LLM takes "
                f"{llama_model.config.hidden_size}"
            )
        self.llama_model = llama_model

    def llm(self) -> LlamaForCausalLM:
        """The attached language model (``attach``); an error, not an AttributeError on None, before it."""
        if self.llama_model is None:
            raise RuntimeError("no language model attached yet")
        return self.llama_model

    @property
    def device(self) -> torch.device:
        return self.llm().device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm().dtype

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """Vision tower in ``dtype``; bridge and projection in float32 (all on ``device``)."""
        self.visual_encoder.to(device=device, dtype=dtype)
        self.bridge.to(device=device, dtype=torch.float32)
        self.llama_proj.to(device=device, dtype=torch.float32)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 224, 224] normalised pixels -> [B, 32, hidden] image embeddings in the LLM's dtype."""
        tower = self.visual_encoder.tower.embeddings.patch_embedding.weight
        features = self.visual_encoder(pixels.to(tower.device, tower.dtype))
        queries = self.bridge(features)
        return self.llama_proj(queries.float()).to(self.dtype)

    def splice(
        self,
        segments: Sequence[tuple[Sequence[int], Sequence[int]]],
        images: torch.Tensor,
    ) -> list[torch.Tensor]:
        """(ids before the image, ids after it) per prompt + [B, 32, hidden] -> one [T_i, hidden] row each."""
        embed = self.llm().get_input_embeddings()
        rows = []
        for (before, after), image in zip(segments, images, strict=True):
            ids = torch.tensor([*before, *after], dtype=torch.long, device=self.device)
            tokens = embed(ids)
            rows.append(torch.cat([tokens[: len(before)], image.to(tokens.dtype), tokens[len(before) :]], dim=0))
        return rows
