"""What the CLI prints for people: aligned tables for listings, and progress for steps that take a while.

Only click and the standard library. On a terminal a running step shows its elapsed seconds, rewritten
in place once a second; in a log or a pipe it prints one line when it starts and one when it ends, so
logs stay readable and tests can read them.
"""

from __future__ import annotations

import sys
import threading
import time
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager

import click


def _width(text: str) -> int:
    """Columns a string takes in a terminal (wide East Asian characters take two, combining marks none)."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cell(value: object) -> str:
    text = "-" if value is None or value == "" else str(value)
    return " ".join(text.split())  # a newline or tab inside a value would break the row


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Collection[int] = ()) -> str:
    """``rows`` under ``headers`` in aligned columns (two spaces apart; columns in ``right`` right-aligned,
    for numbers); None or "" shows as "-". The last column is not padded."""
    cells = [[_cell(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(_width(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = []
        for i, value in enumerate(row):
            pad = " " * (widths[i] - _width(value))
            last = i == len(row) - 1
            parts.append(pad + value if i in right else value + ("" if last else pad))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def echo_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Collection[int] = (), empty: str = "(none)"
) -> None:
    """Print ``table(...)``, or ``empty`` when there is no row."""
    rows = list(rows)
    if not rows:
        click.echo(empty)
        return
    click.echo(table(headers, rows, right=right))


def _interactive(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def step(label: str, *, err: bool = False) -> Iterator[None]:
    """Announce a long step, show it running, and say how it ended and how long it took.

    ``label ...`` first; on a terminal the elapsed seconds tick in place; then ``label ... done in 12.3 s``
    (or ``failed after ...`` when the block raises, the exception going on)."""
    stream = sys.stderr if err else sys.stdout
    live = _interactive(stream)
    started = time.monotonic()
    stop = threading.Event()
    click.echo(f"{label} ...", err=err, nl=not live)

    def tick() -> None:
        while not stop.wait(1.0):
            click.echo(f"\r{label} ... {time.monotonic() - started:.0f} s", err=err, nl=False)

    ticker = threading.Thread(target=tick, name="radialog-progress", daemon=True) if live else None
    if ticker is not None:
        ticker.start()
    outcome = "failed after"
    try:
        yield
        outcome = "done in"
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        elapsed = time.monotonic() - started
        prefix = "\r" if live else ""
        click.echo(f"{prefix}{label} ... {outcome} {elapsed:.1f} s", err=err)
