"""Load RaDialog v1 from local files in the reference's order, naming every tensor that does not fit.

Reference order (every load there is ``strict=False``, so mismatches pass silently): BioViL-T's image model file
without its projector -> ``checkpoint_4.pth["model"]`` into ``query_tokens``, ``ln_vision``, the Q-Former and
(where it has them) the visual encoder's tensors -> Vicuna-7B v1.3 -> a fresh ``img_proj`` and the LoRA adapter
(old peft names; its ``adapter_model.bin`` also holds ``img_proj``) -> the findings classifier. Here each file
must hold exactly what it is read for; what the reference ignores is ignored *by name* and listed in the notes
(BioViL-T's own 128-channel projector, the Q-Former's text parts and stage-1 heads, LAVIS's training state).
Anything else is a :class:`StateDictMismatch` naming every key, and the worker does not start.

The BioViL-T projector (see :mod:`workers.models.radialog_v1.projector`): taken from ``checkpoint_4.pth`` when
it holds it, else the reference's training-time random draws are replayed; ``LoadedRadialogV1.projector`` and
the provenance version say which. A checkpoint with part of it is refused.

Sizes are the reference's (ResNet-50, bert-base Q-Former with 32 queries); a test set made by ``make_tiny``
declares a smaller Q-Former in ``radialog_v1_sizes.json`` beside its tiny-model marker.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from workers.models.common.layout import check_layout
from workers.models.common.llama import load_llama
from workers.models.common.llama import load_tokenizer as load_llama_tokenizer
from workers.models.common.qformer import LAVIS_UNUSED, QFormerSize, from_lavis, to_lavis
from workers.models.llama_tokenizer import SlowLlamaEncoder
from workers.models.radialog_v1 import projector as projector_replay
from workers.models.radialog_v1.files import RadialogV1Files, locate, sha256
from workers.models.radialog_v1.model import RadialogV1
from workers.models.radialog_v1.prompts import IMAGE_TOKEN_ID
from workers.models.radialog_v2.checkpoint_io import ModelFileError, torch_load_checked
from workers.models.radialog_v2.classifier import ChexpertClassifier, load_classifier
from workers.models.radialog_v2.loader import resolve_device
from workers.models.radialog_v2.state_dicts import StateDictMismatch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

log = logging.getLogger(__name__)

SIZES_FILE = "radialog_v1_sizes.json"
#: LAVIS's training state saved beside "model" in checkpoint_4.pth: ignored by name.
TRAINING_STATE = ("optimizer", "config", "scaler", "epoch")
VISUAL = "visual_encoder."
#: The LoRA adapter file's img_proj (the reference's ImgTrainer adds it under these names).
IMG_PROJ_KEYS = {
    "weight": "base_model.model.model.img_proj_layer.weight",
    "bias": "base_model.model.model.img_proj_layer.bias",
}
#: Llama's Linear layers a LoRA may target.
LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
_LORA_KEY = re.compile(r"base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+\.lora_[AB]\.weight")


@dataclass
class LoadedRadialogV1:
    """The model ready to serve, plus what the loader saw (for `radialog model check`)."""

    model: RadialogV1
    classifier: ChexpertClassifier
    tokenizer: Any  # transformers' tokenizer, for decoding
    encoder: SlowLlamaEncoder  # prompt ids as the reference's 4.28 tokenizer made them
    files: RadialogV1Files | None  # None: built from configs with random weights (benchmarks)
    device: torch.device
    dtype: torch.dtype
    classifier_dtype: torch.dtype
    sha256: str
    #: "checkpoint" (checkpoint_4.pth holds it) or "replay-seed42" (the reference's training-time draws)
    projector: str = "replay-seed42"
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def sizes_for(files: RadialogV1Files) -> QFormerSize:
    """The reference's Q-Former; a tiny test set's own (only beside its tiny-model marker)."""
    declared = files.root / SIZES_FILE
    if files.tiny and declared.is_file():
        try:
            return QFormerSize(**json.loads(declared.read_text())["qformer"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelFileError(f"cannot read {declared}: {error}") from error
    return QFormerSize()


def write_sizes(directory: Path, qformer: QFormerSize) -> None:
    (directory / SIZES_FILE).write_text(json.dumps({"qformer": asdict(qformer)}, indent=2))


def load_biovil(model: RadialogV1, path: Path, state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """BioViL-T's image model file -> the vision tower, without its projector (dropped by the reference)."""
    state = torch_load_checked(path) if state is None else state
    if not isinstance(state, dict):
        raise ModelFileError(f"{path.name} is not a state dict")
    tower = model.visual_encoder
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items() if not k.startswith("projector.")}
    ignored = check_layout(path.name, expected, state, ignored=lambda key: key.startswith("projector."))
    tower.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return (
        [
            (
                f"{path.name}: ignored {len(ignored)} tensors of BioViL-T's own 128-channel projector "
                "(the reference drops them and builds a 1408-channel one)"
            )
        ]
        if ignored
        else []
    )


