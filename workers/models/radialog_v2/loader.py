"""Load RaDialog v2 from local directories, in the reference order, refusing anything incomplete.

Order (as the reference ``load_pretrained_model``): base Llama weights with the RaDialog config ->
projector rebuilt for BioViL-T's 512 channels -> ``non_lora_trainables.bin`` (``base_model.`` and
``model.model.`` prefixes handled) checked key by key -> LoRA adapter checked key by key -> merged once.
Then the findings classifier and the tokenizer. Never downloads (``local_files_only``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.models.llama_tokenizer import SlowLlamaEncoder, TokenizerFileError, decoding_tokenizer
from workers.models.radialog_v2.checkpoint_io import ModelFileError, torch_load_checked
from workers.models.radialog_v2.classifier import ChexpertClassifier, load_classifier
from workers.models.radialog_v2.files import ModelFiles, files_sha256, locate
from workers.models.radialog_v2.llava import RadialogLlava, llama_config_from_llava
from workers.models.radialog_v2.state_dicts import StateDictMismatch, check_state_dict

log = logging.getLogger(__name__)

#: Base-checkpoint keys that LLaVA carries but our Llama does not use (reported, never fatal).
BASE_EXTRA_PREFIXES = ("model.mm_projector.", "model.vision_tower.", "model.image_newline")
#: BN running statistics of the LLM vision tower: unused (each image uses its own statistics), so optional.
UNUSED_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class LoadedModel:
    """Everything the backend needs, plus what the loader noticed (for `radialog model check`)."""

    llava: RadialogLlava
    classifier: ChexpertClassifier
    tokenizer: Any
    files: ModelFiles | None  # None: built from configs with random weights (benchmarks)
    device: torch.device
    dtype: torch.dtype
    classifier_dtype: torch.dtype
    sha256: str
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    #: Prompt text -> ids as the reference's slow tokenizer makes them (``tokenizer`` is used to decode).
    encoder: SlowLlamaEncoder | None = None


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; explicit names are honoured (and checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelFileError(f"device {name!r} requested but CUDA is not available")
    return device


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelFileError(f"cannot read {path}: {error}") from error


def split_non_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference prefix handling: strip ``base_model.``, then ``model.`` when keys start ``model.model.``."""
    state = {(k.removeprefix("base_model.")): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k.removeprefix("model.")): v for k, v in state.items()}
    return state


def load_language_model(
    files: ModelFiles,
    config: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Any, list[str]]:
    """Base Llama weights under the RaDialog config; fails on missing / wrong-shaped keys."""
    from transformers import LlamaForCausalLM

    llama_config = llama_config_from_llava(config)
    kwargs: dict[str, Any] = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    model: LlamaForCausalLM
    info: dict[str, Any]
    model, info = LlamaForCausalLM.from_pretrained(  # type: ignore[misc]  # with output_loading_info: a pair
        files.base_dir,
        config=llama_config,
        dtype=dtype,
        local_files_only=True,
        output_loading_info=True,
        low_cpu_mem_usage=True,
        **kwargs,
    )
    missing = list(info.get("missing_keys", []))
    mismatched = [str(m) for m in info.get("mismatched_keys", [])]
    unexpected = [
        k
        for k in info.get("unexpected_keys", [])
        if not k.startswith(BASE_EXTRA_PREFIXES) and not k.endswith("rotary_emb.inv_freq")
    ]
    if missing or mismatched or unexpected:
        raise StateDictMismatch(f"base model {files.base_dir.name}", sorted(missing), sorted(unexpected), mismatched)
    ignored = len(info.get("unexpected_keys", []))
    notes = (
        [f"base: ignored {ignored} LLaVA-only keys (CLIP projector/vision tower, rotary buffers)"] if ignored else []
    )
    return model.eval(), notes


def load_non_lora(llava: RadialogLlava, path: Path) -> list[str]:
    """Vision tower + projector (and any tuned LM tensors) from non_lora_trainables.bin, checked exactly."""
    state = split_non_lora(torch_load_checked(path))
    groups: dict[str, dict[str, torch.Tensor]] = {"vision_tower": {}, "mm_projector": {}, "language_model": {}}
    unexpected: list[str] = []
    for key, value in state.items():
        if key.startswith("model.vision_tower."):
            groups["vision_tower"][key[len("model.vision_tower.") :]] = value
        elif key.startswith("model.mm_projector."):
            groups["mm_projector"][key[len("model.mm_projector.") :]] = value
        elif key.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")):
            groups["language_model"][key] = value
        else:
            unexpected.append(key)
    notes: list[str] = []
    problems: list[StateDictMismatch] = []
    checks = [
        (llava.vision_tower, groups["vision_tower"], "model.vision_tower.", lambda k: k.endswith(UNUSED_BN_BUFFERS)),
        (llava.mm_projector, groups["mm_projector"], "model.mm_projector.", lambda k: False),
    ]
    for module, part, prefix, optional in checks:
        try:
            absent = check_state_dict(module, part, source=path.name, key_prefix=prefix, optional=optional)
            if absent:
                notes.append(f"{path.name}: {len(absent)} BN running-statistics buffers absent (unused: per-image BN)")
        except StateDictMismatch as error:
            problems.append(error)
    lm_state = llava.language_model.state_dict()
    lm_bad = [
        f"{k} {tuple(v.shape)} != {tuple(lm_state[k].shape)}"
        for k, v in groups["language_model"].items()
        if k in lm_state and tuple(v.shape) != tuple(lm_state[k].shape)
    ]
    unexpected += [k for k in groups["language_model"] if k not in lm_state]
    if problems or unexpected or lm_bad:
        raise StateDictMismatch(
            path.name,
            [m for p in problems for m in p.missing],
            [u for p in problems for u in p.unexpected] + unexpected,
            [m for p in problems for m in p.mismatched] + lm_bad,
        )
    llava.vision_tower.load_state_dict(groups["vision_tower"], strict=False)
    llava.mm_projector.load_state_dict(groups["mm_projector"])
    if groups["language_model"]:
        llava.language_model.load_state_dict(groups["language_model"], strict=False)
        notes.append(f"{path.name}: {len(groups['language_model'])} language-model tensors overridden")
    return notes


