"""HL7 v2.5.1 ORU^R01 to a RIS over MLLP: built with hl7apy (message structure validated), sent with the
``hl7`` library's asyncio MLLP streams, the acknowledgement read back and judged.

One message per report version (``base.result_status``): MSH (MSH-10 stable per outbox row, so a retried
message is recognisably the same), PID (patient ID and name as received), OBR (accession number as filler
order number, LOINC 18748-4, OBR-25 P/F/C, OBR-32 the verifying radiologist for F and C), then OBX lines
(TX): the status line (unverified AI output until approved), the findings and the impression, one OBX per
line of text, OBX-11 as OBR-25, and the Study Instance UID (OBX 113014 "DICOM Study").

Acknowledgement: AA (or CA) is success; AE/AR (CE/CR), no ACK, a malformed one, a wrong MSA-2 or a timeout
raise ``DeliveryError`` with the RIS's own text (MSA-3 / ERR-8), and the outbox retries, then DEAD.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import hl7
from hl7.mllp import open_hl7_connection
from hl7apy.base_datatypes import ST
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException

from reporting.channels.base import Delivery, DeliveryError

VERSION = "2.5.1"
REPORT_CODE = "18748-4^Diagnostic imaging report^LN"
FINDINGS_CODE = "59776-5^Findings^LN"
IMPRESSION_CODE = "19005-8^Impressions^LN"
COMMENT_CODE = "121106^Comment^DCM"
STUDY_UID_CODE = "113014^DICOM Study^DCM"
#: Largest ACK read back; anything longer is not an acknowledgement.
MAX_ACK_BYTES = 1024 * 1024


def _escaped(value: str, limit: int | None = None) -> str:
    """``value`` in ER7 with the default encoding characters escaped (hl7apy's text escaping; a backslash
    of the text is made ``\\E\\`` first, so text that looks like an escape sequence stays text)."""
    text = value if limit is None else value[:limit]
    return str(ST(text.replace("\\", "\\E\\")).to_er7())


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _person(message: Message, pn: str | None) -> str:
    """A DICOM PN (Family^Given^Middle^Prefix^Suffix) as HL7 XPN (Family^Given^Middle^Suffix^Prefix)."""
    parts = (pn or "").split("=")[0].split("^") + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    return "^".join(_escaped(p.strip(), 64) for p in (family, given, middle, suffix, prefix)).rstrip("^")


def _lines(text: str | None) -> list[str]:
    return [line.rstrip() for line in (text or "").splitlines() if line.strip()]


def build_oru(
    delivery: Delivery,
    *,
    sending_application: str,
    sending_facility: str,
    receiving_application: str,
    receiving_facility: str,
    now: datetime | None = None,
) -> str:
    """The ORU^R01 message (ER7, segments separated by CR) for one report version."""
    study, version = delivery.study, delivery.version
    if study is None or version is None:
        raise ValueError("an ORU carries a report version")
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    message.msh.msh_3 = _escaped(sending_application, 180)
    message.msh.msh_4 = _escaped(sending_facility, 180)
    message.msh.msh_5 = _escaped(receiving_application, 180)
    message.msh.msh_6 = _escaped(receiving_facility, 180)
    message.msh.msh_7 = _timestamp(now or datetime.now(UTC))
    message.msh.msh_9 = "ORU^R01^ORU_R01"
    message.msh.msh_10 = f"RL{delivery.export_id}"
    message.msh.msh_11 = "P"
    message.msh.msh_12 = VERSION
    message.msh.msh_18 = "UNICODE UTF-8"

    result = message.add_group("ORU_R01_PATIENT_RESULT")
    patient = result.add_group("ORU_R01_PATIENT")
    patient.pid.pid_1 = "1"
    patient.pid.pid_3 = _escaped(study.patient_id or "", 250)
    if study.patient_name:
        patient.pid.pid_5 = _person(message, study.patient_name)

    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    if study.accession_number:
        order.obr.obr_3 = _escaped(study.accession_number, 199)
    order.obr.obr_4 = REPORT_CODE
    if study.study_date:
        order.obr.obr_7 = study.study_date
    order.obr.obr_22 = _timestamp(version.created_at)
    order.obr.obr_24 = "RAD"
    order.obr.obr_25 = version.status
    if version.status in ("F", "C") and version.verifier:
        family, _, given = version.verifier.partition("^")
        order.obr.obr_32 = f"&{_escaped(family, 50)}&{_escaped(given, 50)}".rstrip("&")

    rows: list[tuple[str, str, str]] = [("TX", COMMENT_CODE, line) for line in _lines(version.status_line)]
    rows += [("TX", FINDINGS_CODE, line) for line in _lines(version.findings_text)]
    rows += [("TX", IMPRESSION_CODE, line) for line in _lines(version.impression_text)]
    rows.append(("ST", STUDY_UID_CODE, study.study_instance_uid))
    for number, (value_type, code, text) in enumerate(rows, 1):
        observation = order.add_group("ORU_R01_OBSERVATION")
        observation.obx.obx_1 = str(number)
        observation.obx.obx_2 = value_type
        observation.obx.obx_3 = code
        observation.obx.obx_5 = _escaped(text, 65536)
        observation.obx.obx_11 = version.status
    try:
        message.validate()
    except HL7apyException as exc:  # a bug of ours, never the data's: say which rule
        raise ValueError(f"ORU^R01 does not validate: {type(exc).__name__}") from exc
    return str(message.to_er7())


async def _exchange(host: str, port: int, message: str, timeout_s: float) -> str:
    reader, writer = await asyncio.wait_for(
        open_hl7_connection(host, port, encoding="utf-8", limit=MAX_ACK_BYTES), timeout_s
    )
    try:
        writer.writemessage(message)
        await asyncio.wait_for(writer.drain(), timeout_s)
        ack = await asyncio.wait_for(reader.readmessage(), timeout_s)
        return str(ack)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2.0)
        except (OSError, TimeoutError):
            pass


def judge_ack(ack_text: str, control_id: str) -> str:
    """'AA ...' for an accepting ACK; raises DeliveryError with the RIS's words otherwise."""
    try:
        ack = hl7.parse(ack_text)
        msa = ack.segment("MSA")
    except (KeyError, IndexError, ValueError, hl7.ParseException) as exc:
        raise DeliveryError(f"the RIS answered something that is not an HL7 ACK ({type(exc).__name__})") from exc
    code = str(msa(1)).strip().upper()
    acked = str(msa(2)).strip()
    text = ack.unescape(str(msa(3))).strip() if len(msa) > 3 else ""
    if not text:
        try:
            text = ack.unescape(str(ack.segment("ERR")(8))).strip()
        except (KeyError, IndexError):
            text = ""
    if acked != control_id:
        raise DeliveryError(f"the RIS acknowledged message {acked!r}, not {control_id!r}")
    if code in ("AA", "CA"):
        return f"{code} (accepted by the RIS)"
    meaning = {"AE": "application error", "AR": "application reject", "CE": "commit error", "CR": "commit reject"}
    raise DeliveryError(f"the RIS answered {code} ({meaning.get(code, 'not an acceptance')})", text[:500] or None)


def send_oru(host: str, port: int, message: str, control_id: str, timeout_s: float) -> str:
    """Send over MLLP and judge the ACK; every failure is a ``DeliveryError`` with its reason."""
    try:
        ack = asyncio.run(_exchange(host, port, message, timeout_s))
    except TimeoutError as exc:
        raise DeliveryError(f"no ACK from the RIS at {host}:{port} within {timeout_s:g} s") from exc
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise DeliveryError(f"MLLP connection to {host}:{port} failed: {type(exc).__name__}: {exc}") from exc
    except (ValueError, hl7.ParseException) as exc:  # oversize, a broken block, or text hl7 cannot parse
        raise DeliveryError(f"the RIS at {host}:{port} answered an unreadable ACK ({type(exc).__name__})") from exc
    return judge_ack(ack, control_id)
