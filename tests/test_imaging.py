"""DICOM -> model image: LUTs, windows, photometric, bit depths, compressed syntaxes, refusals; model transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless

from radialog.synthetic import make_cxr, to_jpeg_baseline
from radialog.imaging import UnusableImage, load_model_image
from workers.models.radialog_v2.transforms import (
    batch_tensors,
    branch_batches,
    center_crop,
    resize_shorter_side,
    to_model_tensor,
)


def save(ds: Dataset, tmp_path: Path, name: str = "x") -> Path:
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def no_window(ds: Dataset) -> Dataset:
    del ds.WindowCenter, ds.WindowWidth
    return ds


def raw_minmax(ds: Dataset) -> np.ndarray:
    raw = ds.pixel_array.astype(np.float64)
    return ((raw - raw.min()) / (raw.max() - raw.min()) * 255).astype(np.uint8)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_bit_depths_give_full_range_uint8(tmp_path: Path, bits: int) -> None:
    ds = make_cxr(bits_stored=bits, rows=256, cols=200)
    out = load_model_image(save(ds, tmp_path))
    assert out.dtype == np.uint8 and out.shape == (256, 200)
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_allclose(out.astype(int), raw_minmax(ds).astype(int), atol=1)


def test_monochrome1_is_inverted_to_white_bones(tmp_path: Path) -> None:
    m2 = load_model_image(save(make_cxr(rows=200, cols=200), tmp_path, "m2"))
    m1 = load_model_image(save(make_cxr(rows=200, cols=200, photometric="MONOCHROME1"), tmp_path, "m1"))
    assert np.abs(m1.astype(int) - m2.astype(int)).max() <= 1
    centre, lung = m2[100, 100], m2[96, 60]  # mediastinum (bright) vs lung (dark)
    assert centre > lung


def test_dx_monochrome1_with_inverse_presentation_lut_is_inverted_once(tmp_path: Path) -> None:
    """DX requires Presentation LUT Shape INVERSE with MONOCHROME1: it names the same single inversion."""
    m2 = load_model_image(save(make_cxr(modality="DX", rows=128, cols=128), tmp_path, "m2"))
    m1 = make_cxr(modality="DX", rows=128, cols=128, photometric="MONOCHROME1")
    m1.PresentationLUTShape = "INVERSE"
    out = load_model_image(save(m1, tmp_path, "m1"))
    assert np.abs(m2.astype(int) - out.astype(int)).max() <= 1


def test_rescale_slope_and_intercept_apply_before_windowing(tmp_path: Path) -> None:
    plain = no_window(make_cxr(rows=128, cols=128))
    flipped = no_window(make_cxr(rows=128, cols=128))
    flipped.RescaleSlope, flipped.RescaleIntercept = -1, 4095
    a = load_model_image(save(plain, tmp_path, "a"))
    b = load_model_image(save(flipped, tmp_path, "b"))
    assert np.abs((255 - a.astype(int)) - b.astype(int)).max() <= 1
    # a window given in modality units: slope 2 doubles the values, so the window must move with them
    scaled = make_cxr(rows=128, cols=128)
    scaled.RescaleSlope, scaled.RescaleIntercept = 2, 0
    scaled.WindowCenter, scaled.WindowWidth = 2 * 2048, 2 * 4096
    c = load_model_image(save(scaled, tmp_path, "c"))
    assert np.abs(c.astype(int) - a.astype(int)).max() <= 1


def test_first_of_several_windows_is_used(tmp_path: Path) -> None:
    ds = make_cxr(rows=128, cols=128)
    ds.WindowCenter, ds.WindowWidth = [1000, 3000], [400, 400]
    out = load_model_image(save(ds, tmp_path))
    raw = ds.pixel_array.astype(int)
    assert (out[raw < 790] == 0).all()
    assert (out[raw > 1210] == 255).all()


def test_voi_lut_sequence_wins_over_the_window(tmp_path: Path) -> None:
    ds = make_cxr(rows=128, cols=128)
    lut_item = Dataset()
    lut_item.LUTDescriptor = [4096, 0, 16]
    lut_item.add_new(0x00283006, "US", [4095 - v for v in range(4096)])  # LUTData, an inverting LUT
    ds.VOILUTSequence = [lut_item]
    out = load_model_image(save(ds, tmp_path))
    assert np.abs((255 - raw_minmax(ds).astype(int)) - out.astype(int)).max() <= 1


@pytest.mark.parametrize("codec", ["jpeg_baseline", "jpeg2000", "rle"])
def test_compressed_transfer_syntaxes_decode(tmp_path: Path, codec: str) -> None:
    reference = load_model_image(save(make_cxr(rows=256, cols=256), tmp_path, "ref"))
    ds = make_cxr(rows=256, cols=256)
    if codec == "jpeg_baseline":
        ds = to_jpeg_baseline(ds)
    else:
        ds.compress(JPEG2000Lossless if codec == "jpeg2000" else RLELossless)
    out = load_model_image(save(ds, tmp_path, codec))
    tolerance = 12 if codec == "jpeg_baseline" else 0  # lossy
    assert out.shape == reference.shape
    assert np.abs(out.astype(int) - reference.astype(int)).mean() <= max(tolerance / 3, 0.0)
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= (80 if tolerance else 0)


def test_odd_sizes_survive_to_model_tensors(tmp_path: Path) -> None:
    out = load_model_image(save(make_cxr(rows=301, cols=517), tmp_path))
    assert out.shape == (301, 517)
    for crop in (448, 488):
        tensor = to_model_tensor(out, crop)
        assert tuple(tensor.shape) == (3, crop, crop)
        assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
        assert bool((tensor[0] == tensor[2]).all())


def test_non_image_dataset_is_refused_with_a_reason(tmp_path: Path) -> None:
    ds = make_cxr(rows=64, cols=64)
    del ds.PixelData
    with pytest.raises(UnusableImage, match="no pixel data"):
        load_model_image(save(ds, tmp_path))


def test_multi_frame_colour_and_garbage_are_refused(tmp_path: Path) -> None:
    multi = make_cxr(rows=64, cols=64)
    multi.NumberOfFrames = 2
    multi.PixelData = multi.PixelData * 2
    with pytest.raises(UnusableImage, match="multi-frame"):
        load_model_image(save(multi, tmp_path, "multi"))
    colour = make_cxr(rows=64, cols=64, bits_stored=8)
    colour.SamplesPerPixel, colour.PhotometricInterpretation, colour.PlanarConfiguration = 3, "RGB", 0
    colour.PixelData = colour.PixelData * 3
    with pytest.raises(UnusableImage, match="colour"):
        load_model_image(save(colour, tmp_path, "colour"))
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(UnusableImage, match="not a readable DICOM"):
        load_model_image(garbage)
    blank = make_cxr(rows=64, cols=64)
    blank.PixelData = np.zeros((64, 64), np.uint16).tobytes()
    with pytest.raises(UnusableImage, match="blank"):
        load_model_image(save(blank, tmp_path, "blank"))


def test_resize_follows_torchvision_semantics() -> None:
    """Shorter side to 512, longer side int(512 * long / short), Pillow BILINEAR (antialiased)."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (2500, 2048), np.uint8), "L")
    out = resize_shorter_side(img)
    assert out.size == (512, int(512 * 2500 / 2048))
    assert np.array_equal(np.asarray(out), np.asarray(img.resize(out.size, Image.BILINEAR)))
    crop = center_crop(out, 448)
    top = round((out.size[1] - 448) / 2.0)
    assert np.array_equal(np.asarray(crop), np.asarray(out)[top : top + 448, 32:480])
    wide = resize_shorter_side(Image.new("L", (701, 350)))
    assert wide.size == (int(512 * 701 / 350), 512)


def test_shared_resize_gives_each_branch_exactly_its_own_pipeline() -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, shape, np.uint8) for shape in ((900, 700), (640, 1000), (512, 512))]
    both = branch_batches(images, (448, 488))
    for crop in (448, 488):
        assert torch.equal(both[crop], batch_tensors(images, crop))


def test_a_malformed_header_value_is_an_unusable_image_not_a_crash(tmp_path) -> None:
    """RescaleSlope with a decimal comma breaks the modality LUT: the study fails alone, with a reason."""
    from radialog.synthetic import make_cxr
    from radialog.imaging import UnusableImage, load_model_image

    ds = make_cxr(rows=64, cols=64)
    ds.RescaleSlope, ds.RescaleIntercept = "1.25", "0"
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    assert data.count(b"1.25") == 1
    path.write_bytes(data.replace(b"1.25", b"1,25"))  # as a sender with a decimal comma writes it
    with pytest.raises(UnusableImage, match="header values cannot be applied"):
        load_model_image(path)
