"""Full-size parameter counts and memory per part, measured by building the architecture on CPU.

    python -m bench.model_size --backend xraygpt [--json out.json]
    python -m bench.model_size --backend radialog-v1 [--json out.json]

The vision parts (XrayGPT: EVA ViT-g, ln_vision + Q-Former, llama_proj; RaDialog v1: BioViL-T with its
1408-channel projector, ln_vision + Q-Former, img_proj, the findings classifier) are built for real (in
bfloat16, to halve the RAM this needs: counts do not depend on the dtype); the 7B language model is built on
the meta device (its parameters are counted, never materialised: 7B in float32 would be 28 GB). Memory is given
as served on a GPU (XrayGPT: ViT and LLM bf16, ln_vision, Q-Former and llama_proj float32, see
workers/models/xraygpt/model.py; RaDialog v1: LLM, img_proj and classifier float16, BioViL-T and Q-Former float32,
see workers/models/radialog_v1/model.py) and in float32 (CPU). The KV cache per token follows from the LLM's shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def xraygpt_parts() -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.gpu_xraygpt import VICUNA_7B_V1
    from workers.models.xraygpt.model import XrayGPT

    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        vision = XrayGPT(VICUNA_7B_V1["hidden_size"])  # real tensors
    finally:
        torch.set_default_dtype(previous)
    built_s = time.perf_counter() - started
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**VICUNA_7B_V1))
    served = {
        "vision tower (EVA ViT-g, 39 blocks)": 2,
        "ln_vision + Q-Former (32 queries)": 4,
        "llama_proj": 4,
        "language model (Vicuna-7B v1)": 2,
    }
    counts = {
        "vision tower (EVA ViT-g, 39 blocks)": _count(vision.visual_encoder),
        "ln_vision + Q-Former (32 queries)": _count(vision.bridge),
        "llama_proj": _count(vision.llama_proj),
        "language model (Vicuna-7B v1)": _count(llm),
    }
    materialised = sum(p.numel() * p.element_size() for p in vision.parameters())
    return _result("xraygpt", counts, served, llm, built_s, materialised)


def radialog_v1_parts() -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.gpu_radialog_v1 import VICUNA_7B_V13
    from workers.models.radialog_v1.model import RadialogV1
    from workers.models.radialog_v2.classifier import ChexpertClassifier

    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        vision = RadialogV1(VICUNA_7B_V13["hidden_size"])  # real tensors
        classifier = ChexpertClassifier()
    finally:
        torch.set_default_dtype(previous)
    built_s = time.perf_counter() - started
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(**VICUNA_7B_V13))
    names = (
        "vision tower (BioViL-T, 1408 projector)",
        "ln_vision + Q-Former (32 queries)",
        "img_proj",
        "language model (Vicuna-7B v1.3, LoRA merged)",
        "findings classifier (BioViL-T, 488 px)",
    )
    served = dict(zip(names, (4, 4, 2, 2, 2)))
    counts = dict(
        zip(
            names,
            (
                _count(vision.visual_encoder),
                _count(vision.bridge),
                _count(vision.img_proj),
                _count(llm),
                _count(classifier),
            ),
        )
    )
    materialised = sum(p.numel() * p.element_size() for m in (vision, classifier) for p in m.parameters())
    return _result("radialog-v1", counts, served, llm, built_s, materialised)


def _result(
    backend: str,
    counts: dict[str, int],
    served: dict[str, int],
    llm: torch.nn.Module,
    built_s: float,
    materialised: int,
) -> dict[str, Any]:
    parts = [
        {"part": name, "parameters": n, "served_bytes": n * served[name], "float32_bytes": n * 4}
        for name, n in counts.items()
    ]
    config = llm.config
    kv_per_token = (
        2
        * config.num_hidden_layers
        * config.num_key_value_heads
        * (config.hidden_size // config.num_attention_heads)
        * 2
    )
    return {
        "backend": backend,
        "parts": parts,
        "total_parameters": sum(counts.values()),
        "total_served_bytes": sum(p["served_bytes"] for p in parts),
        "total_float32_bytes": sum(p["float32_bytes"] for p in parts),
        "kv_bytes_per_token_bf16": kv_per_token,
        "vision_built_s": built_s,
        "vision_materialised_bytes_bf16": materialised,
        "torch": torch.__version__,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'part':<46} {'parameters':>15} {'GiB served':>11} {'GiB fp32':>9}")
    for p in result["parts"]:
        print(
            f"{p['part']:<46} {p['parameters']:>15,} {p['served_bytes'] / GIB:>11.2f} {p['float32_bytes'] / GIB:>9.2f}"
        )
    print(
        f"{'total':<46} {result['total_parameters']:>15,} {result['total_served_bytes'] / GIB:>11.2f} "
        f"{result['total_float32_bytes'] / GIB:>9.2f}"
    )
    print(
        f"KV cache (16-bit) {result['kv_bytes_per_token_bf16'] / 2**20:.2f} MiB per token; vision parts built for real "
        f"in {result['vision_built_s']:.1f} s ({result['vision_materialised_bytes_bf16'] / GIB:.2f} GiB bf16), "
        "LLM counted on the meta device"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["xraygpt", "radialog-v1"], default="xraygpt")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = radialog_v1_parts() if args.backend == "radialog-v1" else xraygpt_parts()
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
