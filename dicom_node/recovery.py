"""Start-up recovery of the spool.

Why every instance that got Success is in the registry: Success is returned only after the registry
commit, which comes after the file's fsync, rename and directory fsync. A crash at any earlier point
means the sender got no Success (it retries). What a crash can leave behind:

* half-written temp files under ``<spool>/.incoming`` -> deleted here;
* a complete, renamed file whose registry commit never happened (crash between rename and commit, or a
  registry error answered 0xA700) -> recorded here from its header, so spool and registry agree again;
  the sender's retry then finds a duplicate and gets Success without a second row or file.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import OperationalError, StatementError

from dicom_node import spool
from dicom_node.header import read_header
from dicom_node.records import Seen, record_instance, seen_before
from radialog.logging import get_logger, uid_ref
from radialog.registry import Instance, Registry, utcnow
from radialog.settings import Settings
from radialog.uids import is_valid_uid

log = get_logger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    partial_removed: int
    orphans_recorded: int
    orphans_unusable: int


def recover_spool(settings: Settings, registry: Registry) -> RecoveryReport:
    """Delete temp files and record complete files the registry does not know yet."""
    spool_dir = settings.spool_dir
    removed = spool.remove_partial_files(spool_dir)
    with registry.session() as session:
        known = set(session.scalars(select(Instance.path)))
    recorded = unusable = 0
    for rel_path in spool.spooled_files(spool_dir):
        if rel_path in known:
            continue
        path = spool_dir / rel_path
        try:
            header = read_header(path)
        except Exception as exc:  # noqa: BLE001 - a file we cannot read is reported, not fatal
            log.warning("spool file unreadable at recovery", extra={"error": type(exc).__name__})
            unusable += 1
            continue
        study_uid, sop_uid = header.study_instance_uid, header.sop_instance_uid
        if (
            not (is_valid_uid(study_uid) and is_valid_uid(sop_uid))
            or spool.relative_path(study_uid, sop_uid) != rel_path
        ):
            log.warning("spool file does not match its path at recovery", extra={"sop": uid_ref(sop_uid)})
            unusable += 1
            continue
        try:
            with registry.session() as session:
                if seen_before(session, sop_uid, study_uid) is Seen.NEW:
                    record_instance(
                        session,
                        header,
                        rel_path=rel_path,
                        size_bytes=path.stat().st_size,
                        calling_ae_title=None,
                        now=utcnow(),
                    )
                    recorded += 1
        except OperationalError:
            raise  # the registry is down: the node must not start (and must not answer Success)
        except (StatementError, ValueError) as exc:  # this file's values cannot be recorded: it alone is set aside
            log.warning(
                "spool file cannot be recorded at recovery",
                extra={"sop": uid_ref(sop_uid), "error": type(exc).__name__},
            )
            unusable += 1
    report = RecoveryReport(removed, recorded, unusable)
    log.info(
        "spool recovered",
        extra={"partial_removed": removed, "orphans_recorded": recorded, "orphans_unusable": unusable},
    )
    return report
