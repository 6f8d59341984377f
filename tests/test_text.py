"""The one text rule (reporting/text.py): what it keeps, what it removes, and that the API's pattern,
``is_clean`` and ``clean_text`` agree on every Unicode code point."""

from __future__ import annotations

import re

import pytest

from reporting.text import (
    EMPTY_MODEL_TEXT,
    MAX_REPORT_CHARS,
    TEXT_PATTERN,
    clean_model_text,
    clean_text,
    is_clean,
    require_valid,
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("om0vi\x0fgaly", "om0vigaly"),  # the tiny model's byte-fallback control byte
        ("a\tb", "a b"),  # TAB is no DICOM text character: a space
        ("line\r\nnext\x0cpage", "line\r\nnext\x0cpage"),  # CR, LF, FF stay
        ("".join(map(chr, range(0x20))), " \n\x0c\r"),  # every C0: TAB (a space), LF, FF, CR stay
        ("del\x7f c1\x80\x85\x9f end", "del c1 end"),
        ("lone \ud800\udfff\udc80 surrogates", "lone  surrogates"),
        (
            "\u202eRTL\u202c \u05d0 \u0644 \U0001f44d\U0001f3fd e\u0301 \ufffd",
            "\u202eRTL\u202c \u05d0 \u0644 \U0001f44d\U0001f3fd e\u0301 \ufffd",
        ),
        ('<script>alert(1)</script> \\ "', '<script>alert(1)</script> \\ "'),
    ],
)
def test_clean_text_keeps_what_dicom_text_values_hold(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean and is_clean(clean) and clean_text(clean) == clean


def test_bytes_from_a_tokenizer_are_decoded_with_replacement() -> None:
    assert clean_text(b"Cardio\xe2\x82 edema \xff\x0f") == "Cardio\ufffd edema \ufffd"


def test_the_api_pattern_is_clean_and_clean_text_agree_on_every_code_point() -> None:
    pattern = re.compile(TEXT_PATTERN)
    for code in range(0x110000):
        char = chr(code)
        surrogate = 0xD800 <= code <= 0xDFFF
        assert is_clean(char) == (bool(pattern.match(char)) and not surrogate), hex(code)
        assert is_clean(clean_text(char)), hex(code)
        if is_clean(char):
            assert clean_text(char) == char and require_valid(char, "t") == char


def test_model_text_is_capped_and_never_empty() -> None:
    long = clean_model_text("word " * 30_000)
    assert len(long) <= MAX_REPORT_CHARS and long.endswith("longer than 20,000 characters)") and is_clean(long)
    assert clean_model_text("\x00\x01 \t") == EMPTY_MODEL_TEXT
    assert clean_model_text("Normal.") == "Normal."
