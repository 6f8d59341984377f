"""Hostile HTTP clients against the real server (``api.server``: uvicorn with its request deadline and
connection cap) over real loopback sockets: half-sent requests, silent connections, stalled bodies, more
connections than the cap, huge bodies without a key, and `radialog api` itself under a small
file-descriptor limit. Waits have generous deadlines; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.server import BUSY_RESPONSE, TIMEOUT_RESPONSE, build_server
from bench.hostile_http import Target
from radialog.registry import Registry
from radialog.settings import Settings
from tests.support.brokers import redis_url
from tests.support.polling import wait_for
from tests.support.ports import free_port
from tests.support.processes import Process, radialog_env
from tests.support.seeding import add_reported_study, make_keys

REDIS_URL = redis_url(__name__)
REPO = Path(__file__).resolve().parents[1]
HALF_SENT = b"GET /api/v1/studies HTTP/1.1\r\nHost: radialog\r\nUser-Agent: slow"  # no end of head, ever


@contextmanager
def running(app: Any, settings: Settings) -> Iterator[int]:
    """``app`` served by ``api.server.build_server`` in a thread; yields the port."""
    port = free_port()
    server = build_server(app, settings, host="127.0.0.1", port=port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(
        lambda: server.started,
        what="the server started",
        timeout=30,
        interval=0.02,
        check=lambda: None if thread.is_alive() else pytest.fail("the server thread ended"),
    )
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def connect(port: int, payload: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if payload:
        sock.sendall(payload)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 20.0) -> bytes:
    """Everything the server sends until it closes the connection (fails past ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length (head and body may arrive in separate reads)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def is_open(sock: socket.socket) -> bool:
    """Nothing from the server yet (it writes to a half-sent request only when it closes it)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return False  # an answer or the end of the stream
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"broker_url": REDIS_URL, "api_request_timeout": 1.0})


@pytest.fixture
def app_and_keys(sqlite_registry: Registry, api_settings: Settings) -> tuple[Any, dict[str, str], int]:
    keys = make_keys(sqlite_registry)
    study_id = add_reported_study(sqlite_registry, api_settings)
    return create_app(api_settings, sqlite_registry), keys, study_id


def test_half_sent_requests_and_silent_connections_get_408_and_are_closed(
    app_and_keys: Any, api_settings: Settings
) -> None:
    """uvicorn alone never closes either (its keep-alive timeout starts only after a response)."""
    app, _, _ = app_and_keys
    with running(app, api_settings) as port:
        socks = [connect(port, HALF_SENT) for _ in range(20)] + [connect(port) for _ in range(20)]
        answers = [read_until_closed(s) for s in socks]
    assert answers == [TIMEOUT_RESPONSE] * 40


def test_a_stalled_body_is_closed(app_and_keys: Any, api_settings: Settings) -> None:
    """Head complete, 10 of 100 announced body bytes, then silence: the connection is closed."""
    app, keys, study_id = app_and_keys
    head = (
        f"POST /api/v1/studies/{study_id}/report/versions HTTP/1.1\r\nHost: radialog\r\n"
        f"Authorization: Bearer {keys['rad']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: 100\r\n\r\n"
    ).encode()
    with running(app, api_settings) as port:
        sock = connect(port, head + b'{"kind": "')
        assert not read_until_closed(sock).startswith(b"HTTP/1.1 2")


def test_keep_alive_then_a_half_sent_next_request_is_closed(app_and_keys: Any, api_settings: Settings) -> None:
    """The deadline re-arms for each request on a kept-alive connection."""
    app, _, _ = app_and_keys
    with running(app, api_settings) as port:
        sock = connect(port, b"GET /healthz HTTP/1.1\r\nHost: radialog\r\n\r\n")
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in first, first
        sock.sendall(HALF_SENT)
        assert read_until_closed(sock) == TIMEOUT_RESPONSE


def test_a_prompt_client_gets_in_past_more_half_sent_connections_than_the_cap(
    app_and_keys: Any, api_settings: Settings
) -> None:
    """Cap 16 and 64 half-sent requests: the oldest are answered 503 and closed to make room, and a
    client that sends its request at once is served."""
    app, keys, _ = app_and_keys
    capped = api_settings.model_copy(update={"api_max_connections": 16, "api_request_timeout": 120.0})
    with running(app, capped) as port:
        socks = [connect(port, HALF_SENT) for _ in range(64)]
        time.sleep(0.5)  # let the server accept them all before the legitimate client comes
        response = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/studies", headers={"X-API-Key": keys["reader"]}, timeout=30
        )
        assert response.status_code == 200, response.text
        still_open = [is_open(s) for s in socks]
        oldest = [read_until_closed(s) for s, alive in zip(socks, still_open, strict=True) if not alive]
        for s in socks:
            s.close()
    assert still_open[-15:] == [True] * 15  # the 15 newest half-sent ones keep their place
    assert len(oldest) >= 48 and set(oldest) == {BUSY_RESPONSE}


def test_malformed_requests_do_not_flood_the_log(
    app_and_keys: Any, api_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn logs a warning per malformed request: a client sending garbage in a loop would write the log
    as fast as it sends. One line a minute per message, the next one counting those dropped."""
    app, _, _ = app_and_keys
    with caplog.at_level(logging.INFO), running(app, api_settings) as port:
        answers = [read_until_closed(connect(port, b"NOT HTTP AT ALL\r\n\r\n")) for _ in range(200)]
    assert all(a.startswith(b"HTTP/1.1 400") for a in answers)
    warnings = [r for r in caplog.records if r.name == "uvicorn.error" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings[:5]]


def test_running_out_of_descriptors_at_accept_is_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    """asyncio reports EMFILE once per failed accept (up to a whole backlog in one loop turn)."""
    from api.server import _QuietAcceptErrors

    loop = asyncio.new_event_loop()
    try:
        handler = _QuietAcceptErrors(loop)
        with caplog.at_level(logging.INFO):
            for _ in range(500):
                handler(
                    loop,
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    },
                )
            handler(loop, {"message": "something else", "exception": RuntimeError("kept")})
    finally:
        loop.close()
    accept_lines = [r for r in caplog.records if r.name == "api.server"]
    assert len(accept_lines) == 1 and accept_lines[0].errno == errno.EMFILE
    assert any("something else" in r.getMessage() for r in caplog.records if r.name == "asyncio")


