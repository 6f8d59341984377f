"""RaDialog v1's model parts (issue 17): published key layouts per file, the loader's refusals by name, the
projector from the checkpoint or replayed (and said so), the reshape quirk and the vision path against
hand-written reference math on the published tensors, the splice, and the classifier at 488 px."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_xraygpt_model import reference_qformer
from workers.models.base import StudyInput
from workers.models.common.qformer import to_lavis
from workers.models.radialog_v1 import projector
from workers.models.radialog_v1.backend import RadialogV1Backend, load_radialog_v1_backend
from workers.models.radialog_v1.files import CLASSIFIER_RELPATH, INSTRUCT_ADAPTER, QFORMER_RELPATHS, locate
from workers.models.radialog_v1.loader import adapter_layout, load_radialog_v1
from workers.models.radialog_v1.model import RadialogV1
from workers.models.radialog_v1.prompts import IMAGE_TOKEN_ID
from workers.models.radialog_v1.tiny import TinyPaths, make_tiny
from workers.models.radialog_v2.checkpoint_io import ModelFileError
from workers.models.radialog_v2.state_dicts import StateDictMismatch
from workers.models.radialog_v2.transforms import LLM_CROP, batch_tensors

FIXTURES = Path(__file__).parent / "fixtures"
VICUNA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}


def _fixture(name: str) -> list[str]:
    return (FIXTURES / name).read_text().split("\n")[:-1]


def _lines(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    return sorted(f"{k} {'x'.join(map(str, s)) or 'scalar'}" for k, s in shapes.items())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyPaths:
    return make_tiny(tmp_path_factory.mktemp("radialog-v1"))


def _copy(tiny: TinyPaths, where: Path) -> TinyPaths:
    top = tiny.root.parent
    shutil.copytree(top, where / "set")
    return TinyPaths(*(where / "set" / p.relative_to(top) for p in (tiny.root, tiny.llm_dir, tiny.biovil)))


def _load(paths: TinyPaths):  # -> LoadedRadialogV1
    return load_radialog_v1(paths.root, None, paths.llm_dir, paths.biovil, "cpu")


def _images(n: int = 2) -> list[np.ndarray]:
    from workers.models.radialog_v2.tiny import calibration_images

    return calibration_images()[:n]


# -- 1. published layouts -----------------------------------------------------------------------------
def test_full_size_model_expects_the_published_key_layouts() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = RadialogV1(4096)
        llama = LlamaForCausalLM(LlamaConfig(**VICUNA_7B))
        peft_model = get_peft_model(
            llama,
            LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
            ),
        )
    tower = {k: tuple(v.shape) for k, v in model.visual_encoder.state_dict().items()}
    published = _fixture("radialog_v1_biovil_keys.txt")
    # the BioViL-T file: everything but its 128-channel projector is read (the projector is ignored by name)
    assert _lines({k: s for k, s in tower.items() if not k.startswith("projector.")}) == [
        line for line in published if not line.startswith("projector.")
    ]
    assert [line for line in published if line.startswith("projector.model.0.")] == [
        "projector.model.0.weight 128x512x1x1"
    ]
    buffers = {f"visual_encoder.{name}" for name, _ in model.visual_encoder.named_buffers() if "pos_embed" not in name}
    checkpoint = {k: tuple(v.shape) for k, v in to_lavis(model.bridge.state_dict()).items()}
    checkpoint |= {k: tower[k.removeprefix("visual_encoder.")] for k in buffers}
    assert _lines(checkpoint) == _fixture("radialog_v1_checkpoint_keys.txt")
    assert _lines(adapter_layout(peft_model, model.img_proj)) == _fixture("radialog_v1_adapter_keys.txt")
    # the 1408-channel projector the reference builds, and the bridge's constants
    assert tower["projector.model.0.weight"] == (1408, 512, 1, 1) and tower["projector.model.3.weight"] == (
        1408,
        1408,
        1,
        1,
    )
    assert "projector.model.0.bias" not in tower and tower["projector.model.3.bias"] == (1408,)
    assert model.bridge.ln_vision.eps == 1e-5 and model.bridge.qformer.layernorm.eps == 1e-12
    assert model.bridge.size.cross_attention_frequency == 2 and model.img_proj.in_features == 768


def test_tiny_set_loads_says_what_it_ignored_and_that_the_projector_is_replayed(tiny: TinyPaths) -> None:
    loaded = _load(tiny)
    notes = "\n".join(loaded.notes)
    assert "biovil_t_image_model_proj_size_128.pt: ignored 8 tensors of BioViL-T's own 128-channel projector" in notes
    assert "checkpoint_4.pth: ignored optimizer, config, scaler, epoch (training state)" in notes
    assert "holds no BioViL-T projector (visual_encoder.projector.model.0.weight" in notes and "seed 42" in notes
    assert "LoRA r=8 alpha=16 on q_proj, v_proj (8 tensors) merged" in notes
    assert loaded.projector == "replay-seed42"
    replayed = projector.replay()
    state = loaded.model.visual_encoder.projector.state_dict()
    assert all(torch.equal(state[k], replayed[k]) for k in projector.DRAWN)
    backend = RadialogV1Backend(loaded)
    assert backend.provenance.version == "1.0+projector-replay-seed42" and backend.provenance.tiny
    assert backend.provenance.name == "RaDialog-v1" and backend.provenance.display_name == "RaDialog v1"
    assert loaded.model.llama_model.config.vocab_size == IMAGE_TOKEN_ID


def test_a_checkpoint_holding_the_projector_is_used_and_a_partial_one_refused(tiny: TinyPaths, tmp_path: Path) -> None:
    paths = _copy(tiny, tmp_path)
    path = paths.root / QFORMER_RELPATHS[0]
    content = torch.load(path, weights_only=True)
    own = {f"visual_encoder.projector.{k}": torch.full_like(v, 0.01) for k, v in projector.replay(3).items()}
    content["model"] |= own
    torch.save(content, path)
    loaded = _load(paths)
    assert loaded.projector == "checkpoint" and RadialogV1Backend(loaded).provenance.version == "1.0"
    assert "BioViL-T projector loaded from the checkpoint" in "\n".join(loaded.notes)
    state = loaded.model.visual_encoder.projector.state_dict()
    assert all(torch.equal(state[k.removeprefix("visual_encoder.projector.")], v) for k, v in own.items())

    del content["model"]["visual_encoder.projector.model.3.bias"]
    torch.save(content, path)
    with pytest.raises(StateDictMismatch) as raised:
        _load(paths)
    assert raised.value.missing == ["visual_encoder.projector.model.3.bias"]


# -- 2. the loader names every problem ----------------------------------------------------------------
def test_biovil_file_problems_are_named_in_its_own_keys(tiny: TinyPaths, tmp_path: Path) -> None:
    paths = _copy(tiny, tmp_path)
    state = torch.load(paths.biovil, weights_only=True)
    del state["encoder.missing_previous_emb"]
    state["encoder.backbone_to_vit.weight"] = torch.zeros(256, 255, 1, 1)
    state["encoder.encoder.layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, paths.biovil)
    with pytest.raises(StateDictMismatch) as raised:
        _load(paths)
    error = raised.value
    assert error.missing == ["encoder.missing_previous_emb"]
    assert error.unexpected == ["encoder.encoder.layer5.0.conv1.weight"]
    assert error.mismatched == ["encoder.backbone_to_vit.weight (256, 255, 1, 1) != (256, 256, 1, 1)"]
    assert str(error).startswith("biovil_t_image_model_proj_size_128.pt:")


def test_checkpoint_problems_are_named(tiny: TinyPaths, tmp_path: Path) -> None:
    paths = _copy(tiny, tmp_path)
    path = paths.root / QFORMER_RELPATHS[0]
    content = torch.load(path, weights_only=True)
    del content["model"]["query_tokens"]
    content["model"]["visual_encoder.encoder.encoder.bn1.running_mean"] = torch.zeros(7)
    content["model"]["visual_encoder.encoder.decoder.weight"] = torch.zeros(1)
    content["model"]["Qformer.bert.encoder.layer.1.crossattention.self.key.weight"] = torch.zeros(768, 1408)
    torch.save(content, path)
    with pytest.raises(StateDictMismatch) as raised:
        _load(paths)
    error = raised.value
    assert error.missing == ["query_tokens"]
    # layer 1 has no cross-attention (every second layer): a tensor for it is not ignored
    assert error.unexpected == [
        "Qformer.bert.encoder.layer.1.crossattention.self.key.weight",
        "visual_encoder.encoder.decoder.weight",
    ]
    assert error.mismatched == ["visual_encoder.encoder.encoder.bn1.running_mean (7,) != (8,)"]

    content = torch.load(tiny.root / QFORMER_RELPATHS[0], weights_only=True)
    content["model_ema"] = {}
    torch.save(content, path)
    with pytest.raises(StateDictMismatch) as raised:
        _load(paths)
    assert raised.value.unexpected == ["model_ema"]


def test_adapter_problems_are_named(tiny: TinyPaths, tmp_path: Path) -> None:
    paths = _copy(tiny, tmp_path)
    adapter = paths.root / INSTRUCT_ADAPTER / "adapter_model.bin"
    state = torch.load(adapter, weights_only=True)
    del state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    state["base_model.model.model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 172)  # a base weight
    state["base_model.model.model.img_proj_layer.weight"] = torch.zeros(64, 32)
    torch.save(state, adapter)
    with pytest.raises(StateDictMismatch) as raised:
        _load(paths)
    error = raised.value
    assert error.missing == ["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert error.unexpected == ["base_model.model.model.layers.0.mlp.down_proj.weight"]
    assert error.mismatched == ["base_model.model.model.img_proj_layer.weight (64, 32) != (64, 768)"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"bias": "all"}, "bias 'all'"),
        ({"target_modules": ["c_attn"]}, "target_modules ['c_attn']"),
        ({"peft_type": "PREFIX_TUNING"}, "peft_type 'PREFIX_TUNING'"),
        ({"enable_lora": [True, False, True]}, "enable_lora [True, False, True]"),
        ({"r": 0}, "r 0"),
    ],
)
def test_adapter_config_is_read_by_hand_and_refused_when_it_is_not_the_references_kind(
    tiny: TinyPaths, tmp_path: Path, change: dict, named: str
) -> None:
    paths = _copy(tiny, tmp_path)
    config_path = paths.root / INSTRUCT_ADAPTER / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["merge_weights"] is False and "enable_lora" in config  # peft 0.3's fields, as released
    config_path.write_text(json.dumps(config | change))
    with pytest.raises(ModelFileError, match="cannot rebuild this LoRA") as raised:
        _load(paths)
    assert named in str(raised.value)


def test_another_vocabulary_is_refused(tiny: TinyPaths, tmp_path: Path) -> None:
    """<IMG> is 32000 only with Vicuna's 32,000 pieces (the reference never resizes in its demo)."""
    paths = _copy(tiny, tmp_path)
    config = json.loads((paths.llm_dir / "config.json").read_text())
    (paths.llm_dir / "config.json").write_text(json.dumps(config | {"vocab_size": 32001}))
    with pytest.raises(ModelFileError, match="vocab_size 32001"):
        _load(paths)


