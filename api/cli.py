"""``radialog api`` (serve the API with uvicorn) and ``radialog users`` (API keys)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from radialog.registry import Registry


@click.command()
@click.option("--host", default=None, help="Default: settings.api_host.")
@click.option("--port", type=int, default=None, help="Default: settings.api_port.")
def api(host: str | None, port: int | None) -> None:
    """Serve the reporting API and the radiologist's page."""
    from api.app import create_app
    from api.server import serve
    from radialog.settings import get_settings

    settings = get_settings()
    serve(create_app(settings), settings, host=host, port=port)


@click.group()
def users() -> None:
    """API users and their keys."""


def _registry() -> Registry:
    from radialog.registry import Registry
    from radialog.settings import get_settings

    return Registry.from_settings(get_settings())


@users.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["reader", "radiologist", "admin"]), required=True)
def users_create(name: str, role: str) -> None:
    """Create NAME and print its API key (shown only this once)."""
    from api.users import create_user

    registry = _registry()
    try:
        with registry.session() as session:
            key = create_user(session, name, role)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        registry.dispose()
    click.echo(key)


@users.command("list")
def users_list() -> None:
    """List users: name, role, created, revoked (an aligned table)."""
    from api.users import list_users
    from radialog.console import echo_table

    registry = _registry()
    with registry.session() as session:
        rows = [
            (
                u.name,
                u.role,
                u.created_at.isoformat(timespec="seconds"),
                u.revoked_at.isoformat(timespec="seconds") if u.revoked_at else None,
            )
            for u in list_users(session)
        ]
    registry.dispose()
    echo_table(["name", "role", "created", "revoked"], rows, empty="no users")


@users.command("revoke")
@click.argument("name")
def users_revoke(name: str) -> None:
    """Revoke NAME's key (the user stays in the audit log)."""
    from api.users import revoke_user

    registry = _registry()
    with registry.session() as session:
        found = revoke_user(session, name)
    registry.dispose()
    if not found:
        raise click.ClickException(f"no user {name!r}")
    click.echo(f"revoked {name}")
