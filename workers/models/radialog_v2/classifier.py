"""RaDialog's CheXpert findings classifier: its own BioViL-T (eval mode) + a two-layer head.

Projected patch embeddings [B,128,16,16] at 488 px -> avg_pool2d(4) -> 2048 -> fc1 512 -> ReLU -> fc2 14;
sigmoid > 0.5 (on fp16, as the reference) marks a label present. Weights come from the published Lightning checkpoint
(``state_dict`` keys ``model.biovil_encoder.*``, ``model.fc1.*``, ``model.fc2.*``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from workers.models.base import ClassifierFinding
from workers.models.prompts import CHEXPERT_LABELS
from workers.models.radialog_v2.biovil import BioViLT
from workers.models.radialog_v2.checkpoint_io import ModelFileError, torch_load_checked
from workers.models.radialog_v2.state_dicts import load_exact

#: Keys of the Lightning state dict that are training-only and not part of the classifier.
IGNORED_PREFIXES = ("criterion.",)


class ChexpertClassifier(nn.Module):
    """BioViL-T (joint 128, running BN statistics) -> pooled 4x4 grid -> MLP -> 14 CheXpert logits."""

    def __init__(self, num_classes: int = len(CHEXPERT_LABELS), resnet_width: int = 64):
        super().__init__()
        self.biovil_encoder = BioViLT(joint_feature_size=128, per_image_norm=False, resnet_width=resnet_width)
        self.fc1 = nn.Linear(128 * 4 * 4, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.biovil_encoder(x).projected_patch_embeddings
        x = torch.nn.functional.avg_pool2d(x, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, threshold: float = 0.5) -> list[list[ClassifierFinding]]:
        """Per image, all 14 labels with probability and presence, decided as the reference does.

        The reference runs the classifier in half precision and thresholds ``sigmoid(logits) > 0.5`` on
        the fp16 result. fp16 has no value between 0.5 and 0.5 + 2**-11, so a logit in (0, ~0.001) is
        "absent" there although its float32 probability is above 0.5: the logits are rounded to fp16 and
        the sigmoid's result too (computed in float32, as CUDA's half sigmoid does) on every device.
        """
        logits16 = self(images).to(torch.float16)
        probs = torch.sigmoid(logits16.float()).to(torch.float16).cpu()
        return [
            [ClassifierFinding(label, float(p), bool(p > threshold)) for label, p in zip(CHEXPERT_LABELS, row.tolist())]
            for row in probs
        ]


def classifier_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The classifier's weights from a Lightning checkpoint: ``model.`` stripped, training-only keys dropped."""
    checkpoint = torch_load_checked(path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ModelFileError(f"{path.name}: not a Lightning checkpoint (no 'state_dict' mapping)")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        out[key.removeprefix("model.")] = value
    return out


def load_classifier(path: Path, device: torch.device, dtype: torch.dtype) -> ChexpertClassifier:
    """Build the classifier sized from the file, load it exactly (any key/shape problem is an error)."""
    state = classifier_state_dict(path)
    conv1 = state.get("biovil_encoder.encoder.encoder.conv1.weight")
    if conv1 is None:
        raise ModelFileError(f"{path.name}: missing key model.biovil_encoder.encoder.encoder.conv1.weight")
    model = ChexpertClassifier(resnet_width=int(conv1.shape[0]))
    load_exact(model, state, source=path.name, key_prefix="model.")
    return model.to(device=device, dtype=dtype).eval()
