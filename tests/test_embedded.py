"""`radialog run` without Redis (the embedded default on one machine): the node takes a chest X-ray, the
worker reports it through the embedded SQLite broker, ``/readyz`` sees the ready worker, dialog questions
are answered through the API (stored, then read back; as JSON and as Server-Sent Events), and SIGTERM
stops the whole process as Ctrl-C does."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from composition.chain import Chain, wait_until
from radialog.synthetic import make_cxr

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NO_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1: `radialog run` falls back to its embedded broker


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith(":")]
        if lines:
            event = lines[0].removeprefix("event: ")
            events.append((event, json.loads(lines[1].removeprefix("data: "))))
    return events


def test_embedded_run_is_ready_answers_dialog_and_stops_on_sigterm(
    tmp_path: Path, tiny_model: tuple[Path, Path]
) -> None:
    model_dir, base_dir = tiny_model
    chain = Chain(
        tmp_path / "chain",
        database_url=None,
        redis_url=NO_REDIS,
        model_dir=model_dir,
        base_model_dir=base_dir,
        single_process=True,
        with_orthanc=False,
        flush_redis=False,
        stable_after=1.0,
    )
    with chain:  # start() waits for /readyz: the worker is seen ready without Redis
        [run] = chain.processes
        assert "using the embedded SQLite broker" in run.tail(100_000)
        ready = httpx.get(f"{chain.api_url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["broker"] == "ok" and len(ready.json()["workers"]) == 1

        ds = make_cxr(modality="CR", view_position="PA", patient_index=41, seed=41, rows=256, cols=256)
        path = tmp_path / "pa.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert chain.storescu([path]).returncode == 0
        study = chain.wait_state(str(ds.AccessionNumber), {"REPORTED"}, timeout=300)

        asked = chain.api(
            "POST",
            f"/api/v1/studies/{study['id']}/dialog/questions",
            json={"question": "Is there a pleural effusion?", "wait_seconds": 120},
        )
        assert asked.status_code == 200, asked.text
        turn = asked.json()
        assert turn["state"] == "DONE" and turn["answer"]
        assert chain.api("GET", f"/api/v1/dialog/turns/{turn['id']}").json()["answer"] == turn["answer"]

        streamed = chain.api(
            "POST", f"/api/v1/studies/{study['id']}/dialog/actions", json={"action": "summary", "stream": True}
        )
        assert streamed.status_code == 200, streamed.text
        events = sse_events(streamed.text)
        assert events[0][0] == "turn" and events[-1][0] == "done" and events[-1][1]["answer"], events

        run.popen.send_signal(signal.SIGTERM)
        assert run.popen.wait(timeout=120) == 0, run.tail()
        wait_until(lambda: not chain._api_healthy(), 30, "the API to be gone")
