"""Hostile report text (issue 13): every C0/C1 control, DEL, lone surrogates, the byte-fallback debris of a
tokenizer (a control byte, invalid UTF-8), 100,000 characters, right-to-left, emoji, HTML/JS.

Each text goes the real way: the worker's report path (``run_report_job`` on the tiny model, its text replaced
by the hostile one: the fault injected is "the model said this"), the API's edit, a dialog answer stored by
``run_dialog_turn`` and accepted as a correction, and the approval of the text as the API shows it. Every SR on
the way passes dciodvfy with no Error line, dsrdump reads it, Orthanc stores it, and its Text Value is the text
shown. A raw hostile text typed by a user is refused (422) exactly when the rule would change it.
"""

from __future__ import annotations

import io
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import select

from api.app import create_app
from radialog.registry import Conversation, DialogTurn, Job, Registry, Report, StudyState, utcnow
from radialog.settings import Settings
from reporting.text import MAX_REPORT_CHARS, clean_model_text, is_clean
from tests.support.brokers import redis_url
from tests.support.dicom_files import dciodvfy_errors
from tests.support.orthanc import OrthancServer
from tests.support.seeding import add_study, make_keys

REDIS_URL = redis_url(__name__)

HOSTILE: dict[str, str] = {
    "c0": "Heart normal." + "".join(chr(c) for c in range(0x20)) + " Lungs clear.",
    "c1_del": "Small\x7f left" + "".join(chr(c) for c in range(0x80, 0xA0)) + " effusion.",
    "surrogates": "Left \ud800lower \udfff lobe \udc80\udcff opacity.",
    # what a byte-fallback tokenizer hands back: control-byte tokens (the tiny model's "om0vi\x0fgaly") and
    # incomplete UTF-8 sequences, decoded with replacement or with surrogateescape
    "byte_fallback": "om0vi\x0fgaly \x10\x1b[31m "
    + b"Cardio\xe2\x82 edema \xff\xfe".decode("utf-8", "replace")
    + b" pleural \xf0\x9f\x98".decode("utf-8", "surrogateescape"),
    "long": ("No pneumothorax. No pleural effusion. " * 2700)[:100_000],
    "rtl": "Right-to-left \u202eevitagen\u202c: \u0644\u0627 \u064a\u0648\u062c\u062f \u0627\u0646\u0635\u0628\u0627\u0628."
    " \u05d0\u05d9\u05df \u05ea\u05e4\u05dc\u05d9\u05d8. \u2067isolated\u2069 \u200f",
    "emoji": "Heart \U0001fac0 normal \U0001f44d\U0001f3fd family \U0001f468\u200d\U0001f469\u200d\U0001f467 "
    "\U0001f1e9\U0001f1ea e\u0301 \ufdfd \ufffd",
    "html": '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> &amp; &lt;b&gt;'
    " </textarea><style>body{display:none}</style>",
    "tabs_and_breaks": "Findings:\tnone\r\nImpression:\x0cnormal\n\n\tEnd.",
    "nothing_readable": "\x00\x01\x02 \t\x1b\x7f\x85",
    "quotes": "C:\\path\\file \"quoted\" 'single' `tick` ${x} {{y}} %s %n \\u0000",
}


def assert_valid_sr(path: Path, shown: str, orthanc: OrthancServer) -> None:
    """dciodvfy: no Error line; dsrdump reads it; Orthanc stores it; its Finding text is the text shown."""
    assert dciodvfy_errors(path) == [], path
    dump = subprocess.run(
        ["dsrdump", str(path)], capture_output=True, text=True, errors="replace", timeout=60, check=False
    )  # dsrdump cuts long values at a byte count, maybe inside a character
    assert dump.returncode == 0 and "Diagnostic imaging report" in dump.stdout, dump.stderr
    stored = orthanc.upload(path)
    assert stored["Status"] == "Success", stored
    texts = [item.TextValue for item in _items(dcmread(path)) if item.ValueType == "TEXT"]
    assert shown.strip() in texts


