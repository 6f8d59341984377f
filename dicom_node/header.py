"""The registry's view of a received instance's header, read without touching the pixel data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from radialog.routing import age_in_years, is_stat
from radialog.uids import is_valid_uid


@dataclass(frozen=True)
class Header:
    """What the node records about one instance (``Instance`` columns + ``Instance.attributes``)."""

    sop_instance_uid: str | None
    sop_class_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    transfer_syntax_uid: str | None
    patient_name: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


#: C0 control characters and DEL: no DICOM text VR the registry keeps may hold them (ESC sequences are
#: decoded by pydicom before this point), and PostgreSQL refuses NUL in text and JSON.
_CONTROL = dict.fromkeys([*range(0x20), 0x7F])


def clean_text(text: str) -> str:
    """Text as the registry can hold it: control characters dropped (NUL padding is common from
    modalities), unencodable code points (lone surrogates) replaced, surrounding spaces stripped."""
    text = text.translate(_CONTROL)
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text.strip()


def _text(ds: Dataset, keyword: str, limit: int = 256) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = clean_text(str(value))
    return text[:limit] or None


def _multi(ds: Dataset, keyword: str) -> list[str] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return [clean_text(value)]
    return [clean_text(str(v)) for v in value]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _view_code_meaning(ds: Dataset) -> str | None:
    seq = ds.get("ViewCodeSequence")
    if not seq:
        return None
    item = seq[0]
    return _text(item, "CodeMeaning") or _text(item, "CodeValue")


def _request_attribute(ds: Dataset, keyword: str) -> str | None:
    """An order attribute at the top level, else in the first Request Attributes Sequence item that has it."""
    value = _text(ds, keyword)
    if value:
        return value
    for item in ds.get("RequestAttributesSequence") or []:
        value = _text(item, keyword)
        if value:
            return value
    return None


def routing_attributes(ds: Dataset) -> dict[str, Any]:
    """What the routing rules read (``radialog.routing``). The age is kept in years, never the birth date."""
    requested_priority = _request_attribute(ds, "RequestedProcedurePriority")
    reason = _request_attribute(ds, "ReasonForTheRequestedProcedure")
    return {
        "station_name": _text(ds, "StationName"),
        "institution_name": _text(ds, "InstitutionName"),
        "study_description": _text(ds, "StudyDescription"),
        "patient_age_years": age_in_years(
            _text(ds, "PatientAge", 8), _text(ds, "PatientBirthDate", 8), _text(ds, "StudyDate", 8)
        ),
        "requested_priority": requested_priority,
        "stat": is_stat(requested_priority, reason),
    }


def attributes_of(ds: Dataset) -> dict[str, Any]:
    """``Instance.attributes``: the header fields the image choice and the routing rules use."""
    attributes = {
        "modality": _text(ds, "Modality"),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "view_position": _text(ds, "ViewPosition"),
        "body_part_examined": _text(ds, "BodyPartExamined"),
        "image_laterality": _text(ds, "ImageLaterality"),
        "view_code_meaning": _view_code_meaning(ds),
        "series_description": _text(ds, "SeriesDescription"),
        "protocol_name": _text(ds, "ProtocolName"),
        "image_comments": _text(ds, "ImageComments"),
        "image_type": _multi(ds, "ImageType"),
        "presentation_intent_type": _text(ds, "PresentationIntentType"),
        "patient_orientation": _multi(ds, "PatientOrientation"),
        "photometric_interpretation": _text(ds, "PhotometricInterpretation"),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        **routing_attributes(ds),
    }
    return attributes


def read_header(path: Path) -> Header:
    """Parse a Part 10 file up to (not including) the pixel data.

    UIDs are returned as found; the caller validates them (an invalid UID is a failure status, not
    an exception here).
    """
    return header_of(dcmread(path, stop_before_pixels=True, force=True))


def header_of(ds: Dataset) -> Header:
    """The :class:`Header` of a dataset (its ``file_meta`` gives the transfer syntax)."""
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None

    def uid(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value) if value is not None else None

    return Header(
        sop_instance_uid=uid("SOPInstanceUID"),
        sop_class_uid=uid("SOPClassUID"),
        study_instance_uid=uid("StudyInstanceUID"),
        series_instance_uid=uid("SeriesInstanceUID"),
        transfer_syntax_uid=transfer_syntax,
        patient_name=_text(ds, "PatientName"),
        patient_id=_text(ds, "PatientID", 64),
        accession_number=_text(ds, "AccessionNumber", 64),
        study_date=(_text(ds, "StudyDate", 8) or None),
        study_description=_text(ds, "StudyDescription"),
        attributes=attributes_of(ds),
    )


def valid_or_none(uid: str | None) -> str | None:
    """A UID worth storing in an optional column, or None."""
    return uid if is_valid_uid(uid) else None
