"""`radialog demo`: the whole chain once, on this machine, ending with a report in a PACS.

Orthanc (when Debian's orthanc + orthanc-python are installed) receives three generated chest X-ray
studies from a "modality" (dcmtk's storescu) and routes them to our node; `radialog run` (node, worker,
exporter, API in one process) reports them and sends the SRs back into Orthanc. Without Orthanc the
studies go straight to the node and the SRs stay in our spool. The demo then prints each report, where
its SR is in Orthanc, and the URL of the radiologist page.

With no real model configured (RADIALOG_MODEL_DIR / RADIALOG_BASE_MODEL_DIR, RaDialog v1's RADIALOG_V1_* settings
with ``--backend radialog-v1``, or XrayGPT's three RADIALOG_XRAYGPT_* settings with ``--backend xraygpt``) it
makes a tiny random model and says so loudly: its reports are random text, not a clinical model.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import click

from radialog.settings import Settings, get_settings

if TYPE_CHECKING:
    from composition.chain import Chain

DEMO_REDIS_DB = 8  # the demo's own Redis database: it is emptied at each start


@dataclass
class DemoStudy:
    label: str
    study_uid: str
    accession: str
    paths: list[Path]
    expect_report: bool


def _banner(text: str) -> None:
    line = "!" * 78
    click.secho(f"\n{line}\n{text}\n{line}\n", fg="yellow", bold=True, err=True)


def _demo_broker(settings: Settings) -> str:
    """The configured Redis host, database DEMO_REDIS_DB (never the production database)."""
    from radialog.messaging import is_redis_url

    parts = urlsplit(settings.broker_url)
    if not is_redis_url(settings.broker_url) or parts.scheme == "unix":  # a socket's path is no database number
        return f"redis://127.0.0.1:6379/{DEMO_REDIS_DB}"
    return urlunsplit((parts.scheme, parts.netloc, f"/{DEMO_REDIS_DB}", parts.query, parts.fragment))


def _model(settings: Settings, workdir: Path, backend: str) -> tuple[dict[str, str], bool]:
    """The worker's model settings (environment) and whether they are a tiny random model."""
    if backend == "radialog-v1":
        real = (settings.v1_dir, settings.v1_llm_dir, settings.v1_biovil_file)
        if all(real):
            return {
                "RADIALOG_MODEL_BACKEND": backend,
                "RADIALOG_V1_DIR": str(real[0]),
                "RADIALOG_V1_ADAPTER": settings.v1_adapter,
                "RADIALOG_V1_LLM_DIR": str(real[1]),
                "RADIALOG_V1_BIOVIL_FILE": str(real[2]),
            }, False
        names = "RADIALOG_V1_DIR, RADIALOG_V1_LLM_DIR, RADIALOG_V1_BIOVIL_FILE"
    elif backend == "xraygpt":
        real = (settings.xraygpt_vision_dir, settings.xraygpt_llm_dir, settings.xraygpt_checkpoint)
        if all(real):
            return {
                "RADIALOG_MODEL_BACKEND": "xraygpt",
                "RADIALOG_XRAYGPT_VISION_DIR": str(real[0]),
                "RADIALOG_XRAYGPT_LLM_DIR": str(real[1]),
                "RADIALOG_XRAYGPT_CHECKPOINT": str(real[2]),
            }, False
        names = "RADIALOG_XRAYGPT_VISION_DIR, RADIALOG_XRAYGPT_LLM_DIR, RADIALOG_XRAYGPT_CHECKPOINT"
    else:
        if settings.model_dir and settings.base_model_dir:
            return {
                "RADIALOG_MODEL_BACKEND": backend,
                "RADIALOG_MODEL_DIR": str(settings.model_dir),
                "RADIALOG_BASE_MODEL_DIR": str(settings.base_model_dir),
            }, False
        names = "RADIALOG_MODEL_DIR, RADIALOG_BASE_MODEL_DIR"
    _banner(
        f"No real model is configured ({names}).\n"
        "This demo uses a TINY RANDOM-WEIGHT model in the published file layout: its reports are\n"
        "random words, NOT a clinical model. See README 'Installing the real model'."
    )
    tiny = workdir / f"tiny-model-{backend}"
    complete = tiny / "COMPLETE"  # written last: a half-made model from an interrupted run is remade
    if not complete.exists():
        from radialog.console import step

        shutil.rmtree(tiny, ignore_errors=True)
        complete.parent.mkdir(parents=True, exist_ok=True)
        with step("making the tiny random model"):
            made = _make_tiny(tiny, backend)
        complete.write_text(json.dumps(made))
    return json.loads(complete.read_text()), True


