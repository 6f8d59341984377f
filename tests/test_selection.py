"""The image choice on a table of realistic header variations (pure function, no DICOM I/O)."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage as CR,
)
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation as DX,
)
from pydicom.uid import (
    DigitalXRayImageStorageForProcessing as DXP,
)
from pydicom.uid import (
    SecondaryCaptureImageStorage as SC,
)

from dicom_node.selection import choose_image


def hdr(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "modality": "CR",
        "sop_class_uid": CR,
        "body_part_examined": "CHEST",
        "rows": 2000,
        "columns": 2000,
    }
    base.update(kw)
    return base


# (case, [(instance id, attributes), ...], expected instance id or None, expected reason fragment)
CASES: list[tuple[str, list[tuple[int, dict[str, Any]]], int | None, str]] = [
    ("PA beats lateral", [(1, hdr(view_position="LL")), (2, hdr(view_position="PA"))], 2, "PA"),
    ("PA beats AP", [(1, hdr(view_position="AP")), (2, hdr(view_position="PA"))], 2, "PA"),
    ("AP alone is fine", [(1, hdr(view_position="AP"))], 1, "AP"),
    ("lateral only", [(1, hdr(view_position="LATERAL")), (2, hdr(view_position="RL"))], None, "lateral view only"),
    ("knee", [(1, hdr(body_part_examined="KNEE", view_position="AP"))], None, "no chest image: body part KNEE"),
    ("lower-case thorax", [(1, hdr(body_part_examined="thorax", view_position="PA"))], 1, "PA"),
    (
        "German Thorax pa in description",
        [(1, hdr(body_part_examined="THORAX", view_position=None, series_description="Thorax p.a."))],
        1,
        "",
    ),
    (
        "missing body part, chest in description",
        [(1, hdr(body_part_examined=None, series_description="CHEST PA"))],
        1,
        "PA",
    ),
    (
        "view only in series description",
        [(1, hdr(series_description="CHEST LAT")), (2, hdr(series_description="CHEST PA"))],
        2,
        "PA",
    ),
    (
        "view code sequence meaning",
        [(1, hdr(view_code_meaning="left lateral")), (2, hdr(view_code_meaning="postero-anterior"))],
        2,
        "PA",
    ),
    (
        "derived excluded",
        [
            (1, hdr(view_position="PA", image_type=["DERIVED", "SECONDARY"])),
            (2, hdr(view_position="AP", image_type=["ORIGINAL", "PRIMARY"])),
        ],
        2,
        "AP",
    ),
    (
        "localizer only",
        [(1, hdr(view_position="PA", image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"]))],
        None,
        "LOCALIZER",
    ),
    (
        "DX presentation beats processing",
        [
            (1, hdr(modality="DX", sop_class_uid=DXP, view_position="PA", presentation_intent_type="FOR PROCESSING")),
            (2, hdr(modality="DX", sop_class_uid=DX, view_position="PA", presentation_intent_type="FOR PRESENTATION")),
        ],
        2,
        "PA",
    ),
    (
        "DX processing alone is used",
        [
            (1, hdr(modality="DX", sop_class_uid=DXP, view_position="PA", presentation_intent_type="FOR PROCESSING")),
        ],
        1,
        "for processing",
    ),
    (
        "orientation says lateral",
        [(1, hdr(patient_orientation=["A", "F"])), (2, hdr(patient_orientation=["L", "F"]))],
        2,
        "frontal",
    ),
    (
        "conflicting hints rank below consistent",
        [
            (1, hdr(view_position="PA", series_description="LAT")),
            (2, hdr(view_position="AP")),
        ],
        2,
        "AP",
    ),
    (
        "conflicting hints still usable alone",
        [(1, hdr(view_position="PA", view_code_meaning="lateral"))],
        1,
        "disagree",
    ),
    ("no view stated", [(1, hdr())], 1, "view not stated"),
    ("frontal over unknown", [(1, hdr()), (2, hdr(series_description="Chest frontal"))], 2, "frontal"),
    (
        "one-sided laterality ranks lower",
        [(1, hdr(view_position="PA", image_laterality="L")), (2, hdr(view_position="PA", image_laterality="U"))],
        2,
        "PA",
    ),
    (
        "larger matrix wins a tie",
        [(1, hdr(view_position="PA", rows=1024, columns=1024)), (2, hdr(view_position="PA"))],
        2,
        "PA",
    ),
    ("earliest wins an exact tie", [(3, hdr(view_position="PA")), (2, hdr(view_position="PA"))], 2, "PA"),
    (
        "secondary capture of a film",
        [
            (
                1,
                hdr(
                    modality="OT",
                    sop_class_uid=SC,
                    image_type=["DERIVED", "SECONDARY"],
                    series_description="Scanned film chest PA",
                ),
            )
        ],
        1,
        "secondary capture",
    ),
    (
        "CR beats secondary capture",
        [(1, hdr(modality="OT", sop_class_uid=SC, series_description="chest PA")), (2, hdr(view_position="AP"))],
        2,
        "AP",
    ),
    (
        "secondary capture without chest",
        [(1, hdr(modality="OT", sop_class_uid=SC, body_part_examined=None))],
        None,
        "secondary capture",
    ),
    ("missing modality, CR class", [(1, hdr(modality=None, view_position="PA"))], 1, "PA"),
    (
        "mixed reasons",
        [(1, hdr(view_position="LL")), (2, hdr(body_part_examined="HAND"))],
        None,
        "no usable chest image",
    ),
    ("no instances", [], None, "no instances"),
    ("PA + LAT series description says nothing", [(1, hdr(series_description="CHEST PA + LAT"))], 1, "view not stated"),
    ("portable means AP", [(1, hdr(series_description="CHEST PORTABLE"))], 1, "AP"),
]


@pytest.mark.parametrize(("instances", "expected", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_choose_image(instances: list[tuple[int, dict[str, Any]]], expected: int | None, reason: str) -> None:
    selection = choose_image(instances)
    assert selection.instance_id == expected, selection.reason
    assert reason in selection.reason


def test_body_part_reason_is_readable() -> None:
    selection = choose_image([(1, hdr(body_part_examined="Knee"))])
    assert selection == choose_image([(1, hdr(body_part_examined="KNEE"))])
    assert selection.reason == "no chest image: body part KNEE"
