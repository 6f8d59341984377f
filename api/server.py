"""The API's HTTP server: uvicorn with the limits it lacks against slow or idle clients.

uvicorn times out only idle keep-alive connections (``timeout_keep_alive``, disarmed by the first byte
of the next request) and has no limit on open connections (``limit_concurrency`` answers 503 once a
request head is complete, which a half-sent request never is). Left so, a client that connects and
sends a few bytes holds a socket forever; a thousand of them exhaust the process's file descriptors,
and in ``radialog run`` that takes the DICOM node and the worker down with the API. Here:

- a request deadline: from the connection's first moment, or from the end of the previous response
  once the client sends again, the whole request (head and body) must arrive within
  ``api_request_timeout`` seconds; otherwise the connection gets 408 (before a head) and is closed;
- a connection cap below the file-descriptor limit (``api_max_connections``, with ``FD_RESERVE``
  descriptors kept for the rest of the process and room for the accepts in flight, after the soft limit is
  raised to the hard one; a small listen backlog bounds how many asyncio accepts at once): a new
  connection beyond it closes the oldest connection that is idle or still sending its request, or, when
  every connection has a request in progress, is answered 503 and closed itself. A client that sends its
  request promptly therefore always gets in, however many half-sent requests are open;
- no log flood: closed and refused connections are counted and logged as one summary line a minute;
  asyncio's "accept() out of system resource" (EMFILE: one per failed accept of a backlog, with a stack
  trace) once a minute; uvicorn's and asyncio's own warnings (a malformed request is one line each) at
  most once a minute per message, with the count of those dropped.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from radialog.logging import get_logger
from radialog.settings import Settings

log = get_logger(__name__)

#: File descriptors kept free for everything else in the process (registry, broker, DICOM node, model files).
FD_RESERVE = 256
#: The listen backlog is also how many connections asyncio accepts in one go (one descriptor each) before
#: any protocol runs: a new connection is capped only a few loop turns after its accept(), so up to
#: ACCEPT_TURNS backlogs of descriptors can be open beyond the cap for a moment. The backlog is therefore
#: sized from the descriptors left (uvicorn's default, 2,048, would overrun a 1,024 limit by itself).
ACCEPT_TURNS = 4
MIN_BACKLOG, MAX_BACKLOG = 64, 1024
#: Highest soft RLIMIT_NOFILE we ask for (the hard limit may be in the millions; this is plenty).
FD_WANTED = 65536
#: select() cannot watch a descriptor numbered FD_SETSIZE (1,024 on Linux) or above. pynetdicom watches its
#: sockets with select(), so in a process that also runs the DICOM node or the exporter (``radialog run``)
#: every descriptor must stay below it: the cap is sized from this ceiling there, whatever the rlimit.
SELECT_FD_LIMIT = 1024
SUMMARY_INTERVAL_S = 60.0
TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
BUSY_RESPONSE = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n"


def raise_fd_limit(wanted: int = FD_WANTED) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            log.warning("file-descriptor limit could not be raised", extra={"soft": soft, "hard": hard})
    return soft


def connection_limits(configured: int, fd_soft_limit: int) -> tuple[int, int]:
    """(connection cap, listen backlog): the cap is ``configured`` or fewer (at least 16), so that the cap,
    the accepts in flight (``ACCEPT_TURNS`` x backlog) and ``FD_RESERVE`` fit in the descriptor limit."""
    spare = fd_soft_limit - FD_RESERVE - configured
    backlog = max(MIN_BACKLOG, min(MAX_BACKLOG, spare // ACCEPT_TURNS))
    return max(16, min(configured, fd_soft_limit - FD_RESERVE - ACCEPT_TURNS * backlog)), backlog


@dataclass
class Guard:
    """The limits and counters shared by every connection of one server (used in its event loop only)."""

    request_timeout: float
    max_connections: int
    counts: dict[str, int] = field(default_factory=lambda: {"timed_out": 0, "evicted": 0, "refused": 0})
    _last_summary: float = field(default_factory=time.monotonic)

    def note(self, what: str) -> None:
        self.counts[what] += 1
        now = time.monotonic()
        if now - self._last_summary >= SUMMARY_INTERVAL_S:
            self.summary(now)

    def summary(self, now: float | None = None) -> None:
        if any(self.counts.values()):
            log.warning(
                "HTTP connections closed by the server's limits",
                extra={
                    **self.counts,
                    "since_s": round((now or time.monotonic()) - self._last_summary),
                    "request_timeout_s": self.request_timeout,
                    "max_connections": self.max_connections,
                },
            )
        self.counts = dict.fromkeys(self.counts, 0)
        self._last_summary = now or time.monotonic()


class GuardMixin:
    """Mixed into uvicorn's HTTP protocol class (h11 or httptools): request deadline and connection cap.

    It reads the protocol's ``cycle`` (the current request/response), ``connections`` and ``transport``,
    attributes both of uvicorn's implementations have; ``tests/test_api_hostile.py`` pins the behaviour
    with real sockets, so an uvicorn release that renames them fails there.
    """

    guard: Guard
    cycle: Any
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_since = time.monotonic()
        super().connection_made(transport)  # type: ignore[misc]  # uvicorn's protocol, after this mixin
        self._arm()
        if len(self.connections) > self.guard.max_connections and not self._evict_one():
            self.guard.note("refused")
            self._refuse(BUSY_RESPONSE)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self._between_requests():
            self._arm()  # the next request starts; it too must arrive in time
        super().data_received(data)  # type: ignore[misc]  # uvicorn's protocol, after this mixin
        if self._deadline is not None and self._request_received():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]  # uvicorn's protocol, after this mixin

    # -- state ------------------------------------------------------------------------------------
    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _request_received(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete and not self.cycle.more_body

    def _awaiting_head(self) -> bool:
        return self.cycle is None or (self.cycle.response_complete and not self.cycle.more_body)

    def _evictable(self) -> bool:
        """Idle (keep-alive, nothing sent yet) or still sending its request: no work would be lost."""
        return self._deadline is not None or self._between_requests()

    # -- deadline ---------------------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self._waiting_since = time.monotonic()
        self._deadline = self.loop.call_later(self.guard.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        self.guard.note("timed_out")
        # Between requests (the previous one read whole and answered) say 408 on the wire; with a head and a
        # stalled body the application owns the answer, or has given it with the body unread: just close.
        self._refuse(TIMEOUT_RESPONSE if self._awaiting_head() else None)

    # -- cap --------------------------------------------------------------------------------------
    def _evict_one(self) -> bool:
        victims = [
            c
            for c in self.connections
            if c is not self and isinstance(c, GuardMixin) and c._evictable() and not c.transport.is_closing()
        ]
        if not victims:
            return False
        victim = min(victims, key=lambda c: c._waiting_since)
        self.guard.note("evicted")
        # 503 to one that is sending (or has yet to send) a request; an idle kept-alive one is just closed
        half_sent = victim._deadline is not None and victim._awaiting_head()
        victim._refuse(BUSY_RESPONSE if half_sent else None)
        return True

    def _refuse(self, response: bytes | None) -> None:
        self._disarm()
        if response is not None:
            self.transport.write(response)
        self.transport.close()


def guarded_protocol(base: type[asyncio.Protocol], guard: Guard) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's HTTP protocol class) with ``GuardMixin`` and its shared ``guard``."""
    return type(f"Guarded{base.__name__}", (GuardMixin, base), {"guard": guard})


