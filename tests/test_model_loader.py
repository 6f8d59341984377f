"""The loader on the tiny checkpoint: published layout loads; every kind of broken file is refused by name."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from workers.models.radialog_v2.checkpoint_io import ModelFileError, torch_load_checked
from workers.models.radialog_v2.files import CLASSIFIER_RELPATH
from workers.models.radialog_v2.loader import load_radialog
from workers.models.radialog_v2.state_dicts import StateDictMismatch
from workers.models.radialog_v2.tiny import make_tiny


@pytest.fixture
def tiny_copy(tiny_model: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy a test may break."""
    model_dir, base_dir = tiny_model
    return (
        Path(shutil.copytree(model_dir, tmp_path / "radialog")),
        Path(shutil.copytree(base_dir, tmp_path / "llava")),
    )


def test_tiny_checkpoint_has_the_published_layout(tiny_model: tuple[Path, Path]) -> None:
    model_dir, base_dir = tiny_model
    for name in (
        "config.json",
        "adapter_config.json",
        "adapter_model.bin",
        "non_lora_trainables.bin",
        str(CLASSIFIER_RELPATH),
    ):
        assert (model_dir / name).is_file(), name
    for name in ("config.json", "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer_config.json"):
        assert (base_dir / name).is_file(), name
    assert json.loads((base_dir / "config.json").read_text())["model_type"] == "llava"
    keys = torch.load(model_dir / "non_lora_trainables.bin", weights_only=True).keys()
    assert all(k.startswith("base_model.model.model.") for k in keys)
    # the classifier checkpoint pickles hyper-parameters that the weights-only unpickler refuses
    with pytest.raises(Exception, match="Unsupported global|Weights only load failed"):
        torch.load(model_dir / CLASSIFIER_RELPATH, weights_only=True)


def test_tiny_model_loads_completely(tiny_model: tuple[Path, Path]) -> None:
    loaded = load_radialog(*tiny_model, device_name="cpu")
    assert loaded.files.tiny
    assert loaded.dtype == torch.float32
    assert len(loaded.sha256) == 64
    assert not any("lora_" in name for name, _ in loaded.llava.language_model.named_parameters())
    assert not loaded.classifier.training
    assert all(m.per_image for m in loaded.llava.vision_tower.modules() if hasattr(m, "per_image"))
    assert not any(m.per_image for m in loaded.classifier.modules() if hasattr(m, "per_image"))


def test_lora_is_merged_into_the_weights(tiny_model: tuple[Path, Path]) -> None:
    """The merged q_proj equals base + B @ A * alpha / r (the adapter really changed the model)."""
    model_dir, base_dir = tiny_model
    loaded = load_radialog(model_dir, base_dir, device_name="cpu")
    index = json.loads((base_dir / "pytorch_model.bin.index.json").read_text())["weight_map"]
    key = "model.layers.0.self_attn.q_proj.weight"
    base = torch.load(base_dir / index[key], weights_only=True)[key].float()
    adapter = torch.load(model_dir / "adapter_model.bin", weights_only=True)
    a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    merged = loaded.llava.language_model.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(merged, base + (b @ a) * (16 / 8), atol=1e-6, rtol=1e-5)


def test_missing_file_is_named(tiny_copy: tuple[Path, Path]) -> None:
    model_dir, base_dir = tiny_copy
    (model_dir / "non_lora_trainables.bin").unlink()
    (base_dir / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ModelFileError) as error:
        load_radialog(model_dir, base_dir, device_name="cpu")
    assert "non_lora_trainables.bin" in str(error.value)
    assert "pytorch_model-00002-of-00002.bin" in str(error.value)


def test_unconfigured_directories_say_how_to_fix() -> None:
    with pytest.raises(ModelFileError, match="RADIALOG_MODEL_DIR"):
        load_radialog(None, None, device_name="cpu")