def test_missing_files_and_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="set RADIALOG_V1_LLM_DIR, RADIALOG_V1_BIOVIL_FILE"):
        locate(tmp_path, None, None, None)
    with pytest.raises(ModelFileError) as raised:
        locate(tmp_path / "radialog", None, tmp_path / "vicuna", tmp_path / "biovil.pt")
    message = str(raised.value)
    for name in (
        "pretraining/outputs/stage1_pt_instruct_blip_origlr_img448/checkpoint_4.pth",
        "outputs/stage1_pt_instruct_blip_origlr_img448/checkpoint_4.pth",
        "checkpoint-4800/adapter_config.json",
        "checkpoint-4800/adapter_model.bin",
        str(CLASSIFIER_RELPATH),
        "config.json",
        "pytorch_model.bin",
        "tokenizer.model",
        "biovil.pt",
    ):
        assert name in message, name


def test_the_report_adapter_and_the_readme_layout_are_found(tiny: TinyPaths, tmp_path: Path) -> None:
    paths = _copy(tiny, tmp_path)
    (paths.root / "outputs").mkdir()
    shutil.move(
        paths.root / "pretraining" / "outputs" / "stage1_pt_instruct_blip_origlr_img448", paths.root / "outputs"
    )
    report = paths.root / "checkpoints" / "vicuna-7b-img-report" / "checkpoint-11200"
    shutil.copytree(paths.root / INSTRUCT_ADAPTER, report)
    files = locate(paths.root, "checkpoints/vicuna-7b-img-report/checkpoint-11200", paths.llm_dir, paths.biovil)
    assert files.qformer == paths.root / QFORMER_RELPATHS[1] and files.adapter_dir == report
    assert locate(paths.root, str(report), paths.llm_dir, paths.biovil).adapter_dir == report  # absolute


