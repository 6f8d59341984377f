"""XrayGPT for bench/gpu.py: the full-size architecture with random weights, the tiny set through the real
loader, and the prompts the benchmark times (``python -m bench.gpu --backend xraygpt``).

Full size = what ``xraygpt.yaml`` builds: EVA-CLIP ViT-g (39 blocks, 224 px), the bert-base Q-Former with
32 queries, llama_proj 768 -> 4096 and Vicuna-7B v1 (LLaMA-1: 32 layers, hidden 4096, 2,048 positions).
Imports only torch, transformers, numpy, pillow and ``workers.models``: the GPU machine has nothing else.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from workers.models.base import Turn
from workers.models.xraygpt import prompts
from workers.models.xraygpt.backend import XrayGPTBackend

#: Vicuna-7B v1's config.json (LLaMA-1 7B; the XrayGPT "Vicuna_Radiology_fp16" fine-tune keeps it).
VICUNA_7B_V1: dict[str, Any] = {
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


def build_full_size(device: torch.device) -> XrayGPTBackend:
    """Random weights in the real sizes: ViT and LLM in bf16 on CUDA (float32 on CPU), ln_vision, Q-Former and
    llama_proj in float32, as the loader places them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.models.common.llama import load_tokenizer
    from workers.models.xraygpt.loader import REFERENCE_LEGACY, LoadedXrayGPT
    from workers.models.xraygpt.model import XrayGPT
    from workers.models.xraygpt.tiny import write_tokenizer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llama = LlamaForCausalLM(LlamaConfig(**VICUNA_7B_V1)).eval()
            model = XrayGPT(VICUNA_7B_V1["hidden_size"], llama_model=llama)
    finally:
        torch.set_default_dtype(previous)
    model.place(device, dtype)
    model.eval()
    token_dir = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    write_tokenizer(token_dir)  # a Llama-like sentencepiece tokenizer (ids < 32000): only lengths matter here
    tokenizer, encoder = load_tokenizer(token_dir, legacy=REFERENCE_LEGACY)
    return XrayGPTBackend(LoadedXrayGPT(model, tokenizer, encoder, None, device, dtype, "random-full-size"))


def build_tiny(device: torch.device) -> XrayGPTBackend:
    from workers.models.xraygpt.backend import load_xraygpt_backend
    from workers.models.xraygpt.tiny import make_tiny

    paths = make_tiny(tempfile.mkdtemp(prefix="bench-tiny-xraygpt-"))
    return load_xraygpt_backend(paths.vision_dir, paths.llm_dir, paths.checkpoint, str(device))


def report_turn() -> Turn:
    report = (
        "The heart is enlarged. There is a small left pleural effusion with adjacent atelectasis. "
        "No pneumothorax. Pulmonary vascular congestion without frank edema. "
    ) * 2
    return Turn(prompts.REPORT_QUESTION, report.strip())


def dialog_prompt() -> str:
    """A realistic follow-up: the report turn with a ~100-token report, a yes/no exchange, the impression."""
    return prompts.conversation_prompt([report_turn(), Turn("Is there a pneumothorax?", "No.")], prompts.IMPRESSION)


def equality_prompts() -> list[str]:
    """Mixed lengths: the report prompt, a short and a longer follow-up."""
    short = Turn(prompts.REPORT_QUESTION, "The heart is enlarged. No effusion.")
    return [
        prompts.conversation_prompt([], prompts.REPORT_QUESTION),
        prompts.conversation_prompt([short], prompts.KEY_FINDINGS),
        prompts.conversation_prompt([short], "Is there any edema?"),
        dialog_prompt(),
    ]
