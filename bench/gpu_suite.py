"""Every backend's GPU benchmark in one call: the device time of a session is 15 minutes, all calls counted.

Runs ``python -m bench.gpu --profile --json DIR/<backend>.json`` for RaDialog v2, XrayGPT and RaDialog v1,
one process each (the GPU memory of one model is freed before the next is built), each under its share of
a total time budget, most important first. Writes DIR/<backend>.json, DIR/<backend>.log (what it printed)
and DIR/summary.txt / DIR/summary.json (one line per backend: model memory, best studies/s and its batch,
the dialog turn's first token and tokens/s under load, bf16 engine-vs-generate agreement, targets met).
A backend that fails or runs out of time is reported as such and the next one still runs.

    python -m bench.gpu_suite --out gpu-results               # on the GPU machine (about 6-8 minutes)
    python -m bench.gpu_suite --out /tmp/x --tiny --budget 300 -- --device cpu --batch-sizes 1,2 --new-tokens 5 --naive 1   # CPU check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: Most important first: v2 is the product's default backend.
BACKENDS = ("radialog-v2", "xraygpt", "radialog-v1")
#: Each backend's share of the budget (what is left over by an early finisher goes to the next).
SHARES = {"radialog-v2": 0.45, "xraygpt": 0.3, "radialog-v1": 0.25}


def summarise(backend: str, result: dict[str, Any] | None, outcome: str, seconds: float) -> dict[str, Any]:
    """One backend's line: the figures the issue asks for, or why there are none."""
    line: dict[str, Any] = {"backend": backend, "outcome": outcome, "seconds": round(seconds, 1)}
    if result is None:
        return line
    targets = result["targets"]
    best = targets["best_studies_per_s"]
    line.update(
        {
            "gpu": result["gpu"] or result["device"],
            "dtype": result["dtype"],
            "torch": result["torch"],
            "transformers": result["transformers"],
            "model_gib": result["build"]["model_bytes"] / 2**30,
            "naive_studies_per_s": result["naive"]["studies_per_s"],
            "best_studies_per_s": best["value"],
            "best_batch": best["batch"],
            "peak_gib": max((row["peak_bytes"] or 0) for row in result["engine"]) / 2**30,
            "dialog_first_token_ms": result["dialog"]["first_token_s"] * 1000,
            "dialog_tokens_per_s": result["dialog"]["tokens_per_s"],
            "identical_share": result["equality"]["identical_share"],
            "targets_met": {name: v["met"] for name, v in targets.items() if "met" in v},
        }
    )
    return line


def format_line(line: dict[str, Any]) -> str:
    if "model_gib" not in line:
        return f"{line['backend']}: {line['outcome']} after {line['seconds']:.0f} s"
    rate = "-" if line["dialog_tokens_per_s"] is None else f"{line['dialog_tokens_per_s']:.0f}"
    missed = [name for name, met in line["targets_met"].items() if not met]
    return (
        f"{line['backend']} on {line['gpu']} ({line['dtype']}): model {line['model_gib']:.2f} GiB, peak "
        f"{line['peak_gib']:.2f} GiB; naive {line['naive_studies_per_s']:.2f} studies/s, engine best "
        f"{line['best_studies_per_s']:.2f} studies/s at B={line['best_batch']}; dialog under load first token "
        f"{line['dialog_first_token_ms']:.0f} ms, {rate} tokens/s; engine == generate share "
        f"{line['identical_share']:.3f}; targets not met: {', '.join(missed) or 'none'} ({line['seconds']:.0f} s)"
    )


def run_one(backend: str, out: Path, seconds: float, extra: list[str], tiny: bool) -> dict[str, Any]:
    """One backend's benchmark in its own process, cut off after ``seconds``."""
    json_path, log_path = out / f"{backend}.json", out / f"{backend}.log"
    command = [
        sys.executable,
        "-m",
        "bench.gpu",
        "--backend",
        backend,
        "--profile",
        "--json",
        str(json_path),
        *(["--tiny"] if tiny else []),
        *extra,
    ]
    started = time.monotonic()
    with log_path.open("w") as log:
        try:
            code = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, timeout=seconds, check=False
            ).returncode
            outcome = "ok" if code == 0 else f"failed (exit {code}; see {log_path.name})"
        except subprocess.TimeoutExpired:
            outcome = f"ran out of its {seconds:.0f} s (see {log_path.name})"
    took = time.monotonic() - started
    result = json.loads(json_path.read_text()) if outcome == "ok" and json_path.exists() else None
    return summarise(backend, result, outcome, took)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, logs and summary")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all backends together")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoints (a CPU check of the script)")
    parser.add_argument("extra", nargs="*", help="after --: passed to every bench.gpu run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    deadline = time.monotonic() + args.budget
    lines: list[dict[str, Any]] = []
    for i, backend in enumerate(backends):
        left = deadline - time.monotonic()
        later = sum(SHARES[b] for b in backends[i:])
        seconds = left * SHARES[backend] / later
        if seconds < 10:
            lines.append({"backend": backend, "outcome": "not run: no time left", "seconds": 0.0})
        else:
            lines.append(run_one(backend, args.out, seconds, args.extra, args.tiny))
        print(format_line(lines[-1]), flush=True)
    (args.out / "summary.json").write_text(json.dumps(lines, indent=2))
    (args.out / "summary.txt").write_text("\n".join(format_line(line) for line in lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