# -- 3. the vision path -------------------------------------------------------------------------------
def test_reshape_without_permute_and_the_vision_path_equal_the_reference_math(tiny: TinyPaths) -> None:
    """``projected_patch_embeddings.reshape(B, -1, 1408)``: token n is the flat channel-major slice
    [n * 1408, (n + 1) * 1408). A permute (patch n's 1408 features) is another model and must fail here."""
    loaded = _load(tiny)
    model = loaded.model
    pixels = batch_tensors(_images(), LLM_CROP)
    lavis = torch.load(tiny.root / QFORMER_RELPATHS[0], weights_only=True)["model"]
    adapter = torch.load(tiny.root / INSTRUCT_ADAPTER / "adapter_model.bin", weights_only=True)
    with torch.inference_mode():
        grid = model.visual_encoder(pixels).projected_patch_embeddings
        assert grid.shape == (2, 1408, 14, 14)
        flat = grid.flatten(1)  # channel-major
        expected = torch.stack([flat[:, n * 1408 : (n + 1) * 1408] for n in range(196)], dim=1)
        features = model.image_features(pixels)
        assert features.shape == (2, 196, 1408)
        assert torch.equal(features, expected)
        assert not torch.allclose(features, grid.flatten(2).transpose(1, 2))  # the permuted reading differs
        expected_queries = reference_qformer(features, lavis, model.bridge.size.layers, model.bridge.size.heads)
        queries = torch.cat([model.bridge(model.image_features(pixels[i : i + 1])) for i in range(2)])
        torch.testing.assert_close(queries, expected_queries, atol=1e-5, rtol=1e-4)
        embeds = model.encode_images(pixels)  # one image at a time, as above
        weight = adapter["base_model.model.model.img_proj_layer.weight"]
        bias = adapter["base_model.model.model.img_proj_layer.bias"]
        torch.testing.assert_close(embeds, queries @ weight.T + bias, atol=1e-5, rtol=1e-5)
    assert embeds.shape == (2, 32, 64)
    assert not torch.allclose(embeds[0], embeds[1], atol=1e-4), "the two images gave the same embeddings"