def _make_tiny(directory: Path, backend: str) -> dict[str, str]:
    if backend == "radialog-v1":
        from workers.models.radialog_v1.tiny import make_tiny as make_tiny_v1

        return make_tiny_v1(directory).env()
    if backend == "xraygpt":
        from workers.models.xraygpt.tiny import make_tiny as make_tiny_xraygpt

        return make_tiny_xraygpt(directory).env()
    from workers.models.radialog_v2.tiny import make_tiny

    model_dir, base_dir = make_tiny(directory)
    return {
        "RADIALOG_MODEL_BACKEND": backend,
        "RADIALOG_MODEL_DIR": str(model_dir.resolve()),
        "RADIALOG_BASE_MODEL_DIR": str(base_dir.resolve()),
    }


def _write_studies(directory: Path) -> list[DemoStudy]:
    """Three studies as a chest room sends them: PA + lateral, a bedside AP, and a lateral only."""
    from radialog.synthetic import make_cxr

    directory.mkdir(parents=True, exist_ok=True)
    pa = make_cxr(modality="CR", view_position="PA", patient_index=1, seed=1)
    lateral = make_cxr(modality="CR", view_position="LL", patient_index=1, study_uid=pa.StudyInstanceUID, seed=2)
    ap = make_cxr(modality="DX", view_position="AP", patient_index=2, seed=3, rows=640, cols=560)
    lat_only = make_cxr(modality="DX", view_position="LATERAL", patient_index=3, seed=4)
    studies = []
    for label, datasets, expect in (
        ("CR PA + lateral", [pa, lateral], True),
        ("DX AP (bedside)", [ap], True),
        ("DX lateral only", [lat_only], False),
    ):
        paths = []
        for ds in datasets:
            path = directory / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        first = datasets[0]
        studies.append(DemoStudy(label, str(first.StudyInstanceUID), str(first.AccessionNumber), paths, expect))
    return studies


def _states(database_url: str, studies: list[DemoStudy]) -> dict[str, tuple[str, str | None]]:
    from sqlalchemy import select

    from radialog.registry import Registry, Study

    registry = Registry(database_url)
    try:
        with registry.session() as session:
            rows = session.scalars(
                select(Study).where(Study.study_instance_uid.in_([s.study_uid for s in studies]))
            ).all()
            return {row.study_instance_uid: (row.state, row.reason) for row in rows}
    finally:
        registry.dispose()


def _reports(database_url: str, study_uid: str) -> list[str]:
    from sqlalchemy import select

    from radialog.registry import Registry, Report, Study
    from reporting.render import report_text

    registry = Registry(database_url)
    try:
        with registry.session() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            if study is None:
                return []
            reports = session.scalars(select(Report).where(Report.study_id == study.id).order_by(Report.version))
            return [report_text(r) for r in reports]
    finally:
        registry.dispose()