def _items(node: Any) -> Iterator[Any]:
    for child in getattr(node, "ContentSequence", []):
        yield child
        yield from _items(child)


@pytest.fixture
def world(registry: Registry, settings: Settings, tiny_model: tuple[Path, Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    """Settings on this module's Redis, the tiny model loaded as a worker holds it, the API, Orthanc."""
    from workers.context import WorkerContext
    from workers.models import load_backend

    ws = settings.model_copy(
        update={
            "broker_url": REDIS_URL,
            "model_dir": tiny_model[0],
            "base_model_dir": tiny_model[1],
            "device": "cpu",
            "batch_wait_ms": 0,
        }
    )
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    ctx = WorkerContext(
        settings=ws, registry=registry, hostname=f"hostile-{uuid.uuid4().hex[:6]}", backend=load_backend(ws)
    )
    with OrthancServer(tmp_path / "orthanc") as orthanc, TestClient(create_app(ws, registry)) as http:
        yield ws, ctx, http, make_keys(registry), orthanc
    client.flushdb()
    client.close()


def enqueue(registry: Registry, settings: Settings, study_ids: list[int]) -> dict[int, int]:
    """``enqueue_report`` for each study (a real message on this module's Redis): job id -> study id."""
    from radialog.messaging import enqueue_report

    return {enqueue_report(registry, settings, study_id): study_id for study_id in study_ids}


def run_jobs(ctx: Any, registry: Registry, job_ids: list[int]) -> None:
    """``run_report_job`` as a worker runs each message (a batch takes the other waiting jobs along)."""
    from workers.pipeline import run_report_job

    for job_id in job_ids:
        run_report_job(ctx, job_id)
    with registry.session() as s:
        states = {j.id: (j.state, j.error) for j in s.scalars(select(Job).where(Job.id.in_(job_ids)))}
    assert all(state == "DONE" for state, _ in states.values()), states


def answer_turn(ctx: Any, registry: Registry, study_id: int, report_id: int, task: str = "correction") -> int:
    """A correction turn about ``report_id`` (or a view question, which carries no history) answered by
    ``run_dialog_turn``; returns the turn id."""
    from workers.dialog import run_dialog_turn
    from workers.models.prompts import correction_prompt

    with registry.session() as session:
        conversation = Conversation(study_id=study_id, user="rad", seed_report_id=report_id, created_at=utcnow())
        session.add(conversation)
        session.flush()
        question = (
            correction_prompt(["Cardiomegaly"], [])
            if task == "correction"
            else "<image> From what view was this image taken?"
        )
        turn = DialogTurn(
            conversation_id=conversation.id, task=task, question=question, state="QUEUED", created_at=utcnow()
        )
        session.add(turn)
        session.flush()
        turn_id = turn.id
    outcome = run_dialog_turn(ctx, turn_id)
    with registry.session() as session:
        assert outcome == "done", session.get(DialogTurn, turn_id).error
    return turn_id


@pytest.mark.slow
def test_hostile_model_and_user_text_makes_valid_srs_that_are_shown_and_signed_as_is(world, registry: Registry) -> None:  # type: ignore[no-untyped-def]
    settings, ctx, http, keys, orthanc = world
    backend = ctx.backend
    studies = {
        name: add_study(registry, settings, state=StudyState.QUEUED, index=i)[0] for i, name in enumerate(HOSTILE)
    }
    jobs = enqueue(registry, settings, list(studies.values()))
    said = {str(job): HOSTILE[next(n for n, s in studies.items() if s == study)] for job, study in jobs.items()}
    real_report_each, real_answer = backend.report_each, backend.answer

    def report_each(inputs: Any) -> Any:  # the model ran; what it "said" is the hostile text
        outputs = real_report_each(inputs)
        for item, out in zip(inputs, outputs):
            out.findings_text = said[item.key]
        return outputs

    backend.report_each = report_each
    run_jobs(ctx, registry, list(jobs))

    h = {"Authorization": f"Bearer {keys['rad']}"}
    for name, study_id in studies.items():
        raw = HOSTILE[name]
        url = f"/api/v1/studies/{study_id}/report"
        # 1. the draft: cleaned at the model boundary, stored, shown and written as one text
        draft = http.get(url, headers=h).json()
        assert draft["findings_text"] == clean_model_text(raw) and is_clean(draft["findings_text"]), name
        assert len(draft["findings_text"]) <= MAX_REPORT_CHARS
        with registry.session() as s:
            row = s.scalars(select(Report).where(Report.study_id == study_id)).one()
            assert row.findings_text == draft["findings_text"]
        assert_valid_sr(settings.sr_dir / row.sr_path, draft["findings_text"], orthanc)

        # 2. an edit: the raw text is refused exactly when the rule would change it; the shown one is taken
        typed = http.post(
            url + "/versions",
            headers={**h, "Content-Type": "application/json"},  # \ud800 escapes
            content=json.dumps({"kind": "edit", "findings_text": raw, "base_version": 1}),
        )
        acceptable = is_clean(raw) and 0 < len(raw) <= MAX_REPORT_CHARS
        assert typed.status_code == (201 if acceptable else 422), (name, typed.text)
        current = http.get(url, headers=h).json()
        edited_text = ("Checked. " + current["findings_text"])[:MAX_REPORT_CHARS]
        edited = http.post(
            url + "/versions",
            headers=h,
            json={
                "kind": "edit",
                "findings_text": edited_text,
                "impression_text": raw[:200] if is_clean(raw[:200]) else None,
                "base_version": current["version"],
            },
        )
        assert edited.status_code == 201, (name, edited.text)
        assert_valid_sr(settings.sr_dir / _sr_path(registry, study_id, edited.json()["version"]), edited_text, orthanc)

        # 3. a correction: the model's answer (the hostile text) stored by the worker, accepted as the report
        def answer(request: Any, on_token: Any = None, raw: str = raw) -> str:  # the model ran, then "said" raw
            real_answer(request)
            for piece in (raw[:50], raw[50:120]):  # streamed in pieces, as tokens are
                if on_token is not None:
                    on_token(piece)
            return raw

        backend.answer = answer
        # a 20,000-character report leaves no room for a correction turn in the model's 4,000-token context
        # (refused before the model runs): that answer comes from a view question, which has no history
        turn_id = answer_turn(
            ctx,
            registry,
            study_id,
            _report_id(registry, study_id, edited.json()["version"]),
            "view" if name == "long" else "correction",
        )
        backend.answer = real_answer
        conversation = http.get(f"/api/v1/studies/{study_id}/dialog", headers=h).json()
        shown_answer = next(t["answer"] for t in conversation["turns"] if t["id"] == turn_id)
        assert shown_answer == clean_model_text(raw), name
        corrected = http.post(
            url + "/versions",
            headers=h,
            json={
                "kind": "ai_correction",
                "findings_text": shown_answer,
                "source_turn_id": turn_id,
                "impression_text": edited.json()["impression_text"],
                "base_version": edited.json()["version"],
            },
        )
        assert corrected.status_code == 201, (name, corrected.text)
        assert_valid_sr(
            settings.sr_dir / _sr_path(registry, study_id, corrected.json()["version"]), shown_answer, orthanc
        )

        # 4. the approval of exactly what is shown
        shown = http.get(url, headers=h).json()
        signed = http.post(
            url + "/approve",
            headers=h,
            json={
                "base_version": shown["version"],
                "findings_text": shown["findings_text"],
                "impression_text": shown["impression_text"] or "",
            },
        )
        assert signed.status_code == 201, (name, signed.text)
        assert signed.json()["verified"] and signed.json()["findings_text"] == shown["findings_text"]
        sr_path = settings.sr_dir / _sr_path(registry, study_id, signed.json()["version"])
        assert_valid_sr(sr_path, shown["findings_text"], orthanc)
        assert dcmread(sr_path).VerificationFlag == "VERIFIED"


def _report_id(registry: Registry, study_id: int, version: int) -> int:
    with registry.session() as s:
        return s.scalars(select(Report.id).where(Report.study_id == study_id, Report.version == version)).one()


def _sr_path(registry: Registry, study_id: int, version: int) -> str:
    with registry.session() as s:
        return s.scalars(select(Report.sr_path).where(Report.study_id == study_id, Report.version == version)).one()


@pytest.mark.slow
def test_the_tiny_model_itself_writes_a_valid_sr_and_clean_answers(world, registry: Registry) -> None:  # type: ignore[no-untyped-def]
    """One run through the real tiny model, nothing replaced: whatever it writes (it used to write
    "om0vi\\x0fgaly"), the draft is clean, its SR valid, and a dialog answer is clean too."""
    settings, ctx, http, keys, orthanc = world
    study_id = add_study(registry, settings, state=StudyState.QUEUED, index=40)[0]
    run_jobs(ctx, registry, list(enqueue(registry, settings, [study_id])))
    with registry.session() as s:
        draft = s.scalars(select(Report).where(Report.study_id == study_id)).one()
        text, sr_path, report_id = draft.findings_text, draft.sr_path, draft.id
    assert is_clean(text) and text.strip()
    assert_valid_sr(settings.sr_dir / sr_path, text, orthanc)
    turn_id = answer_turn(ctx, registry, study_id, report_id)
    with registry.session() as s:
        turn = s.get(DialogTurn, turn_id)
        assert turn.state == "DONE" and is_clean(turn.answer)
    h = {"Authorization": f"Bearer {keys['rad']}"}
    shown = http.get(f"/api/v1/studies/{study_id}/report", headers=h).json()
    signed = http.post(
        f"/api/v1/studies/{study_id}/report/approve",
        headers=h,
        json={"base_version": 1, "findings_text": shown["findings_text"], "impression_text": ""},
    )
    assert signed.status_code == 201, signed.text
    assert_valid_sr(settings.sr_dir / _sr_path(registry, study_id, 2), shown["findings_text"], orthanc)


def test_rows_stored_before_the_rule_are_shown_clean_and_can_be_signed_as_shown(
    sqlite_registry: Registry, settings: Settings
) -> None:
    """A draft stored with a control byte (before the model boundary cleaned it) is shown without it in
    every channel, and approving the shown text signs exactly that (no 422, no control byte in the SR)."""
    from tests.support.seeding import add_reported_study

    study_id = add_reported_study(sqlite_registry, settings, findings_text="Mild cardiomegaly.")
    with sqlite_registry.session() as s:  # as the tiny model's draft used to be stored
        s.scalars(select(Report).where(Report.study_id == study_id)).one().findings_text = "om0vi\x0fgaly\ttext"
    keys = make_keys(sqlite_registry)
    h = {"Authorization": f"Bearer {keys['rad']}"}
    with TestClient(create_app(settings, sqlite_registry)) as http:
        shown = http.get(f"/api/v1/studies/{study_id}/report", headers=h).json()
        assert shown["findings_text"] == "om0vigaly text"
        assert shown["document"]["findings_text"] == "om0vigaly text" and "om0vigaly text" in shown["text"]
        signed = http.post(
            f"/api/v1/studies/{study_id}/report/approve",
            headers=h,
            json={"base_version": 1, "findings_text": shown["findings_text"], "impression_text": ""},
        )
        assert signed.status_code == 201, signed.text
        sr = dcmread(io.BytesIO(http.get(signed.json()["sr_url"], headers=h).content))
    assert "om0vigaly text" in [i.TextValue for i in _items(sr) if i.ValueType == "TEXT"]
