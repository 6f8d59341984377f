"""Load XrayGPT from local files in the reference's order, naming every tensor that does not fit.

Reference order (every load there is ``strict=False``, so mismatches pass silently): EVA ViT-g from
``eva_vit_g.pth`` -> ``blip2_pretrained_flant5xxl.pth["model"]`` into ``query_tokens``, ``ln_vision`` and
the Q-Former -> the Vicuna directory -> a fresh ``llama_proj`` overwritten by the XrayGPT checkpoint's
``["model"]``. Here each file must hold exactly what it is read for; what the reference ignores is ignored
*by name* (and listed in the notes): a 40th ViT block, the Q-Former's text parts and stage-1 heads,
``position_ids`` / ``rotary_emb.inv_freq`` buffers, and the training state beside ``"model"``
(``optimizer``, ``config``, ``scaler``, ``epoch``). Anything else (a missing ``llama_proj``, a Swin/MedCLIP
tensor, a wrong shape) is a :class:`StateDictMismatch` naming every key, and the worker does not start.

Sizes are the reference's (EVA ViT-g 39 blocks, bert-base Q-Former with 32 queries); a test checkpoint
made by ``make_tiny`` declares smaller ones in ``xraygpt_sizes.json`` beside its tiny-model marker.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.models.common.layout import check_layout
from workers.models.common.llama import load_llama, load_tokenizer
from workers.models.common.qformer import LAVIS_UNUSED, QFormerSize, from_lavis, to_lavis
from workers.models.llama_tokenizer import SlowLlamaEncoder
from workers.models.radialog_v2.checkpoint_io import ModelFileError, torch_load_checked
from workers.models.radialog_v2.loader import resolve_device
from workers.models.radialog_v2.state_dicts import StateDictMismatch
from workers.models.xraygpt import eva_vit
from workers.models.xraygpt.eva_vit import EvaSize
from workers.models.xraygpt.files import XrayGPTFiles, locate, sha256
from workers.models.xraygpt.model import XrayGPT

log = logging.getLogger(__name__)

SIZES_FILE = "xraygpt_sizes.json"
#: The reference tokenises with ``LlamaTokenizer(use_fast=False)`` of transformers 4.29 (XrayGPT's env.yml),
#: which had no ``legacy`` option (4.31 added it) and always behaved as ``legacy: true``: every text piece
#: between special tokens gets sentencepiece's dummy "▁", whatever tokenizer_config.json says.
REFERENCE_LEGACY = True
#: Training state saved beside "model" (LAVIS runner): ignored by name.
TRAINING_STATE = ("optimizer", "config", "scaler", "epoch")
#: Buffers the XrayGPT checkpoint carries (the saver keeps buffers): ignored by name.
CHECKPOINT_BUFFERS = (
    re.compile(r"Qformer\.bert\.embeddings\.position_ids"),
    re.compile(r"llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
)


@dataclass(frozen=True)
class Sizes:
    eva: EvaSize = field(default_factory=EvaSize)
    qformer: QFormerSize = field(default_factory=QFormerSize)

    def to_json(self) -> str:
        return json.dumps({"eva": asdict(self.eva), "qformer": asdict(self.qformer)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Sizes:
        data = json.loads(text)
        return cls(EvaSize(**data["eva"]), QFormerSize(**data["qformer"]))


@dataclass
class LoadedXrayGPT:
    """The model ready to serve, plus what the loader saw (for `radialog model check`)."""

    model: XrayGPT
    tokenizer: Any  # decodes generated ids
    encoder: SlowLlamaEncoder  # prompt ids, as the reference's slow LlamaTokenizer made them
    files: XrayGPTFiles | None  # None: built from configs with random weights (benchmarks)
    device: torch.device
    dtype: torch.dtype
    sha256: str
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def sizes_for(files: XrayGPTFiles) -> Sizes:
    """The reference's sizes; a tiny test checkpoint's own (only beside its tiny-model marker)."""
    declared = files.checkpoint.parent / SIZES_FILE
    if files.tiny and declared.is_file():
        try:
            return Sizes.from_json(declared.read_text())
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelFileError(f"cannot read {declared}: {error}") from error
    return Sizes()


def model_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``torch.load(path)["model"]``; other top-level entries must be training state (ignored by name)."""
    content = torch_load_checked(path)
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        raise StateDictMismatch(path.name, ["model"], [], [])
    extra = [k for k in content if k != "model"]
    unexpected = [str(k) for k in extra if k not in TRAINING_STATE]
    if unexpected:
        raise StateDictMismatch(path.name, [], unexpected, [])
    notes = [f"{path.name}: ignored {', '.join(map(str, extra))} (training state)"] if extra else []
    return content["model"], notes


