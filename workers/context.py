"""What one worker process holds: settings, registry, the loaded model, and its heartbeats.

A worker is one process (Celery's ``threads`` pool, or ``solo`` without the engine): the process that
loaded the model runs the tasks, so there is exactly one model per GPU and nothing CUDA-related is ever
forked. With the engine, the model's work happens in the engine's thread; report tasks and dialog turns
hand it requests from their own threads (``workers.engine``). A SIGKILL takes
the whole worker down; its unacknowledged message comes back from Redis after the visibility timeout,
and sooner through the reconciler, which sees the job's registry lease (``Job.heartbeat_at``) expire.

Two heartbeats run in a thread: the lease of the jobs being run (registry) and the worker's readiness
(``radialog.presence``: the Redis key ``radialog:worker:<hostname>``, or a file beside the embedded broker;
JSON provenance, TTL 30 s, refreshed every 10 s), written only once the model is loaded.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import update

from radialog.logging import get_logger
from radialog.messaging import redis_client
from radialog.presence import READY_REFRESH_S, BrokerUnavailable, Presence, presence_for
from radialog.registry import Job, JobState, Registry, utcnow
from radialog.settings import Settings, get_settings
from workers.crashes import Gate

if TYPE_CHECKING:
    from workers.models.base import ModelBackend

log = get_logger(__name__)

#: A RUNNING job whose heartbeat is older than this is taken to have lost its worker.
DEFAULT_LEASE_S = 30.0


def default_hostname(device: str = "cpu") -> str:
    return f"radialog-{device.replace(':', '')}-{os.getpid()}@{socket.gethostname()}"


@dataclass
class WorkerContext:
    """The state of one worker process (one GPU, one model)."""

    settings: Settings
    registry: Registry
    hostname: str
    backend: ModelBackend | None = None
    lease_s: float = DEFAULT_LEASE_S
    active_jobs: set[int] = field(default_factory=set)
    oom_batch_cap: int | None = None
    #: Report batches share the process; a suspect job (see ``workers.crashes``) runs with it to itself.
    gate: Gate = field(default_factory=Gate)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _redis: redis.Redis | None = None
    _presence: Presence | None = None

    @property
    def redis(self) -> redis.Redis | None:
        if self._redis is None:
            self._redis = redis_client(self.settings)
        return self._redis

    def require_backend(self) -> ModelBackend:
        if self.backend is None:
            raise RuntimeError(f"worker {self.hostname} has no model loaded (export-only worker)")
        return self.backend

    # -- batch size under GPU memory pressure ---------------------------------------------------------
    def batch_limit(self, configured: int) -> int:
        """``configured``, or less once a batch ran out of GPU memory in this process."""
        limit = max(1, configured)
        return min(limit, self.oom_batch_cap) if self.oom_batch_cap else limit

    def out_of_memory_at(self, size: int) -> None:
        """A batch of ``size`` did not fit: later batches of this worker stay below it."""
        cap = max(1, size // 2)
        if self.oom_batch_cap is None or cap < self.oom_batch_cap:
            self.oom_batch_cap = cap
            log.warning("out of GPU memory: batch size capped", extra={"worker": self.hostname, "cap": cap})

    # -- leases ----------------------------------------------------------------------------------
    def hold(self, job_ids: list[int]) -> None:
        with self._lock:
            self.active_jobs.update(job_ids)

    def release(self, job_ids: list[int]) -> None:
        with self._lock:
            self.active_jobs.difference_update(job_ids)

    def renew_leases(self) -> None:
        """Move the heartbeat of the jobs this worker is running to now."""
        with self._lock:
            held = sorted(self.active_jobs)
        if not held:
            return
        with self.registry.session() as session:
            session.execute(
                update(Job)
                .where(Job.id.in_(held), Job.state == JobState.RUNNING.value, Job.worker == self.hostname)
                .values(heartbeat_at=utcnow())
            )

    # -- readiness -------------------------------------------------------------------------------
    @property
    def presence(self) -> Presence:
        if self._presence is None:
            self._presence = presence_for(self.settings)
        return self._presence

    def announce_ready(self) -> None:
        """Announce this worker ready (only when a model is loaded), wherever the broker keeps readiness."""
        if self.backend is None:
            return
        info: dict[str, Any] = {
            **self.backend.provenance.to_dict(),
            **self.backend.serving_info(),
            "backend": self.backend.capabilities.backend,
            "hostname": self.hostname,
        }
        self.presence.announce(self.hostname, info)

    def withdraw_ready(self) -> None:
        try:
            self.presence.withdraw(self.hostname)
        except BrokerUnavailable:
            pass

    def start_heartbeats(self) -> None:
        """Start the thread that renews leases and the readiness key until ``stop``."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._beat, name="radialog-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        period = min(READY_REFRESH_S, self.lease_s / 3)
        next_ready = 0.0
        elapsed = 0.0
        while not self._stop.is_set():
            try:
                self.renew_leases()
            except Exception:  # a registry hiccup must not kill the heartbeat thread
                log.warning("lease renewal failed", exc_info=True)
            if elapsed >= next_ready:
                try:
                    self.announce_ready()
                except BrokerUnavailable:
                    log.warning("readiness could not be announced", extra={"worker": self.hostname})
                next_ready = elapsed + READY_REFRESH_S
            self._stop.wait(period)
            elapsed += period

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.withdraw_ready()
        if self._presence is not None:
            self._presence.close()
        if self.backend is not None:
            self.backend.close()


_current: WorkerContext | None = None
_current_lock = threading.Lock()


def install(context: WorkerContext) -> WorkerContext:
    """Make ``context`` the one the tasks of this process use."""
    global _current
    with _current_lock:
        _current = context
    return context


def load(
    settings: Settings,
    *,
    hostname: str | None = None,
    with_model: bool = True,
    lease_s: float = DEFAULT_LEASE_S,
) -> WorkerContext:
    """Open the registry, load the model once (if wanted), start the heartbeats, install the context."""
    registry = Registry.from_settings(settings)
    backend = None
    _preload_task_modules()
    if with_model:
        from workers.engine.backend import with_engine
        from workers.models import load_backend

        backend = with_engine(load_backend(settings), settings)
        log.info("model loaded", extra={"provenance": backend.provenance.to_dict(), **backend.serving_info()})
    context = WorkerContext(
        settings=settings,
        registry=registry,
        hostname=hostname or default_hostname(settings.device),
        backend=backend,
        lease_s=lease_s,
    )
    try:
        context.announce_ready()
    except BrokerUnavailable:
        log.warning("readiness could not be announced", extra={"worker": context.hostname})
    context.start_heartbeats()
    return install(context)


def _preload_task_modules() -> None:
    """Import what the tasks use now, so that the first job does not pay for it."""
    import importlib

    for name in ("radialog.imaging", "reporting.versions", "reporting.export", "workers.dialog"):
        importlib.import_module(name)


def current() -> WorkerContext:
    """The installed context; a process started as plain ``celery worker`` loads one from the env."""
    with _current_lock:
        context = _current
    if context is not None:
        return context
    return load(get_settings())
