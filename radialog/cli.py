"""The `radialog` command: one entry point for every process (node, worker, api, run, demo, model, bench).

Each subcommand is a thin shell over its package; heavy imports happen inside the command so that
`radialog --help` stays fast and a node host needs no torch import.
"""

from __future__ import annotations

import click

from radialog import __version__


@click.group()
@click.version_option(__version__, prog_name="radialog")
@click.option("--log-level", default="INFO", show_default=True, envvar="RADIALOG_LOG_LEVEL")
def main(log_level: str) -> None:
    """radialog-node: AI draft reports for chest X-rays, as DICOM SR, with a radiologist dialog."""
    from radialog import logging as rlog

    rlog.configure(log_level)


@main.group()
def db() -> None:
    """The study registry."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the registry schema to the newest revision."""
    from radialog.registry import Registry
    from radialog.settings import get_settings

    settings = get_settings()
    Registry.from_settings(settings).dispose()
    click.echo(f"registry at newest revision: {settings.resolved_database_url.split('@')[-1]}")


if __name__ == "__main__":
    main()
