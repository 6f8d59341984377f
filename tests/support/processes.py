"""Subprocesses in tests: one harness with its log file, a clean stop, and the product's environment.

It is the product's own ``composition.chain.Process`` (log file, own process group, SIGTERM then SIGKILL),
which the local chain and ``radialog demo`` use, with what tests add: a crash on demand (``kill``), waiting for a
line in the log, and a ``radialog worker`` that is ready when its readiness key is in Redis.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import redis

from composition.chain import Process as ChainProcess
from radialog.presence import ready_key
from radialog.settings import Settings
from tests.support.polling import wait_for

REPO = Path(__file__).resolve().parents[2]


def radialog_env(values: Mapping[str, object], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a product subprocess: ``base`` (default ``os.environ``) without any ``RADIALOG_*``
    variable, then ``values`` (full ``RADIALOG_*`` names) and ``PYTHONPATH`` at this checkout."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("RADIALOG_")}
    env.update({k: str(v) for k, v in values.items()})
    env["PYTHONPATH"] = str(REPO)
    return env


class Process(ChainProcess):
    """One subprocess, its stdout and stderr in ``log_dir/<name>.log``; ``stop()`` ends it (and its group)."""

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.popen

    @property
    def log(self) -> Path:
        return self.log_path

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def last_lines(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL to the process alone, as a crash would end it (no cleanup, nothing flushed)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def wait_for_output(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first match of ``pattern`` in the log; fails when the process exits or time runs out first."""

        def exited() -> None:
            if self.popen.poll() is not None and not re.search(pattern, self.output()):
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}):\n{self.last_lines()}")

        return wait_for(
            lambda: re.search(pattern, self.output()),
            what=f"{pattern!r} in {self.name}'s log",
            timeout=timeout,
            check=exited,
            details=self.last_lines,
        )


def radialog_process(
    name: str, args: Sequence[str], env: Mapping[str, str], log_dir: Path, module: str = "composition.cli"
) -> Process:
    """``radialog <args>`` (``python -m <module>``, the CLI or a test launcher that ends in it)."""
    return Process(name, [sys.executable, "-m", module, *args], dict(env), log_dir)


class WorkerProcess(Process):
    """A real ``radialog worker --hostname <name>``; ready once its readiness key (model loaded) is in Redis."""

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        log_dir: Path,
        *,
        broker_url: str,
        args: Sequence[str] = ("--no-sweep",),
        module: str = "composition.cli",
    ) -> None:
        self.broker_url = broker_url
        super().__init__(name, [sys.executable, "-m", module, "worker", "--hostname", name, *args], dict(env), log_dir)

    def is_ready(self) -> bool:
        client = redis.Redis.from_url(self.broker_url)
        try:
            return bool(client.exists(ready_key(self.name)))
        finally:
            client.close()

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"worker {self.name} exited ({self.popen.returncode}):\n{self.last_lines()}")

    def wait_ready(self, timeout: float = 240.0) -> None:
        wait_for(
            self.is_ready,
            what=f"worker {self.name} ready",
            timeout=timeout,
            interval=0.2,
            check=self.check,
            details=self.last_lines,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop it, and drop its readiness key: a killed worker leaves it until the TTL, and the next test counts."""
        super().stop(timeout)
        client = redis.Redis.from_url(self.broker_url)
        try:
            client.delete(ready_key(self.name))
        finally:
            client.close()


def dialog_worker(settings: Settings, database_url: str, log_dir: Path, name: str) -> WorkerProcess:
    """A worker on the ``dialog`` and ``export`` queues for ``settings`` (the API tests' model and broker)."""
    env = radialog_env(
        {
            "RADIALOG_DATA_DIR": settings.data_dir,
            "RADIALOG_DATABASE_URL": database_url,
            "RADIALOG_BROKER_URL": settings.broker_url,
            "RADIALOG_MODEL_DIR": settings.model_dir,
            "RADIALOG_BASE_MODEL_DIR": settings.base_model_dir,
            "RADIALOG_DEVICE": "cpu",
            "RADIALOG_MIN_FREE_BYTES": 0,
        }
    )
    return WorkerProcess(
        name, env, log_dir, broker_url=settings.broker_url, args=("--queues", "dialog,export", "--no-sweep")
    )
