"""Container health checks for compose.yaml: exit 0 when healthy, 1 (with the reason on stderr) when not.

    python deploy/healthcheck.py dicom-echo HOST PORT CALLED_AET [--calling-aet AET]   # the node answers C-ECHO
    python deploy/healthcheck.py http URL                                             # 2xx from the API
    python deploy/healthcheck.py worker HOSTNAME                                      # model loaded, key in Redis

``worker`` reads the broker URL from RADIALOG_BROKER_URL (the same settings as the worker) and looks for
the readiness key ``radialog:worker:<HOSTNAME>`` that a worker keeps alive only once its model is loaded.
Nothing here prints patient data: these checks never touch a study.
"""

from __future__ import annotations

import sys

import click


@click.group()
def main() -> None:
    """Health checks used by compose.yaml."""


@main.command("dicom-echo")
@click.argument("host")
@click.argument("port", type=int)
@click.argument("called_aet")
@click.option("--calling-aet", default="HEALTHCHECK", show_default=True)
@click.option("--timeout", type=float, default=5.0, show_default=True)
def dicom_echo(host: str, port: int, called_aet: str, calling_aet: str, timeout: float) -> None:
    """C-ECHO the DICOM node (the AE title must be allowed by its policy, or echo is refused)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        _fail(f"no association with {called_aet}@{host}:{port}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if getattr(status, "Status", None) != 0x0000:
        _fail(f"C-ECHO answered {getattr(status, 'Status', 'nothing')}")


@main.command()
@click.argument("url")
@click.option("--timeout", type=float, default=5.0, show_default=True)
def http(url: str, timeout: float) -> None:
    """GET the URL and expect a 2xx answer."""
    import httpx

    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        _fail(f"{url}: {type(exc).__name__}")
    if not response.is_success:
        _fail(f"{url}: HTTP {response.status_code}")


@main.command()
@click.argument("hostname")
def worker(hostname: str) -> None:
    """The worker's readiness key exists in Redis (its model is loaded and it is alive)."""
    import redis

    from radialog.presence import ready_key
    from radialog.settings import Settings

    settings = Settings()
    try:
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=5)
        alive = client.exists(ready_key(hostname))
    except (redis.RedisError, OSError) as exc:
        _fail(f"broker unavailable: {type(exc).__name__}")
    if not alive:
        _fail(f"worker {hostname} has not announced a loaded model")


def _fail(reason: str) -> None:
    click.echo(f"unhealthy: {reason}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
