"""A tiny random-initialised XrayGPT in exactly the published file formats, for tests, the demo and CI.

It goes through the real loader: ``vision/eva_vit_g.pth`` (a raw EVA state dict, with one block more than
the model uses, like EVA-CLIP-g's 40 for the reference's 39), ``vision/blip2_pretrained_flant5xxl.pth``
(``{"model": ...}`` in LAVIS's layout with the parts the query path ignores: text embeddings and FFNs, LM
head, projections, ITM head, ``temp``, ``position_ids``), a sharded Vicuna-style HF directory (.bin shards
+ index, old ``rotary_emb.inv_freq`` buffers, a Llama-like sentencepiece tokenizer) and the XrayGPT
checkpoint (``llama_proj`` + buffers under ``"model"``, beside ``optimizer``, ``config``, ``scaler``,
``epoch``). Sizes are small and declared in ``xraygpt_sizes.json``; a marker file says loudly that this is
a tiny random model. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.models.common.qformer import QFormerSize, QueryBridge, to_lavis
from workers.models.tiny_llama import vicuna_v1_config, write_llama_tokenizer, write_vicuna_v1_configs
from workers.models.xraygpt import eva_vit, prompts
from workers.models.xraygpt.eva_vit import EvaSize, EvaViT
from workers.models.xraygpt.files import EVA_FILE, QFORMER_FILE, TINY_MARKER
from workers.models.xraygpt.loader import SIZES_FILE, Sizes

#: 2 heads of 16, 2 blocks; 32 queries like the real model, so the splice has the real length.
TINY_SIZES = Sizes(
    EvaSize(width=32, depth=2, heads=2, mlp=64),
    QFormerSize(vision_width=32, hidden_size=32, layers=2, heads=4, intermediate_size=64, queries=32),
)
CHECKPOINT_NAME = "xraygpt_checkpoint.pth"
LLM_DIR_NAME = "Vicuna_Radiology_fp16"
MARKER_TEXT = (
    "TINY RANDOM MODEL - NOT CLINICAL. Random weights written by `radialog model make-tiny --backend xraygpt`.\n"
)
BERT_VOCAB = 30523  # bert-base-uncased + [DEC], as LAVIS's Q-Former tokenizer


@dataclass(frozen=True)
class TinyPaths:
    """The three settings a worker needs (RADIALOG_XRAYGPT_VISION_DIR / _LLM_DIR / _CHECKPOINT)."""

    vision_dir: Path
    llm_dir: Path
    checkpoint: Path

    def env(self) -> dict[str, str]:
        return {
            "RADIALOG_MODEL_BACKEND": "xraygpt",
            "RADIALOG_XRAYGPT_VISION_DIR": str(self.vision_dir.resolve()),
            "RADIALOG_XRAYGPT_LLM_DIR": str(self.llm_dir.resolve()),
            "RADIALOG_XRAYGPT_CHECKPOINT": str(self.checkpoint.resolve()),
        }


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights of a plausible scale (transformers' inits for BLIP-2 are ~1e-10: a flat model)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02, generator=generator)
            elif param.dim() == 1:  # LayerNorm weights
                param.uniform_(0.8, 1.2, generator=generator)
            else:
                fan_in = param[0].numel() if param.dim() > 1 else param.shape[-1]
                param.normal_(0, fan_in**-0.5, generator=generator)


def _write_eva(path: Path, size: EvaSize, generator: torch.Generator) -> None:
    extra = EvaViT(EvaSize(size.width, size.depth + 1, size.heads, size.mlp, size.image_size, size.patch_size))
    _randomise(extra, generator)
    with torch.no_grad():
        for name, param in extra.tower.encoder.layers.named_parameters():  # EVA has no k bias: the fused
            if name.endswith("self_attn.qkv.bias"):  # bias's middle third is zero
                param[size.width : 2 * size.width] = 0
    torch.save(eva_vit.to_published(extra.tower.state_dict()), path)


def _write_qformer(path: Path, size: QFormerSize, generator: torch.Generator) -> None:
    bridge = QueryBridge(size)
    _randomise(bridge, generator)
    state = to_lavis(bridge.state_dict())
    h, f = size.hidden_size, size.intermediate_size

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    state |= {
        "Qformer.bert.embeddings.word_embeddings.weight": rand(BERT_VOCAB, h),
        "Qformer.bert.embeddings.position_embeddings.weight": rand(512, h),
        "Qformer.bert.embeddings.position_ids": torch.arange(512).expand(1, -1).clone(),
        "Qformer.cls.predictions.bias": rand(BERT_VOCAB),
        "Qformer.cls.predictions.transform.dense.weight": rand(h, h),
        "Qformer.cls.predictions.transform.dense.bias": rand(h),
        "Qformer.cls.predictions.transform.LayerNorm.weight": torch.ones(h),
        "Qformer.cls.predictions.transform.LayerNorm.bias": torch.zeros(h),
        "Qformer.cls.predictions.decoder.weight": rand(BERT_VOCAB, h),
        "Qformer.cls.predictions.decoder.bias": rand(BERT_VOCAB),
        "vision_proj.weight": rand(256, h),
        "vision_proj.bias": rand(256),
        "text_proj.weight": rand(256, h),
        "text_proj.bias": rand(256),
        "itm_head.weight": rand(2, h),
        "itm_head.bias": rand(2),
        "temp": torch.tensor(0.07),
    }
    for i in range(size.layers):  # the text FFN (MiniGPT-4 sets it to None; LAVIS saves it)
        p = f"Qformer.bert.encoder.layer.{i}"
        state |= {
            f"{p}.intermediate.dense.weight": rand(f, h),
            f"{p}.intermediate.dense.bias": rand(f),
            f"{p}.output.dense.weight": rand(h, f),
            f"{p}.output.dense.bias": rand(h),
            f"{p}.output.LayerNorm.weight": torch.ones(h),
            f"{p}.output.LayerNorm.bias": torch.zeros(h),
        }
    torch.save({"model": state}, path)


def _write_llm(llm_dir: Path, generator: torch.Generator) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = write_tokenizer(llm_dir)
    fields = vicuna_v1_config(vocab)
    write_vicuna_v1_configs(llm_dir, fields)
    config = LlamaConfig(
        **{
            k: v
            for k, v in fields.items()
            if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")
        }
    )
    model = LlamaForCausalLM(config)
    state = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    head_dim = config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):  # buffers old checkpoints carry
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        )
    keys = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
        "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
    }
    weight_map: dict[str, str] = {}
    for name, shard_keys in shards.items():
        torch.save({k: state[k] for k in shard_keys}, llm_dir / name)
        weight_map |= dict.fromkeys(shard_keys, name)
    (llm_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2)
    )
    return int(config.hidden_size)


def corpus() -> list[str]:
    """Text to train the tiny tokenizer on: XrayGPT's system text, questions and conversation markers."""
    report = prompts.conversation_prompt([], prompts.REPORT_QUESTION)
    roles = prompts.SEP.join(f"{role}: " for role in prompts.ROLES)
    return [report, roles + prompts.IMPRESSION + prompts.SEP, prompts.KEY_FINDINGS, "</s>"]


