"""Model throughput benchmark: the FULL-size RaDialog v2 from configs with random weights (bf16, CUDA), or
the tiny checkpoint through the real loader on CPU (``--tiny``).

    python -m bench.gpu                # full size on cuda: needs ~17 GB of GPU memory
    python -m bench.gpu --tiny         # tiny random model, CPU, through make_tiny + the real loader
    python -m bench.gpu --batch-sizes 1,8,16,32 --new-tokens 100 --json out.json

Measures: load/build time, peak memory, batch-1 report latency (classifier + generation), studies/s and
generated tokens/s at each batch size (every report forced to exactly ``--new-tokens`` tokens with
min_new_tokens, so random weights cannot stop early), the naive one-study-at-a-time path, and a dialog
turn's first-token latency and tokens/s. Random weights give the real model's compute and memory traffic;
text quality is meaningless. Imports only torch, transformers, peft, numpy, pillow and workers.models
(which needs nothing else), so it runs on a GPU machine that has only those.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.generation.streamers import BaseStreamer

from workers.models.base import StudyInput, Turn
from workers.models.conversation import conversation_prompt
from workers.models.prompts import report_prompt, yes_no_prompt
from workers.models.radialog_v2.backend import RadialogV2Backend, load_radialog_v2
from workers.models.radialog_v2.transforms import LLM_CROP, batch_tensors

#: llava-v1.5-7b's Llama fields (config.json of the published base).
LLAVA_7B: dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Radiograph-sized uint8 images (2,048 x 2,500) with some structure, made with numpy only."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:2500, 0:2048].astype(np.float32)
    base = 0.5 + 0.3 * np.sin(x / 90.0) * np.cos(y / 140.0)
    return [np.clip((base + rng.normal(0, 0.05, base.shape)) * 255, 0, 255).astype(np.uint8) for _ in range(n)]


def build_full_size(device: torch.device) -> RadialogV2Backend:
    """The 7B model's architecture with random weights, bf16 LLM + vision tower, fp16 classifier."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.models.radialog_v2.classifier import ChexpertClassifier
    from workers.models.radialog_v2.llava import RadialogLlava
    from workers.models.radialog_v2.loader import LoadedModel
    from workers.models.radialog_v2.tiny import write_tokenizer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            language_model = LlamaForCausalLM(LlamaConfig(**LLAVA_7B)).eval()
            llava = RadialogLlava(language_model).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.device(device):
        classifier = ChexpertClassifier().eval()
    classifier.to(torch.float16 if device.type == "cuda" else torch.float32)
    token_dir = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    write_tokenizer(token_dir)  # a Llama-style sentencepiece tokenizer (ids < 32000): only lengths matter here
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(token_dir), local_files_only=True)
    loaded = LoadedModel(llava, classifier, tokenizer, None, device, dtype,
                         torch.float16 if device.type == "cuda" else torch.float32, "random-full-size")
    return RadialogV2Backend(loaded)


