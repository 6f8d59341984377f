"""``radialog rules``: show the configured routing rules, and test them on a DICOM file."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def rules() -> None:
    """Routing rules: which studies get a pre-read and at what priority (settings ``routing_rules``)."""


@rules.command("show")
def show() -> None:
    """The rules in force, in the order they are tried (a settings error stops here, naming the field)."""
    from radialog.settings import get_settings

    for number, rule in enumerate(get_settings().routing_rules, 1):
        tests = rule.match.model_dump(exclude_none=True) or "every study"
        extra = f", reason: {rule.reason}" if rule.reason else ""
        click.echo(f"{number}. {rule.name}: {rule.action} at {rule.priority.value} when {tests}{extra}")


@rules.command("test")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--calling-ae", default=None, help="Calling AE title the file would arrive from.")
@click.option(
    "--store-priority",
    type=click.Choice(["LOW", "MEDIUM", "HIGH"]),
    default="MEDIUM",
    show_default=True,
    help="The C-STORE request's Priority field it would arrive with.",
)
def test(file: Path, calling_ae: str | None, store_priority: str) -> None:
    """Which rule FILE (one instance, as its own study) matches and why, after the node's image choice."""
    from dicom_node.header import read_header
    from dicom_node.selection import choose_image
    from radialog.routing import evaluate, explain, facts_of
    from radialog.settings import get_settings

    settings = get_settings()
    try:
        header = read_header(file)
    except Exception as exc:
        raise click.ClickException(f"not a readable DICOM file ({type(exc).__name__})") from exc
    attributes = {**header.attributes, "store_priority": store_priority}
    selection = choose_image([(1, attributes)])
    if selection.instance_id is None:
        click.echo(f"image choice: SKIPPED before the rules: {selection.reason}")
        return
    click.echo(f"image choice: {selection.reason}")
    facts = facts_of([(calling_ae, attributes)])
    for line in explain(facts, settings.routing_rules):
        click.echo(line)
    decision = evaluate(facts, settings.routing_rules)
    if decision.skipped:
        click.echo(f"result: SKIPPED by rule {decision.rule!r}: {decision.reason}")
    else:
        rule = repr(decision.rule) if decision.rule else "none (default)"
        click.echo(f"result: reported at priority {decision.priority.value} (rule {rule})")
    for note in decision.notes:
        click.echo(f"note: {note}")
