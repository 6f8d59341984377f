"""RaDialog-LLaVA: BioViL-T vision tower -> mm_projector -> Llama (transformers), image spliced at ``<image>``.

Attribute names mirror LLaVA's ``LlavaLlamaForCausalLM`` so ``non_lora_trainables.bin`` keys map directly:
``model.vision_tower.*`` -> :attr:`RadialogLlava.vision_tower`, ``model.mm_projector.*`` ->
:attr:`RadialogLlava.mm_projector`, ``model.layers.*``/``lm_head.*`` -> :attr:`RadialogLlava.language_model`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from workers.models.prompts import IMAGE_TOKENS
from workers.models.radialog_v2.biovil import BioViLT

IMAGE_TOKEN_INDEX = -200  # LLaVA's in-sequence marker for the image embeddings
NUM_IMAGE_TOKENS = IMAGE_TOKENS  # 14 x 14 patch grid at 448 px

#: LLaVA config fields that are not Llama's (dropped before building a LlamaConfig).
_NON_LLAMA_PREFIXES = ("mm_", "freeze_", "tune_", "image_", "unfreeze_")
_NON_LLAMA_KEYS = {
    "model_type",
    "architectures",
    "transformers_version",
    "_name_or_path",
    "use_mm_proj",
    "mv_type",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "auto_map",
}


def llama_config_from_llava(config: dict[str, Any]) -> LlamaConfig:
    """A LlamaConfig from a LLaVA config.json (transformers 5 would misread it as its own LlavaConfig)."""
    fields = {k: v for k, v in config.items() if k not in _NON_LLAMA_KEYS and not k.startswith(_NON_LLAMA_PREFIXES)}
    fields.pop("torch_dtype", None)
    fields.pop("dtype", None)
    return LlamaConfig(**fields)


def build_projector(mm_hidden_size: int, hidden_size: int, projector_type: str = "mlp2x_gelu") -> nn.Sequential:
    """LLaVA ``mlpNx_gelu`` projector: Linear -> (GELU -> Linear) x (N-1); keys 0, 2, ..."""
    if not projector_type.startswith("mlp") or not projector_type.endswith("x_gelu"):
        raise ValueError(f"unsupported mm_projector_type {projector_type!r} (RaDialog v2 uses mlp2x_gelu)")
    depth = int(projector_type[3:-6])
    layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)


class RadialogLlava(nn.Module):
    """The LLM branch. ``vision_tower`` normalises each image with its own statistics (reference behaviour)."""

    def __init__(
        self,
        language_model: LlamaForCausalLM,
        *,
        mm_hidden_size: int = 512,
        projector_type: str = "mlp2x_gelu",
        resnet_width: int = 64,
    ):
        super().__init__()
        hidden = language_model.config.hidden_size
        self.language_model = language_model
        self.vision_tower = BioViLT(joint_feature_size=128, per_image_norm=True, resnet_width=resnet_width)
        self.mm_projector = build_projector(mm_hidden_size, hidden, projector_type)

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 448, 448] -> [B, 196, hidden] projected image tokens."""
        patches = self.vision_tower(pixels.to(self.device, self.dtype)).patch_embeddings
        return self.mm_projector(patches.flatten(2).transpose(1, 2))

    def splice(self, prompts: Sequence[Sequence[int]], image_features: torch.Tensor) -> list[torch.Tensor]:
        """Token ids with one ``IMAGE_TOKEN_INDEX`` each -> one [T_i, hidden] embedding row per prompt."""
        embed = self.language_model.get_input_embeddings()
        rows: list[torch.Tensor] = []
        for ids, features in zip(prompts, image_features):
            ids_t = torch.tensor(list(ids), dtype=torch.long, device=self.device)
            where = (ids_t == IMAGE_TOKEN_INDEX).nonzero().flatten()
            if len(where) != 1:
                raise ValueError(f"a prompt must hold exactly one <image>, found {len(where)}")
            cut = int(where[0])
            before, after = embed(ids_t[:cut]), embed(ids_t[cut + 1 :])
            rows.append(torch.cat([before, features.to(before.dtype), after], dim=0))
        return rows

    def embed_prompts(
        self, prompts: Sequence[Sequence[int]], image_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids with one ``IMAGE_TOKEN_INDEX`` each -> left-padded (inputs_embeds, attention_mask)."""
        rows = self.splice(prompts, image_features)
        longest = max(len(r) for r in rows)
        hidden = rows[0].shape[1]
        embeds = torch.zeros(len(rows), longest, hidden, dtype=rows[0].dtype, device=self.device)
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            embeds[i, longest - len(row) :] = row
            mask[i, longest - len(row) :] = 1
        return embeds, mask

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        pixels: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
        min_new_tokens: int | None = None,
        streamer: BaseStreamer | None = None,
        **options: Any,
    ) -> list[list[int]]:
        """Greedy generation for a batch (one forward per step); returns new tokens up to (excluding) EOS.

        ``options`` go to transformers' generate unchanged (e.g. ``cache_implementation="static"``).
        """
        features = self.encode_images(pixels)
        embeds, mask = self.embed_prompts(prompts, features)
        kwargs: dict[str, Any] = dict(options)
        if min_new_tokens:
            kwargs["min_new_tokens"] = min_new_tokens
        out = self.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            streamer=streamer,
            use_cache=True,
            **kwargs,
        )
        results: list[list[int]] = []
        for row in out.tolist():
            results.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
        return results


class CallbackStreamer(BaseStreamer):
    """Feeds decoded text pieces to a callback as tokens arrive (same thread as generate).

    Decodes the whole answer so far and emits the new suffix; holds back text that ends in an incomplete
    byte-fallback character (U+FFFD) until the next token completes it.
    """

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None], eos_token_id: int):
        self.decode, self.on_text, self.eos = decode, on_text, eos_token_id
        self.tokens: list[int] = []
        self.emitted = 0
        self.finished = False

    def put(self, value: torch.Tensor) -> None:
        if value.numel() == 0 or self.finished:
            return
        ids = value.flatten().tolist()
        if len(ids) > 1:  # prompt echo (only with input_ids); we generate from embeddings, so ignore
            return
        if ids[0] == self.eos:
            self.finished = True
            return
        self.tokens.extend(ids)
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.decode(self.tokens).lstrip()
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.emitted:
            self.on_text(text[self.emitted :])
            self.emitted = len(text)
