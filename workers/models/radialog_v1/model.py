"""RaDialog v1's modules put together: 448-px image -> BioViL-T (1408-channel projector) -> ln_vision ->
Q-Former (32 queries) -> ``img_proj`` -> 32 embeddings in Vicuna's space, spliced where the prompt holds the
32 ``<IMG>`` ids.

The reshape quirk, copied exactly: the reference turns the projected patch grid ``[B, 1408, 14, 14]`` into
Q-Former input with ``.reshape(B, -1, 1408)`` and no permute, so "token" n is the flat channel-major slice
``[n * 1408, (n + 1) * 1408)`` (pieces of ~7 channels over the whole grid), not patch n's 1408 features. The
Q-Former was trained on exactly that, so it is kept.

Precision, as the reference demo runs it: BioViL-T, ln_vision and the Q-Former in float32; ``img_proj`` and
the LLM in the LLM's dtype (float16 on a GPU, as the reference; float32 on CPU). The vision tower's BatchNorm
layers use their stored statistics (the reference freezes it in eval mode), so a study's features never
depend on its batch companions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import LlamaForCausalLM

from workers.models.common.qformer import QFormerSize, QueryBridge
from workers.models.radialog_v1.prompts import IMAGE_TOKENS
from workers.models.radialog_v1.tokens import image_position
from workers.models.radialog_v2.biovil import BioViLT


class RadialogV1(nn.Module):
    """Vision tower, bridge and ``img_proj``; the ``LlamaForCausalLM`` is attached once loaded."""

    def __init__(
        self,
        llm_hidden: int,
        qformer: QFormerSize | None = None,
        resnet_width: int = 64,
        llama_model: LlamaForCausalLM | None = None,
    ) -> None:
        super().__init__()
        qformer = qformer or QFormerSize()
        if qformer.queries != IMAGE_TOKENS:
            raise ValueError(f"RaDialog v1 splices {IMAGE_TOKENS} query outputs, not {qformer.queries}")
        self.visual_encoder = BioViLT(
            joint_feature_size=qformer.vision_width, per_image_norm=False, resnet_width=resnet_width
        )
        self.bridge = QueryBridge(qformer)
        self.img_proj = nn.Linear(qformer.hidden_size, llm_hidden)
        self.llama_model = llama_model

    def attach(self, llama_model: LlamaForCausalLM) -> None:
        if llama_model.config.hidden_size != self.img_proj.out_features:
            raise ValueError(
                f"img_proj gives {self.img_proj.out_features} features, the LLM takes {llama_model.config.hidden_size}"
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
        """Vision tower and bridge in float32, ``img_proj`` in the LLM's ``dtype`` (all on ``device``)."""
        self.visual_encoder.to(device=device, dtype=torch.float32)
        self.bridge.to(device=device, dtype=torch.float32)
        self.img_proj.to(device=device, dtype=dtype)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 448, 448] pixels in [0, 1] -> the Q-Former's input [B, 196, 1408] (the reference's reshape)."""
        weight = self.visual_encoder.encoder.encoder.conv1.weight
        grid = self.visual_encoder(pixels.to(weight.device, weight.dtype)).projected_patch_embeddings
        return grid.reshape(grid.shape[0], -1, self.bridge.size.vision_width)  # no permute: see the module doc

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 448, 448] pixels -> [B, 32, hidden] image embeddings in the LLM's dtype, one image at a time.

        Batched convolutions and matmuls round differently with the batch size (~1e-6 here), and greedy
        decoding can turn such a difference into another report; one image at a time, a study's embeddings
        are bit for bit those it gets alone, whatever shares its batch. The vision path is a small part of a
        report's cost (300 decode steps of a 7B model).
        """
        rows = [
            self.img_proj(self.bridge(self.image_features(one[None])).to(self.img_proj.weight.dtype)) for one in pixels
        ]
        return torch.cat(rows).to(self.dtype)

    def splice(self, prompts: Sequence[Sequence[int]], images: torch.Tensor) -> list[torch.Tensor]:
        """Prompt ids holding the 32 image ids + [B, 32, hidden] -> one [T_i, hidden] row per prompt (the
        image embeddings take the placeholders' positions; length and positions are unchanged)."""
        embed = self.llm().get_input_embeddings()
        rows = []
        for ids, image in zip(prompts, images, strict=True):
            ids = list(ids)
            start = image_position(ids)
            text = torch.tensor(ids[:start] + ids[start + IMAGE_TOKENS :], dtype=torch.long, device=self.device)
            tokens = embed(text)
            rows.append(torch.cat([tokens[:start], image.to(tokens.dtype), tokens[start:]], dim=0))
        return rows
