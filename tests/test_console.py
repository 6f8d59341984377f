"""radialog/console.py: aligned tables for listing commands, and progress lines for long steps."""

from __future__ import annotations

import pytest

from radialog.console import step, table


def test_table_aligns_columns_numbers_to_the_right_and_wide_characters_by_their_width() -> None:
    text = table(
        ["id", "name", "state"], [(7, "pacs", "SENT"), (1234, "主PACS", None), (5, "a\tb\nc", "DEAD")], right={0}
    )
    assert text.splitlines() == [
        "  id  name    state",
        "   7  pacs    SENT",
        "1234  主PACS  -",  # the wide character takes two columns; an empty value shows as "-"
        "   5  a b c   DEAD",  # a tab or newline inside a value never breaks the row
    ]


def test_step_says_when_it_starts_how_it_ends_and_how_long_it_took(capsys: pytest.CaptureFixture[str]) -> None:
    with step("loading the model"):
        pass
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "loading the model ..."
    assert out[1].startswith("loading the model ... done in ") and out[1].endswith(" s")
    with pytest.raises(RuntimeError), step("sending"):
        raise RuntimeError("peer down")
    assert capsys.readouterr().out.splitlines()[1].startswith("sending ... failed after ")