def write_tokenizer(llm_dir: Path) -> int:
    """A Llama-like sentencepiece tokenizer (:func:`workers.models.tiny_llama.write_llama_tokenizer`) trained
    on :func:`corpus`; returns the vocabulary size. tokenizer_config.json says ``legacy: false``, as a copy
    saved by a newer transformers would: the backend must still encode with the reference's legacy rules."""
    return write_llama_tokenizer(llm_dir, corpus(), legacy=False)


def _write_checkpoint(
    path: Path, qformer_hidden: int, llm_hidden: int, layers: int, generator: torch.Generator
) -> None:
    head_dim = 16
    model = {
        "llama_proj.weight": torch.randn(llm_hidden, qformer_hidden, generator=generator) * qformer_hidden**-0.5,
        "llama_proj.bias": torch.randn(llm_hidden, generator=generator) * 0.02,
        "Qformer.bert.embeddings.position_ids": torch.arange(512).expand(1, -1).clone(),
    }
    for layer in range(layers):
        model[f"llama_model.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        )
    torch.save(
        {
            "model": model,
            "optimizer": {"state": {}, "param_groups": [{"lr": 3e-5, "params": [0, 1]}]},
            "config": {"model": {"arch": "mini_gpt4", "num_query_token": 32}, "run": {"seed": 42}},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "epoch": 4,
        },
        path,
    )


def make_tiny(directory: Path | str, seed: int = 0) -> TinyPaths:
    """Write ``directory/vision``, ``directory/Vicuna_Radiology_fp16`` and ``directory/xraygpt/<checkpoint>``."""
    directory = Path(directory)
    paths = TinyPaths(directory / "vision", directory / LLM_DIR_NAME, directory / "xraygpt" / CHECKPOINT_NAME)
    for folder in (paths.vision_dir, paths.llm_dir, paths.checkpoint.parent):
        folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    _write_eva(paths.vision_dir / EVA_FILE, TINY_SIZES.eva, generator)
    _write_qformer(paths.vision_dir / QFORMER_FILE, TINY_SIZES.qformer, generator)
    llm_hidden = _write_llm(paths.llm_dir, generator)
    _write_checkpoint(paths.checkpoint, TINY_SIZES.qformer.hidden_size, llm_hidden, 2, generator)
    (paths.checkpoint.parent / SIZES_FILE).write_text(TINY_SIZES.to_json())
    (paths.checkpoint.parent / TINY_MARKER).write_text(MARKER_TEXT)
    return paths