def test_slow_but_complete_requests_and_long_responses_are_not_cut(api_settings: Settings) -> None:
    """The deadline covers receiving the request only: a head sent in pieces within it, and an answer that
    takes longer than it, both complete."""

    async def slow_app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        await asyncio.sleep(2.5)  # longer than the 1 s request deadline
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with running(slow_app, api_settings) as port:
        sock = connect(port)
        for piece in (b"GET /slow HTTP/1.1\r\n", b"Host: radialog\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(0.2)
        sock.settimeout(20)
        answer = read_response(sock)
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")


def test_a_body_without_a_key_is_refused_before_it_is_read(app_and_keys: Any, api_settings: Settings) -> None:
    """A 200 MB body announced without a key: 401 at once, without one byte of the body sent; with a key,
    413 at once from the Content-Length."""
    app, keys, study_id = app_and_keys
    path = f"/api/v1/studies/{study_id}/report/versions"

    def head(extra: str) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: radialog\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {200 * 1024 * 1024}\r\n\r\n"
        ).encode()

    with running(app, api_settings) as port:
        no_key = read_until_closed(connect(port, head("")))
        wrong_key = read_until_closed(connect(port, head("X-API-Key: rdl_not-a-key\r\n")))
        sock = connect(port, head(f"Authorization: Bearer {keys['rad']}\r\n"))
        sock.settimeout(20)
        too_large = sock.recv(65536)
        sock.close()
    assert no_key.startswith(b"HTTP/1.1 401") and b"the body was not read" in no_key
    assert wrong_key.startswith(b"HTTP/1.1 401")
    assert too_large.startswith(b"HTTP/1.1 413"), too_large


