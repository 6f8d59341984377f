"""The LLaVA side at full size (meta device), reduced precision on CPU, and the streamer's byte handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workers.models.base import StudyInput
from workers.models.radialog_v2.backend import RadialogV2Backend, load_radialog_v2
from workers.models.radialog_v2.llava import CallbackStreamer, RadialogLlava, llama_config_from_llava

#: The published llava-v1.5-7b config.json (its Llama fields and the LLaVA-only ones).
LLAVA_V15_7B_CONFIG = {
    "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
    "architectures": ["LlavaLlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "freeze_mm_mlp_adapter": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "image_aspect_ratio": "pad",
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_length": 4096,
    "max_position_embeddings": 4096,
    "mm_hidden_size": 1024,
    "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "model_type": "llava",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0",
    "tune_mm_mlp_adapter": False,
    "tune_mm_vision_resampler": False,
    "unfreeze_mm_vision_tower": False,
    "use_cache": True,
    "use_mm_proj": True,
    "vocab_size": 32000,
}


def test_full_size_model_from_the_published_config() -> None:
    from transformers import LlamaForCausalLM

    config = llama_config_from_llava(LLAVA_V15_7B_CONFIG)
    assert config.model_type == "llama" and not hasattr(config, "mm_vision_tower")
    with torch.device("meta"):
        model = RadialogLlava(LlamaForCausalLM(config))
    state = model.language_model.state_dict()
    assert len(state) == 2 + 32 * 9 + 1  # embed, lm_head, 9 tensors per layer, final norm
    assert tuple(state["model.layers.31.mlp.down_proj.weight"].shape) == (4096, 11008)
    assert tuple(state["lm_head.weight"].shape) == (32000, 4096)
    llm_params = sum(p.numel() for p in model.language_model.parameters())
    assert 6.7e9 < llm_params < 6.8e9
    assert tuple(model.mm_projector[0].weight.shape) == (4096, 512)
    assert tuple(model.mm_projector[2].weight.shape) == (4096, 4096)


@pytest.fixture(scope="module")
def tiny_backend(tiny_model: tuple[Path, Path]) -> RadialogV2Backend:
    return load_radialog_v2(*tiny_model, device="cpu")


def test_gpu_precisions_run_on_cpu(tiny_backend: RadialogV2Backend) -> None:
    """bf16 LLM + vision tower and fp16 classifier (the GPU setting) work through the same code."""
    backend = tiny_backend
    backend.llava.to(torch.bfloat16)
    backend.classifier.to(torch.float16)
    backend.loaded.dtype, backend.loaded.classifier_dtype = torch.bfloat16, torch.float16
    try:
        image = np.random.default_rng(0).integers(0, 255, (600, 520), np.uint8)
        (out,) = backend.report([StudyInput("a", image)], max_new_tokens=8, min_new_tokens=8)
        assert out.generated_tokens == 8
        with torch.no_grad():
            x = torch.rand(1, 3, 448, 448, dtype=torch.bfloat16)
            fused = backend.llava.vision_tower(x, x).patch_embeddings  # ViT pooler with a previous image
        assert fused.dtype == torch.bfloat16 and fused.shape == (1, 512, 14, 14)
    finally:
        backend.llava.float()
        backend.classifier.float()
        backend.loaded.dtype, backend.loaded.classifier_dtype = torch.float32, torch.float32


def test_streamer_holds_back_incomplete_utf8(tiny_backend: RadialogV2Backend) -> None:
    tokenizer = tiny_backend.tokenizer
    ids = tokenizer("é", add_special_tokens=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert "<0xC3>" in pieces and "<0xA9>" in pieces  # byte fallback: two tokens for one character
    emitted: list[str] = []
    streamer = CallbackStreamer(tokenizer.decode, emitted.append, eos_token_id=2)
    for token in ids:
        streamer.put(torch.tensor([token]))
        if token == tokenizer.convert_tokens_to_ids("<0xC3>"):
            assert "".join(emitted).strip() == ""  # half a character is never sent
    streamer.put(torch.tensor([2]))
    streamer.put(torch.tensor([5]))  # after EOS nothing more is taken
    streamer.end()
    assert "".join(emitted) == "é"
