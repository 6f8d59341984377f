"""The `radialog` command: one entry point for every process (node, worker, api, run, demo, model, bench).

Each subcommand is a thin shell over its package; heavy imports happen inside the command so that
`radialog --help` stays fast and a node host needs no torch import.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from radialog import __version__

#: Subcommands owned by the packages: name -> "module:attribute" of a click command or group.
#: Listed only when their module exists, so the CLI never shows a command that cannot run.
COMMANDS: dict[str, str] = {
    "node": "dicom_node.cli:node",
    "worker": "workers.cli:worker",
    "run": "workers.cli:run",
    "model": "workers.models.cli:model",
    "api": "api.cli:api",
    "users": "api.cli:users",
    "export": "reporting.cli:export",
    "rules": "dicom_node.rules_cli:rules",
    "demo": "radialog.demo:demo",
    "bench": "bench.cli:bench",
}


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


class LazyGroup(click.Group):
    """Imports a package's command only when it is invoked (keeps `--help` and the node light)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [name for name, target in COMMANDS.items() if _module_exists(target.split(":")[0])]
        return sorted(set(super().list_commands(ctx)) | set(lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target and _module_exists(target.split(":")[0]):
            module_name, attribute = target.split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup)
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
