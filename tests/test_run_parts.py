"""`radialog run` fails loudly when a part cannot start (issue 18): with the DICOM or the API port already
taken by another socket it stops the parts already running and exits non-zero within a bounded time,
saying which part could not start and why; it never carries on without a listener or an API.

Runs the real command in a subprocess (embedded broker, temporary data directory, no model configured:
the worker must never be reached, so the run needs none).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Seconds `radialog run` may take to give up (start-up imports on a busy CI machine included).
BOUND_S = 90


def _radialog_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIALOG_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "RADIALOG_DATA_DIR": str(tmp_path / "var"),
            "RADIALOG_BROKER_URL": "redis://127.0.0.1:1/0",  # nothing there: the embedded broker
            "RADIALOG_DICOM_HOST": "127.0.0.1",
            "RADIALOG_API_HOST": "127.0.0.1",
        }
    )
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "composition.cli", "run", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=BOUND_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = "".join(
            v.decode(errors="replace") if isinstance(v, bytes) else (v or "") for v in (exc.stdout, exc.stderr)
        )
        pytest.fail(f"radialog run was still running after {BOUND_S} s with a part down:\n{output[-3000:]}")
    return result, time.monotonic() - started


@pytest.mark.parametrize("taken", ["DICOM listener", "API"])
def test_radialog_run_exits_when_a_port_is_taken(tmp_path: Path, taken: str) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = str(blocker.getsockname()[1])
        ports = (
            ["--dicom-port", port, "--api-port", "0"]
            if taken == "DICOM listener"
            else ["--dicom-port", "0", "--api-port", port]
        )
        result, seconds = _radialog_run(tmp_path, *ports)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert seconds < BOUND_S
    assert f"Error: radialog run: the {taken} (127.0.0.1:{port}) could not start" in result.stderr, output[-3000:]
    assert "EADDRINUSE" in result.stderr
    assert '"part": "' + taken + '"' in output  # the log line names the part too
    assert "worker starting" not in output and "model loaded" not in output
    if taken == "API":  # the node was up: it is stopped, not left serving
        assert '"msg": "node listening"' in output and '"msg": "part stopped", "part": "DICOM listener"' in output
