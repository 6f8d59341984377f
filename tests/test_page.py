"""The radiologist's page in headless Chromium against the real API (uvicorn), Redis and a real worker
with the tiny model: sign in, open a study, ask, watch the answer stream in, approve, see the new version.

Screenshots go to test-artifacts/ (page.png: the draft with its banner and the answer; page-approved.png;
page-switch-studies.png, page-older-version.png, page-skipped.png, page-viewer.png, page-hostile.png).
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import func, select

from api.app import create_app
from radialog.registry import DialogTurn, Registry, Report, StudyState
from radialog.settings import Settings
from tests.support.brokers import redis_url
from tests.support.processes import dialog_worker
from tests.support.seeding import add_reported_study, add_study, make_keys

REDIS_URL = redis_url(__name__)
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def served(
    sqlite_registry: Registry, settings: Settings, tiny_model: tuple[Path, Path], tmp_path: Path
) -> Iterator[tuple[str, dict[str, str], int, Registry]]:
    """The API on a free port (uvicorn in a thread) and one dialog worker process."""
    api_settings = settings.model_copy(
        update={"broker_url": REDIS_URL, "model_dir": tiny_model[0], "base_model_dir": tiny_model[1], "device": "cpu"}
    )
    worker = dialog_worker(api_settings, sqlite_registry.url, tmp_path, f"page-test-{uuid.uuid4().hex[:8]}")
    try:
        keys = make_keys(sqlite_registry)
        study_id = add_reported_study(sqlite_registry, api_settings)
        with api_server(api_settings, sqlite_registry) as url:
            worker.wait_ready()
            yield url, keys, study_id, sqlite_registry
    finally:
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
        wait_image(page, study_id)  # the viewer's full frame
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

        give_verdicts(page)
        page.click("#approve")
        expect(page.locator("#report-banner")).to_have_text("Verified by rad — version 2")
        expect(page.locator("#versions li")).to_have_count(2)
        expect(page.locator("#versions li").first).to_contain_text("v2 approval by rad — verified")
        expect(page.locator("#approve")).to_be_disabled()
        page.screenshot(path=str(ARTIFACTS / "page-approved.png"), full_page=True)
        browser.close()


# -- what the radiologist sees is what gets signed (issue 13) ---------------------------------------------
# These run the API alone (uvicorn in a thread, no worker: nothing here asks the model) and Chromium.


@contextmanager
def api_server(settings: Settings, registry: Registry) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings, registry), log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def signed_in(base: str, key: str) -> Iterator[Any]:
    """A Chromium page signed in with ``key``; page errors (uncaught exceptions) fail the test."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(base + "/")
            page.fill("#api-key", key)
            page.click("#key-save")
            expect(page.locator("#app")).to_be_visible()
            yield page
            assert errors == [], errors
        finally:
            browser.close()


def give_verdicts(page: Any) -> None:
    """What a radiologist does before signing (issue 20): a verdict on each AI finding of the checklist,
    here "agree" on every one the text did not settle."""
    from playwright.sync_api import expect

    expect(page.locator("#checklist-note")).not_to_be_empty()
    if page.locator("#checklist-rest").is_visible():
        page.click("#checklist-rest")


def wait_image(page: Any, study_id: int) -> None:
    """Until the viewer shows a rendered image of ``study_id`` (polled from Python: the page's CSP
    refuses the eval() Playwright's wait_for_function would use)."""
    deadline = time.monotonic() + 60
    while (
        page.locator("#viewer-image").evaluate(
            "img => img.dataset.studyId === undefined ? 0 : Number(img.dataset.studyId) * (img.naturalWidth > 0)"
        )
        != study_id
    ):
        assert time.monotonic() < deadline, f"the viewer did not show study {study_id}"
        page.wait_for_timeout(100)


@pytest.fixture
def page_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"broker_url": REDIS_URL})


