"""Model benchmark for the serving engine: the naive path against the engine, in one run.

    python -m bench.gpu --json gpu.json          # FULL-size RaDialog v2, random weights, bf16 on CUDA
    python -m bench.gpu --tiny --json tiny.json  # tiny random checkpoint through the real loader, CPU
    python -m bench.gpu --profile                # also: where the time goes at the largest batch
    python -m bench.gpu --backend xraygpt        # the same for XrayGPT (bench/gpu_xraygpt.py)
    python -m bench.gpu --backend radialog-v1    # the same for RaDialog v1 (bench/gpu_radialog_v1.py)

One command prints a table and writes JSON with (1) the model build: seconds and model memory; (2) the
naive path: one study at a time through ``backend.report`` (plain transformers generate); (3) the engine
at each batch size: a stream of 3 x B reports into an engine with B report slots, sustained studies/s and
tokens/s from the first submit to the last result, median first-token latency, peak memory, KV pool size
and the ratio to the naive path; (4) one dialog turn submitted while a full report batch runs: its first
token and its tokens/s; (5) equality: engine tokens against one-at-a-time generation; (6) optionally a
torch.profiler table. Every report and the dialog turn are forced to exactly ``--new-tokens`` tokens
(min = max), so random weights cannot stop early. Random weights give the real model's compute and
memory traffic; the text is meaningless.

Imports only torch, transformers, peft, numpy, pillow, ``workers.models``, ``workers.engine`` and
``radialog.logging``: the GPU machine has nothing else.
"""

from __future__ import annotations

import argparse
import gc
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

from workers.engine import Engine, EngineConfig
from workers.engine.engine import served_model
from workers.models.base import StudyInput, Turn
from workers.models.conversation import conversation_prompt
from workers.models.prompts import IMPRESSION, report_prompt, yes_no_prompt
from workers.models.radialog_v2.backend import RadialogV2Backend, load_radialog_v2

#: llava-v1.5-7b's Llama fields (config.json of the published base).
LLAVA_7B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}
#: Issue 9's targets (full size, one GPU).
TARGETS = {"studies_per_s": 20.0, "dialog_first_token_s": 0.150, "dialog_tokens_per_s": 150.0, "model_gb": 18.0}
GIB = 2**30


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

    from workers.models.llama_tokenizer import SlowLlamaEncoder, decoding_tokenizer
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
    encoder = SlowLlamaEncoder.from_directory(token_dir)
    loaded = LoadedModel(
        llava,
        classifier,
        decoding_tokenizer(token_dir, encoder),
        None,
        device,
        dtype,
        torch.float16 if device.type == "cuda" else torch.float32,
        "random-full-size",
        encoder=encoder,
    )
    return RadialogV2Backend(loaded)


