"""The `radialog` command: one entry point for every process (node, worker, api, run, demo, model, bench).

Each subcommand is a thin shell over its package; heavy imports happen inside the command so that
`radialog --help` stays fast and a node host needs no torch import.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from radialog import __version__

#: Subcommands owned by the packages: name -> "module:attribute" of a click command or group. Every one ships
#: in the wheel: a module that fails to import fails its command loudly.
COMMANDS: dict[str, str] = {
    "node": "dicom_node.cli:node",
    "worker": "workers.cli:worker",
    "run": "composition.run:run",
    "model": "workers.models.cli:model",
    "api": "api.cli:api",
    "users": "api.cli:users",
    "export": "reporting.cli:export",
    "rules": "dicom_node.rules_cli:rules",
    "demo": "composition.demo:demo",
}
#: Commands of the source tree only (not in the wheel): listed when their package is there.
SOURCE_TREE_COMMANDS: dict[str, str] = {"bench": "bench.cli:bench"}


def _in_source_tree(target: str) -> bool:
    module = target.split(":")[0]
    package = module.split(".")[0]
    return importlib.util.find_spec(package) is not None and importlib.util.find_spec(module) is not None


def _target(name: str) -> str | None:
    if name in COMMANDS:
        return COMMANDS[name]
    target = SOURCE_TREE_COMMANDS.get(name)
    return target if target and _in_source_tree(target) else None


class LazyGroup(click.Group):
    """Imports a package's command only when it is invoked (keeps `--help` and the node light)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = [name for name in [*COMMANDS, *SOURCE_TREE_COMMANDS] if _target(name)]
        return sorted(set(super().list_commands(ctx)) | set(names))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _target(cmd_name)
        if target:
            module_name, attribute = target.split(":")
            command: click.Command = getattr(importlib.import_module(module_name), attribute)
            return command
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