def test_a_late_answer_for_the_previous_study_never_lands_beside_the_next(
    page_settings: Settings, sqlite_registry: Registry
) -> None:
    """Study A's responses are held back (request interception) while the radiologist moves on to B;
    when A's answers finally arrive, nothing of A may appear: header, report, image and Approve are B's."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    keys = make_keys(sqlite_registry)
    a = add_reported_study(sqlite_registry, page_settings, index=1, findings_text="STUDY-A text: large right effusion.")
    b = add_reported_study(sqlite_registry, page_settings, index=2, findings_text="STUDY-B text: clear lungs.")
    held: list[Any] = []
    with api_server(page_settings, sqlite_registry) as base, signed_in(base, keys["rad"]) as page:
        study_a = re.compile(rf"/api/v1/studies/{a}(/|\?|$)")
        page.route(study_a, lambda route: held.append(route))  # answered only later
        page.locator(f'#worklist tr[data-study-id="{a}"]').click()
        page.locator(f'#worklist tr[data-study-id="{b}"]').click()
        expect(page.locator("#findings-text")).to_have_text("STUDY-B text: clear lungs.")
        expect(page.locator("#versions li")).to_have_count(1)
        assert held, "study A's requests were not intercepted"
        page.unroute(study_a)  # whatever the page asks about A from now on is answered at once
        for route in held:  # A's answers arrive now, after B is on screen
            with suppress(PlaywrightError):  # the page aborted that request when B was chosen: the fix itself
                route.continue_()
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(1000)  # time for any late answer to be applied, if the page would apply it
        page.screenshot(path=str(ARTIFACTS / "page-switch-studies.png"), full_page=True)
        expect(page.locator(f'#worklist tr[data-study-id="{b}"]')).to_have_class("current")
        expect(page.locator("#study-head")).to_contain_text("Synthetic^Patient2")
        text = page.locator("#study").inner_text()
        assert "Patient1" not in text and "STUDY-A" not in text, text
        expect(page.locator("#findings-text")).to_have_text("STUDY-B text: clear lungs.")
        wait_image(page, b)
        give_verdicts(page)
        expect(page.locator("#approve")).to_have_text("Approve and sign version 1")
        page.click("#approve")
        expect(page.locator("#report-banner")).to_have_text("Verified by rad — version 2")
    with sqlite_registry.session() as s:
        signed = {r.study_id: (r.version, r.findings_text) for r in s.scalars(select(Report).where(Report.verified))}
    assert signed == {b: (2, "STUDY-B text: clear lungs.")}


def test_an_older_version_on_screen_cannot_be_signed_as_the_current_one(
    page_settings: Settings, sqlite_registry: Registry
) -> None:
    """v1 (AI draft) and v2 (an edit): with v1 displayed, Approve is disabled and says why; the server
    refuses v1's text under v2's number (409); with v2 displayed, exactly v2's text is signed."""
    from playwright.sync_api import expect

    from reporting.versions import create_version

    keys = make_keys(sqlite_registry)
    study = add_reported_study(sqlite_registry, page_settings, findings_text="V1 draft: small left effusion.")
    with sqlite_registry.session() as s:
        create_version(
            s,
            page_settings,
            study,
            kind="edit",
            findings_text="V2 edit: no effusion.",
            impression_text="Normal chest.",
            author="rad",
        )
    with api_server(page_settings, sqlite_registry) as base, signed_in(base, keys["rad"]) as page:
        page.locator(f'#worklist tr[data-study-id="{study}"]').click()
        expect(page.locator("#findings-text")).to_have_text("V2 edit: no effusion.")
        expect(page.locator("#versions li")).to_have_count(2)
        page.locator('#versions li[data-version="1"]').click(position={"x": 8, "y": 6})
        expect(page.locator("#findings-text")).to_have_text("V1 draft: small left effusion.")
        expect(page.locator("#approve")).to_be_disabled()
        expect(page.locator("#version-note")).to_contain_text("not the current version 2")
        expect(page.locator("#approve-note")).to_contain_text("show version 2 to approve it")
        page.screenshot(path=str(ARTIFACTS / "page-older-version.png"), full_page=True)
        page.locator("#approve").dispatch_event("click")  # even a forced click signs nothing
        page.wait_for_timeout(300)
        with sqlite_registry.session() as s:
            assert s.scalar(select(func.count()).select_from(Report).where(Report.study_id == study)) == 2
        # the server's side of it: v1's text under v2's number is refused
        refused = page.request.post(
            f"{base}/api/v1/studies/{study}/report/approve",
            headers={"Authorization": f"Bearer {keys['rad']}"},
            data={"base_version": 2, "findings_text": "V1 draft: small left effusion."},
        )
        assert refused.status == 409 and refused.json()["type"].endswith("/text-mismatch")
        page.locator('#versions li[data-version="2"]').click(position={"x": 8, "y": 6})
        give_verdicts(page)
        expect(page.locator("#approve")).to_have_text("Approve and sign version 2")
        page.click("#approve")
        expect(page.locator("#report-banner")).to_have_text("Verified by rad — version 3")
        # the versions list says what each version changed, word by word ("effusion." stayed)
        expect(page.locator('#versions li[data-version="2"] del').first).to_have_text("V1 draft: small left")
        expect(page.locator('#versions li[data-version="2"] ins').first).to_have_text("V2 edit: no")
        expect(page.locator('#versions li[data-version="1"] .changes')).to_have_text("first version")
        expect(page.locator('#versions li[data-version="3"] .changes')).to_contain_text("no word changed")
    with sqlite_registry.session() as s:
        v3 = s.scalar(select(Report).where(Report.study_id == study, Report.version == 3))
        assert (v3.verified, v3.findings_text, v3.impression_text) == (True, "V2 edit: no effusion.", "Normal chest.")


