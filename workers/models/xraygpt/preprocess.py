"""XrayGPT's image transform (``blip2_image_eval`` at 224 px), on our 8-bit windowed images.

Reference: PIL ``convert('RGB')`` -> torchvision ``Resize((224, 224), BICUBIC)`` on the PIL image (the aspect
ratio is not kept) -> ``ToTensor`` -> ``Normalize`` with CLIP's mean and std. torchvision resizes a PIL
image with Pillow itself, so Pillow is used directly (no torchvision import). A grayscale image converted to
RGB has three equal channels and Pillow resamples each band alike, so the 'L' image is resized once and
repeated: the same numbers, a third of the work (a test checks it against the RGB path).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SIZE = 224
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(image: np.ndarray, size: int = SIZE) -> torch.Tensor:
    """2-D uint8 array -> float tensor [3, size, size], normalised with CLIP's mean and std."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    resized = Image.fromarray(image, mode="L").resize((size, size), Image.Resampling.BICUBIC)
    plane = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    return (plane.unsqueeze(0).expand(3, -1, -1) - mean) / std


def batch_tensors(images: list[np.ndarray], size: int = SIZE) -> torch.Tensor:
    """[B, 3, size, size] for a list of images."""
    return torch.stack([to_tensor(image, size) for image in images])
