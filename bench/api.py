"""API benchmark over real HTTP (uvicorn on a free port): worklist and report reads, and a dialog turn
streamed as Server-Sent Events from a real ``radialog worker`` with the tiny RaDialog checkpoint.

It separates what the API adds from what the model costs: "turn event" is the time from sending the
POST to the API's first event (question checked, turn row committed, Redis subscribed, task sent);
"first token" and "done" include the worker (tiny model on CPU here, so they are not model figures).

    .venv/bin/python -m bench.api [--studies 300] [--reads 100] [--turns 5] [--db URL]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import redis
import uvicorn

from api.app import create_app
from bench.seeding import add_reported_study, add_study, make_keys
from composition.chain import Process, wait_until
from radialog.presence import ready_key
from radialog.registry import Registry, StudyState
from radialog.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/14"


def _summary(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    return (
        f"{name:<22} n={len(ms):<4} median {statistics.median(ms):7.1f} ms   p90 {p90:7.1f} ms   max {ms[-1]:7.1f} ms"
    )


def _stream_turn(http: httpx.Client, study_id: int, question: str) -> tuple[float, float, float, int]:
    start = time.perf_counter()
    turn_at = first_at = None
    tokens = 0
    with http.stream(
        "POST", f"/api/v1/studies/{study_id}/dialog/questions", json={"question": question, "stream": True}, timeout=300
    ) as response:
        response.raise_for_status()
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                now = time.perf_counter() - start
                if event == "turn" and turn_at is None:
                    turn_at = now
                elif event == "token":
                    tokens += 1
                    first_at = first_at if first_at is not None else now
                elif event in ("done", "error"):
                    if event == "error":
                        raise RuntimeError("the worker answered with an error")
                    return turn_at or now, first_at or now, now, tokens
    raise RuntimeError("stream ended without done")


def _dialog_worker(settings: Settings, database_url: str, log_dir: Path, name: str) -> Process:
    """A real ``radialog worker`` serving the ``dialog`` and ``export`` queues, configured for ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIALOG_")}
    env.update(
        {
            "RADIALOG_DATA_DIR": str(settings.data_dir),
            "RADIALOG_DATABASE_URL": database_url,
            "RADIALOG_BROKER_URL": settings.broker_url,
            "RADIALOG_MODEL_DIR": str(settings.model_dir),
            "RADIALOG_BASE_MODEL_DIR": str(settings.base_model_dir),
            "RADIALOG_DEVICE": "cpu",
            "RADIALOG_MIN_FREE_BYTES": "0",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
    )
    return Process(
        name,
        [
            sys.executable,
            "-m",
            "composition.cli",
            "worker",
            "--hostname",
            name,
            "--queues",
            "dialog,export",
            "--no-sweep",
        ],
        env,
        log_dir,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--reads", type=int, default=100)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite WAL in a temp dir)")
    args = parser.parse_args()

    from workers.models.radialog_v2.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_dir, base_dir = make_tiny(tmp_path / "tiny")
        settings = Settings(
            data_dir=tmp_path / "var",
            min_free_bytes=0,
            broker_url=REDIS_URL,
            device="cpu",
            model_dir=model_dir,
            base_model_dir=base_dir,
            database_url=args.db,
        )
        registry = Registry.from_settings(settings)
        keys = make_keys(registry)
        for i in range(args.studies):
            add_study(registry, settings, state=StudyState.QUEUED, index=i + 1)
        study_id = add_reported_study(registry, settings)
        worker_name = f"bench-api-{uuid.uuid4().hex[:8]}"
        worker = _dialog_worker(settings, registry.url, tmp_path, worker_name)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(settings, registry), log_config=None, access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            broker = redis.Redis.from_url(settings.broker_url)
            wait_until(lambda: broker.exists(ready_key(worker_name)), 240, "the dialog worker", check=worker.check)
            broker.close()
            base = f"http://127.0.0.1:{sock.getsockname()[1]}"
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys['rad']}"}) as http:
                for _ in range(5):  # warm-up
                    http.get("/api/v1/studies").raise_for_status()
                results: dict[str, list[float]] = {"GET worklist (50)": [], "GET report": [], "GET image.png": []}
                for _ in range(args.reads):
                    for name, path in (
                        ("GET worklist (50)", "/api/v1/studies?limit=50"),
                        ("GET report", f"/api/v1/studies/{study_id}/report"),
                        ("GET image.png", f"/api/v1/studies/{study_id}/image.png"),
                    ):
                        t0 = time.perf_counter()
                        http.get(path).raise_for_status()
                        results[name].append(time.perf_counter() - t0)
                _stream_turn(http, study_id, "Warm-up question?")
                turn, first, done, tokens = [], [], [], []
                for n in range(args.turns):
                    t, f, d, k = _stream_turn(http, study_id, f"Is there any change {n}?")
                    turn.append(t)
                    first.append(f)
                    done.append(d)
                    tokens.append(k)
            print(
                f"registry: {registry.url.split('@')[-1].split('?')[0]}; {args.studies + 1} studies; "
                f"tiny model on CPU; tokens per answer median {statistics.median(tokens)}"
            )
            for name, values in results.items():
                print(_summary(name, values))
            print(_summary("SSE turn event (API)", turn))
            print(_summary("SSE first token", first))
            print(_summary("SSE done", done))
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            sock.close()
            worker.stop()
            registry.dispose()


if __name__ == "__main__":
    main()