def time_reports(backend: RadialogV2Backend, images: list[np.ndarray], batch: int, new_tokens: int,
                 repeats: int) -> dict[str, float]:
    """Seconds per batch (median) for `batch` studies, each forced to `new_tokens` tokens."""
    device = backend.loaded.device
    studies = [StudyInput(str(i), images[i % len(images)]) for i in range(batch)]
    backend.report(studies, max_new_tokens=4, min_new_tokens=4)  # warm-up (kernels, allocator)
    times = []
    tokens = 0
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        outs = backend.report(studies, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        sync(device)
        times.append(time.perf_counter() - t)
        tokens = sum(o.generated_tokens for o in outs)
    seconds = statistics.median(times)
    return {"batch": batch, "seconds": seconds, "studies_per_s": batch / seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_study": tokens / batch}


def time_naive(backend: RadialogV2Backend, images: list[np.ndarray], n: int, new_tokens: int) -> dict[str, float]:
    """The one-at-a-time path: n studies, each its own report() call."""
    device = backend.loaded.device
    sync(device)
    t = time.perf_counter()
    for i in range(n):
        backend.report([StudyInput(str(i), images[i % len(images)])], max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens)
    sync(device)
    seconds = time.perf_counter() - t
    return {"studies": n, "seconds": seconds, "studies_per_s": n / seconds}


class TokenClock(BaseStreamer):
    """Records when each generated token arrives (token level: random weights may decode to no text)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.numel() == 1:  # one new token for the single sequence (prompt echoes are empty or longer)
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_dialog(backend: RadialogV2Backend, image: np.ndarray, new_tokens: int, repeats: int) -> dict[str, float]:
    """A yes/no follow-up after a ~100-token report: first-token latency and streaming tokens/s.

    Goes through the same path as ``backend.answer`` (prompt, image tokens, streamer) with a token clock.
    """
    history = [Turn(report_prompt("cardiomegaly, pleural effusion"), "The heart is enlarged. " * 20)]
    ids = [backend.prompt_ids(conversation_prompt(history, yes_no_prompt("edema")))]
    first, rates = [], []
    for _ in range(repeats + 1):
        clock = TokenClock()
        start = time.perf_counter()
        backend.llava.generate(
            ids, batch_tensors([image], LLM_CROP), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            eos_token_id=backend.eos_id, pad_token_id=backend.pad_id, streamer=clock, **backend.generate_options,
        )
        sync(backend.loaded.device)
        end = time.perf_counter()
        first.append(clock.times[0] - start)
        rates.append((len(clock.times) - 1) / max(end - clock.times[0], 1e-9))
    return {"first_token_s": statistics.median(first[1:]), "tokens_per_s": statistics.median(rates[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoint through the real loader")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive", type=int, default=8, help="studies for the one-at-a-time path")
    parser.add_argument("--static-cache", action="store_true",
                        help="generate with transformers' static KV cache (compiled decode step on CUDA)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    t = time.perf_counter()
    if args.tiny:
        from workers.models.radialog_v2.tiny import make_tiny

        model_dir, base_dir = make_tiny(tempfile.mkdtemp(prefix="bench-tiny-"))
        backend = load_radialog_v2(model_dir, base_dir, str(device))
        label = "tiny random RaDialog v2 (real loader)"
    else:
        backend = build_full_size(device)
        label = "full-size RaDialog v2 architecture, random weights"
    build_s = time.perf_counter() - t
    if args.static_cache:
        backend.generate_options = {"cache_implementation": "static"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    images = synthetic_images(8)

    results: dict[str, Any] = {
        "model": label, "device": str(device), "dtype": str(backend.loaded.dtype),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "new_tokens": args.new_tokens, "build_s": build_s,
        "static_cache": args.static_cache,
        "weights_gib": sum(p.numel() * p.element_size() for m in (backend.llava, backend.classifier)
                           for p in m.parameters()) / 2**30,
    }
    single = time_reports(backend, images, 1, args.new_tokens, args.repeats)
    results["batch1_report_latency_s"] = single["seconds"]
    results["batches"] = [single] + [
        time_reports(backend, images, b, args.new_tokens, args.repeats)
        for b in (int(x) for x in args.batch_sizes.split(",")) if b != 1
    ]
    results["naive"] = time_naive(backend, images, args.naive, args.new_tokens)
    results["dialog"] = time_dialog(backend, images[0], args.new_tokens, args.repeats)
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    print(f"{label} on {results['gpu'] or device} ({results['dtype']}), torch {torch.__version__}")
    print(f"build {build_s:.1f} s, weights {results['weights_gib']:.2f} GiB"
          + (f", peak memory {results['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in results else ""))
    print(f"batch-1 report latency (classifier + {args.new_tokens} tokens): {single['seconds'] * 1000:.0f} ms")
    print(f"{'batch':>6} {'s/batch':>9} {'studies/s':>10} {'tokens/s':>10}")
    for row in results["batches"]:
        print(f"{row['batch']:>6} {row['seconds']:>9.3f} {row['studies_per_s']:>10.2f} {row['tokens_per_s']:>10.1f}")
    naive = results["naive"]
    print(f"naive one-at-a-time: {naive['studies']} studies in {naive['seconds']:.2f} s = {naive['studies_per_s']:.2f} studies/s")
    dialog = results["dialog"]
    print(f"dialog turn: first token {dialog['first_token_s'] * 1000:.0f} ms, {dialog['tokens_per_s']:.1f} tokens/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
