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
    from radialog.console import echo_table
    from radialog.registry import Export, Report

    registry, _ = _context()
    with registry.session() as session:
        # outer join: event rows (study.failed, export.dead webhooks) have no report version
        query = select(Export, Report).outerjoin(Report, Export.report_id == Report.id).order_by(Export.id.desc())
        if state:
            query = query.where(Export.state == state)
        rows = []
        for export_row, report in session.execute(query.limit(limit)).all():
            when = export_row.sent_at or export_row.next_attempt_at
            study = report.study_id if report is not None else export_row.study_id
            what = export_row.event or (f"v{report.version}" if report is not None else None)
            rows.append(
                (
                    export_row.id,
                    study,
                    what,
                    export_row.destination,
                    export_row.state,
                    export_row.attempts,
                    when.isoformat(timespec="seconds") if when else None,
                    export_row.last_error,
                )
            )
    echo_table(
        ["id", "study", "carries", "destination", "state", "tries", "next / sent", "last error"],
        rows,
        right={0, 1, 5},
        empty="no exports",
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
    from radialog.console import step
    from reporting.export import deliver_due

    registry, settings = _context()
    with step("delivering what is due"):
        outcomes = deliver_due(registry, settings)
    for export_id, outcome in outcomes.items():
        click.echo(f"export {export_id}: {outcome}")
    click.echo(f"{len(outcomes)} due, {sum(o == 'SENT' for o in outcomes.values())} sent")
