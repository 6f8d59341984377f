"""The radiologist's page in headless Chromium against the real API (uvicorn), Redis and a real worker
with the tiny model: sign in, open a study, ask, watch the answer stream in, approve, see the new version.

Screenshots go to test-artifacts/ (page.png: the draft with its banner and the answer; page-approved.png).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import select

from tests.support.brokers import redis_url
from api.app import create_app
from api.testing import WorkerProcess, add_reported_study, make_keys
from radialog.registry import DialogTurn, Registry
from radialog.settings import Settings

REDIS_URL = redis_url(14)
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def served(sqlite_registry: Registry, settings: Settings, tiny_model: tuple[Path, Path],
           tmp_path: Path) -> Iterator[tuple[str, dict[str, str], int, Registry]]:
    """The API on a free port (uvicorn in a thread) and one dialog worker process."""
    api_settings = settings.model_copy(update={
        "broker_url": REDIS_URL, "model_dir": tiny_model[0], "base_model_dir": tiny_model[1], "device": "cpu"})
    worker = WorkerProcess(api_settings, sqlite_registry.url, tmp_path / "worker.log",
                           f"page-test-{uuid.uuid4().hex[:8]}")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(api_settings, sqlite_registry), log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    try:
        keys = make_keys(sqlite_registry)
        study_id = add_reported_study(sqlite_registry, api_settings)
        thread.start()
        worker.wait_ready()
        yield f"http://127.0.0.1:{port}", keys, study_id, sqlite_registry
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        worker.stop()


@pytest.mark.slow
def test_open_ask_stream_approve_in_chromium(served) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    base, keys, study_id, registry = served
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 950})
        page.goto(base + "/")
        page.fill("#api-key", keys["rad"])
        page.click("#key-save")
        row = page.locator(f'#worklist tr[data-study-id="{study_id}"]')
        expect(row).to_contain_text("REPORTED")
        row.click()
        expect(page.locator("#report-banner")).to_have_text("AI draft — not verified (version 1, ai_draft)")
        expect(page.locator("#report-banner")).to_have_class("banner unverified")
        expect(page.locator("#findings-text")).to_contain_text("small left pleural effusion")
        # Polled from Python: Playwright's own wait_for_function polls through eval(), which the page's
        # Content Security Policy (no 'unsafe-eval') rightly refuses once the image is not there at once.
        deadline = time.monotonic() + 60
        while page.locator("#preview").evaluate("img => img.naturalWidth") == 0:
            assert time.monotonic() < deadline, "the image preview did not load"
            page.wait_for_timeout(100)
        assert page.evaluate("sessionStorage.getItem('radialog.apiKey')") == keys["rad"]

        # a yes/no quick action (the tiny model answers in at most 32 tokens); free questions use the same
        # streaming code and are covered through the API in test_api_dialog.py
        page.select_option("#finding-select", "Cardiomegaly")
        page.click("#ask-yes-no")
        answer = page.locator("#chat .msg.a").last
        expect(answer).not_to_have_class("msg a pending", timeout=240_000)
        with registry.session() as s:
            turn = s.scalars(select(DialogTurn).order_by(DialogTurn.id.desc())).first()
        assert turn is not None and turn.state == "DONE" and turn.task == "yes_no"
        expect(answer).to_have_text(turn.answer)
        expect(page.locator("#chat .msg.q").last).to_have_text("Is there any Cardiomegaly?")  # the label as asked
        page.fill("#chat-input", "Is the heart enlarged?")  # typed, ready to send, in the screenshot
        page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)

        page.click("#approve")
        expect(page.locator("#report-banner")).to_have_text("Verified by rad — version 2")
        expect(page.locator("#versions li")).to_have_count(2)
        expect(page.locator("#versions li").first).to_contain_text("v2 approval by rad — verified")
        expect(page.locator("#approve")).to_be_disabled()
        page.screenshot(path=str(ARTIFACTS / "page-approved.png"), full_page=True)
        browser.close()