@click.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the demo keeps its model, PACS and registry (default: <data_dir>/demo).",
)
@click.option("--timeout", type=float, default=900, show_default=True, help="Seconds to wait for the reports.")
@click.option(
    "--serve/--no-serve",
    default=False,
    show_default=True,
    help="Keep everything running afterwards (for the radiologist page) until Ctrl-C.",
)
@click.option(
    "--backend",
    type=click.Choice(["radialog-v2", "radialog-v1", "xraygpt"]),
    default=None,
    help="Model backend (default: RADIALOG_MODEL_BACKEND).",
)
def demo(workdir: Path | None, timeout: float, serve: bool, backend: str | None) -> None:
    """Send generated chest X-rays through the whole chain and print the reports."""
    from composition.chain import Chain, ChainError, orthanc_available

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not for this audience
    settings = get_settings()
    workdir = (workdir or settings.data_dir / "demo").resolve()
    model_env, tiny = _model(settings, workdir, backend or settings.model_backend)
    with_orthanc = orthanc_available()
    if not with_orthanc:
        click.echo(
            "Orthanc (+ orthanc-python) is not installed: the studies go straight to our node and the "
            "SRs stay in our spool. Install them (./scripts/setup as root does) for the PACS round trip."
        )
    shutil.rmtree(workdir / "chain", ignore_errors=True)
    chain = Chain(
        workdir / "chain",
        database_url=settings.database_url,
        redis_url=_demo_broker(settings),
        orthanc_stable_age=1,
        stable_after=1.0,
        single_process=True,
        with_orthanc=with_orthanc,
        flush_redis=True,
        extra_env={**model_env, **({} if tiny else {"RADIALOG_DEVICE": settings.device})},
    )
    database_url = settings.database_url or chain.env_sqlite_url()
    from radialog.console import step

    # Orthanc and `radialog run` run in sessions of their own (a Ctrl-C in the terminal reaches only us):
    # whatever ends the demo - Ctrl-C, SIGTERM from a service manager, an error - must stop them.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            # the worker loads the model before the chain answers: the longest step
            with step("starting: " + ("Orthanc + " if with_orthanc else "") + "radialog run (node, worker, API)"):
                chain.start()
        except (ChainError, TimeoutError) as exc:
            raise click.ClickException(f"the chain did not start: {exc}\n{chain.logs()}") from exc
        studies = _write_studies(workdir / "chain" / "studies")
        target = "Orthanc" if with_orthanc else "the node"
        for study in studies:
            result = chain.storescu(study.paths)
            if result.returncode != 0:
                raise click.ClickException(f"storescu to {target} failed: {result.stderr[-500:]}")
            click.echo(f"sent {study.label} ({len(study.paths)} image(s)) to {target}")
        _follow(chain, database_url, studies, timeout)
        ok = _print_results(chain, database_url, studies, with_orthanc)
        if serve:
            admin_key = chain.create_user(f"admin-{chain.user.split('-', 1)[1]}", "admin")
            click.echo(f"\nRadiologist page: {chain.api_url}/   (API key: {chain.api_key})")
            click.echo(f"Operations page: {chain.api_url}/   (admin API key: {admin_key}; 'Operations' in the header)")
        else:
            click.echo("\nRadiologist page: run `radialog demo --serve` to keep the chain up and open it.")
        click.echo(f"Logs: {chain.workdir}")
        if tiny:
            _banner("These reports come from a TINY RANDOM model: they are not clinical output.")
        if serve:
            click.echo("Serving until Ctrl-C ...")
            while True:
                chain.check_alive()
                time.sleep(1)
        if not ok:
            sys.exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the stop short
            signal.signal(signum, signal.SIG_IGN)
        chain.stop()


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM ends the demo exactly as Ctrl-C does (its ``finally`` stops Orthanc and `radialog run`)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _follow(chain: Chain, database_url: str, studies: list[DemoStudy], timeout: float) -> None:
    """Print each study's state changes until every study has reached an end state."""
    # Without a PACS there is nothing to export to: REPORTED is then the end of the road.
    terminal = {"SKIPPED", "FAILED", "EXPORTED" if chain.with_orthanc else "REPORTED"}
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chain.check_alive()
        states = _states(database_url, studies)
        for study in studies:
            state, reason = states.get(study.study_uid, ("(not yet received)", None))
            if seen.get(study.study_uid) != state:
                seen[study.study_uid] = state
                suffix = f": {reason}" if reason and state in {"SKIPPED", "FAILED"} else ""
                done = sum(seen.get(s.study_uid) in terminal for s in studies)
                click.echo(
                    f"  [{time.strftime('%H:%M:%S')}] {study.label:<18} {state}{suffix}"
                    f"   ({done}/{len(studies)} finished)"
                )
        if all(seen.get(s.study_uid) in terminal for s in studies):
            return
        time.sleep(0.5)
    raise click.ClickException(f"not every study finished within {timeout:.0f} s:\n{chain.logs()}")


def _print_results(chain: Chain, database_url: str, studies: list[DemoStudy], with_orthanc: bool) -> bool:
    ok = True
    states = _states(database_url, studies)
    for study in studies:
        state, reason = states[study.study_uid]
        click.secho(f"\n=== {study.label}: {state}", bold=True)
        if state in {"SKIPPED", "FAILED"}:
            click.echo(f"reason: {reason}")
            ok &= not study.expect_report
            continue
        for text in _reports(database_url, study.study_uid):
            click.echo(text)
        if with_orthanc:
            srs = chain.orthanc_srs(study.study_uid)
            for sr in srs:
                click.echo(
                    f"SR in Orthanc: {chain.orthanc_url}/instances/{sr['ID']}  "
                    f"(series '{sr.get('SeriesDescription', '')}', same study)"
                )
            ok &= bool(srs)
        ok &= study.expect_report and state == ("EXPORTED" if with_orthanc else "REPORTED")
    return ok
