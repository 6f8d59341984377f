"""XrayGPT's model parts (issue 16): published key layouts, the loader's refusals by name, the vision path
against a hand-written version of the reference's math on the same published tensors, and preprocessing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workers.models.common.qformer import to_lavis
from workers.models.radialog_v2.checkpoint_io import ModelFileError
from workers.models.radialog_v2.state_dicts import StateDictMismatch
from workers.models.xraygpt import eva_vit
from workers.models.xraygpt.files import EVA_FILE, QFORMER_FILE, locate
from workers.models.xraygpt.loader import load_xraygpt
from workers.models.xraygpt.model import XrayGPT
from workers.models.xraygpt.preprocess import MEAN, STD, to_tensor
from workers.models.xraygpt.tiny import TinyPaths, make_tiny

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture(name: str) -> list[str]:
    return (FIXTURES / name).read_text().split("\n")[:-1]


def _lines(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    return sorted(f"{k} {'x'.join(map(str, s)) or 'scalar'}" for k, s in shapes.items())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyPaths:
    return make_tiny(tmp_path_factory.mktemp("xraygpt"))


def _copy(tiny: TinyPaths, where: Path) -> TinyPaths:
    root = tiny.vision_dir.parent
    shutil.copytree(root, where / "set")
    return TinyPaths(*(where / "set" / p.relative_to(root) for p in (tiny.vision_dir, tiny.llm_dir, tiny.checkpoint)))


def _load(paths: TinyPaths):  # -> LoadedXrayGPT
    return load_xraygpt(paths.vision_dir, paths.llm_dir, paths.checkpoint, "cpu")


# -- 1. published layouts -----------------------------------------------------------------------------
def test_full_size_model_expects_the_published_key_layouts() -> None:
    with torch.device("meta"):
        model = XrayGPT(4096)
    assert _lines(eva_vit.published_shapes(model.visual_encoder.tower.state_dict())) == _fixture(
        "xraygpt_eva_vit_g_keys.txt"
    )
    assert _lines({k: tuple(v.shape) for k, v in to_lavis(model.bridge.state_dict()).items()}) == _fixture(
        "xraygpt_qformer_keys.txt"
    )
    assert _lines({f"llama_proj.{k}": tuple(v.shape) for k, v in model.llama_proj.state_dict().items()}) == _fixture(
        "xraygpt_checkpoint_keys.txt"
    )
    # ln_vision is LAVIS's eps 1e-5 LayerNorm, the blocks' norms EVA's 1e-6
    assert model.bridge.ln_vision.eps == 1e-5
    assert model.visual_encoder.tower.encoder.layers[0].layer_norm1.eps == 1e-6
    assert model.bridge.qformer.layernorm.eps == 1e-12


def test_tiny_set_loads_and_says_what_it_ignored(tiny: TinyPaths) -> None:
    loaded = _load(tiny)
    notes = "\n".join(loaded.notes)
    assert "eva_vit_g.pth: ignored 13 tensors of blocks beyond 2" in notes  # the extra block, by name
    assert "blip2_pretrained_flant5xxl.pth: ignored 29 tensors" in notes
    assert "ignored optimizer, config, scaler, epoch (training state)" in notes
    assert "xraygpt_checkpoint.pth: ignored 3 buffers" in notes
    assert loaded.files is not None and loaded.files.tiny and len(loaded.sha256) == 64


# -- 2. the loader names every problem ----------------------------------------------------------------
def test_eva_file_problems_are_named_in_the_files_own_keys(tiny: TinyPaths, tmp_path: Path) -> None:
    paths = _copy(tiny, tmp_path)
    state = torch.load(paths.vision_dir / EVA_FILE)
    del state["blocks.1.attn.v_bias"]
    state["pos_embed"] = torch.zeros(1, 197, 32)
    state["norm.weight"] = torch.ones(32)  # a final norm the reference does not have
    torch.save(state, paths.vision_dir / EVA_FILE)
    with pytest.raises(StateDictMismatch) as raised:
        _load(paths)
    error = raised.value
    assert error.missing == ["blocks.1.attn.v_bias"]
    assert error.unexpected == ["norm.weight"]
    assert error.mismatched == ["pos_embed (1, 197, 32) != (1, 257, 32)"]
    assert str(error).startswith("eva_vit_g.pth:")


def test_qformer_file_problems_are_named(tiny: TinyPaths, tmp_path: Path) -> None:
    paths = _copy(tiny, tmp_path)
    content = torch.load(paths.vision_dir / QFORMER_FILE)
    del content["model"]["query_tokens"]
    content["model"]["visual_encoder.blocks.0.norm1.weight"] = torch.ones(32)
    content["model"]["Qformer.bert.encoder.layer.1.crossattention.self.key.weight"] = torch.zeros(32, 32)
    content["model"]["ln_vision.weight"] = torch.ones(31)
    torch.save(content, paths.vision_dir / QFORMER_FILE)
    with pytest.raises(StateDictMismatch) as raised:
        _load(paths)
    error = raised.value
    assert error.missing == ["query_tokens"]
    # layer 1 has no cross-attention in BLIP-2 (every second layer): a tensor for it is not ignored
    assert error.unexpected == [
        "Qformer.bert.encoder.layer.1.crossattention.self.key.weight",
        "visual_encoder.blocks.0.norm1.weight",
    ]
    assert error.mismatched == ["ln_vision.weight (31,) != (32,)"]


def test_checkpoint_without_llama_proj_or_with_foreign_weights_is_refused(tiny: TinyPaths, tmp_path: Path) -> None:
    """The reference would run with a random llama_proj (strict=False); a MedCLIP/Swin tensor would mean the
    code does not match the weights."""
    paths = _copy(tiny, tmp_path)
    content = torch.load(paths.checkpoint, weights_only=True)
    del content["model"]["llama_proj.bias"]
    content["model"]["visual_encoder.encoder.layers.0.blocks.0.norm1.weight"] = torch.ones(96)
    torch.save(content, paths.checkpoint)
    with pytest.raises(StateDictMismatch) as raised:
        _load(paths)
    assert raised.value.missing == ["llama_proj.bias"]
    assert raised.value.unexpected == ["visual_encoder.encoder.layers.0.blocks.0.norm1.weight"]

    content = torch.load(tiny.checkpoint, weights_only=True)
    content["model_ema"] = {}
    torch.save(content, paths.checkpoint)
    with pytest.raises(StateDictMismatch) as raised:
        _load(paths)
    assert raised.value.unexpected == ["model_ema"]
    torch.save({"state_dict": content["model"]}, paths.checkpoint)
    with pytest.raises(StateDictMismatch) as raised:
        _load(paths)
    assert raised.value.missing == ["model"]


def test_missing_files_and_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="RADIALOG_XRAYGPT_LLM_DIR, RADIALOG_XRAYGPT_CHECKPOINT"):
        locate(tmp_path, None, None)
    with pytest.raises(ModelFileError) as raised:
        locate(tmp_path / "vision", tmp_path / "llm", tmp_path / "ckpt.pth")
    message = str(raised.value)
    for name in (EVA_FILE, QFORMER_FILE, "config.json", "pytorch_model.bin", "tokenizer.model", "ckpt.pth"):
        assert name in message


# -- 3. the vision path equals the reference's math on the published tensors ---------------------------
def _layer_norm(x: torch.Tensor, state: dict, prefix: str, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * state[f"{prefix}.weight"] + state[f"{prefix}.bias"]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, width = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, width // heads).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    weights = ((q * (width // heads) ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, width)


def _linear(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def reference_eva(pixels: torch.Tensor, state: dict, depth: int, heads: int) -> torch.Tensor:
    """EVA ViT-g as xraygpt/models/eva_vit.py computes it: patch conv, CLS, absolute positions, pre-LN blocks
    (eps 1e-6) with q/v biases and no k bias, exact GELU, no final norm."""
    x = torch.nn.functional.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + state["pos_embed"]
    for i in range(depth):
        p = f"blocks.{i}"
        h = _layer_norm(x, state, f"{p}.norm1", 1e-6)
        bias = torch.cat(
            [state[f"{p}.attn.q_bias"], torch.zeros_like(state[f"{p}.attn.v_bias"]), state[f"{p}.attn.v_bias"]]
        )
        q, k, v = (h @ state[f"{p}.attn.qkv.weight"].T + bias).chunk(3, dim=-1)
        x = x + _linear(_attend(q, k, v, heads), state, f"{p}.attn.proj")
        h = _layer_norm(x, state, f"{p}.norm2", 1e-6)
        x = x + _linear(torch.nn.functional.gelu(_linear(h, state, f"{p}.mlp.fc1")), state, f"{p}.mlp.fc2")
    return x


def reference_qformer(image: torch.Tensor, state: dict, layers: int, heads: int) -> torch.Tensor:
    """LAVIS's BertModel with query embeddings only: LayerNorm(queries), then per layer self-attention,
    cross-attention on even layers (K/V from the ln_vision output), the _query FFN; post-LN, eps 1e-12."""
    image = _layer_norm(image, state, "ln_vision", 1e-5)
    x = _layer_norm(state["query_tokens"].expand(len(image), -1, -1), state, "Qformer.bert.embeddings.LayerNorm", 1e-12)
    for i in range(layers):
        p = f"Qformer.bert.encoder.layer.{i}"
        for kind, source in (("attention", None), ("crossattention", image)):
            if kind == "crossattention" and i % 2:
                continue
            a = f"{p}.{kind}"
            kv = x if source is None else source
            out = _attend(
                _linear(x, state, f"{a}.self.query"),
                _linear(kv, state, f"{a}.self.key"),
                _linear(kv, state, f"{a}.self.value"),
                heads,
            )
            x = _layer_norm(_linear(out, state, f"{a}.output.dense") + x, state, f"{a}.output.LayerNorm", 1e-12)
        h = torch.nn.functional.gelu(_linear(x, state, f"{p}.intermediate_query.dense"))
        x = _layer_norm(_linear(h, state, f"{p}.output_query.dense") + x, state, f"{p}.output_query.LayerNorm", 1e-12)
    return x


def test_vision_path_equals_the_reference_math_on_the_published_tensors(tiny: TinyPaths) -> None:
    loaded = _load(tiny)
    model = loaded.model
    eva = torch.load(tiny.vision_dir / EVA_FILE)
    qformer = torch.load(tiny.vision_dir / QFORMER_FILE)["model"]
    proj = torch.load(tiny.checkpoint, weights_only=True)["model"]
    size = model.visual_encoder.size
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (300 + 20 * i, 280), dtype=np.uint8) for i in range(2)]
    pixels = torch.stack([to_tensor(image) for image in images])
    with torch.inference_mode():
        features = model.visual_encoder(pixels)
        expected = reference_eva(pixels, eva, size.depth, size.heads)
        assert features.shape == (2, 257, 32)
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)
        queries = model.bridge(features)
        expected_q = reference_qformer(expected, qformer, model.bridge.size.layers, model.bridge.size.heads)
        assert queries.shape == (2, 32, 32)
        torch.testing.assert_close(queries, expected_q, atol=1e-5, rtol=1e-4)
        embeds = model.encode_images(pixels)
        torch.testing.assert_close(
            embeds, expected_q @ proj["llama_proj.weight"].T + proj["llama_proj.bias"], atol=1e-5, rtol=1e-4
        )
    assert not torch.allclose(embeds[0], embeds[1], atol=1e-3), "the two images gave the same embeddings"


# -- 4. preprocessing -----------------------------------------------------------------------------------
def test_preprocessing_is_224_bicubic_with_clip_mean_and_std() -> None:
    image = (np.arange(7 * 9).reshape(7, 9) * 4).astype(np.uint8)  # a small gradient, stretched (aspect not kept)
    got = to_tensor(image)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    # the reference path: PIL convert('RGB') -> Resize((224, 224), BICUBIC) -> ToTensor -> Normalize
    rgb = np.asarray(Image.fromarray(image).convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(rgb).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[
        :, None, None
    ]
    assert torch.equal(got, expected)
    # fixed numbers: a change of filter, size, mean or std shows here
    assert got[0, 0, 0].item() == pytest.approx(-1.7922625, abs=1e-6)  # black: -mean/std of the red channel
    assert got[1, 100, 100].item() == pytest.approx(-0.1162504, abs=1e-6)
    assert got[0, 50, 150].item() == pytest.approx(-0.9017585, abs=1e-6)
    assert got[2, 223, 223].item() == pytest.approx(2.1032369, abs=1e-6)
    # the 'L' shortcut equals the RGB path on an irregular image too, and the filter matters there
    noisy = np.random.default_rng(3).integers(0, 256, (31, 17), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(noisy).convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
    assert torch.equal(to_tensor(noisy)[1], (torch.from_numpy(rgb[..., 1]) - MEAN[1]) / STD[1])
    bilinear = np.asarray(Image.fromarray(noisy).resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255.0
    assert np.abs(bilinear - rgb[..., 0]).max() > 0.05
    with pytest.raises(ValueError, match="2-D uint8"):
        to_tensor(np.zeros((4, 4, 3), dtype=np.uint8))


def test_model_and_bench_modules_import_without_celery_dicom_or_web_packages() -> None:
    """The GPU machine has only torch, transformers, peft, numpy and pillow: bench/gpu.py --backend xraygpt
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
import bench.gpu, bench.gpu_xraygpt, bench.model_size, workers.engine.backend
import workers.models.xraygpt.backend, workers.models.xraygpt.serving, workers.models.xraygpt.tiny
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
