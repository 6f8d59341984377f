"""The image viewer: one stored image of a study, rendered server-side (``api.viewer``) at the region,
size and window the page asks for. ``GET .../image`` says what there is to show; ``.../image/render``
returns the PNG. The model's own 8-bit view stays at ``.../image.png`` (routes/reports.py)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session

from api import audit
from api.deps import DB, AnyUser, AppSettings
from api.imaging import reported_instance
from api.lookups import get_study
from api.problems import Problem, Responses, problem_responses
from api.schemas import MAX_ID, ImageInfo, ImageRef, StudyId, WindowPreset
from api.viewer import (
    MAX_OUTPUT_SIDE,
    ImageTooLarge,
    NotRenderable,
    Renderer,
    RenderRequest,
    SourceImage,
    UnknownPreset,
    ViewerBusy,
)
from radialog.registry import Instance, Study
from radialog.registry.queries import latest_report
from radialog.settings import Settings

T = TypeVar("T")
router = APIRouter(prefix="/studies/{study_id}", tags=["images"])
_ERRORS = problem_responses(401, 403, 404, 409, 422, 503)
_PNG: Responses = {200: {"description": "The rendered region (8-bit grayscale PNG)", "content": {"image/png": {}}}}
#: A render is audited once per user, study and image within this many seconds: a window drag asks for
#: dozens of renders, one "image.read" entry says who looked at the image.
AUDIT_EVERY_S = 600.0
_LOCK = threading.Lock()

InstanceParam = Annotated[
    int | None,
    Query(
        ge=1,
        le=MAX_ID,
        description="An image of the study (default: the reported image, else the one chosen for the model)",
    ),
]
Coordinate = Annotated[float | None, Query(ge=-1e6, le=1e6)]
Extent = Annotated[float | None, Query(ge=0.01, le=1e6, description="At least 1/100 pixel")]
OutSide = Annotated[int | None, Query(ge=1, le=MAX_OUTPUT_SIDE)]


class _RecentReads:
    """Who read which image recently, so renders are audited once per ``AUDIT_EVERY_S`` (bounded)."""

    def __init__(self, size: int = 4096) -> None:
        self._seen: OrderedDict[tuple[str, int, int], float] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def due(self, key: tuple[str, int, int]) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last < AUDIT_EVERY_S:
                return False
            self._seen[key] = now
            self._seen.move_to_end(key)
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)
            return True


def _state(request: Request) -> tuple[Renderer, _RecentReads]:
    """The app's renderer and read log, made on first use (one per app, shared by its threads)."""
    state = request.app.state
    with _LOCK:
        if getattr(state, "viewer", None) is None:
            state.viewer = (Renderer(), _RecentReads())
    return state.viewer


def _instance(session: Session, study: Study, instance_id: int | None) -> Instance:
    if instance_id is None:
        return reported_instance(session, study, latest_report(session, study.id))
    instance = session.get(Instance, instance_id)
    if instance is None or instance.study_id != study.id:
        raise Problem(404, "instance-not-found", f"study {study.id} has no image {instance_id}")
    return instance


def _load(
    renderer: Renderer, settings: Settings, instance: Instance, work: Callable[[Renderer, tuple[int, str], Path], T]
) -> T:
    """``work(renderer, cache key, file)`` with the viewer's errors turned into problem details."""
    path = Path(settings.spool_dir) / instance.path
    try:
        return work(renderer, (instance.id, instance.path), path)
    except FileNotFoundError as exc:
        raise Problem(409, "image-missing", "the image file is no longer in the spool") from exc
    except ImageTooLarge as exc:
        raise Problem(409, "image-too-large", str(exc)) from exc
    except NotRenderable as exc:
        raise Problem(409, "image-unusable", f"the image cannot be shown: {exc}") from exc
    except UnknownPreset as exc:
        raise Problem(422, "unknown-preset", str(exc)) from exc
    except ViewerBusy as exc:
        raise Problem(503, "viewer-busy", str(exc), headers={"Retry-After": "2"}) from exc


def _label(instance: Instance) -> str:
    attributes = instance.attributes or {}
    parts = [attributes.get("modality"), attributes.get("view_position"), attributes.get("series_description")]
    return " ".join(str(p) for p in parts if p) or f"image {instance.id}"