def _edit(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def test_missing_vision_key_is_named(tiny_copy: tuple[Path, Path]) -> None:
    model_dir, base_dir = tiny_copy
    key = "base_model.model.model.vision_tower.encoder.backbone_to_vit.weight"
    _edit(model_dir / "non_lora_trainables.bin", lambda s: s.pop(key))
    with pytest.raises(StateDictMismatch, match="missing keys .*model.vision_tower.encoder.backbone_to_vit.weight"):
        load_radialog(model_dir, base_dir, device_name="cpu")


def test_absent_bn_running_stats_of_the_llm_tower_are_only_noted(tiny_copy: tuple[Path, Path]) -> None:
    """Per-image BN never reads them, so a file without them still loads (the note says so)."""
    model_dir, base_dir = tiny_copy
    _edit(
        model_dir / "non_lora_trainables.bin",
        lambda s: [s.pop(k) for k in list(s) if k.endswith(("running_mean", "running_var", "num_batches_tracked"))],
    )
    loaded = load_radialog(model_dir, base_dir, device_name="cpu")
    assert any("running-statistics" in note for note in loaded.notes)


def test_wrong_projector_shape_is_named(tiny_copy: tuple[Path, Path]) -> None:
    model_dir, base_dir = tiny_copy
    key = "base_model.model.model.mm_projector.0.weight"

    def change(state: dict) -> None:
        state[key] = torch.zeros(64, 1024)  # a CLIP-sized projector instead of BioViL-T's 512

    _edit(model_dir / "non_lora_trainables.bin", change)
    with pytest.raises(
        StateDictMismatch, match=r"wrong shapes .*model.mm_projector.0.weight \(64, 1024\) != \(64, 512\)"
    ):
        load_radialog(model_dir, base_dir, device_name="cpu")


def test_unexpected_key_is_named(tiny_copy: tuple[Path, Path]) -> None:
    model_dir, base_dir = tiny_copy
    _edit(
        model_dir / "non_lora_trainables.bin",
        lambda s: s.update({"base_model.model.model.image_pooler.weight": torch.zeros(2)}),
    )
    with pytest.raises(StateDictMismatch, match="unexpected keys .*image_pooler.weight"):
        load_radialog(model_dir, base_dir, device_name="cpu")


def test_adapter_problems_are_named(tiny_copy: tuple[Path, Path]) -> None:
    model_dir, base_dir = tiny_copy
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    _edit(model_dir / "adapter_model.bin", lambda s: s.pop(key))
    with pytest.raises(StateDictMismatch, match="missing keys .*layers.1.mlp.down_proj.lora_B.weight"):
        load_radialog(model_dir, base_dir, device_name="cpu")


def test_classifier_problems_are_named(tiny_copy: tuple[Path, Path]) -> None:
    model_dir, base_dir = tiny_copy
    path = model_dir / CLASSIFIER_RELPATH
    checkpoint = torch_load_checked(path)
    state = checkpoint["state_dict"]
    state["model.fc2.weight"] = torch.zeros(13, 512)
    torch.save({"state_dict": dict(state)}, path)
    with pytest.raises(StateDictMismatch, match=r"model.fc2.weight \(13, 512\) != \(14, 512\)"):
        load_radialog(model_dir, base_dir, device_name="cpu")


def test_missing_base_weight_is_named(tiny_copy: tuple[Path, Path]) -> None:
    model_dir, base_dir = tiny_copy
    index = json.loads((base_dir / "pytorch_model.bin.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.up_proj.weight"
    _edit(base_dir / index[key], lambda s: s.pop(key))
    with pytest.raises(StateDictMismatch, match="missing keys .*model.layers.1.mlp.up_proj.weight"):
        load_radialog(model_dir, base_dir, device_name="cpu")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/radialog_pwned_by_checkpoint",))


def test_restricted_unpickling_never_runs_foreign_code(tmp_path: Path) -> None:
    marker = Path("/tmp/radialog_pwned_by_checkpoint")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": _Exploit()}, path)
    loaded = torch_load_checked(path)
    assert not marker.exists()
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(1))


def test_make_tiny_is_reproducible(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    """Same seed, same bytes: the provenance hash (and so the SR's model identity) is stable across runs."""
    from workers.models.radialog_v2.files import files_sha256, locate

    again = make_tiny(tmp_path / "again")
    assert files_sha256(locate(*again)) == files_sha256(locate(*tiny_model))
    other = make_tiny(tmp_path / "other", seed=1)
    assert files_sha256(locate(*other)) != files_sha256(locate(*tiny_model))


def test_safetensors_adapter_and_base_load_the_same_model(tiny_copy: tuple[Path, Path], tiny_model) -> None:
    """peft's newer adapter_model.safetensors and a single model.safetensors base are read as well."""
    from safetensors.torch import save_file

    model_dir, base_dir = tiny_copy
    adapter = torch.load(model_dir / "adapter_model.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, model_dir / "adapter_model.safetensors")
    (model_dir / "adapter_model.bin").unlink()
    index = base_dir / "pytorch_model.bin.index.json"
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(torch.load(base_dir / shard, weights_only=True))
        (base_dir / shard).unlink()
    index.unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, base_dir / "model.safetensors", metadata={"format": "pt"})
    converted = load_radialog(model_dir, base_dir, device_name="cpu")
    original = load_radialog(*tiny_model, device_name="cpu")
    assert converted.files.adapter_weights.suffix == ".safetensors"
    ours, theirs = converted.llava.state_dict(), original.llava.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
