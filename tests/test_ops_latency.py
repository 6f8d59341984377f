"""The operations page's latency (issue 18): "image -> PACS" counts only deliveries of the SR to SR
destinations (settings.destinations of kind dimse or stow), not the webhook, HL7 and FHIR rows that share
the exports table; "image -> SR" is every AI draft. On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from api.operations import latency
from radialog.registry import Export, ExportState, Registry, Report, Study, utcnow
from radialog.settings import Destination, Settings
from tests.support.seeding import add_reported_study

DESTINATIONS = [
    Destination.model_validate(d)
    for d in (
        {"name": "pacs", "kind": "dimse"},
        {"name": "web-pacs", "kind": "stow", "url": "http://pacs.invalid/dicom-web"},
        {"name": "ris", "kind": "hl7", "port": 2575},
        {"name": "fhir", "kind": "fhir", "url": "http://fhir.invalid/r4"},
        {"name": "hook", "kind": "webhook", "url": "http://hook.invalid/in", "secret": "s" * 16},
    )
]


def test_image_to_pacs_counts_sr_destinations_only(registry: Registry, settings: Settings) -> None:
    settings = settings.model_copy(update={"destinations": DESTINATIONS})
    studies = [
        add_reported_study(registry, settings.model_copy(update={"destinations": []}), index=i) for i in range(3)
    ]
    # study 0: the webhook, RIS and FHIR answered in 1-3 s, the PACS after 7 s, the DICOMweb store after 9 s
    # study 1: only the non-SR channels answered (the PACS row still pending)
    # study 2: the DICOMweb store answered after 4 s
    sent_after: list[dict[str, int | None]] = [
        {"hook": 1, "ris": 2, "fhir": 3, "pacs": 7, "web-pacs": 9},
        {"hook": 1, "ris": 2, "fhir": 3, "pacs": None},
        {"web-pacs": 4},
    ]
    with registry.session() as session:
        for study_id, rows in zip(studies, sent_after, strict=True):
            study = session.get(Study, study_id)
            assert study is not None and study.last_instance_at is not None
            last_image = study.last_instance_at
            report = session.scalars(select(Report).where(Report.study_id == study_id)).one()
            for destination, seconds in rows.items():
                session.add(
                    Export(
                        report_id=report.id,
                        study_id=study_id,
                        destination=destination,
                        state=ExportState.PENDING.value if seconds is None else ExportState.SENT.value,
                        created_at=last_image,
                        sent_at=None if seconds is None else last_image + timedelta(seconds=seconds),
                    )
                )
        session.commit()
        now = utcnow()
        figures = latency(session, settings, now - timedelta(hours=1), now + timedelta(minutes=1))
    assert figures["image_to_sr"]["n"] == 3
    pacs = figures["image_to_pacs"]
    assert pacs["n"] == 2, pacs  # study 1 reached no SR destination
    assert (round(pacs["p50"], 3), round(pacs["max"], 3)) == (5.5, 7.0), pacs  # 7 s and 4 s: the first SR store

    # a configuration without SR destinations has no "image -> PACS" at all
    with registry.session() as session:
        none = latency(
            session,
            settings.model_copy(update={"destinations": DESTINATIONS[2:]}),
            now - timedelta(hours=1),
            now + timedelta(minutes=1),
        )
    assert none["image_to_pacs"]["n"] == 0 and none["image_to_sr"]["n"] == 3
