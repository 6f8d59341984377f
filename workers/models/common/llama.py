"""A Vicuna / Llama Hugging Face directory, loaded completely or not at all (XrayGPT, RaDialog v1).

``LlamaForCausalLM.from_pretrained`` reports missing, unexpected and mis-shaped tensors but loads anyway;
here every one of them is named and the load refused, except keys ignored *by name*: old checkpoints carry
``rotary_emb.inv_freq`` buffers that transformers recomputes. Never downloads (``local_files_only``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from workers.models.llama_tokenizer import SlowLlamaEncoder, TokenizerFileError, decoding_tokenizer
from workers.models.radialog_v2.checkpoint_io import ModelFileError
from workers.models.radialog_v2.state_dicts import StateDictMismatch

#: Buffers of old Llama checkpoints that transformers recomputes (ignored by name, reported in the notes).
ROTARY_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def weight_files(directory: Path, missing: list[str]) -> list[Path]:
    """Single-file or sharded (index.json) .bin / .safetensors weights; what is absent goes to ``missing``."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as error:
                raise ModelFileError(f"cannot read {index}: {error}") from error
            paths = [directory / s for s in shards]
            missing.extend(str(p) for p in paths if not p.is_file())
            return [index, *paths]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    missing.append(f"{directory}/model.safetensors or pytorch_model.bin (or a sharded index)")
    return []


def tokenizer_files(directory: Path, missing: list[str]) -> list[Path]:
    """tokenizer.model or tokenizer.json (one is needed), plus the config files that are there."""
    found = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not any(p.name in ("tokenizer.model", "tokenizer.json") for p in found):
        missing.append(f"{directory / 'tokenizer.model'} or {directory / 'tokenizer.json'}")
    return found


def load_llama(directory: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, list[str]]:
    """The directory's LlamaForCausalLM in ``dtype`` on ``device``; StateDictMismatch names every problem."""
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        config = LlamaConfig.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # a missing or unreadable config.json: one clear message
        raise ModelFileError(f"cannot read {directory / 'config.json'}: {error}") from error
    kwargs: dict[str, Any] = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    model: LlamaForCausalLM
    info: dict[str, Any]
    model, info = LlamaForCausalLM.from_pretrained(  # type: ignore[misc]  # with output_loading_info: a pair
        directory,
        config=config,
        dtype=dtype,
        local_files_only=True,
        output_loading_info=True,
        low_cpu_mem_usage=True,
        **kwargs,
    )
    ignored = [k for k in info.get("unexpected_keys", []) if ROTARY_BUFFER.fullmatch(k)]
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not ROTARY_BUFFER.fullmatch(k))
    missing = sorted(info.get("missing_keys", []))
    mismatched = [str(m) for m in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        raise StateDictMismatch(f"language model {directory.name}", missing, unexpected, mismatched)
    notes = [f"{directory.name}: ignored {len(ignored)} rotary inv_freq buffers (recomputed)"] if ignored else []
    return model.eval(), notes


def load_tokenizer(directory: Path, *, legacy: bool | None) -> tuple[Any, SlowLlamaEncoder]:
    """(decoding tokenizer, prompt encoder) of the directory; refuses one whose ids or <s> handling are not
    Llama's. Prompt ids come from the slow sentencepiece rules (:class:`SlowLlamaEncoder`; ``legacy``: see
    its ``from_directory``), never from transformers' fast tokenizer, whose ids differ (after ``</s>``,
    before leading whitespace); generated ids are decoded by transformers' tokenizer."""
    try:
        encoder = SlowLlamaEncoder.from_directory(directory, legacy=legacy)
    except TokenizerFileError as error:
        raise ModelFileError(f"tokenizer in {directory}: {error}") from error
    if (encoder.bos_id, encoder.eos_id) != (1, 2):
        raise ModelFileError(f"tokenizer in {directory} is not Llama's (bos {encoder.bos_id}, eos {encoder.eos_id})")
    if not encoder.add_bos_token:
        raise ModelFileError(f"tokenizer in {directory} does not add <s> (set add_bos_token in tokenizer_config.json)")
    try:
        tokenizer = decoding_tokenizer(directory, encoder)
    except Exception as error:
        raise ModelFileError(f"cannot load the tokenizer from {directory}: {error}") from error
    return tokenizer, encoder


def files_sha256(entries: Iterable[tuple[str, Path]], chunk: int = 16 * 1024 * 1024) -> str:
    """sha256 over (name, bytes) of each file, in the given order: the identity of a model's file set."""
    digest = hashlib.sha256()
    for name, path in entries:
        digest.update(name.encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def ends_with_any(tokens: Sequence[int], stops: Sequence[Sequence[int]]) -> bool:
    """Whether ``tokens`` ends with one of the ``stops`` id sequences (the reference's StoppingCriteria)."""
    return any(len(tokens) >= len(s) and list(tokens[-len(s) :]) == list(s) for s in stops if s)