def test_header_names_the_user_and_skipped_or_failed_studies_offer_no_chat(
    page_settings: Settings, sqlite_registry: Registry
) -> None:
    from playwright.sync_api import expect

    keys = make_keys(sqlite_registry)
    skipped, _ = add_study(
        sqlite_registry, page_settings, state=StudyState.SKIPPED, index=3, reason="lateral view only"
    )
    failed, _ = add_study(
        sqlite_registry, page_settings, state=StudyState.FAILED, index=4, reason="unusable image: truncated pixel data"
    )
    reported = add_reported_study(sqlite_registry, page_settings, index=5)
    with api_server(page_settings, sqlite_registry) as base, signed_in(base, keys["reader"]) as page:
        expect(page.locator("#who-name")).to_have_text("reader · reader")
        page.locator(f'#worklist tr[data-study-id="{reported}"]').click()
        expect(page.locator("#chat-box")).to_be_visible()
        expect(page.locator("#approve")).to_be_disabled()  # a reader reads and asks, never signs
        expect(page.locator("#approve-note")).to_have_text("Only a radiologist approves and signs.")
        for study, reason in (
            (skipped, "SKIPPED: lateral view only"),
            (failed, "FAILED: unusable image: truncated pixel data"),
        ):
            page.locator(f'#worklist tr[data-study-id="{study}"]').click()
            expect(page.locator("#study-reason")).to_have_text(reason)
            expect(page.locator("#chat-box")).to_be_hidden()
            expect(page.locator("#approve")).to_be_disabled()
        page.screenshot(path=str(ARTIFACTS / "page-skipped.png"), full_page=True)
        # the next person at this screen signs in: the header is theirs, nothing of the last study stays
        page.click("#sign-out")
        page.fill("#api-key", keys["rad"])
        page.click("#key-save")
        expect(page.locator("#who-name")).to_have_text("rad · radiologist")
        expect(page.locator("#study")).to_be_hidden()


def test_viewer_windows_zooms_pans_inverts_and_shows_the_model_view(
    page_settings: Settings, sqlite_registry: Registry
) -> None:
    """The full frame from the API: drag changes the window (a new render with that centre and width),
    the wheel and buttons zoom, shift-drag pans, invert and reset, and the toggle shows the model's image."""
    from playwright.sync_api import expect

    keys = make_keys(sqlite_registry)
    study = add_reported_study(sqlite_registry, page_settings)
    renders: list[str] = []
    with api_server(page_settings, sqlite_registry) as base, signed_in(base, keys["rad"]) as page:
        page.on("request", lambda r: renders.append(r.url) if "/image/render" in r.url else None)
        page.locator(f'#worklist tr[data-study-id="{study}"]').click()
        wait_image(page, study)
        expect(page.locator("#viewer-caption")).to_contain_text("Window 1 C 2048 W 4096 · zoom 100%")
        assert "preset=window%3A0" in renders[-1]
        box = page.locator("#viewport").bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx, cy)
        page.mouse.down()
        page.mouse.move(cx - 100, cy + 50, steps=5)
        page.mouse.up()
        expect(page.locator("#viewer-caption")).to_contain_text("window C ")
        expect(page.locator("#viewer-image")).to_have_attribute("data-window", re.compile(r"^custom:"))
        last = renders[-1]
        assert "window_center=" in last and "window_width=" in last and "preset=" not in last
        page.click("#zoom-in")
        expect(page.locator("#viewer-caption")).to_contain_text("zoom 125%")
        page.keyboard.down("Shift")
        page.mouse.move(cx, cy)
        page.mouse.down()
        page.mouse.move(cx + 80, cy + 40, steps=4)
        page.mouse.up()
        page.keyboard.up("Shift")
        page.wait_for_load_state("networkidle")
        assert "x=-" in renders[-1] or "&x=" in renders[-1]
        page.click("#invert")
        expect(page.locator("#invert")).to_have_attribute("aria-pressed", "true")
        page.wait_for_load_state("networkidle")
        assert "invert=true" in renders[-1]
        page.screenshot(path=str(ARTIFACTS / "page-viewer.png"), full_page=True)
        page.click("#reset")
        expect(page.locator("#viewer-caption")).to_contain_text("Window 1 C 2048 W 4096 · zoom 100%")
        page.check("#model-view")
        expect(page.locator("#viewer-image")).to_have_attribute("data-window", "model")
        expect(page.locator("#viewer-caption")).to_have_text("The image as the model saw it (windowed, 8-bit)")
        expect(page.locator("#invert")).to_be_disabled()