#: What accept() fails with when the process (or the system) is out of descriptors or memory.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _QuietAcceptErrors:
    """The event loop's exception handler: accept() out of descriptors or memory at most once a minute
    (asyncio calls it for every failed accept of a backlog, then pauses accepting for a second and carries
    on serving); anything else goes to asyncio's default handler."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.suppressed = 0
        self.last = -SUMMARY_INTERVAL_S

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES:
            now = time.monotonic()
            if now - self.last < SUMMARY_INTERVAL_S:
                self.suppressed += 1
                return
            log.error(
                "HTTP accept failed: out of file descriptors or memory; new connections wait",
                extra={"error": type(exc).__name__, "errno": exc.errno, "suppressed": self.suppressed},
            )
            self.last, self.suppressed = now, 0
            return
        loop.default_exception_handler(context)


class RepeatLimiter(logging.Filter):
    """A filter for the server's own loggers (uvicorn's "Invalid HTTP request received.", asyncio's socket
    warnings): each message template at most once a minute, the next one saying how many were dropped.
    A client can make those lines as fast as it can send bytes; the log must not be its amplifier."""

    def __init__(self, interval_s: float = SUMMARY_INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._dropped: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self.interval_s) < self.interval_s:
                self._dropped[key] = self._dropped.get(key, 0) + 1
                return False
            self._last[key] = now
            dropped = self._dropped.pop(key, 0)
        if dropped:
            record.dropped_repeats = dropped
        return True


#: Loggers a client can make write a line per connection or per request.
CLIENT_DRIVEN_LOGGERS = ("uvicorn.error", "asyncio")
_limiter = RepeatLimiter()


def limit_client_driven_logs() -> None:
    """Install ``RepeatLimiter`` on ``CLIENT_DRIVEN_LOGGERS`` (once per process)."""
    for name in CLIENT_DRIVEN_LOGGERS:
        logger = logging.getLogger(name)
        if _limiter not in logger.filters:
            logger.addFilter(_limiter)


class GuardedServer(uvicorn.Server):
    """uvicorn's server with ``GuardMixin`` on its protocol and the quiet accept-error handler."""

    def __init__(self, config: uvicorn.Config, guard: Guard) -> None:
        super().__init__(config)
        self.guard = guard

    async def startup(self, sockets: list[Any] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_QuietAcceptErrors(loop))
        if not self.config.loaded:
            self.config.load()
        self.config.http_protocol_class = guarded_protocol(self.config.http_protocol_class, self.guard)
        await super().startup(sockets)
        log.info("api listening", extra={"port": self.config.port, **self.limits()})

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        self.guard.summary()
        await super().shutdown(sockets)

    def limits(self) -> dict[str, Any]:
        return {
            "max_connections": self.guard.max_connections,
            "request_timeout_s": self.guard.request_timeout,
            "backlog": self.config.backlog,
        }


