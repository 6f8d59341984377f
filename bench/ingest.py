"""C-STORE ingest benchmark: our node vs dcmtk ``storescp`` vs Orthanc, same files, same client.

Generates N ~10 MB CR files with /work/shared/tools/make_cxr.py (or uses ``--files DIR``), then sends
them with one dcmtk ``storescu`` association to each receiver, in alternating order over a few rounds:

* ``node``     -- ``radialog node`` as its own process: fsync + atomic rename + registry (SQLite, WAL,
  synchronous=FULL) commit before every Success;
* ``storescp`` -- dcmtk's storescp writing to a temp directory (no fsync);
* ``orthanc``  -- Debian's Orthanc with a temporary configuration on free ports.

Prints images/s and MB/s per receiver (sum over rounds) and our ratio to each. Every receiver starts
fresh for every round (new data directory), so no send is a duplicate.

    .venv/bin/python -m bench.ingest [--n 40] [--rounds 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from composition.chain import free_port

MAKE_CXR = Path("/work/shared/tools/make_cxr.py")
AE_TITLE = "RADIALOG"


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def run_node(work: Path) -> Iterator[tuple[str, int]]:
    """``radialog node`` in its own process with a fresh data directory (SQLite registry)."""
    env = dict(
        os.environ,
        RADIALOG_DATA_DIR=str(work / "var"),
        RADIALOG_MIN_FREE_BYTES="0",
        RADIALOG_STABLE_AFTER="3600",
        RADIALOG_DICOM_HOST="127.0.0.1",
        RADIALOG_LOG_LEVEL="WARNING",
    )
    port = free_port()
    radialog = Path(sys.executable).with_name("radialog")
    proc = subprocess.Popen(
        [str(radialog), "node", "--port", str(port), "--no-enqueue"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield AE_TITLE, port
    finally:
        stop_process(proc)


@contextmanager
def run_storescp(work: Path) -> Iterator[tuple[str, int]]:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield "STORESCP", port
    finally:
        stop_process(proc)


@contextmanager
def run_orthanc(work: Path) -> Iterator[tuple[str, int]]:
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(work / "orthanc-storage"),
        "IndexDirectory": str(work / "orthanc-index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
    }
    config_path = work / "orthanc.json"
    config_path.write_text(json.dumps(config))
    proc = subprocess.Popen(["Orthanc", str(config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        wait_port(dicom_port)
        yield "ORTHANC", dicom_port
    finally:
        stop_process(proc, timeout=30)


RECEIVERS: dict[str, Callable[[Path], contextmanager]] = {  # type: ignore[type-arg]
    "node": run_node,
    "storescp": run_storescp,
    "orthanc": run_orthanc,
}


def send(files: list[Path], ae_title: str, port: int) -> float:
    """Seconds for one storescu association carrying every file; fails unless every store succeeded."""
    started = time.perf_counter()
    result = subprocess.run(
        ["storescu", "-v", "-aet", "BENCH", "-aec", ae_title, "127.0.0.1", str(port), *map(str, files)],
        check=False,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    successes = len(re.findall(r"Received Store Response \(Success\)", result.stdout + result.stderr))
    if result.returncode != 0 or successes != len(files):
        raise RuntimeError(
            f"storescu: rc {result.returncode}, {successes}/{len(files)} Success\n{result.stderr[-2000:]}"
        )
    return elapsed


def make_files(directory: Path, n: int) -> list[Path]:
    subprocess.run([sys.executable, str(MAKE_CXR), str(directory), str(n)], check=True)
    return sorted(directory.glob("*.dcm"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="number of ~10 MB CR files")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=Path, help="use these .dcm files instead of generating")
    parser.add_argument("--receivers", default="node,storescp,orthanc")
    args = parser.parse_args(argv)
    names = [r.strip() for r in args.receivers.split(",") if r.strip()]
    with tempfile.TemporaryDirectory(prefix="radialog-bench-") as tmp:
        root = Path(tmp)
        files = sorted(args.files.glob("*.dcm")) if args.files else make_files(root / "files", args.n)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} files, {megabytes:.1f} MB, {os.cpu_count()} CPUs, {args.rounds} rounds")
        totals = {name: 0.0 for name in names}
        for rnd in range(args.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                work = root / f"{name}-{rnd}"
                work.mkdir()
                with RECEIVERS[name](work) as (ae_title, port):
                    seconds = send(files, ae_title, port)
                totals[name] += seconds
                shutil.rmtree(work, ignore_errors=True)
                print(
                    f"round {rnd + 1} {name:9s} {seconds:6.2f} s  {len(files) / seconds:6.1f} img/s  "
                    f"{megabytes / seconds:7.1f} MB/s"
                )
        print("\nreceiver   img/s     MB/s   (all rounds)")
        rate = {}
        for name in names:
            seconds = totals[name]
            rate[name] = len(files) * args.rounds / seconds
            print(f"{name:9s} {rate[name]:6.1f}  {megabytes * args.rounds / seconds:7.1f}")
        if "node" in rate:
            for other in names:
                if other != "node":
                    print(f"node / {other}: {rate['node'] / rate[other]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