def build(tiny: bool, device: torch.device, backend_name: str = "radialog-v2") -> tuple[Any, str, dict[str, Any]]:
    """The model and its build figures: seconds, and model memory (allocated on CUDA, parameter bytes on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    if backend_name == "radialog-v1":
        from bench import gpu_radialog_v1

        backend = gpu_radialog_v1.build_tiny(device) if tiny else gpu_radialog_v1.build_full_size(device)
        label = (
            "tiny random RaDialog v1 (make_tiny + real loader)"
            if tiny
            else "full-size RaDialog v1 architecture, random weights"
        )
    elif backend_name == "xraygpt":
        from bench import gpu_xraygpt

        backend = gpu_xraygpt.build_tiny(device) if tiny else gpu_xraygpt.build_full_size(device)
        label = (
            "tiny random XrayGPT (make_tiny + real loader)"
            if tiny
            else "full-size XrayGPT architecture, random weights"
        )
    elif tiny:
        from workers.models.radialog_v2.tiny import make_tiny

        model_dir, base_dir = make_tiny(tempfile.mkdtemp(prefix="bench-tiny-"))
        backend = load_radialog_v2(model_dir, base_dir, str(device))
        label = "tiny random RaDialog v2 (make_tiny + real loader)"
    else:
        backend = build_full_size(device)
        label = "full-size RaDialog v2 architecture, random weights"
    sync(device)
    seconds = time.perf_counter() - started
    if backend_name == "xraygpt":
        modules = [backend.model]
    elif backend_name == "radialog-v1":
        modules = [backend.model, backend.classifier]
    else:
        modules = [backend.llava, backend.classifier]
    params = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    buffers = sum(b.numel() * b.element_size() for m in modules for b in m.buffers())
    figures: dict[str, Any] = {"build_s": seconds, "parameter_bytes": params + buffers}
    if device.type == "cuda":
        figures["model_bytes"] = torch.cuda.memory_allocated(device)
        figures["free_after_build_bytes"] = torch.cuda.mem_get_info(device)[0]
    else:
        figures["model_bytes"] = params + buffers
    return backend, label, figures


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# -- naive path --------------------------------------------------------------------------------------
def time_naive(backend: RadialogV2Backend, images: list[np.ndarray], n: int, new_tokens: int) -> dict[str, Any]:
    """The one-at-a-time path: n studies, each its own ``backend.report`` call (plain generate)."""
    device = backend.loaded.device
    backend.report([StudyInput("warm", images[0])], max_new_tokens=2, min_new_tokens=2)
    free_memory(device)
    sync(device)
    started = time.perf_counter()
    tokens = 0
    for i in range(n):
        (out,) = backend.report(
            [StudyInput(str(i), images[i % len(images)])], max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )
        tokens += out.generated_tokens
    sync(device)
    seconds = time.perf_counter() - started
    return {
        "studies": n,
        "seconds": seconds,
        "studies_per_s": n / seconds,
        "tokens_per_s": tokens / seconds,
        "tokens": tokens,
        "peak_bytes": peak_bytes(device),
    }


# -- the engine --------------------------------------------------------------------------------------
def report_slot_len(backend: RadialogV2Backend, new_tokens: int) -> int:
    """Report slot length for ``new_tokens``: the longest report prompt (every label) + new tokens + 1.

    The engine's default uses the backend's report limit, which a random-weights model caps at 32.
    """
    return served_model(backend).longest_report_positions() + new_tokens + 1


def make_engine(backend: RadialogV2Backend, report_slots: int, new_tokens: int, dialog_slots: int = 4) -> Engine:
    config = EngineConfig(
        report_slots=report_slots, dialog_slots=dialog_slots, report_max_len=report_slot_len(backend, new_tokens)
    )
    return Engine(backend, config).start()


def warm_up(engine: Engine, image: np.ndarray, dialog: bool = False) -> None:
    """One short request per path, so first-time kernel choices and allocations are not timed."""
    for handle in engine.submit_reports([image], max_new_tokens=2, min_new_tokens=2):
        handle.result(600)
    if dialog:
        engine.submit_dialog(dialog_prompt_for(engine.backend), image, 2, min_new_tokens=2).result(600)


def submit_stream(engine: Engine, images: list[np.ndarray], count: int, chunk: int, new_tokens: int) -> list:
    """Submit ``count`` reports in chunks (each chunk is resized in this thread while the engine runs)."""
    handles = []
    for start in range(0, count, chunk):
        batch = [images[i % len(images)] for i in range(start, min(count, start + chunk))]
        handles += engine.submit_reports(batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return handles


def pool_figures(engine: Engine) -> dict[str, Any]:
    return {name: {"slots": p.slots, "max_len": p.max_len, "gib": p.nbytes / GIB} for name, p in engine.pools.items()}


def time_engine(
    backend: RadialogV2Backend, images: list[np.ndarray], batch: int, new_tokens: int, naive_rate: float
) -> dict[str, Any]:
    """Sustained throughput of an engine with ``batch`` report slots fed 3 x batch reports."""
    device = backend.loaded.device
    free_memory(device)
    engine = make_engine(backend, batch, new_tokens)
    try:
        warm_up(engine, images[0])
        count = max(3, 3 * batch)
        before = engine.step_count
        sync(device)
        started = time.perf_counter()
        handles = submit_stream(engine, images, count, batch, new_tokens)
        results = [h.result(600) for h in handles]
        seconds = time.perf_counter() - started
        steps = engine.step_count - before
        pools = pool_figures(engine)
    finally:
        engine.stop()
    tokens = sum(len(r.tokens) for r in results)
    first = [r.timings["first_token"] for r in results]
    rate = count / seconds
    row = {
        "batch": batch,
        "studies": count,
        "seconds": seconds,
        "studies_per_s": rate,
        "tokens_per_s": tokens / seconds,
        "tokens": tokens,
        "first_token_median_s": statistics.median(first),
        "first_token_first_wave_s": statistics.median(first[:batch]),
        "decode_steps": steps,
        "peak_bytes": peak_bytes(device),
        "kv_gib": sum(p["gib"] for p in pools.values()),
        "pools": pools,
        "ratio_to_naive": rate / naive_rate if naive_rate else None,
    }
    del engine, handles, results
    free_memory(device)
    return row


# -- dialog under load -------------------------------------------------------------------------------
def dialog_prompt() -> str:
    """A realistic follow-up: the report turn with a ~100-token report, then the impression question."""
    report = (
        "The heart is enlarged. There is a small left pleural effusion with adjacent atelectasis. "
        "No pneumothorax. Pulmonary vascular congestion without frank edema. "
    ) * 2
    history = [
        Turn(report_prompt("cardiomegaly, pleural effusion, atelectasis"), report.strip()),
        Turn(yes_no_prompt("pneumothorax"), "No."),
    ]
    return conversation_prompt(history, IMPRESSION)


def dialog_prompt_for(backend: Any) -> str:
    if backend.capabilities.backend == "radialog-v1":
        from bench import gpu_radialog_v1

        return gpu_radialog_v1.dialog_prompt()
    if backend.capabilities.backend == "xraygpt":
        from bench import gpu_xraygpt

        return gpu_xraygpt.dialog_prompt()
    return dialog_prompt()


def wait_until_full(engine: Engine, since_step: int, timeout: float) -> int:
    """Until every report slot is live and two decode steps ran after ``since_step``; the live reports seen."""
    pool = engine.pools["report"]
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        used = pool.used
        if used == pool.slots and engine.step_count >= since_step + 2:
            return used
        time.sleep(0.002)
    raise TimeoutError("the report pool did not fill")


def time_dialog_under_load(
    backend: RadialogV2Backend, images: list[np.ndarray], batch: int, new_tokens: int
) -> dict[str, Any]:
    """One dialog turn submitted while ``batch`` reports decode: first token and tokens/s of that stream."""
    device = backend.loaded.device
    free_memory(device)
    engine = make_engine(backend, batch, new_tokens)
    callbacks: list[float] = []
    try:
        warm_up(engine, images[0], dialog=True)
        since = engine.step_count
        reports = submit_stream(engine, images, max(3, 3 * batch), batch, new_tokens)
        live_reports = wait_until_full(engine, since, 600)
        prompt = dialog_prompt_for(backend)
        submitted = time.perf_counter()
        handle = engine.submit_dialog(
            prompt,
            images[1],
            new_tokens,
            on_token=lambda _t: callbacks.append(time.perf_counter()),
            min_new_tokens=new_tokens,
        )
        result = handle.result(600)
        unfinished = sum(not h.done() for h in reports)
    finally:
        engine.stop()
    del engine
    free_memory(device)
    tokens = len(result.tokens)
    first, total = result.timings["first_token"], result.timings["total"]
    row = {
        "reports_live": live_reports,
        "reports_unfinished_at_end": unfinished,
        "prompt_tokens": backend.count_tokens(prompt),
        "tokens": tokens,
        "first_token_s": first,
        "tokens_per_s": (tokens - 1) / (total - first) if tokens > 1 else None,
        "callbacks": len(callbacks),
        "first_callback_s": callbacks[0] - submitted if callbacks else None,
        "callback_tokens_per_s": (
            (len(callbacks) - 1) / (callbacks[-1] - callbacks[0])
            if len(callbacks) > 2 and callbacks[-1] > callbacks[0]
            else None
        ),
    }
    return row


# -- equality ----------------------------------------------------------------------------------------
def equality_prompts() -> list[str]:
    """Prompts of mixed length: two report prompts, a short and a longer follow-up."""
    history = [Turn(report_prompt("cardiomegaly"), "The heart is enlarged. No effusion.")]
    return [
        conversation_prompt([], report_prompt("no common findings")),
        conversation_prompt([], report_prompt("cardiomegaly, edema, pleural effusion, support devices")),
        conversation_prompt(history, yes_no_prompt("edema")),
        dialog_prompt(),
    ]


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_equality(backend: RadialogV2Backend, images: list[np.ndarray], new_tokens: int) -> dict[str, Any]:
    """Engine tokens (the prompts batched together, mixed lengths) against ``backend.generate`` one at a time."""
    device = backend.loaded.device
    if backend.capabilities.backend == "radialog-v1":
        from bench import gpu_radialog_v1

        prompts = gpu_radialog_v1.equality_prompts()
    elif backend.capabilities.backend == "xraygpt":
        from bench import gpu_xraygpt

        prompts = gpu_xraygpt.equality_prompts()
    else:
        prompts = equality_prompts()
    pictures = [images[i % len(images)] for i in range(len(prompts))]
    naive = [
        backend.generate([p], [img], new_tokens, min_new_tokens=new_tokens)[0] for p, img in zip(prompts, pictures)
    ]
    free_memory(device)
    engine = make_engine(backend, 2, new_tokens, dialog_slots=len(prompts))
    try:
        handles = [
            engine.submit_dialog(p, img, new_tokens, min_new_tokens=new_tokens) for p, img in zip(prompts, pictures)
        ]
        served = [h.result(600).tokens for h in handles]
    finally:
        engine.stop()
    del engine
    free_memory(device)
    prefixes = [shared_prefix(a, b) for a, b in zip(served, naive)]
    return {
        "prompts": len(prompts),
        "prompt_tokens": [backend.count_tokens(p) for p in prompts],
        "identical_prefix": prefixes,
        "tokens": [len(t) for t in naive],
        "identical_share": sum(prefixes) / max(1, sum(len(t) for t in naive)),
        "all_identical": all(a == b for a, b in zip(served, naive)),
    }


# -- profile -----------------------------------------------------------------------------------------
def profile_engine(
    backend: RadialogV2Backend, images: list[np.ndarray], batch: int, new_tokens: int, iterations: int = 5
) -> dict[str, Any]:
    """torch.profiler over ``iterations`` decode iterations of a full batch, run in this thread (the engine's
    loop body, without its thread): the top 15 ops by self device time (CPU time on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    device = backend.loaded.device
    free_memory(device)
    config = EngineConfig(report_slots=batch, dialog_slots=1, report_max_len=report_slot_len(backend, new_tokens))
    engine = Engine(backend, config)  # not started: this thread runs its iterations
    engine.submit_reports(
        [images[i % len(images)] for i in range(batch)], max_new_tokens=new_tokens, min_new_tokens=new_tokens
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        engine._take_inbox()
        while engine.waiting["report"] or engine.step_count < 3:
            engine._iteration()
        sync(device)
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            for _ in range(iterations):
                engine._iteration()
            sync(device)
            wall_ms = (time.perf_counter() - started) * 1000 / iterations
    on_device = device.type == "cuda"
    events = list(prof.key_averages())

    def self_time(e: Any) -> float:
        if on_device:
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    total = sum(self_time(e) for e in events) or 1.0
    top = sorted(events, key=self_time, reverse=True)[:15]
    del engine
    free_memory(device)
    return {
        "batch": batch,
        "iterations": iterations,
        "iteration_ms": wall_ms,
        "ops_ms": total / 1000 / iterations,
        "clock": "device" if on_device else "cpu",
        "top": [
            {
                "op": e.key,
                "self_ms": self_time(e) / 1000 / iterations,
                "share": self_time(e) / total,
                "calls": e.count // iterations,
            }
            for e in top
        ],
    }


# -- report ------------------------------------------------------------------------------------------
def gb(value: float | None, unit: float = GIB) -> str:
    return "-" if value is None else f"{value / unit:.2f}"


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against this run (meaningful on the full-size model on a GPU only)."""
    best = max(results["engine"], key=lambda r: r["studies_per_s"])
    dialog, model = results["dialog"], results["build"]["model_bytes"]
    return {
        "best_studies_per_s": {
            "value": best["studies_per_s"],
            "batch": best["batch"],
            "target": TARGETS["studies_per_s"],
            "met": best["studies_per_s"] >= TARGETS["studies_per_s"],
        },
        "dialog_first_token_s": {
            "value": dialog["first_token_s"],
            "target": TARGETS["dialog_first_token_s"],
            "met": dialog["first_token_s"] < TARGETS["dialog_first_token_s"],
        },
        "dialog_tokens_per_s": {
            "value": dialog["tokens_per_s"],
            "target": TARGETS["dialog_tokens_per_s"],
            "met": (dialog["tokens_per_s"] or 0) >= TARGETS["dialog_tokens_per_s"],
        },
        "model_gb": {"value": model / 1e9, "target": TARGETS["model_gb"], "met": model / 1e9 <= TARGETS["model_gb"]},
        "identical_share": {"value": results["equality"]["identical_share"]},
    }


def print_results(r: dict[str, Any]) -> None:
    b, naive = r["build"], r["naive"]
    print(
        f"{r['model']} on {r['gpu'] or r['device']} ({r['dtype']}), torch {r['torch']}, transformers {r['transformers']}"
    )
    print(
        f"build {b['build_s']:.1f} s, model memory {gb(b['model_bytes'])} GiB"
        + (f", free after build {gb(b['free_after_build_bytes'])} GiB" if "free_after_build_bytes" in b else "")
    )
    print(f"{r['new_tokens']} new tokens per report (min = max)")
    print(
        f"{'path':<8} {'batch':>5} {'studies':>7} {'studies/s':>10} {'tokens/s':>9} {'1st tok med':>11} "
        f"{'1st wave':>9} {'peak GiB':>9} {'KV GiB':>7} {'x naive':>8}"
    )
    print(
        f"{'naive':<8} {1:>5} {naive['studies']:>7} {naive['studies_per_s']:>10.3f} {naive['tokens_per_s']:>9.1f} "
        f"{'-':>11} {'-':>9} {gb(naive['peak_bytes']):>9} {'-':>7} {1.0:>8.2f}"
    )
    for row in r["engine"]:
        print(
            f"{'engine':<8} {row['batch']:>5} {row['studies']:>7} {row['studies_per_s']:>10.3f} {row['tokens_per_s']:>9.1f} "
            f"{row['first_token_median_s'] * 1000:>9.0f}ms {row['first_token_first_wave_s'] * 1000:>7.0f}ms "
            f"{gb(row['peak_bytes']):>9} {row['kv_gib']:>7.3f} {row['ratio_to_naive']:>8.2f}"
        )
    d = r["dialog"]
    rate = "-" if d["tokens_per_s"] is None else f"{d['tokens_per_s']:.1f}"
    print(
        f"dialog turn beside {d['reports_live']} live reports ({d['prompt_tokens']} prompt tokens): first token "
        f"{d['first_token_s'] * 1000:.0f} ms, {d['tokens']} tokens at {rate} tokens/s"
        + (f" (first text callback {d['first_callback_s'] * 1000:.0f} ms)" if d["first_callback_s"] is not None else "")
    )
    e = r["equality"]
    print(
        f"equality, {e['prompts']} prompts ({e['prompt_tokens']} positions) batched in the engine vs one-at-a-time "
        f"generate: identical prefix {e['identical_prefix']} of {e['tokens']} tokens, share {e['identical_share']:.3f}"
    )
    note = "" if r["device"].startswith("cuda") and not r["tiny"] else "  [tiny/CPU run: targets do not apply]"
    print("targets:" + note)
    for name, v in r["targets"].items():
        target = f" (target {v['target']})" if "target" in v else ""
        met = "" if "met" not in v else ("  met" if v["met"] else "  NOT met")
        value = "-" if v["value"] is None else f"{v['value']:.3f}"
        print(f"  {name}: {value}{target}{met}")
    prof = r.get("profile")
    if prof:
        print(
            f"profile, batch {prof['batch']}: {prof['iteration_ms']:.2f} ms per iteration (wall), ops' self "
            f"{prof['clock']} time {prof['ops_ms']:.2f} ms; top 15 ({'ms/iter':>8}, share, calls/iter):"
        )
        for op in prof["top"]:
            print(f"  {op['self_ms']:>9.3f} {op['share'] * 100:>5.1f}% {op['calls']:>6}  {op['op']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoint through the real loader")
    parser.add_argument("--backend", choices=["radialog-v2", "radialog-v1", "xraygpt"], default="radialog-v2")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch-sizes", default=None, help="default 1,8,16,32,64 (tiny: 1,4,8)")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument(
        "--naive", type=int, default=None, help="studies for the one-at-a-time path (default 4; tiny 3)"
    )
    parser.add_argument(
        "--equality-tokens", type=int, default=None, help="tokens per equality prompt (default --new-tokens)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler over a few iterations at the largest batch"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.new_tokens < 5:  # the dialog-under-load step needs reports still decoding when it submits the turn
        parser.error("--new-tokens: at least 5")
    args.batch_sizes = [int(x) for x in (args.batch_sizes or ("1,4,8" if args.tiny else "1,8,16,32,64")).split(",")]
    args.naive = args.naive or (3 if args.tiny else 4)
    args.equality_tokens = args.equality_tokens or args.new_tokens
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-able results."""
    import transformers

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend, label, build_figures = build(args.tiny, device, args.backend)
    images = synthetic_images(8)
    results: dict[str, Any] = {
        "model": label,
        "backend": args.backend,
        "tiny": args.tiny,
        "device": str(device),
        "dtype": str(backend.loaded.dtype),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "build": build_figures,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    results["naive"] = naive = time_naive(backend, images, args.naive, args.new_tokens)
    results["engine"] = [
        time_engine(backend, images, b, args.new_tokens, naive["studies_per_s"]) for b in args.batch_sizes
    ]
    results["dialog"] = time_dialog_under_load(backend, images, max(args.batch_sizes), args.new_tokens)
    results["equality"] = check_equality(backend, images, args.equality_tokens)
    results["profile"] = (
        profile_engine(backend, images, max(args.batch_sizes), args.new_tokens) if args.profile else None
    )
    results["targets"] = verdicts(results)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - started
    print_results(results)
    print(f"wall {results['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
