"""Hostile HTTP clients against a real `radialog run` (node + worker + exporter + API in one process, the tiny
model, the embedded broker) started under a file-descriptor limit like a default Linux login: the soft limit
is --nofile (1,024; the hard one stays, as under systemd's 1,024 / 524,288), or both with --hard.

1. half-sent requests: N connections each send an incomplete request head and then nothing; while they
   are open, every 2 s a legitimate API call (authenticated worklist), /healthz and a C-ECHO to the node,
   plus one C-STORE, each with a 10 s timeout; the server's open descriptors, RSS and log volume sampled;
2. a huge body without a key: a POST announcing 200 MB, streamed until the server answers or closes.

Loopback only, bounded counts. Prints one JSON object (and writes it with --out).

    .venv/bin/python -m bench.hostile_http [--connections 1000] [--hold 40] [--nofile 1024 [--hard]] [--tree DIR]

``--tree`` runs the server from another checkout (e.g. the commit before a fix) with this one's venv.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from composition.chain import free_port

ROOT = Path(__file__).resolve().parents[1]
HALF_SENT = b"GET /api/v1/studies HTTP/1.1\r\nHost: radialog\r\nUser-Agent: slow"


def proc_stats(pid: int) -> dict[str, int]:
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "rss_mb": rss_kb // 1024}


def timed(fn: Any) -> tuple[bool, float]:
    start = time.monotonic()
    try:
        ok = bool(fn())
    except (httpx.HTTPError, OSError, RuntimeError, ValueError):  # the probe failed
        ok = False
    return ok, round(time.monotonic() - start, 3)


class Target:
    def __init__(
        self,
        tree: Path,
        workdir: Path,
        nofile: int,
        hard: bool,
        model: tuple[Path, Path],
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.tree = tree
        self.api_port, self.dicom_port = free_port(), free_port()
        self.log_path = workdir / "run.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RADIALOG_")}
        self.env.update(
            {
                "PYTHONPATH": str(tree),
                "RADIALOG_DATA_DIR": str(workdir / "var"),
                "RADIALOG_BROKER_URL": "redis://127.0.0.1:1/0",  # nothing there: the embedded broker
                "RADIALOG_API_HOST": "127.0.0.1",
                "RADIALOG_API_PORT": str(self.api_port),
                "RADIALOG_DICOM_HOST": "127.0.0.1",
                "RADIALOG_DICOM_PORT": str(self.dicom_port),
                "RADIALOG_MIN_FREE_BYTES": "0",
                "RADIALOG_MODEL_DIR": str(model[0]),
                "RADIALOG_BASE_MODEL_DIR": str(model[1]),
                "RADIALOG_DEVICE": "cpu",
                "RADIALOG_STABLE_AFTER": "1",
                **(extra_env or {}),
            }
        )
        self.key = self._radialog("users", "create", "bench", "--role", "reader").strip()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    "bash",
                    "-c",
                    f'ulimit {"-n" if hard else "-Sn"} {nofile} && exec "$@"',
                    "bash",
                    sys.executable,
                    "-m",
                    "composition.cli",
                    "run",
                ],
                cwd=tree,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{self.api_port}"

    def _radialog(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "composition.cli", *args],
            cwd=self.tree,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"radialog run exited:\n{self.log_path.read_text()[-3000:]}")
            if timed(self.echo)[0] and timed(self.api_call)[0]:
                return
            time.sleep(0.5)
        raise TimeoutError("radialog run not ready")

    def api_call(self) -> bool:
        return httpx.get(f"{self.url}/api/v1/studies", headers={"X-API-Key": self.key}, timeout=10).status_code == 200

    def healthz(self) -> bool:
        return httpx.get(f"{self.url}/healthz", timeout=10).status_code == 200

    # The DICOM probes run as dcmtk processes: this one holds over a thousand sockets, and pynetdicom's
    # select() cannot watch a descriptor numbered 1,024 or above.
    def echo(self) -> bool:
        return (
            subprocess.run(
                [
                    "echoscu",
                    "-to",
                    "10",
                    "-ta",
                    "10",
                    "-td",
                    "10",
                    "-aet",
                    "BENCH",
                    "-aec",
                    "RADIALOG",
                    "127.0.0.1",
                    str(self.dicom_port),
                ],
                check=False,
                capture_output=True,
                timeout=60,
            ).returncode
            == 0
        )

    def store(self) -> bool:
        from radialog.synthetic import make_cxr

        path = self.log_path.parent / "probe.dcm"
        make_cxr(rows=256, cols=256, patient_index=90, seed=90).save_as(path, enforce_file_format=True)
        return (
            subprocess.run(
                [
                    "storescu",
                    "-to",
                    "10",
                    "-ta",
                    "10",
                    "-td",
                    "10",
                    "-aet",
                    "BENCH",
                    "-aec",
                    "RADIALOG",
                    "127.0.0.1",
                    str(self.dicom_port),
                    str(path),
                ],
                check=False,
                capture_output=True,
                timeout=60,
            ).returncode
            == 0
        )

    def log_size(self) -> tuple[int, int]:
        data = self.log_path.read_bytes()
        return data.count(b"\n"), len(data)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def half_sent(target: Target, connections: int, hold: float) -> dict[str, Any]:
    lines0, bytes0 = target.log_size()
    socks: list[socket.socket] = []
    opened = refused = 0
    start = time.monotonic()
    for _ in range(connections):
        try:
            sock = socket.create_connection(("127.0.0.1", target.api_port), timeout=5)
            sock.sendall(HALF_SENT)
            socks.append(sock)
            opened += 1
        except OSError:
            refused += 1
    open_s = round(time.monotonic() - start, 2)
    probes: list[dict[str, Any]] = []
    peak = proc_stats(target.proc.pid)
    stored = None
    end = time.monotonic() + hold
    while time.monotonic() < end and target.proc.poll() is None:
        api_ok, api_s = timed(target.api_call)
        health_ok, health_s = timed(target.healthz)
        echo_ok, echo_s = timed(target.echo)
        if stored is None:
            stored = timed(target.store)
        stats = proc_stats(target.proc.pid)
        peak = {k: max(peak[k], v) for k, v in stats.items()}
        probes.append({"api": [api_ok, api_s], "healthz": [health_ok, health_s], "echo": [echo_ok, echo_s], **stats})
        time.sleep(2)
    closed = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            sock.recv(1, socket.MSG_PEEK)
            closed += 1  # an answer (408/503) or the end of the stream
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        sock.close()
    lines1, bytes1 = target.log_size()
    api_times = [p["api"][1] for p in probes if p["api"][0]]
    return {
        "connections": connections,
        "opened": opened,
        "refused_at_connect": refused,
        "open_s": open_s,
        "hold_s": hold,
        "probes": len(probes),
        "api_ok": sum(p["api"][0] for p in probes),
        "healthz_ok": sum(p["healthz"][0] for p in probes),
        "echo_ok": sum(p["echo"][0] for p in probes),
        "store_ok": bool(stored and stored[0]),
        "api_s_max": max(api_times, default=None),
        "api_s_median": sorted(api_times)[len(api_times) // 2] if api_times else None,
        "closed_by_server": closed,
        "peak_fds": peak["fds"],
        "peak_rss_mb": peak["rss_mb"],
        "log_lines": lines1 - lines0,
        "log_bytes": bytes1 - bytes0,
        "alive": target.proc.poll() is None,
    }


def huge_body(target: Target, megabytes: int = 200) -> dict[str, Any]:
    before = proc_stats(target.proc.pid)["rss_mb"]
    sock = socket.create_connection(("127.0.0.1", target.api_port), timeout=30)
    sock.sendall(
        f"POST /api/v1/studies/1/report/versions HTTP/1.1\r\nHost: radialog\r\nContent-Type: "
        f"application/json\r\nContent-Length: {megabytes * 1024 * 1024}\r\n\r\n".encode()
    )
    chunk = b" " * (1024 * 1024)
    sent = 0
    sock.setblocking(False)
    answer = b""
    start = time.monotonic()
    while sent < megabytes and time.monotonic() - start < 120:
        try:
            answer += sock.recv(65536)
            break
        except BlockingIOError:
            pass
        except OSError:
            break
        try:
            sock.sendall(chunk)
            sent += 1
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            break
    sock.settimeout(30)
    try:
        answer += sock.recv(65536)
    except OSError:
        pass
    sock.close()
    after = proc_stats(target.proc.pid)["rss_mb"]
    return {
        "announced_mb": megabytes,
        "sent_mb_before_answer": sent,
        "status": answer[:12].decode(errors="replace"),
        "rss_before_mb": before,
        "rss_after_mb": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=40.0, help="seconds the half-sent requests stay open")
    parser.add_argument("--nofile", type=int, default=1024, help="soft RLIMIT_NOFILE of the server process")
    parser.add_argument("--hard", action="store_true", help="make --nofile the hard limit too (no raising it)")
    parser.add_argument("--tree", type=Path, default=ROOT, help="source tree to run the server from")
    parser.add_argument(
        "--env", action="append", default=[], metavar="RADIALOG_X=VALUE", help="a setting for the server (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from workers.models.radialog_v2.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        extra = dict(item.split("=", 1) for item in args.env)
        target = Target(args.tree.resolve(), work, args.nofile, args.hard, make_tiny(work / "tiny"), extra)
        try:
            target.wait_ready()
            result: dict[str, Any] = {
                "target": "radialog run (embedded broker, tiny model)",
                "nofile": args.nofile,
                "hard": args.hard,
                "env": extra,
                "baseline": proc_stats(target.proc.pid),
            }
            result["half_sent"] = half_sent(target, args.connections, args.hold)
            if target.proc.poll() is None:
                time.sleep(2)
                result["after_attack"] = {"api": timed(target.api_call), "echo": timed(target.echo)}
                result["huge_body_without_key"] = huge_body(target)
        finally:
            result_code = target.stop()
            if args.out:  # the server's own log, for what it said during the attack
                args.out.with_suffix(".server.log").write_bytes(target.log_path.read_bytes())
        result["exit_code_after_sigterm"] = result_code
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
