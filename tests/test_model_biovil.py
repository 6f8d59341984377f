"""BioViL-T and the classifier at full size: published names/shapes, stage shapes, BatchNorm behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.models.radialog_v2.biovil import BioViLT, PerImageBatchNorm2d
from workers.models.radialog_v2.classifier import ChexpertClassifier
from workers.models.radialog_v2.llava import build_projector

FIXTURES = Path(__file__).parent / "fixtures"


def _names_and_shapes(state: dict[str, torch.Tensor], prefix: str) -> list[str]:
    return sorted(f"{prefix}{k} {'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in state.items())


def _fixture(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def test_vision_tower_and_projector_match_the_published_non_lora_keys() -> None:
    with torch.device("meta"):
        tower = BioViLT()
        projector = build_projector(512, 4096)
    ours = _names_and_shapes(tower.state_dict(), "model.vision_tower.")
    ours += _names_and_shapes(projector.state_dict(), "model.mm_projector.")
    assert sorted(ours) == _fixture("radialog_v2_non_lora_keys.txt")


def test_classifier_matches_the_published_lightning_keys() -> None:
    with torch.device("meta"):
        classifier = ChexpertClassifier()
    assert _names_and_shapes(classifier.state_dict(), "model.") == _fixture("chexpert_classifier_keys.txt")


@pytest.fixture(scope="module")
def tower() -> BioViLT:
    torch.manual_seed(0)
    model = BioViLT().eval()
    for m in model.modules():  # non-trivial running statistics, so the two BN modes really differ
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_full_size_stage_shapes(tower: BioViLT) -> None:
    x = torch.rand(2, 3, 448, 448)
    with torch.no_grad():
        trunk = tower.encoder.encoder(x)
        out = tower(x)
        fused = tower.encoder(x, previous=torch.rand(2, 3, 448, 448))
    assert trunk.shape == (2, 2048, 14, 14)
    assert out.patch_embeddings.shape == (2, 512, 14, 14)
    assert out.img_embedding.shape == (2, 512)
    assert out.projected_patch_embeddings.shape == (2, 128, 14, 14)
    assert out.projected_global_embedding.shape == (2, 128)
    assert fused.shape == (2, 512, 14, 14)
    # without a previous image the second half is the learned "missing previous" embedding everywhere
    missing = tower.encoder.missing_previous_emb.reshape(1, 256, 1, 1).expand(2, 256, 14, 14)
    assert torch.equal(out.patch_embeddings[:, 256:], missing)
    tokens = build_projector(512, 64)(out.patch_embeddings.flatten(2).transpose(1, 2))
    assert tokens.shape == (2, 196, 64)


def test_llm_branch_normalises_each_image_on_its_own(tower: BioViLT) -> None:
    """Batch of N == N batch-1 runs in the reference's train-mode BN; independent of batch companions."""
    torch.manual_seed(1)
    a, b, c = (torch.rand(1, 3, 224, 224) for _ in range(3))  # size does not matter without a previous image
    tower.set_per_image_norm(True)
    with torch.no_grad():
        alone = tower(a).patch_embeddings
        with_b = tower(torch.cat([a, b])).patch_embeddings[:1]
        with_c = tower(torch.cat([c, a])).patch_embeddings[1:]
        # the reference: torch's own BatchNorm in training mode at batch 1 (copy, so stats stay untouched)
        reference = BioViLT()
        reference.load_state_dict(tower.state_dict())
        for m in reference.modules():
            if isinstance(m, PerImageBatchNorm2d):
                m.per_image = False
                m.forward = torch.nn.BatchNorm2d.forward.__get__(m)  # plain nn.BatchNorm2d behaviour
        reference.train()
        expected = reference(a).patch_embeddings
    torch.testing.assert_close(with_b, alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(with_c, alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(alone, expected, atol=2e-5, rtol=1e-4)
    tower.set_per_image_norm(False)
    with torch.no_grad():
        running = tower(a).patch_embeddings
    assert not torch.allclose(running, alone, atol=1e-3)


def test_per_image_norm_does_not_touch_running_statistics(tower: BioViLT) -> None:
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    tower.set_per_image_norm(True)
    with torch.no_grad():
        tower(torch.rand(2, 3, 128, 128))
    after = tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_classifier_grid_at_488_pixels() -> None:
    torch.manual_seed(0)
    classifier = ChexpertClassifier().eval()
    x = torch.rand(2, 3, 488, 488)
    with torch.no_grad():
        projected = classifier.biovil_encoder(x).projected_patch_embeddings
        logits = classifier(x)
        single = classifier(x[:1])
    assert projected.shape == (2, 128, 16, 16)
    assert logits.shape == (2, 14)
    torch.testing.assert_close(logits[:1], single, atol=1e-5, rtol=1e-4)  # eval BN: batch-independent too
    (findings,) = classifier.predict(x[:1])
    assert [f.label for f in findings][:2] == ["No Finding", "Enlarged Cardiomediastinum"]
    assert all(f.present == (f.probability > 0.5) for f in findings)
    probabilities = torch.tensor([f.probability for f in findings])  # fp16 values, as the reference's
    torch.testing.assert_close(probabilities, torch.sigmoid(single[0]), atol=5e-4, rtol=0)


def test_classifier_thresholds_its_fp16_output_as_the_reference() -> None:
    """The reference classifies in half precision: ``sigmoid(fp16 logits) > 0.5`` in fp16. Just above 0,
    a logit's fp16 probability rounds to exactly 0.5 (absent) while float32 says 0.5001 (present)."""
    import numpy as np

    torch.manual_seed(0)
    classifier = ChexpertClassifier(resnet_width=8).eval()
    logits = [0.0004, 0.0009, 0.00098, 0.001, 0.0011, 0.002, -0.0004, 0.0, 3.0, -3.0, 0.5, 0.25, 0.0005, 0.004]
    with torch.no_grad():
        classifier.fc2.weight.zero_()
        classifier.fc2.bias.copy_(torch.tensor(logits))
    (row,) = classifier.predict(torch.rand(1, 3, 488, 488))
    # numpy's float16: logits rounded to fp16, the sigmoid computed in float32, its result rounded to fp16
    half = np.asarray(logits, np.float32).astype(np.float16).astype(np.float32)
    reference = (1 / (1 + np.exp(-half))).astype(np.float16)
    assert [f.present for f in row] == [bool(p > 0.5) for p in reference]
    assert [f.probability for f in row] == [float(p) for p in reference]
    assert not row[0].present and row[0].probability == 0.5  # float32 would call it present
    assert row[5].present
