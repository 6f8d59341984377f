"""Llama prefill and decode steps over the loaded transformers modules, with keys/values in our pools.

The weights and the layer parts (projections, RMSNorm, MLP, rotary embedding) are transformers' own
objects from the loaded ``LlamaForCausalLM``; only the attention glue is ours, because transformers'
caches share one position per batch while continuous batching needs one per sequence. Every sequence
starts at position 0 in its own slot (no padding inside a sequence), so its positions, and its greedy
tokens, are those of the same prompt run alone. Attention is torch's ``scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb

from workers.engine.kv_pool import KVPool, PoolShape


@dataclass
class Group:
    """The rows of one step that live in one pool: ``pool`` slots ``slots`` at ``positions``."""

    pool: KVPool
    slots: torch.Tensor  # [n] long
    positions: torch.Tensor  # [n] long: where the step's (first) token goes


class LlamaSteps:
    """Prefill and decode for a ``LlamaForCausalLM``; call from one thread (the engine's)."""

    def __init__(self, model: LlamaForCausalLM):
        self.model = model
        config = model.config
        self.layers = model.model.layers
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads  # LlamaConfig sets it so; typed optional
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.gqa = self.kv_heads != self.heads
        self.shape = PoolShape(layers=len(self.layers), kv_heads=self.kv_heads, head_dim=self.head_dim)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last hidden state per row [B, H] -> float32 logits [B, vocab] (as generate scores them)."""
        return self.model.lm_head(self.model.model.norm(hidden)).float()

    def _qkv(
        self,
        layer: LlamaDecoderLayer,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        rows, length = hidden.shape[:2]
        q = attn.q_proj(hidden).view(rows, length, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(hidden).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _finish_layer(self, layer: LlamaDecoderLayer, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """[B, heads, T, D] attention output -> o_proj, residual, MLP block."""
        rows, _, length, _ = attended.shape
        out = layer.self_attn.o_proj(attended.transpose(1, 2).reshape(rows, length, self.heads * self.head_dim))
        hidden = residual + out
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    @torch.inference_mode()
    def prefill(self, embeds: Sequence[torch.Tensor], pool: KVPool, slots: Sequence[int]) -> torch.Tensor:
        """Run whole prompts (``embeds[i]``: [T_i, hidden]) into ``slots`` of ``pool``; logits of each last token.

        The prompts are right-padded to the longest; padded keys are masked and their cache entries are
        overwritten by the sequence's later tokens before they are ever attended to.
        """
        lengths = torch.tensor([len(e) for e in embeds], device=self.device)
        longest = int(lengths.max())
        if longest > pool.max_len:
            raise ValueError(f"a prompt of {longest} tokens does not fit pool {pool.name!r} ({pool.max_len})")
        rows = len(embeds)
        hidden = torch.zeros(rows, longest, embeds[0].shape[-1], dtype=self.dtype, device=self.device)
        for i, e in enumerate(embeds):
            hidden[i, : len(e)] = e
        positions = torch.arange(longest, device=self.device).expand(rows, longest)
        cos, sin = self.model.model.rotary_emb(hidden, positions)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril()
        mask = (causal[None] & (positions < lengths[:, None])[:, None, :])[:, None]  # [B, 1, T, T]
        slot_index = torch.tensor(list(slots), device=self.device)
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(hidden), cos, sin)
            pool.k[index, slot_index, :, :longest] = k
            pool.v[index, slot_index, :, :longest] = v
            attended = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=layer.self_attn.scaling, enable_gqa=self.gqa
            )
            hidden = self._finish_layer(layer, hidden, attended)
        last = hidden[torch.arange(rows, device=self.device), lengths - 1]
        return self._logits(last)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, groups: Sequence[Group]) -> torch.Tensor:
        """One token per row (rows ordered group by group) -> next-token logits [rows, vocab].

        Each group's new keys/values are written at its rows' positions; each group attends over its
        pool's live slots only up to its longest sequence.
        """
        hidden = self.embed(tokens[:, None])  # [B, 1, H]
        positions = torch.cat([g.positions for g in groups])
        cos, sin = self.model.model.rotary_emb(hidden, positions[:, None])
        spans, start = [], 0
        for group in groups:
            spans.append((start, start + len(group.slots)))
            start += len(group.slots)
        masks = []
        for group in groups:
            length = int(group.positions.max()) + 1
            keys = torch.arange(length, device=self.device)
            masks.append((keys[None, :] <= group.positions[:, None])[:, None, None, :])  # [n, 1, 1, L]
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(hidden), cos, sin)
            parts = []
            for group, (lo, hi), mask in zip(groups, spans, masks):
                pool_k, pool_v = group.pool.k[index], group.pool.v[index]
                pool_k[group.slots, :, group.positions] = k[lo:hi, :, 0]
                pool_v[group.slots, :, group.positions] = v[lo:hi, :, 0]
                n, length = hi - lo, mask.shape[-1]
                parts.append(
                    F.scaled_dot_product_attention(
                        q[lo:hi],
                        pool_k[:n, :, :length],
                        pool_v[:n, :, :length],
                        attn_mask=mask,
                        scale=layer.self_attn.scaling,
                        enable_gqa=self.gqa,
                    )
                )
            hidden = self._finish_layer(layer, hidden, torch.cat(parts) if len(parts) > 1 else parts[0])
        return self._logits(hidden[:, -1])