def test_the_splice_puts_the_image_at_the_placeholders(tiny: TinyPaths) -> None:
    backend = load_radialog_v1_backend(tiny.root, None, tiny.llm_dir, tiny.biovil, "cpu")
    _, (prompt,) = backend.report_prompts([[]])
    ids = backend.prompt_ids(prompt)
    start = ids.index(IMAGE_TOKEN_ID)
    pixels = batch_tensors(_images(1), LLM_CROP)
    with torch.inference_mode():
        image = backend.model.encode_images(pixels)
        (row,) = backend.embed([prompt], pixels)
        text = backend.model.llama_model.get_input_embeddings()(torch.tensor([i for i in ids if i != IMAGE_TOKEN_ID]))
    assert row.shape[0] == len(ids) == backend.count_tokens(prompt)  # length and positions unchanged
    assert torch.equal(row[start : start + 32], image[0])
    assert torch.equal(row[:start], text[:start]) and torch.equal(row[start + 32 :], text[start:])


def test_classifier_reads_488_pixels(tiny: TinyPaths) -> None:
    backend = load_radialog_v1_backend(tiny.root, None, tiny.llm_dir, tiny.biovil, "cpu")
    seen: list[tuple[int, ...]] = []
    predict = backend.classifier.predict
    backend.classifier.predict = lambda pixels: seen.append(tuple(pixels.shape)) or predict(pixels)  # type: ignore[method-assign]
    (out,) = backend.report([StudyInput("a", _images(1)[0])], max_new_tokens=4)
    assert seen == [(1, 3, 488, 488)] and len(out.findings) == 14
    with pytest.raises(RuntimeError):  # at 448 the pooled grid is 3 x 3: fc1's 2,048 inputs do not fit
        backend.classifier(torch.rand(1, 3, 448, 448))


def test_model_and_bench_modules_import_without_celery_dicom_or_web_packages() -> None:
    """The GPU machine has only torch, transformers, peft, numpy and pillow: bench/gpu.py --backend radialog-v1
    must import there (a module-level Celery/DICOM/web import in workers.models or workers.engine breaks it)."""
    import subprocess
    import sys

    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"celery", "kombu", "redis", "pydicom", "highdicom", "pynetdicom", "fastapi",
                                  "starlette", "sqlalchemy", "pydantic_settings"}:
            raise ImportError("not on the GPU machine: " + name)
sys.meta_path.insert(0, Block())
import bench.gpu, bench.gpu_radialog_v1, bench.model_size, workers.engine.backend, workers.models.capabilities
import workers.models.radialog_v1.backend, workers.models.radialog_v1.serving, workers.models.radialog_v1.tiny
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