def _info(image: SourceImage, instance: Instance, study: Study, reported: Instance) -> ImageInfo:
    return ImageInfo(
        instance_id=instance.id,
        rows=image.rows,
        columns=image.columns,
        frames=image.frames,
        photometric_interpretation=image.photometric,
        inverse_display=image.inverse_display,
        bits_stored=image.bits_stored,
        pixel_spacing=image.pixel_spacing,
        value_min=image.minimum,
        value_max=image.maximum,
        default_preset=image.default_preset,
        presets=[
            WindowPreset(
                id=p.id, label=p.label, center=p.center, width=p.width, function=p.function, lut=p.lut is not None
            )
            for p in image.presets
        ],
        images=[ImageRef(id=i.id, label=_label(i), reported=i.id == reported.id) for i in study.instances],
    )


def _fit(w: float, h: float, out_width: int | None, out_height: int | None) -> tuple[int, int]:
    """The output size: as given, else the region's aspect with the given side (or fitting 1024 x 1024)."""
    if out_width is not None and out_height is not None:
        return out_width, out_height
    if out_width is None and out_height is None:
        scale = min(1024 / w, 1024 / h)
    else:
        scale = out_width / w if out_width is not None else out_height / h  # type: ignore[operator]  # one is set

    def side(value: float) -> int:
        return max(1, min(MAX_OUTPUT_SIDE, round(value)))

    return out_width or side(w * scale), out_height or side(h * scale)


@router.get("/image", response_model=ImageInfo, responses=_ERRORS)
def image_info(
    study_id: StudyId,
    request: Request,
    session: DB,
    who: AnyUser,
    settings: AppSettings,
    instance: InstanceParam = None,
) -> ImageInfo:
    """Size, value range and window presets (header windows, VOI LUTs, full range) of one image."""
    study = get_study(session, study_id)
    reported = reported_instance(session, study, latest_report(session, study_id))
    chosen = _instance(session, study, instance)
    renderer, reads = _state(request)
    image = _load(renderer, settings, chosen, lambda r, key, path: r.info(key, path))
    reads.due((who.name, study_id, chosen.id))  # this read is audited below; renders need not repeat it
    audit.record(session, who, "image.read", study_id, instance=chosen.id)
    session.commit()
    return _info(image, chosen, study, reported)


@router.get("/image/render", response_class=Response, responses={**_PNG, **_ERRORS})
def image_render(
    study_id: StudyId,
    request: Request,
    session: DB,
    who: AnyUser,
    settings: AppSettings,
    instance: InstanceParam = None,
    x: Coordinate = None,
    y: Coordinate = None,
    w: Extent = None,
    h: Extent = None,
    out_width: OutSide = None,
    out_height: OutSide = None,
    preset: Annotated[str | None, Query(pattern=r"^(lut:\d{1,3}|window:\d{1,3}|full)$")] = None,
    window_center: Annotated[float | None, Query(ge=-1e9, le=1e9)] = None,
    window_width: Annotated[float | None, Query(gt=0, le=1e9)] = None,
    function: Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"] | None = None,
    invert: bool = False,
) -> Response:
    """The region ``x, y, w, h`` (image pixels; default the whole image) at ``out_width`` x
    ``out_height`` (default: fit in 1024), windowed by ``preset`` or ``window_center`` /
    ``window_width`` / ``function``, MONOCHROME1 shown inverted, ``invert`` flipping that."""
    study = get_study(session, study_id)
    chosen = _instance(session, study, instance)
    renderer, reads = _state(request)

    def render(r: Renderer, key: tuple[int, str], path: Path) -> bytes:
        image = r.info(key, path)
        rx, ry = x if x is not None else 0.0, y if y is not None else 0.0
        rw, rh = w if w is not None else image.columns - rx, h if h is not None else image.rows - ry
        if rw <= 0 or rh <= 0:
            raise Problem(422, "empty-region", "the region must have a positive width and height")
        ow, oh = _fit(rw, rh, out_width, out_height)
        return r.render(
            key, path, RenderRequest(rx, ry, rw, rh, ow, oh, preset, window_center, window_width, function, invert)
        )

    png = _load(renderer, settings, chosen, render)
    if reads.due((who.name, study_id, chosen.id)):
        audit.record(session, who, "image.read", study_id, instance=chosen.id)
    session.commit()
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})  # patient data