def _adapter_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise ModelFileError(f"cannot read {path}: {error}") from error
    return torch_load_checked(path)


def apply_lora(language_model: Any, files: ModelFiles) -> tuple[Any, list[str]]:
    """LoRA from adapter_config.json + weights, every adapter tensor checked by name and shape, then merged."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

    try:
        config = PeftConfig.from_pretrained(str(files.model_dir), local_files_only=True)
    except Exception as error:
        raise ModelFileError(f"cannot read {files.adapter_config}: {error}") from error
    config.inference_mode = True
    config.base_model_name_or_path = getattr(language_model, "name_or_path", None)  # ours, not the hub id
    peft_model = get_peft_model(language_model, config)
    expected = {k.replace(".default.", "."): tuple(v.shape) for k, v in peft_model.state_dict().items() if "lora_" in k}
    if not expected:
        raise ModelFileError(f"{files.adapter_config.name}: target_modules match no layer of the language model")
    state = _adapter_state(files.adapter_weights)
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = [
        f"{k} {tuple(v.shape)} != {expected[k]}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatch(files.adapter_weights.name, missing, unexpected, mismatched)
    set_peft_model_state_dict(peft_model, state)
    merged = peft_model.merge_and_unload()
    return merged.eval(), [f"LoRA r={config.r} alpha={config.lora_alpha}: {len(state) // 2} layers merged"]


def load_tokenizer(files: ModelFiles) -> tuple[Any, SlowLlamaEncoder]:
    """The decoding tokenizer (transformers) and the encoder that gives the reference's prompt ids.

    The encoder reads tokenizer.model and tokenizer_config.json (``legacy``, ``add_bos_token``, the special
    tokens) and refuses a configuration whose ids it could not reproduce.
    """
    try:
        encoder = SlowLlamaEncoder.from_directory(files.base_dir)
    except TokenizerFileError as error:
        raise ModelFileError(f"tokenizer in {files.base_dir}: {error}") from error
    try:
        tokenizer = decoding_tokenizer(files.base_dir, encoder)
    except Exception as error:
        raise ModelFileError(f"cannot load the tokenizer from {files.base_dir}: {error}") from error
    if (tokenizer.bos_token_id, tokenizer.eos_token_id) != (1, 2) or (encoder.bos_id, encoder.eos_id) != (1, 2):
        raise ModelFileError(
            f"tokenizer in {files.base_dir} is not Llama's (bos {tokenizer.bos_token_id}, eos {tokenizer.eos_token_id})"
        )
    if not encoder.add_bos_token:
        raise ModelFileError(
            f"tokenizer in {files.base_dir} does not add <s> (set add_bos_token in tokenizer_config.json)"
        )
    return tokenizer, encoder


def load_radialog(model_dir: Path | None, base_dir: Path | None, device_name: str = "auto") -> LoadedModel:
    """The whole model, ready to serve (weights in eval mode, LoRA merged)."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    files = locate(model_dir, base_dir)
    device = resolve_device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    classifier_dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = read_json(files.config)
    notes: list[str] = []

    t = time.perf_counter()
    language_model, base_notes = load_language_model(files, config, device, dtype)
    notes += base_notes
    seconds["base"] = time.perf_counter() - t

    t = time.perf_counter()
    non_lora = torch_load_checked(files.non_lora_trainables)
    conv1 = split_non_lora(non_lora).get("model.vision_tower.encoder.encoder.conv1.weight")
    if conv1 is None:
        raise StateDictMismatch(
            files.non_lora_trainables.name, ["model.vision_tower.encoder.encoder.conv1.weight"], [], []
        )
    del non_lora
    llava = RadialogLlava(
        language_model,
        mm_hidden_size=512,  # the reference forces 512 for BioViL-T whatever the config says
        projector_type=config.get("mm_projector_type", "mlp2x_gelu"),
        resnet_width=int(conv1.shape[0]),
    )
    llava.vision_tower.to(device=device, dtype=dtype)
    llava.mm_projector.to(device=device, dtype=dtype)
    notes += load_non_lora(llava, files.non_lora_trainables)
    seconds["non_lora"] = time.perf_counter() - t

    t = time.perf_counter()
    llava.language_model, lora_notes = apply_lora(llava.language_model, files)
    notes += lora_notes
    llava.eval()
    seconds["lora"] = time.perf_counter() - t

    t = time.perf_counter()
    classifier = load_classifier(files.classifier, device, classifier_dtype)
    tokenizer, encoder = load_tokenizer(files)
    seconds["classifier_tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    sha = files_sha256(files)
    seconds["sha256"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    log.info("model loaded", extra={"device": str(device), "dtype": str(dtype), "tiny": files.tiny, "seconds": seconds})
    notes.append(f"tokenizer: sentencepiece, legacy={str(encoder.legacy).lower()} (as tokenizer_config.json says)")
    return LoadedModel(
        llava, classifier, tokenizer, files, device, dtype, classifier_dtype, sha, notes, seconds, encoder
    )
