"""The one rule for report text: which characters may go into a report, cleaned where model text
enters and enforced where text leaves (the SR builder, the API's renderings).

Why one rule: model output reaches the registry, the API, the page and the SR's Text Value (UT). A
byte-fallback token such as ``<0x0F>`` used to travel all the way into the SR (dciodvfy: "Character
invalid for this VR"), the page showed it, and approving the text as shown failed because the API
refuses control characters from users. With one rule the cleaned text is what is stored, shown,
signed and written.

The rule (DICOM PS3.5 6.2, the text VRs UT / ST / LT with Specific Character Set ISO_IR 192):

- kept: every Unicode character that UTF-8 can encode, non-ASCII included (right-to-left scripts,
  emoji, U+FFFD), and the control characters CR, LF and FF;
- TAB becomes a space: UT/ST/LT do not list it (dciodvfy reports "Character invalid for this VR (0x9)"),
  and a space keeps the words apart;
- removed: the other C0 controls (ESC too: with ISO_IR 192 there are no code extensions), DEL, the C1
  controls U+0080..U+009F and lone surrogates (not encodable, e.g. from ``surrogateescape``);
- bytes (a tokenizer's raw byte-fallback output) are decoded as UTF-8, invalid sequences as U+FFFD.

Short VRs (LO, SH, PN) allow no control character at all and no backslash (their value delimiter).
"""

from __future__ import annotations

import re

#: Longest findings or impression text, in characters: the API refuses longer text from users and the
#: model boundary truncates (a real report is a few hundred words; 20,000 characters is ~40 of them).
MAX_REPORT_CHARS = 20_000
#: Every character the rule removes (TAB is replaced, not removed). Also the API's pattern: see TEXT_PATTERN.
_REMOVED = "\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ud800-\udfff"
_INVALID = re.compile(f"[{_REMOVED}\t]")
_REMOVE = re.compile(f"[{_REMOVED}]")
#: JSON-schema pattern of clean text (the API's request bodies): no character the rule would change.
#: Lone surrogates cannot be written in such a pattern; pydantic refuses them as invalid strings anyway.
TEXT_PATTERN = r"^[^\x00-\x09\x0B\x0E-\x1F\x7F-\x9F]*$"
#: Control characters a short VR (LO, SH, PN) may not hold, plus the backslash (value delimiter).
_INVALID_SHORT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\\]")
SHORT_VR_MAX = {"LO": 64, "SH": 16, "PN": 64}
TRUNCATED_NOTE = " [...] (the model's text was cut here: longer than {limit:,} characters)"
EMPTY_MODEL_TEXT = "(the model produced no readable text)"


class InvalidReportText(ValueError):
    """Text that would make an invalid DICOM value; raised by ``require_valid`` (the SR builder).

    ``field`` names the report part, ``position`` and ``character`` the first offending character.
    """

    def __init__(self, field: str, vr: str, position: int, character: str, reason: str | None = None) -> None:
        self.field, self.vr, self.position, self.character = field, vr, position, character
        what = reason or f"character U+{ord(character):04X} at position {position} is not valid for VR {vr}"
        super().__init__(f"{field}: {what}")


def clean_text(value: str | bytes) -> str:
    """``value`` with the rule applied: TAB -> space, invalid characters removed (see module doc)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return _REMOVE.sub("", value.replace("\t", " "))


def is_clean(value: str) -> bool:
    """True when ``clean_text`` would not change ``value``."""
    return _INVALID.search(value) is None


def clean_model_text(value: str | bytes, *, limit: int = MAX_REPORT_CHARS) -> str:
    """Model output as it may be stored: cleaned, at most ``limit`` characters (cut with a note that
    says so), and never empty (an empty draft would be an empty report to sign)."""
    text = clean_text(value)
    if len(text) > limit:
        note = TRUNCATED_NOTE.format(limit=limit)
        text = text[: limit - len(note)].rstrip() + note
    return text if text.strip() else EMPTY_MODEL_TEXT


def require_valid(value: str, field: str, vr: str = "UT") -> str:
    """``value`` unchanged when it is valid for ``vr``, else ``InvalidReportText`` (never altered)."""
    if vr in SHORT_VR_MAX:
        match = _INVALID_SHORT.search(value)
        if match:
            raise InvalidReportText(field, vr, match.start(), match.group())
        if len(value) > SHORT_VR_MAX[vr]:
            raise InvalidReportText(
                field,
                vr,
                SHORT_VR_MAX[vr],
                value[SHORT_VR_MAX[vr]],
                f"longer than the {SHORT_VR_MAX[vr]} characters VR {vr} allows",
            )
        return value
    match = _INVALID.search(value)
    if match:
        raise InvalidReportText(field, vr, match.start(), match.group())
    return value