def model_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``torch.load(path)["model"]``; other top-level entries must be LAVIS training state (ignored by name)."""
    content = torch_load_checked(path)
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        raise StateDictMismatch(path.name, ["model"], [], [])
    extra = [str(k) for k in content if k != "model"]
    unexpected = [k for k in extra if k not in TRAINING_STATE]
    if unexpected:
        raise StateDictMismatch(path.name, [], unexpected, [])
    notes = [f"{path.name}: ignored {', '.join(extra)} (training state)"] if extra else []
    return content["model"], notes


def load_qformer_checkpoint(model: RadialogV1, path: Path) -> tuple[str, list[str]]:
    """checkpoint_4.pth: the bridge (required), visual-encoder tensors it holds (loaded over BioViL-T's, as
    the reference does), the projector or its replay. Returns (projector source, notes)."""
    state, notes = model_dict(path)
    tower = model.visual_encoder
    visual_expected = {VISUAL + k: tuple(v.shape) for k, v in tower.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in to_lavis(model.bridge.state_dict()).items()}
    visual = {k: v for k, v in state.items() if k in visual_expected}
    expected |= {k: visual_expected[k] for k in visual}  # whatever visual-encoder tensors it holds, shape-checked

    def unused(key: str) -> bool:
        return any(p.fullmatch(key) for p in LAVIS_UNUSED)

    ignored = check_layout(path.name, expected, state, ignored=unused)
    drawn = [projector_replay.PROJECTOR_PREFIX + k for k in projector_replay.DRAWN]
    present = [k for k in drawn if k in visual]
    if present and len(present) != len(drawn):
        raise StateDictMismatch(path.name, [k for k in drawn if k not in visual], [], [])
    bridge, _rest, _unused = from_lavis({k: v for k, v in state.items() if k not in ignored and k not in visual})
    model.bridge.load_state_dict(bridge)
    if present:
        source = "checkpoint"
        notes.append(f"{path.name}: BioViL-T projector loaded from the checkpoint")
    else:
        source = f"replay-seed{projector_replay.TRAINING_SEED}"
        replayed = projector_replay.replay()
        tower.projector.load_state_dict(replayed, strict=False)
        notes.append(
            f"{path.name} holds no BioViL-T projector ({', '.join(drawn)}): using the reference's training-time "
            f"random draws, replayed (seed {projector_replay.TRAINING_SEED}, bit-exact with hi-ml under torch 1.13; "
            "README 'RaDialog v1: the projector')"
        )
    tower.load_state_dict({k.removeprefix(VISUAL): v for k, v in visual.items()}, strict=False)
    held = len(visual) - len(present)
    if held:
        notes.append(f"{path.name}: {held} visual-encoder tensors (BatchNorm statistics) loaded over BioViL-T's")
    if ignored:
        notes.append(
            f"{path.name}: ignored {len(ignored)} tensors the query path does not use (text embeddings "
            "and FFNs, LM head, vision/text projections, ITM head, temp, position_ids)"
        )
    return source, notes


def read_adapter_config(path: Path) -> dict[str, Any]:
    """The old-peft adapter_config.json's LoRA settings, checked field by field (peft is not asked to parse
    it: fields such as ``enable_lora`` and ``merge_weights`` are from peft 0.3)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelFileError(f"cannot read {path}: {error}") from error
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: not a JSON object")
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (LORA expected)")
    if config.get("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        problems.append(f"task_type {config.get('task_type')!r} (CAUSAL_LM expected)")
    r, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"r {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        problems.append(f"lora_alpha {alpha!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        problems.append(f"lora_dropout {dropout!r}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(t in LLAMA_LINEARS for t in targets):
        problems.append(f"target_modules {targets!r} (Llama linear layers expected)")
    for name, allowed in (
        ("bias", ("none",)),
        ("fan_in_fan_out", (False, None)),
        ("enable_lora", (None,)),
        ("modules_to_save", (None,)),
    ):
        if config.get(name) not in allowed:
            problems.append(f"{name} {config.get(name)!r} (the reference's is {allowed[0]!r})")
    if problems:
        raise ModelFileError(f"{path}: cannot rebuild this LoRA: " + "; ".join(problems))
    assert isinstance(targets, list)  # checked above
    return {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout), "target_modules": list(targets)}


def adapter_layout(peft_model: Any, img_proj: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """``adapter_model.bin``'s expected names and shapes: the LoRA tensors in old peft names (no adapter name)
    and the reference's ``img_proj_layer``."""
    expected = {k.replace(".default.", "."): tuple(v.shape) for k, v in peft_model.state_dict().items() if "lora_" in k}
    return expected | {IMG_PROJ_KEYS[k]: tuple(v.shape) for k, v in img_proj.state_dict().items()}


def apply_adapter(model: RadialogV1, files: RadialogV1Files) -> list[str]:
    """img_proj and the LoRA from the adapter directory, every tensor checked by name and shape; merged."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    settings = read_adapter_config(files.adapter_config)
    lora = LoraConfig(**settings, bias="none", task_type="CAUSAL_LM", inference_mode=True)
    peft_model = get_peft_model(model.llm(), lora)
    expected = adapter_layout(peft_model, model.img_proj)
    state = torch_load_checked(files.adapter_weights)
    if not isinstance(state, dict):
        raise ModelFileError(f"{files.adapter_weights.name} is not a state dict")
    check_layout(files.adapter_weights.name, expected, state)
    lora_state = {k: v for k, v in state.items() if _LORA_KEY.fullmatch(k)}
    set_peft_model_state_dict(peft_model, lora_state)
    model.llama_model = cast("LlamaForCausalLM", peft_model.merge_and_unload().eval())  # peft gives back the base
    model.img_proj.load_state_dict({k: state[v] for k, v in IMG_PROJ_KEYS.items()})
    return [
        (
            f"{files.adapter_dir.name}: LoRA r={settings['r']} alpha={settings['lora_alpha']} on "
            f"{', '.join(settings['target_modules'])} ({len(lora_state)} tensors) merged; img_proj loaded"
        )
    ]


def load_tokenizer(directory: Path) -> tuple[Any, SlowLlamaEncoder]:
    """(decoding tokenizer, the 4.28-rules encoder: ``common.llama.load_tokenizer`` with ``legacy=True``);
    refuses a vocabulary that would collide with <IMG>=32000."""
    tokenizer, encoder = load_llama_tokenizer(directory, legacy=True)
    if encoder.sp.get_piece_size() > IMAGE_TOKEN_ID:
        raise ModelFileError(
            f"tokenizer in {directory} has {encoder.sp.get_piece_size()} pieces: id {IMAGE_TOKEN_ID} "
            "is <IMG> in RaDialog v1"
        )
    return tokenizer, encoder


def llm_hidden(directory: Path) -> int:
    """The LLM's hidden size and vocabulary from config.json (img_proj is built before the LLM is loaded)."""
    try:
        config = json.loads((directory / "config.json").read_text())
        hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelFileError(f"cannot read the sizes from {directory / 'config.json'}: {error}") from error
    if vocab != IMAGE_TOKEN_ID:
        raise ModelFileError(
            f"{directory / 'config.json'}: vocab_size {vocab}; RaDialog v1 runs Vicuna's 32,000 "
            f"(the reference splices at id {IMAGE_TOKEN_ID} and never embeds it)"
        )
    return hidden


def load_radialog_v1(
    root: Path | None, adapter: str | Path | None, llm_dir: Path | None, biovil: Path | None, device_name: str = "auto"
) -> LoadedRadialogV1:
    """The whole model, ready to serve. On a GPU the LLM, LoRA and img_proj run in float16 and the classifier
    in float16 as in the reference (BioViL-T, ln_vision and the Q-Former float32); on CPU float32.
    Raises ModelFileError (StateDictMismatch) naming what is missing, unexpected or mis-shaped."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    files = locate(root, adapter, llm_dir, biovil)
    device = resolve_device(device_name)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    notes: list[str] = []

    t = time.perf_counter()
    biovil_state = torch_load_checked(files.biovil)
    conv1 = biovil_state.get("encoder.encoder.conv1.weight") if isinstance(biovil_state, dict) else None
    if not isinstance(conv1, torch.Tensor):
        raise StateDictMismatch(files.biovil.name, ["encoder.encoder.conv1.weight"], [], [])
    model = RadialogV1(llm_hidden(files.llm_dir), sizes_for(files), resnet_width=int(conv1.shape[0]))
    notes += load_biovil(model, files.biovil, biovil_state)
    del biovil_state
    seconds["biovil"] = time.perf_counter() - t
    t = time.perf_counter()
    projector, qformer_notes = load_qformer_checkpoint(model, files.qformer)
    notes += qformer_notes
    seconds["qformer"] = time.perf_counter() - t
    t = time.perf_counter()
    llama, llm_notes = load_llama(files.llm_dir, device, dtype)
    model.attach(llama)
    notes += llm_notes
    seconds["llm"] = time.perf_counter() - t
    t = time.perf_counter()
    notes += apply_adapter(model, files)
    seconds["adapter"] = time.perf_counter() - t
    model.place(device, dtype)
    model.eval()
    t = time.perf_counter()
    classifier_dtype = torch.float16 if device.type == "cuda" else torch.float32
    classifier = load_classifier(files.classifier, device, classifier_dtype)
    tokenizer, encoder = load_tokenizer(files.llm_dir)
    seconds["classifier_tokenizer"] = time.perf_counter() - t
    t = time.perf_counter()
    digest = sha256(files)
    seconds["sha256"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    notes.append("tokenizer: sentencepiece with transformers 4.28's rules (legacy, <IMG> strips its spaces)")
    log.info(
        "model loaded",
        extra={
            "model": "RaDialog v1",
            "device": str(device),
            "tiny": files.tiny,
            "projector": projector,
            "seconds": seconds,
        },
    )
    return LoadedRadialogV1(
        model, classifier, tokenizer, encoder, files, device, dtype, classifier_dtype, digest, projector, notes, seconds
    )