def build_server(
    app: Any, settings: Settings, *, host: str | None = None, port: int | None = None, fd_ceiling: int | None = None
) -> GuardedServer:
    """A server for ``app`` with the settings' limits; raises the descriptor limit first. ``fd_ceiling``:
    size the cap as if the limit were at most this (``SELECT_FD_LIMIT`` beside select() users)."""
    limit_client_driven_logs()
    descriptors = raise_fd_limit()
    cap, backlog = connection_limits(
        settings.api_max_connections, descriptors if fd_ceiling is None else min(descriptors, fd_ceiling)
    )
    guard = Guard(request_timeout=settings.api_request_timeout, max_connections=cap)
    config = uvicorn.Config(
        app,
        host=host or settings.api_host,
        port=port if port is not None else settings.api_port,
        log_config=None,
        access_log=False,  # access logs would carry ids in paths only, but stay off
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16 * 1024,  # a request head over 16 KiB: 400
        backlog=backlog,
    )
    return GuardedServer(config, guard)


def serve(app: Any, settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Serve ``app`` until SIGINT/SIGTERM (main thread)."""
    build_server(app, settings, host=host, port=port).run()


class ServerDidNotStart(RuntimeError):
    """The API's server thread ended, or was still not listening, before it served: its port was taken, the
    app's startup failed. The cause (the bind's ``OSError``) is chained when uvicorn gave one."""


#: How long ``serve_in_thread`` waits for the server to listen (app startup included).
START_TIMEOUT_S = 60.0


def serve_in_thread(
    app: Any, settings: Settings, *, fd_ceiling: int | None = None, start_timeout_s: float = START_TIMEOUT_S
) -> Callable[[], None]:
    """Serve ``app`` in a daemon thread (``radialog run``) and return, once it listens, the function that
    stops it; ``ServerDidNotStart`` when it does not. In a thread, uvicorn's ``sys.exit`` on a port in use
    would only end that thread: the caller would carry on without an API."""
    server = build_server(app, settings, fd_ceiling=fd_ceiling)
    ended: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits from inside ``except OSError`` (the bind): keep that error
            ended.append(exc.__context__ if isinstance(exc.__context__, Exception) else exc)
        except Exception as exc:
            ended.append(exc)
            if server.started:  # while serving: the thread's excepthook logs it
                raise

    thread = threading.Thread(target=run, name="radialog-api", daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        where = f"{server.config.host}:{server.config.port}"
        if not thread.is_alive():
            raise ServerDidNotStart(f"the API server on {where} ended before it listened") from (
                ended[0] if ended else None
            )
        if time.monotonic() > deadline:
            stop()
            raise ServerDidNotStart(f"the API server on {where} was not listening after {start_timeout_s:.0f} s")
        time.sleep(0.05)
    return stop