def load_eva(model: XrayGPT, path: Path) -> list[str]:
    """``eva_vit_g.pth`` (raw dict) -> the vision tower, every tensor checked in the file's names."""
    state = torch_load_checked(path)
    if not isinstance(state, dict):
        raise ModelFileError(f"{path.name} is not a state dict")
    depth = model.visual_encoder.size.depth
    tower = model.visual_encoder.tower

    def beyond(key: str) -> bool:
        return (eva_vit.block_index(key) or 0) >= depth

    ignored = check_layout(path.name, eva_vit.published_shapes(tower.state_dict()), state, ignored=beyond)
    tower.load_state_dict(eva_vit.from_published({k: v for k, v in state.items() if k not in ignored}))
    note = (
        f"{path.name}: ignored {len(ignored)} tensors of blocks beyond {depth} "
        "(the reference builds 39 of EVA-CLIP-g's 40 blocks)"
    )
    return [note] if ignored else []


def load_bridge(model: XrayGPT, path: Path) -> list[str]:
    """``blip2_pretrained_flant5xxl.pth["model"]`` -> query_tokens, ln_vision and the Q-Former."""
    state, notes = model_dict(path)
    expected = {k: tuple(v.shape) for k, v in to_lavis(model.bridge.state_dict()).items()}

    def unused(key: str) -> bool:
        return any(p.fullmatch(key) for p in LAVIS_UNUSED)

    ignored = check_layout(path.name, expected, state, ignored=unused)
    bridge, _rest, _unused = from_lavis({k: v for k, v in state.items() if k not in ignored})
    model.bridge.load_state_dict(bridge)
    if ignored:
        notes.append(
            f"{path.name}: ignored {len(ignored)} tensors the query path does not use "
            "(text embeddings and FFNs, LM head, vision/text projections, ITM head, temp, position_ids)"
        )
    return notes


def load_projection(model: XrayGPT, path: Path) -> list[str]:
    """The XrayGPT checkpoint: ``llama_proj`` (the trained part); known buffers ignored by name. Anything
    else (MedCLIP/Swin or Q-Former weights) would mean that code and weights do not match: refused."""
    state, notes = model_dict(path)
    expected = {f"llama_proj.{k}": tuple(v.shape) for k, v in model.llama_proj.state_dict().items()}

    def buffer(key: str) -> bool:
        return any(p.fullmatch(key) for p in CHECKPOINT_BUFFERS)

    ignored = check_layout(path.name, expected, state, ignored=buffer)
    model.llama_proj.load_state_dict({k.removeprefix("llama_proj."): state[k] for k in expected})
    if ignored:
        notes.append(f"{path.name}: ignored {len(ignored)} buffers (position_ids, rotary inv_freq)")
    return notes


def llm_hidden(directory: Path) -> int:
    """The LLM's hidden size from its config.json (llama_proj is built before the LLM is loaded)."""
    try:
        return int(json.loads((directory / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelFileError(f"cannot read the hidden size from {directory / 'config.json'}: {error}") from error


def load_xraygpt(
    vision_dir: Path | None, llm_dir: Path | None, checkpoint: Path | None, device_name: str = "auto"
) -> LoadedXrayGPT:
    """The whole model, ready to serve. bf16 on a GPU (ln_vision, Q-Former, llama_proj in float32), float32
    on CPU. Raises ModelFileError (StateDictMismatch) naming what is missing, unexpected or mis-shaped."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    files = locate(vision_dir, llm_dir, checkpoint)
    sizes = sizes_for(files)
    device = resolve_device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    notes: list[str] = []

    model = XrayGPT(llm_hidden(files.llm_dir), sizes.eva, sizes.qformer)
    t = time.perf_counter()
    notes += load_eva(model, files.eva)
    seconds["eva"] = time.perf_counter() - t
    t = time.perf_counter()
    notes += load_bridge(model, files.qformer)
    seconds["qformer"] = time.perf_counter() - t
    t = time.perf_counter()
    llama, llm_notes = load_llama(files.llm_dir, device, dtype)
    model.attach(llama)
    notes += llm_notes
    seconds["llm"] = time.perf_counter() - t
    t = time.perf_counter()
    notes += load_projection(model, files.checkpoint)
    seconds["checkpoint"] = time.perf_counter() - t
    model.place(device, dtype)
    model.eval()
    tokenizer, encoder = load_tokenizer(files.llm_dir, legacy=REFERENCE_LEGACY)
    t = time.perf_counter()
    digest = sha256(files)
    seconds["sha256"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    log.info("model loaded", extra={"model": "XrayGPT", "device": str(device), "tiny": files.tiny, "seconds": seconds})
    return LoadedXrayGPT(model, tokenizer, encoder, files, device, dtype, digest, notes, seconds)
