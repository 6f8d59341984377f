"""Which image of a study to report: a pure function over ``Instance.attributes`` dicts.

RaDialog reads one frontal chest radiograph. We look for it with every hint real headers give, because
each one is missing or wrong somewhere: ViewPosition, the View Code Sequence meaning, BodyPartExamined
(any case, several languages), series/protocol descriptions and image comments ("CHEST PA", "THORAX
AP LIEGEND", "LAT"), PatientOrientation (row direction A/P means lateral), ImageType (DERIVED,
SECONDARY, LOCALIZER are not what the modality acquired), DX presentation intent and ImageLaterality.

Candidates are ranked: consistent hints before conflicting ones, FOR PRESENTATION before FOR
PROCESSING, CR/DX before Secondary Capture, PA before AP before "frontal" before "view unknown",
bilateral/unlabelled before a one-sided label, then the larger matrix and the earliest instance.
Nothing usable gives a reason a person can read ("lateral view only", "no chest image: body part KNEE").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

from dicom_node.policy import SECONDARY_CAPTURE_CLASSES

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})

#: Body part words that mean chest (DICOM's CHEST plus what devices write in practice).
CHEST_WORDS = frozenset(
    {
        "CHEST",
        "THORAX",
        "THORAKS",
        "TORAX",
        "TÓRAX",
        "TORACE",
        "THORACIC",
        "LUNG",
        "LUNGS",
        "LUNGE",
        "BRUSTKORB",
        "POUMON",
        "POUMONS",
        "CXR",
        "THX",
        "THOR",
    }
)
#: Words in descriptions that name a view.
PA_WORDS = frozenset({"PA", "P-A", "P/A", "POSTEROANTERIOR", "POSTERO-ANTERIOR", "POSTERIOR-ANTERIOR", "P.A."})
AP_WORDS = frozenset(
    {
        "AP",
        "A-P",
        "A/P",
        "ANTEROPOSTERIOR",
        "ANTERO-POSTERIOR",
        "ANTERIOR-POSTERIOR",
        "A.P.",
        "SUPINE",
        "LIEGEND",
        "BEDSIDE",
        "PORTABLE",
    }
)
LATERAL_WORDS = frozenset(
    {
        "LAT",
        "LATERAL",
        "LL",
        "RL",
        "LLAT",
        "RLAT",
        "SEITLICH",
        "PROFIL",
        "LATERALE",
        "LATÉRAL",
        "LATERO-LATERAL",
        "LLD",
        "RLD",
        "DECUBITUS",
    }
)
FRONTAL_WORDS = frozenset({"FRONTAL", "FRONT", "D.V.", "V.D.", "PA/AP"})
_MODALITY_OF_CLASS: dict[str, str] = {
    ComputedRadiographyImageStorage: "CR",
    DigitalXRayImageStorageForPresentation: "DX",
    DigitalXRayImageStorageForProcessing: "DX",
}
EXCLUDED_IMAGE_TYPES = frozenset({"DERIVED", "SECONDARY", "LOCALIZER", "SCOUT"})

_WORD = re.compile(r"[A-ZÀ-Ý0-9][A-ZÀ-Ý0-9./-]*")


@dataclass(frozen=True)
class Selection:
    """The instance to report, or why there is none."""

    instance_id: int | None
    reason: str


def _words(text: str | None) -> set[str]:
    if not text:
        return set()
    found = set(_WORD.findall(text.upper()))
    # "CHEST_PA" / "THORAX-PA" / "PA+LAT": also split on joiners
    for token in list(found):
        found.update(p for p in re.split(r"[-_/+.]", token) if p)
    return found


def _view_of_text(text: str | None) -> str | None:
    """'PA', 'AP', 'LAT', 'FRONTAL', or None from one piece of free text."""
    words = _words(text)
    if not words:
        return None
    lateral = bool(words & LATERAL_WORDS) or any(w.startswith("LATERAL") for w in words)
    pa = bool(words & PA_WORDS) or "POSTERO" in (text or "").upper().replace(" ", "")
    ap = bool(words & AP_WORDS) or "ANTERO-POST" in (text or "").upper()
    frontal = bool(words & FRONTAL_WORDS)
    if lateral and not (pa or ap or frontal):
        return "LAT"
    if lateral:  # "PA + LAT" in a series description says nothing about this image
        return None
    if pa and not ap:
        return "PA"
    if ap and not pa:
        return "AP"
    if pa or ap or frontal:
        return "FRONTAL"
    return None


def _view_of_position(value: str | None) -> str | None:
    if not value:
        return None
    v = value.strip().upper()
    if v in {"PA"}:
        return "PA"
    if v in {"AP"}:
        return "AP"
    if v in {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LPO", "RPO", "LAO", "RAO"}:
        return "LAT"  # decubitus/oblique views are not frontal either
    return _view_of_text(v)


def _view_of_orientation(value: Any) -> str | None:
    if not value or not isinstance(value, (list, tuple)) or not value[0]:
        return None
    row = str(value[0]).upper()[:1]
    if row in {"A", "P"}:
        return "LAT"
    if row in {"L", "R"}:
        return "FRONTAL"
    return None


def _is_frontal(view: str) -> bool:
    return view in {"PA", "AP", "FRONTAL"}


@dataclass(frozen=True)
class _Judgement:
    excluded: str | None
    rank: tuple[Any, ...] = ()


def _judge(instance_id: int, a: Mapping[str, Any]) -> _Judgement:
    sop_class = a.get("sop_class_uid") or ""
    modality = (a.get("modality") or _MODALITY_OF_CLASS.get(sop_class, "")).strip().upper()
    is_sc = sop_class in SECONDARY_CAPTURE_CLASSES
    body = (a.get("body_part_examined") or "").strip()
    body_words = _words(body)
    descriptions = [
        a.get("series_description"),
        a.get("protocol_name"),
        a.get("image_comments"),
        a.get("view_code_meaning"),
    ]
    text_words = set().union(*(_words(d) for d in descriptions))
    chest_in_text = bool(text_words & CHEST_WORDS)

    if not is_sc and modality and modality not in RADIOGRAPH_MODALITIES:
        return _Judgement(f"no chest radiograph: modality {modality}")
    if not is_sc and not modality and not chest_in_text and not (body_words & CHEST_WORDS):
        return _Judgement("no chest radiograph: modality missing")
    image_type = {str(v).strip().upper() for v in (a.get("image_type") or [])}
    bad_types = image_type & (EXCLUDED_IMAGE_TYPES - ({"DERIVED", "SECONDARY"} if is_sc else set()))
    if bad_types:
        return _Judgement(f"no original image: image type {'/'.join(sorted(bad_types))}")
    if body and not (body_words & CHEST_WORDS):
        return _Judgement(f"no chest image: body part {body.upper()[:32]}")
    if is_sc and not (body_words & CHEST_WORDS) and not chest_in_text:
        return _Judgement("no chest image: secondary capture without chest in its header")

    votes = [
        v
        for v in (
            _view_of_position(a.get("view_position")),
            _view_of_text(a.get("view_code_meaning")),
            _view_of_text(a.get("series_description")),
            _view_of_text(a.get("protocol_name")),
            _view_of_text(a.get("image_comments")),
            _view_of_orientation(a.get("patient_orientation")),
        )
        if v
    ]
    lateral = [v for v in votes if v == "LAT"]
    frontal = [v for v in votes if _is_frontal(v)]
    conflict = bool(lateral and frontal)
    if lateral and not frontal:
        return _Judgement("lateral view only")
    # The first specific source wins (ViewPosition, then view code, then descriptions).
    specific = next((v for v in frontal if v in {"PA", "AP"}), None)
    view_rank = {"PA": 0, "AP": 1}.get(specific or "", 2 if frontal else 3)
    processing = (a.get("presentation_intent_type") or "").strip().upper() == "FOR PROCESSING"
    laterality = (a.get("image_laterality") or "").strip().upper()
    one_sided = laterality in {"L", "R"}
    pixels = int(a.get("rows") or 0) * int(a.get("columns") or 0)
    rank = (conflict, processing, is_sc, view_rank, one_sided, -pixels, instance_id)
    return _Judgement(None, rank)


def choose_image(instances: Iterable[tuple[int, Mapping[str, Any]]]) -> Selection:
    """Pick the frontal chest radiograph to report from ``(instance id, Instance.attributes)`` pairs."""
    ranked: list[tuple[tuple[Any, ...], int]] = []
    reasons: dict[str, int] = {}
    for instance_id, attributes in instances:
        judgement = _judge(instance_id, attributes or {})
        if judgement.excluded is None:
            ranked.append((judgement.rank, instance_id))
        else:
            reasons[judgement.excluded] = reasons.get(judgement.excluded, 0) + 1
    if ranked:
        rank, chosen = min(ranked)
        view = {0: "PA", 1: "AP", 2: "frontal", 3: "view not stated"}[rank[3]]
        notes = [view]
        if rank[0]:
            notes.append("view hints disagree")
        if rank[1]:
            notes.append("for processing")
        if rank[2]:
            notes.append("secondary capture")
        return Selection(chosen, "chosen: " + ", ".join(notes))
    if not reasons:
        return Selection(None, "no instances received")
    if len(reasons) == 1:
        return Selection(None, next(iter(reasons)))
    parts = [f"{count} x {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))]
    return Selection(None, "no usable chest image: " + "; ".join(parts))
