"""The image viewer's server side: the full frame of a stored DICOM image, rendered at the size, region
and window the page asks for (PNG, 8-bit), so the browser needs no DICOM code and no library.

Pipeline per request: decoded pixels (cached) -> Modality LUT (pydicom ``apply_modality_lut``) ->
the requested region resampled to the requested output size (Pillow, area average when shrinking,
bilinear when magnifying) -> VOI: a window (pydicom ``apply_windowing``: LINEAR, LINEAR_EXACT or
SIGMOID, PS3.3 C.11.2.1.2) or one of the header's VOI LUTs -> MONOCHROME1 (or a MONOCHROME2 image
with Presentation LUT Shape INVERSE) shown inverted, so the lowest value is white -> optional invert
-> 8-bit PNG. Outside the image is black.

Bounded work, so a huge image cannot stall the API: images over ``MAX_SOURCE_PIXELS`` are refused
from their header (nothing decoded), at most ``RENDER_SLOTS`` decodes/renders run at once (a request
that waits longer than ``SLOT_WAIT_S`` gets ``ViewerBusy``), the output is at most
``MAX_OUTPUT_SIDE`` pixels a side, and decoded images and resampled regions live in one LRU cache of
at most ``CACHE_BYTES``. A given image is decoded once even when several requests ask for it at once.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radialog.logging import get_logger

log = get_logger(__name__)

#: Largest image (rows x columns) the viewer decodes: 36 MP is beyond any chest radiograph (43 x 43 cm
#: at 0.1 mm is ~18 MP); a bigger one is refused from its header before any decoding.
MAX_SOURCE_PIXELS = 36_000_000
#: Largest rendered side in pixels (a 4K screen's viewport).
MAX_OUTPUT_SIDE = 2048
#: Decoded images (float32) and resampled regions kept in memory, in bytes.
CACHE_BYTES = 256 * 1024 * 1024
#: Renders at once, and how long a request waits for its turn before it is told to retry.
RENDER_SLOTS = 2
SLOT_WAIT_S = 15.0
FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class ViewerError(Exception):
    """The image cannot be rendered; subclasses say why (the API maps each to a problem type)."""


class ImageTooLarge(ViewerError):
    """More pixels than ``MAX_SOURCE_PIXELS``: refused from the header, nothing decoded."""


class NotRenderable(ViewerError):
    """Not a grayscale image this viewer can show (colour, no pixel data, undecodable)."""


class ViewerBusy(ViewerError):
    """Every render slot stayed busy for ``SLOT_WAIT_S``: retry shortly."""


class UnknownPreset(ViewerError):
    """The requested window preset is not in this image's header."""


@dataclass(frozen=True)
class Preset:
    """A way to window the image: a header window, a header VOI LUT, or the full value range.

    ``center`` / ``width`` are in modality units (for a LUT: the LUT's input range), so a drag can
    start from any preset.
    """

    id: str
    label: str
    center: float
    width: float
    function: str = "LINEAR"
    lut: int | None = None


@dataclass(frozen=True)
class VoiLut:
    """One VOI LUT of the header as a table: input ``first`` maps to ``table[0]``."""

    first: int
    table: np.ndarray
    label: str


@dataclass
class SourceImage:
    """One decoded frame after the Modality LUT, with what the header says about showing it."""

    values: np.ndarray  # float32, rows x columns, modality units
    photometric: str
    inverse_display: bool  # MONOCHROME1, or MONOCHROME2 with Presentation LUT Shape INVERSE
    presets: list[Preset]
    default_preset: str
    luts: list[VoiLut]
    frames: int
    bits_stored: int | None
    pixel_spacing: list[float] | None
    minimum: float = field(init=False)
    maximum: float = field(init=False)

    def __post_init__(self) -> None:
        self.minimum = float(np.min(self.values))
        self.maximum = float(np.max(self.values))

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def columns(self) -> int:
        return int(self.values.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes) + sum(int(lut.table.nbytes) for lut in self.luts)

    def preset(self, preset_id: str) -> Preset:
        for preset in self.presets:
            if preset.id == preset_id:
                return preset
        raise UnknownPreset(f"no window preset {preset_id!r} for this image")


