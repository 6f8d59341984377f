"""Per-branch image transforms, as the reference's torchvision pipeline does them on a PIL 'L' image.

Resize(512) (shorter side to 512, Pillow BILINEAR, which antialiases when shrinking) -> CenterCrop
(448 for the LLM branch, 488 for the classifier) -> ToTensor ([0, 1], no mean/std) -> 3 channels.
Pillow is used directly so the result equals torchvision's without importing it.
"""

from __future__ import annotations

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
    return image.resize((new_w, new_h), Image.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` offsets (Python round); inputs here are never smaller than size."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"image {w}x{h} is smaller than the crop {size}")
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def to_model_tensor(image: np.ndarray, crop: int) -> torch.Tensor:
    """2-D uint8 array -> float tensor [3, crop, crop] in [0, 1]."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    pil = center_crop(resize_shorter_side(Image.fromarray(image, mode="L")), crop)
    tensor = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)
    return tensor.unsqueeze(0).expand(3, -1, -1).contiguous()


def batch_tensors(images: list[np.ndarray], crop: int) -> torch.Tensor:
    """Stack several images for one branch: [B, 3, crop, crop]."""
    return torch.stack([to_model_tensor(image, crop) for image in images])
