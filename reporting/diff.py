"""What changed between two versions of a report, word by word (stdlib ``difflib``).

Words are runs of non-space characters; whitespace only separates them, so a re-wrapped line is no
change. The versions list shows these runs (kept, inserted, deleted) beside each version.
"""

from __future__ import annotations

import difflib

#: Above this many words in the two texts together the diff is one "replaced everything" pair:
#: SequenceMatcher is quadratic in the worst case and a report is a few hundred words.
MAX_DIFF_WORDS = 12_000

EQUAL, INSERT, DELETE = "equal", "insert", "delete"


def word_diff(old: str | None, new: str | None) -> list[tuple[str, str]]:
    """``[(op, text)]`` turning ``old`` into ``new``; ``op`` is "equal", "insert" or "delete" and
    ``text`` the words of that run joined by single spaces (a replacement is a delete then an insert)."""
    a, b = (old or "").split(), (new or "").split()
    if len(a) + len(b) > MAX_DIFF_WORDS:
        if a == b:
            return [(EQUAL, " ".join(a))] if a else []
        return [(op, " ".join(words)) for op, words in ((DELETE, a), (INSERT, b)) if words]
    parts: list[tuple[str, str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            parts.append((EQUAL, " ".join(a[i1:i2])))
            continue
        if tag in ("delete", "replace"):
            parts.append((DELETE, " ".join(a[i1:i2])))
        if tag in ("insert", "replace"):
            parts.append((INSERT, " ".join(b[j1:j2])))
    return parts
