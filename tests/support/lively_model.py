"""Images for tests on the tiny model, and the ones whose labels are clear of the threshold.

``radialog model make-tiny`` writes a lively model (:mod:`workers.models.radialog_v2.tiny`): its labels vary
with the image and its answers end at different lengths, so batched-vs-alone comparisons can fail on it.
Images whose labels sit near the 0.5 threshold are left out (:func:`clear_seeds`), because batch size
changes the classifier's logits by ~1e-3 on CPU.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from radialog.synthetic import chest_pixels
from workers.models.radialog_v2.backend import RadialogV2Backend
from workers.models.radialog_v2.transforms import CLASSIFIER_CROP, batch_tensors

CANDIDATE_SEEDS = range(24)
#: Smallest |logit| a test image may have (~70x the batch-size noise of the tiny classifier's logits).
LABEL_MARGIN = 0.1


@cache
def image(seed: int) -> np.ndarray:
    """A synthetic chest image (size varies with the seed so resizing differs too); read-only, shared."""
    return chest_pixels(560 + 40 * (seed % 5), 520 + 30 * (seed % 3), 8, seed=seed).astype(np.uint8)


@torch.no_grad()
def clear_seeds(backend: RadialogV2Backend, minimum: int = 12) -> list[int]:
    """Candidate seeds whose labels are clear of the threshold when classified alone (at least ``minimum``)."""
    logits = torch.cat([backend.classifier(batch_tensors([image(s)], CLASSIFIER_CROP)) for s in CANDIDATE_SEEDS])
    chosen = [s for s, row in zip(CANDIDATE_SEEDS, logits) if float(row.abs().min()) > LABEL_MARGIN]
    assert len(chosen) >= minimum, chosen
    return chosen
