"""Per-branch image transforms, as the reference's torchvision pipeline does them on a PIL 'L' image.

Resize(512) (shorter side to 512, Pillow BILINEAR, which antialiases when shrinking) -> CenterCrop
(448 for the LLM branch, 488 for the classifier) -> ToTensor ([0, 1], no mean/std) -> 3 channels.
Pillow is used directly so the result equals torchvision's without importing it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

RESIZE = 512
LLM_CROP = 448
CLASSIFIER_CROP = 488


def resize_shorter_side(image: Image.Image, size: int = RESIZE) -> Image.Image:
    """torchvision ``Resize(size)`` semantics: shorter side to ``size``, longer side truncated to int."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` offsets (Python round); inputs here are never smaller than size."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"image {w}x{h} is smaller than the crop {size}")
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def _to_pil(image: np.ndarray) -> Image.Image:
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    return Image.fromarray(image, mode="L")


def _crop_tensor(resized: Image.Image, crop: int) -> torch.Tensor:
    """Centre crop of an already resized image -> float tensor [3, crop, crop] in [0, 1]."""
    tensor = torch.from_numpy(np.asarray(center_crop(resized, crop), dtype=np.float32) / 255.0)
    return tensor.unsqueeze(0).expand(3, -1, -1).contiguous()


def to_model_tensor(image: np.ndarray, crop: int) -> torch.Tensor:
    """2-D uint8 array -> float tensor [3, crop, crop] in [0, 1]."""
    return _crop_tensor(resize_shorter_side(_to_pil(image)), crop)


def batch_tensors(images: list[np.ndarray], crop: int) -> torch.Tensor:
    """Stack several images for one branch: [B, 3, crop, crop]."""
    return torch.stack([to_model_tensor(image, crop) for image in images])


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="resize")
    return _POOL


def branch_batches(images: list[np.ndarray], crops: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Both branches' batches from ONE resize per image (both start with Resize(512)), resized in threads.

    Pillow releases the GIL while resampling, so a batch of radiographs uses several cores; the result is
    identical to :func:`batch_tensors` per crop.
    """
    resized = list(_pool().map(lambda image: resize_shorter_side(_to_pil(image)), images))
    return {crop: torch.stack([_crop_tensor(r, crop) for r in resized]) for crop in crops}
