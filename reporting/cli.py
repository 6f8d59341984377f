"""`radialog export`: look at the outbox, re-arm dead rows, deliver what is due (ops without Celery)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from sqlalchemy import select

if TYPE_CHECKING:
    from radialog.registry import Registry
    from radialog.settings import Settings


def _context() -> tuple[Registry, Settings]:
    from radialog.registry import Registry
    from radialog.settings import get_settings

    settings = get_settings()
    return Registry.from_settings(settings), settings


@click.group()
def export() -> None:
    """The export outbox: SR versions waiting for, sent to, or given up on by each destination."""


@export.command("list")
@click.option("--state", type=click.Choice(["PENDING", "SENT", "DEAD"]), default=None, help="Only this state.")
@click.option("--limit", default=50, show_default=True)
def list_exports(state: str | None, limit: int) -> None:
    """Show outbox rows, newest first."""
    from radialog.registry import Export, Report

    registry, _ = _context()
    with registry.session() as session:
        query = select(Export, Report).join(Report, Export.report_id == Report.id).order_by(Export.id.desc())
        if state:
            query = query.where(Export.state == state)
        rows = session.execute(query.limit(limit)).all()
        click.echo(f"{'id':>6} {'study':>6} {'ver':>3} {'destination':<16} {'state':<8} {'tries':>5}  next / sent / reason")
        for export_row, report in rows:
            when = export_row.sent_at or export_row.next_attempt_at
            tail = f"{when.isoformat(timespec='seconds') if when else '-'}"
            if export_row.last_error:
                tail += f"  {export_row.last_error}"
            click.echo(
                f"{export_row.id:>6} {report.study_id:>6} {report.version:>3} {export_row.destination:<16} "
                f"{export_row.state:<8} {export_row.attempts:>5}  {tail}"
            )


@export.command("retry")
@click.argument("export_id", type=int)
def retry(export_id: int) -> None:
    """Re-arm a DEAD (or waiting) row: due now, with a fresh attempt budget."""
    from reporting.export import rearm

    registry, _ = _context()
    if not rearm(registry, export_id):
        raise click.ClickException(f"export {export_id} does not exist or was already sent")
    click.echo(f"export {export_id} re-armed")


@export.command("send-due")
def send_due() -> None:
    """Deliver every row that is due now, one after the other, and print the outcomes."""
    from reporting.export import deliver_due

    registry, settings = _context()
    outcomes = deliver_due(registry, settings)
    for export_id, outcome in outcomes.items():
        click.echo(f"export {export_id}: {outcome}")
    click.echo(f"{len(outcomes)} due, {sum(o == 'SENT' for o in outcomes.values())} sent")
