"""RaDialog v1 for bench/gpu.py: the full-size architecture with random weights, the tiny set through the real
loader, and the prompts the benchmark times (``python -m bench.gpu --backend radialog-v1``).

Full size = what the reference builds: BioViL-T (ResNet-50, 1408-channel projector) at 448 px, the bert-base
Q-Former with 32 queries reading 1408 features, img_proj 768 -> 4096, Vicuna-7B v1.3 (LLaMA-1: 32 layers, hidden
4096, 2,048 positions; LoRA merged, so the same shapes) and the CheXpert classifier at 488 px. On CUDA the LLM and
img_proj are float16 and the classifier float16 as in the reference, BioViL-T and the Q-Former float32.
Imports only torch, transformers, peft, numpy, pillow and ``workers.models``: the GPU machine has nothing else.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from workers.models.base import Turn
from workers.models.conversation import conversation_prompt
from workers.models.prompts import yes_no_prompt
from workers.models.radialog_v1 import prompts
from workers.models.radialog_v1.backend import RadialogV1Backend

#: lmsys/vicuna-7b-v1.3's config.json (LLaMA-1 7B).
VICUNA_7B_V13: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def build_full_size(device: torch.device) -> RadialogV1Backend:
    """Random weights in the real sizes, placed as the loader places them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.models.radialog_v1.loader import LoadedRadialogV1, load_tokenizer
    from workers.models.radialog_v1.model import RadialogV1
    from workers.models.radialog_v1.tiny import corpus
    from workers.models.radialog_v2.classifier import ChexpertClassifier
    from workers.models.tiny_llama import write_llama_tokenizer

    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llama = LlamaForCausalLM(LlamaConfig(**VICUNA_7B_V13)).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.device(device):
        model = RadialogV1(VICUNA_7B_V13["hidden_size"], llama_model=llama)
        classifier = ChexpertClassifier().eval()
    model.place(device, dtype)
    model.eval()
    classifier.to(dtype)
    token_dir = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    write_llama_tokenizer(token_dir, corpus())  # a Llama-like sentencepiece tokenizer (ids < 32000): lengths only
    tokenizer, encoder = load_tokenizer(token_dir)
    return RadialogV1Backend(
        LoadedRadialogV1(
            model, classifier, tokenizer, encoder, None, device, dtype, dtype, "random-full-size", projector="random"
        )
    )


def build_tiny(device: torch.device) -> RadialogV1Backend:
    from workers.models.radialog_v1.backend import load_radialog_v1_backend
    from workers.models.radialog_v1.tiny import make_tiny

    paths = make_tiny(tempfile.mkdtemp(prefix="bench-tiny-radialog-v1-"))
    return load_radialog_v1_backend(paths.root, None, paths.llm_dir, paths.biovil, str(device))


def report_turn() -> Turn:
    report = (
        "The heart is enlarged. There is a small left pleural effusion with adjacent atelectasis. "
        "No pneumothorax. Pulmonary vascular congestion without frank edema. "
    ) * 2
    return Turn(prompts.report_prompt("cardiomegaly, pleural effusion, atelectasis"), report.strip())


def dialog_prompt() -> str:
    """A realistic follow-up: the report turn with a ~100-token report, a yes/no exchange, the findings list."""
    return conversation_prompt([report_turn(), Turn(yes_no_prompt("Pneumothorax"), "No.")], prompts.LIST_FINDINGS)


def equality_prompts() -> list[str]:
    """Mixed lengths: two report prompts, a short and a longer follow-up."""
    short = Turn(prompts.report_prompt("cardiomegaly"), "The heart is enlarged. No effusion.")
    return [
        conversation_prompt([], prompts.report_prompt("no common findings")),
        conversation_prompt([], prompts.report_prompt("cardiomegaly, edema, pleural effusion, support devices")),
        conversation_prompt([short], yes_no_prompt("Edema")),
        dialog_prompt(),
    ]