@dataclass(frozen=True)
class RenderRequest:
    """What to show: a region of the image (image pixel coordinates, may reach outside it), the output
    size, the window (a preset id, or centre / width / function) and whether to invert."""

    x: float
    y: float
    w: float
    h: float
    out_width: int
    out_height: int
    preset: str | None = None
    center: float | None = None
    width: float | None = None
    function: str | None = None
    invert: bool = False


# -- reading ---------------------------------------------------------------------------------------
def _check_header(ds: Any) -> tuple[int, str]:
    if "PixelData" not in ds:
        raise NotRenderable("the instance has no pixel data")
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip().upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotRenderable(f"only grayscale images can be shown here (PhotometricInterpretation {photometric or '?'})")
    rows, columns = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    if rows <= 0 or columns <= 0:
        raise NotRenderable("the image header has no size (Rows / Columns)")
    if rows * columns > MAX_SOURCE_PIXELS:
        raise ImageTooLarge(f"{columns} x {rows} pixels is more than the viewer renders ({MAX_SOURCE_PIXELS:,})")
    return int(getattr(ds, "NumberOfFrames", 1) or 1), photometric


def _numbers(value: Any) -> list[float]:
    """A DS / IS value with VM 1-n as floats (empty when missing or malformed)."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return []


def _labels(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    return [str(v) for v in items]


def _voi_luts(ds: Any) -> list[VoiLut]:
    """Each VOI LUT item as a table, read by pydicom's own ``apply_voi`` over the LUT's input range."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_voi

    luts: list[VoiLut] = []
    for index, item in enumerate(ds.get("VOILUTSequence") or []):
        try:
            entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
            holder = Dataset()
            holder.VOILUTSequence = [item]
            if hasattr(ds, "file_meta"):
                holder.file_meta = ds.file_meta
            table = np.asarray(apply_voi(np.arange(first, first + entries, dtype=np.int64), holder, 0), np.float32)
        except Exception:  # noqa: BLE001 - a malformed LUT is left out, the image is still shown
            log.warning("VOI LUT ignored", extra={"index": index})
            continue
        label = str(item.get("LUTExplanation") or f"VOI LUT {index + 1}")
        luts.append(VoiLut(first, table, label))
    return luts


def _presets(ds: Any, luts: list[VoiLut], minimum: float, maximum: float) -> tuple[list[Preset], str]:
    presets = [
        Preset(f"lut:{i}", lut.label, lut.first + len(lut.table) / 2, float(len(lut.table)), "LINEAR", i)
        for i, lut in enumerate(luts)
    ]
    centers, widths = _numbers(ds.get("WindowCenter")), _numbers(ds.get("WindowWidth"))
    explanations = _labels(ds.get("WindowCenterWidthExplanation"))
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    function = function if function in FUNCTIONS else "LINEAR"
    for i, (center, width) in enumerate(zip(centers, widths)):
        if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
            continue  # an invalid header window (width 0 ...) is not offered
        label = explanations[i] if i < len(explanations) and explanations[i] else f"Window {i + 1}"
        presets.append(Preset(f"window:{i}", label, center, width, function))
    span = max(maximum - minimum, 1.0)
    presets.append(Preset("full", "Full range", minimum + span / 2, span + 1, "LINEAR"))
    default = next((p.id for p in presets if p.lut is not None), None) or next(
        (p.id for p in presets if p.id.startswith("window:")), "full"
    )
    return presets, default


