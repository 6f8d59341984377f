"""The tiny random RaDialog model made lively enough that batching mistakes show (shared by the engine and
generation tests; the fixtures that load it stay in the test modules).

The tiny checkpoint as written is too flat to test batching: its classifier gives every image the same
labels (features differ by ~1e-5 between images) and its LLM repeats one token and never says EOS. With
that, every report prompt has the same length and a mixed-up KV cache or padding could still produce
"equal" tokens. :func:`liven` gives the same modules livelier weights (same code paths): the classifier
head is re-fitted so that images get different labels, the LLM's matrices are scaled so the answer
depends on the context, and EOS takes the place of one frequent token so answers end at different
lengths. Images whose labels sit near the 0.5 threshold are left out (:func:`clear_seeds`), because batch
size changes the classifier's logits by ~1e-2 on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch

from radialog.synthetic import chest_pixels
from workers.models.radialog_v2.backend import RadialogV2Backend
from workers.models.radialog_v2.transforms import CLASSIFIER_CROP, batch_tensors

CANDIDATE_SEEDS = range(24)
#: Smallest |logit - threshold| a test image may have (10x the batch-size noise of the classifier's logits).
LABEL_MARGIN = 0.1
#: Token whose lm_head row EOS takes (x1.05): frequent enough that about half the answers end before 32.
EOS_LIKE_TOKEN, EOS_SCALE = 534, 1.05
LLM_SCALE = 6.0


@cache
def image(seed: int) -> np.ndarray:
    """A synthetic chest image (size varies with the seed so resizing differs too); read-only, shared."""
    return chest_pixels(560 + 40 * (seed % 5), 520 + 30 * (seed % 3), 8, seed=seed).astype(np.uint8)


def _pooled_features(backend: RadialogV2Backend, seeds: Sequence[int]) -> torch.Tensor:
    pixels = batch_tensors([image(s) for s in seeds], CLASSIFIER_CROP)
    embeddings = backend.classifier.biovil_encoder(pixels).projected_patch_embeddings
    return torch.nn.functional.avg_pool2d(embeddings, 4).flatten(1).double()


@torch.no_grad()
def liven(backend: RadialogV2Backend) -> None:
    """Give the tiny model weights under which batching mistakes would show (see the module docstring)."""
    generator = torch.Generator().manual_seed(7)
    head = backend.classifier
    features = _pooled_features(backend, CANDIDATE_SEEDS)
    mean = features.mean(0)
    w1 = torch.randn(head.fc1.out_features, features.shape[1], generator=generator, dtype=torch.float64)
    w1 /= ((features - mean) @ w1.T).std()
    head.fc1.weight.copy_(w1)
    head.fc1.bias.copy_(-(w1 @ mean))
    hidden = torch.relu((features - mean) @ w1.T)
    w2 = torch.randn(head.fc2.out_features, hidden.shape[1], generator=generator, dtype=torch.float64)
    w2 *= 3 / (hidden @ w2.T).std(0).mean()  # logits of about +-3 around the threshold
    head.fc2.weight.copy_(w2)
    head.fc2.bias.copy_(-(w2 @ hidden.mean(0)))
    llm = backend.llava.language_model
    for name, param in llm.named_parameters():
        if param.dim() == 2 and "embed" not in name:
            param.mul_(LLM_SCALE)
    llm.lm_head.weight[backend.eos_id] = llm.lm_head.weight[EOS_LIKE_TOKEN] * EOS_SCALE


@torch.no_grad()
def clear_seeds(backend: RadialogV2Backend, minimum: int = 12) -> list[int]:
    """Candidate seeds whose labels are clear of the threshold when classified alone (at least ``minimum``)."""
    logits = torch.cat([backend.classifier(batch_tensors([image(s)], CLASSIFIER_CROP)) for s in CANDIDATE_SEEDS])
    chosen = [s for s, row in zip(CANDIDATE_SEEDS, logits) if float(row.abs().min()) > LABEL_MARGIN]
    assert len(chosen) >= minimum, chosen
    return chosen