def test_hostile_report_text_is_shown_as_text_and_signed_as_shown(
    page_settings: Settings, sqlite_registry: Registry
) -> None:
    """Drafts as the model boundary stores hostile model output (tests/test_hostile_text.py): the page shows
    each exactly as the API gives it, as text (no element, no script), and approving the shown text works."""
    from playwright.sync_api import expect

    from reporting.text import clean_model_text
    from tests.test_hostile_text import HOSTILE

    keys = make_keys(sqlite_registry)
    names = ["html", "rtl", "emoji", "byte_fallback", "tabs_and_breaks", "long"]
    studies = {
        name: add_reported_study(
            sqlite_registry, page_settings, index=20 + i, findings_text=clean_model_text(HOSTILE[name])
        )
        for i, name in enumerate(names)
    }
    with api_server(page_settings, sqlite_registry) as base, signed_in(base, keys["rad"]) as page:
        for name, study in studies.items():
            page.locator(f'#worklist tr[data-study-id="{study}"]').click()
            expect(page.locator("#study-head")).to_have_attribute("data-study-id", str(study))
            expect(page.locator("#findings-text")).to_have_attribute("data-version", "1")
            shown = page.locator("#findings-text").evaluate("node => node.textContent")
            assert shown == clean_model_text(HOSTILE[name]), name
            assert page.locator("#findings-text").evaluate("node => node.children.length") == 0
            assert page.evaluate("typeof window.__pwned") == "undefined"
            if name == "html":
                page.screenshot(path=str(ARTIFACTS / "page-hostile.png"), full_page=True)
                give_verdicts(page)
                page.click("#approve")
                expect(page.locator("#report-banner")).to_have_text("Verified by rad — version 2")
    with sqlite_registry.session() as s:
        signed = s.scalar(select(Report).where(Report.study_id == studies["html"], Report.version == 2))
        assert signed.verified and signed.findings_text == clean_model_text(HOSTILE["html"])


def test_the_page_offers_only_what_the_configured_model_was_trained_for(
    page_settings: Settings, sqlite_registry: Registry
) -> None:
    """Issue 16: with XrayGPT configured, RaDialog's quick actions (easy language, summary, view, yes/no and
    corrections by finding) and the empty classifier list are hidden; free questions, key findings and
    impression stay. With RaDialog everything is there."""
    from playwright.sync_api import expect

    from radialog.model_output import Provenance, ReportOutput
    from radialog.registry import StudyState
    from reporting.versions import create_ai_draft
    from tests.support.seeding import add_study

    keys = make_keys(sqlite_registry)
    xraygpt = page_settings.model_copy(update={"model_backend": "xraygpt"})
    study_id, _ = add_study(sqlite_registry, xraygpt, state=StudyState.RUNNING, index=3)
    with sqlite_registry.session() as session:
        create_ai_draft(
            session,
            xraygpt,
            study_id,
            ReportOutput(
                key=str(study_id),
                findings_text="The heart size is normal. No effusion.",
                findings=[],
                findings_phrase="",
                generated_tokens=9,
            ),
            Provenance("XrayGPT", "1.0", "1" * 64, display_name="XrayGPT"),
        )
    hidden = ["easy_language", "summary", "view"]
    with api_server(xraygpt, sqlite_registry) as base, signed_in(base, keys["rad"]) as page:
        page.locator(f'#worklist tr[data-study-id="{study_id}"]').click()
        expect(page.locator("#findings-text")).to_have_text("The heart size is normal. No effusion.")
        expect(page.locator("#chat-box")).to_be_visible()
        for action in ("list", "impression"):
            expect(page.locator(f'[data-action="{action}"]')).to_be_visible()
        for action in hidden:
            expect(page.locator(f'[data-action="{action}"]')).to_be_hidden()
        expect(page.locator("#finding-actions")).to_be_hidden()
        expect(page.locator("#classifier-block")).to_be_hidden()
        expect(page.locator("#chat-input")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "page-xraygpt.png"), full_page=True)
    radialog_study = add_reported_study(sqlite_registry, page_settings, index=4)
    with api_server(page_settings, sqlite_registry) as base, signed_in(base, keys["rad"]) as page:
        page.locator(f'#worklist tr[data-study-id="{radialog_study}"]').click()
        expect(page.locator("#chat-box")).to_be_visible()
        for action in ("list", "impression", *hidden):
            expect(page.locator(f'[data-action="{action}"]')).to_be_visible()
        expect(page.locator("#finding-actions")).to_be_visible()
        expect(page.locator("#classifier li")).to_have_count(14)
