"""The PNG preview: exactly the 8-bit image the model saw (``radialog.imaging.load_model_image``)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.problems import Problem
from radialog.registry import Instance, Report, Study
from radialog.settings import Settings


def reported_instance(session: Session, study: Study, report: Report | None) -> Instance:
    """The report's source image, else the image the node selected for the model."""
    instance = None
    if report is not None and report.source_instance_uid:
        instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == report.source_instance_uid))
    if instance is None and study.selected_instance_id is not None:
        instance = session.get(Instance, study.selected_instance_id)
    if instance is None:
        raise Problem(409, "no-image", f"study {study.id} has no selected image (state {study.state})")
    return instance


def preview_png(settings: Settings, instance: Instance, max_side: int = 1024) -> bytes:
    from radialog.imaging import UnusableImage, load_model_image

    path = Path(settings.spool_dir) / instance.path
    try:
        pixels = load_model_image(path)
    except UnusableImage as exc:
        raise Problem(409, "image-unusable", f"the image cannot be shown: {exc}") from exc
    except FileNotFoundError as exc:
        raise Problem(409, "image-missing", "the image file is no longer in the spool") from exc
    image = Image.fromarray(pixels, mode="L")
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