def read_source(path: Path) -> SourceImage:
    """Decode the first frame of ``path`` and apply its Modality LUT (header checked first)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=False, defer_size=1024)
    except (InvalidDicomError, ValueError) as error:
        raise NotRenderable(f"not a readable DICOM file ({type(error).__name__})") from error
    frames, photometric = _check_header(header)  # before touching the (deferred) pixel data
    try:
        pixels = header.pixel_array
    except Exception as error:  # decoder missing or data truncated: this image only
        raise NotRenderable(f"the pixel data cannot be decoded ({type(error).__name__})") from error
    if frames > 1 and pixels.ndim == 3:
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise NotRenderable(f"unexpected pixel array shape {pixels.shape}")
    try:
        values = np.asarray(apply_modality_lut(pixels, header), dtype=np.float32)
    except Exception:  # noqa: BLE001 - a malformed rescale / LUT: show stored values rather than nothing
        log.warning("Modality LUT ignored")
        values = pixels.astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise NotRenderable("pixel values are not finite")
    luts = _voi_luts(header)
    inverse = photometric == "MONOCHROME1" or (
        str(header.get("PresentationLUTShape", "")).upper() == "INVERSE" and photometric == "MONOCHROME2"
    )
    spacing = _numbers(header.get("PixelSpacing") or header.get("ImagerPixelSpacing")) or None
    image = SourceImage(
        values=values,
        photometric=photometric,
        inverse_display=inverse,
        presets=[],
        default_preset="full",
        luts=luts,
        frames=frames,
        bits_stored=int(header.BitsStored) if "BitsStored" in header else None,
        pixel_spacing=spacing[:2] if spacing else None,
    )
    image.presets, image.default_preset = _presets(header, luts, image.minimum, image.maximum)
    return image


# -- rendering -------------------------------------------------------------------------------------
def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Values -> 0..255 through pydicom's windowing (an 8-bit unsigned output range)."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    target = Dataset()
    target.PhotometricInterpretation = "MONOCHROME2"
    target.BitsStored, target.PixelRepresentation = 8, 0  # output range 0..255
    target.WindowCenter, target.WindowWidth = float(center), float(width)
    target.VOILUTFunction = function
    return np.asarray(apply_windowing(values, target), dtype=np.float64)


def _lut(values: np.ndarray, lut: VoiLut) -> np.ndarray:
    """Values -> 0..255 through a header VOI LUT (scaled by the LUT's own output range)."""
    index = np.clip(np.rint(values).astype(np.int64) - lut.first, 0, len(lut.table) - 1)
    out = lut.table[index].astype(np.float64)
    low, high = float(lut.table.min()), float(lut.table.max())
    return (out - low) / (high - low) * 255.0 if high > low else np.zeros_like(out)


def resample(image: SourceImage, request: RenderRequest) -> tuple[np.ndarray, np.ndarray]:
    """The requested region at the output size: (values, inside mask). Area average when shrinking."""
    from PIL import Image

    out = np.zeros((request.out_height, request.out_width), dtype=np.float32)
    inside = np.zeros(out.shape, dtype=bool)
    x0, y0 = max(request.x, 0.0), max(request.y, 0.0)
    x1, y1 = min(request.x + request.w, float(image.columns)), min(request.y + request.h, float(image.rows))
    if x1 <= x0 or y1 <= y0:
        return out, inside
    sx, sy = request.out_width / request.w, request.out_height / request.h
    dx0, dy0 = round((x0 - request.x) * sx), round((y0 - request.y) * sy)
    dx1, dy1 = round((x1 - request.x) * sx), round((y1 - request.y) * sy)
    dx1, dy1 = min(max(dx1, dx0 + 1), request.out_width), min(max(dy1, dy0 + 1), request.out_height)
    dx0, dy0 = min(dx0, dx1 - 1), min(dy0, dy1 - 1)
    shrinking = (dx1 - dx0) < (x1 - x0) or (dy1 - dy0) < (y1 - y0)
    source = Image.fromarray(image.values, mode="F")
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    region = source.resize((dx1 - dx0, dy1 - dy0), resample=resample, box=(x0, y0, x1, y1))
    out[dy0:dy1, dx0:dx1] = np.asarray(region, dtype=np.float32)
    inside[dy0:dy1, dx0:dx1] = True
    return out, inside


def to_display(image: SourceImage, values: np.ndarray, inside: np.ndarray, request: RenderRequest) -> np.ndarray:
    """Windowed, inverted as the header and the request say, 8-bit; outside the image black.

    A preset that is a VOI LUT is applied as the LUT unless a centre or width is given (a drag that
    started from it); otherwise centre, width and function default to the preset's.
    """
    preset = image.preset(request.preset or image.default_preset)
    if preset.lut is not None and request.center is None and request.width is None:
        shown = _lut(values, image.luts[preset.lut])
    else:
        center = preset.center if request.center is None else request.center
        width = preset.width if request.width is None else request.width
        function = (request.function or preset.function).upper()
        function = function if function in FUNCTIONS else "LINEAR"
        # LINEAR needs a width of at least 1, the others more than 0 (PS3.3 C.11.2.1.2)
        shown = _window(values, center, max(width, 1.0 if function == "LINEAR" else 1e-6), function)
    if image.inverse_display != request.invert:
        shown = 255.0 - shown
    pixels = np.clip(np.rint(shown), 0, 255).astype(np.uint8)
    pixels[~inside] = 0
    return pixels


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# -- cache and slots -------------------------------------------------------------------------------
class ByteLRU:
    """A thread-safe LRU cache bounded by the bytes of its values (``size(value)``)."""

    def __init__(self, max_bytes: int, size: Callable[[Any], int]) -> None:
        self.max_bytes, self._size = max_bytes, size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        size = self._size(value)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._bytes -= self._size(self._items.pop(key))
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size(old)

    @property
    def bytes(self) -> int:
        return self._bytes


def _entry_size(value: Any) -> int:
    if isinstance(value, SourceImage):
        return value.nbytes
    return int(sum(part.nbytes for part in value))


class Renderer:
    """Decoded images and resampled regions in one byte-bounded cache; renders through a few slots."""

    def __init__(self, cache_bytes: int = CACHE_BYTES, slots: int = RENDER_SLOTS, wait_s: float = SLOT_WAIT_S) -> None:
        self.cache = ByteLRU(cache_bytes, _entry_size)
        self._slots = threading.BoundedSemaphore(slots)
        self._wait_s = wait_s
        self._decoding: dict[Any, threading.Lock] = {}
        self._lock = threading.Lock()
        self.decodes = 0  # how many times an image was decoded (the cache's effect, for tests and metrics)

    def source(self, key: Any, path: Path) -> SourceImage:
        """The decoded image for ``key`` (e.g. instance id + file), decoded once however many ask."""
        cached = self.cache.get(("source", key))
        if cached is not None:
            return cached
        with self._lock:
            lock = self._decoding.setdefault(key, threading.Lock())
        with lock:
            cached = self.cache.get(("source", key))
            if cached is None:
                cached = read_source(path)
                self.decodes += 1
                self.cache.put(("source", key), cached)
        with self._lock:
            self._decoding.pop(key, None)
        return cached

    def _slot(self) -> None:
        if not self._slots.acquire(timeout=self._wait_s):
            raise ViewerBusy("the viewer is busy rendering other images; retry in a moment")

    def info(self, key: Any, path: Path) -> SourceImage:
        self._slot()
        try:
            return self.source(key, path)
        finally:
            self._slots.release()

    def render(self, key: Any, path: Path, request: RenderRequest) -> bytes:
        """The PNG for ``request``; the resampled region is cached, so a new window costs one pass."""
        self._slot()
        try:
            image = self.source(key, path)
            geometry = (key, request.x, request.y, request.w, request.h, request.out_width, request.out_height)
            region = self.cache.get(("region", geometry))
            if region is None:
                region = resample(image, request)
                self.cache.put(("region", geometry), region)
            return encode_png(to_display(image, region[0], region[1], request))
        finally:
            self._slots.release()