def test_a_chunked_body_past_the_limit_is_refused_once_the_limit_is_read(
    app_and_keys: Any, api_settings: Settings
) -> None:
    """No Content-Length to judge by: the bytes are counted as they are read, 413 past 1 MiB."""
    app, keys, study_id = app_and_keys
    head = (
        f"POST /api/v1/studies/{study_id}/report/versions HTTP/1.1\r\nHost: radialog\r\n"
        f"X-API-Key: {keys['rad']}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"  # 64 KiB of JSON whitespace per chunk
    sent = 0
    with running(app, api_settings) as port:
        sock = connect(port, head.encode())
        sock.settimeout(20)
        try:
            for _ in range(48):  # 3 MiB, unless the server stops us first
                sock.sendall(chunk)
                sent += 1
        except OSError:
            pass
        answer = sock.recv(65536)
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_radialog_api_under_a_small_fd_limit_keeps_serving_through_many_half_sent_requests(
    tmp_path: Path, sqlite_registry: Registry, settings: Settings
) -> None:
    """`radialog api` with 256 file descriptors and 400 half-sent requests open: without the cap the
    process runs out of descriptors, accept() fails and no request is served until those clients leave."""
    keys = make_keys(sqlite_registry)
    port = free_port()
    env = radialog_env(
        {
            "RADIALOG_DATA_DIR": settings.data_dir,
            "RADIALOG_BROKER_URL": REDIS_URL,
            "RADIALOG_API_PORT": port,
            "RADIALOG_API_REQUEST_TIMEOUT": 120,
        }
    )
    api = Process(
        "api",
        ["bash", "-c", 'ulimit -n 256 && exec "$@"', "bash", sys.executable, "-m", "composition.cli", "api"],
        env,
        tmp_path,
    )
    log_path = api.log_path
    socks: list[socket.socket] = []
    try:
        wait_for(
            lambda: _healthy(f"http://127.0.0.1:{port}"),
            what="`radialog api` to answer /healthz",
            interval=0.2,
            check=_alive(api),
            details=api.output,
        )
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                sock.sendall(HALF_SENT)
            except OSError:  # closed by the server already (the cap): fine, it is one more attempt
                pass
            socks.append(sock)
        time.sleep(1.0)
        response = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/studies", headers={"X-API-Key": keys["reader"]}, timeout=30
        )
        assert response.status_code == 200, response.text
        assert api.running, log_path.read_text()
    finally:
        for sock in socks:
            sock.close()
        api.stop()
    text = log_path.read_text()
    assert "max_connections" in text and '"max_connections": 16' in text  # 256 - the reserve: the floor of 16


def _alive(process: Process | Target) -> Callable[[], None]:
    """A ``wait_for`` check: fails at once when ``process`` has exited."""
    popen = process.proc
    log = process.log_path

    def check() -> None:
        assert popen.poll() is None, f"exited ({popen.returncode}):\n{log.read_text()[-3000:]}"

    return check


@pytest.mark.slow
def test_radialog_run_survives_1100_half_sent_requests_during_worker_start_up(
    tmp_path: Path, tiny_model: tuple[Path, Path]
) -> None:
    """The probe's worst case: a hard 1,024-descriptor limit and 1,100 half-sent requests arriving while the
    worker is still loading (importing torch, opening the model's files). Before, the API's accept loop took
    every descriptor, the worker's import failed with EMFILE and the whole process exited."""
    target = Target(REPO, tmp_path, 1024, True, tiny_model)
    socks: list[socket.socket] = []
    try:
        wait_for(lambda: _healthy(target.url), what="/healthz", timeout=120, interval=0.05, check=_alive(target))
        for _ in range(1100):
            sock = socket.create_connection(("127.0.0.1", target.api_port), timeout=30)
            try:
                sock.sendall(HALF_SENT)
            except OSError:  # closed by the server already (the cap)
                pass
            socks.append(sock)
        wait_for(lambda: _ready(target.url), what="worker ready", timeout=300, interval=0.5, check=_alive(target))
        assert target.api_call() and target.echo()
    finally:
        for sock in socks:
            sock.close()
        code = target.stop()
    assert code == 0, target.log_path.read_text()[-3000:]


@pytest.mark.slow
def test_radialog_run_keeps_its_dicom_node_below_the_select_limit(
    tmp_path: Path, tiny_model: tuple[Path, Path]
) -> None:
    """A raised descriptor limit and a generous cap (2,000): 1,300 half-sent requests must not push the
    process past descriptor 1,023, where pynetdicom's select() takes every new association for closed."""
    target = Target(
        REPO,
        tmp_path,
        1024,
        False,
        tiny_model,
        {"RADIALOG_API_MAX_CONNECTIONS": "2000", "RADIALOG_API_REQUEST_TIMEOUT": "120"},
    )
    socks: list[socket.socket] = []
    try:
        target.wait_ready()
        for _ in range(1300):
            sock = socket.create_connection(("127.0.0.1", target.api_port), timeout=30)
            try:
                sock.sendall(HALF_SENT)
            except OSError:  # closed by the server already (the cap)
                pass
            socks.append(sock)
        time.sleep(1.0)
        assert target.echo() and target.store() and target.api_call(), target.log_path.read_text()[-3000:]
    finally:
        for sock in socks:
            sock.close()
        code = target.stop()
    assert code == 0, target.log_path.read_text()[-3000:]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    except httpx.TransportError:
        return False
