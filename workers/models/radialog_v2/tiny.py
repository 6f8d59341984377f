"""A tiny random-initialised RaDialog v2 in exactly the published file layout, for tests, demo and CI.

It goes through the real loader: a sharded llava-style base (.bin shards + index, LLaVA-only keys,
sentencepiece tokenizer.model), RaDialog's config.json, a LLaVA-era adapter_config.json +
adapter_model.bin, non_lora_trainables.bin with ``base_model.model.model.`` prefixes, and a
Lightning-style classifier checkpoint whose pickled hyper-parameters (argparse.Namespace and a
dict subclass like Lightning's AttributeDict) need the restricted unpickler. A marker file says loudly
that this is a tiny random model and not clinical. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from workers.models.prompts import (
    CHEXPERT_LABELS,
    EASY_LANGUAGE,
    IMPRESSION,
    LIST_FINDINGS,
    SYSTEM,
    VIEW_PROMPT,
    correction_prompt,
    report_prompt,
    yes_no_prompt,
)
from workers.models.radialog_v2.classifier import ChexpertClassifier
from workers.models.radialog_v2.files import CLASSIFIER_RELPATH, TINY_MARKER
from workers.models.radialog_v2.llava import RadialogLlava

TINY_RESNET_WIDTH = 8  # trunk output 256 channels instead of 2048; everything after it is full size
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MARKER_TEXT = "TINY RANDOM MODEL - NOT CLINICAL. Random weights written by `radialog model make-tiny`.\n"


class HyperParameters(dict):
    """Stands in for Lightning's AttributeDict (a dict subclass) in the checkpoint's pickled hparams."""


def _llama_fields(vocab_size: int) -> dict[str, Any]:
    return {
        "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": vocab_size, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "initializer_range": 0.02, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "rope_theta": 10000.0,
        "use_cache": True, "torch_dtype": "float16",
    }


def _corpus() -> list[str]:
    """Text to train the tiny tokenizer on: our prompts and some radiology phrasing."""
    findings = [label.lower() for label in CHEXPERT_LABELS]
    lines = [SYSTEM, LIST_FINDINGS, IMPRESSION, EASY_LANGUAGE, VIEW_PROMPT, "USER: ASSISTANT: </s>"]
    lines += [report_prompt(f) for f in findings + ["no common findings"]]
    lines += [yes_no_prompt(f) for f in findings] + [correction_prompt([findings[2]], [findings[5]])]
    lines += [
        "The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
        "There is mild cardiomegaly with small bilateral pleural effusions and bibasilar atelectasis.",
        "Support devices are in standard position. No acute cardiopulmonary process.",
        "PA and lateral views of the chest. Yes. No. The image was taken in the AP view.",
    ]
    return lines * 4


def write_tokenizer(base_dir: Path) -> int:
    """Train a small sentencepiece BPE (byte fallback, unk 0 / bos 1 / eos 2, no pad) like Llama's."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe", vocab_size=600,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        split_digits=True, add_dummy_prefix=True, minloglevel=2, hard_vocab_limit=False,
    )
    (base_dir / "tokenizer.model").write_bytes(model.getvalue())
    token = lambda text: {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (base_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": token("<s>"), "eos_token": token("</s>"), "unk_token": token("<unk>"), "pad_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096, "padding_side": "right",
        "sp_model_kwargs": {},
    }, indent=2))
    (base_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": token("<s>"), "eos_token": token("</s>"), "unk_token": token("<unk>"), "pad_token": "<unk>"}
    ))
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return int(processor.get_piece_size())


def _randomise_bn(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give BatchNorm layers plausible non-trivial running statistics and affine parameters."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=generator)
            m.running_var.uniform_(0.5, 1.5, generator=generator)
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
            m.bias.data.normal_(0, 0.1, generator=generator)
            m.num_batches_tracked.fill_(1000)


def make_tiny(directory: Path | str, seed: int = 0) -> tuple[Path, Path]:
    """Write ``directory/radialog`` (settings.model_dir) and ``directory/llava`` (settings.base_model_dir)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    from workers.models.radialog_v2.llava import llama_config_from_llava

    directory = Path(directory)
    model_dir, base_dir = directory / "radialog", directory / "llava"
    model_dir.mkdir(parents=True, exist_ok=True)
    base_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    vocab = write_tokenizer(base_dir)
    llama = _llama_fields(vocab)
    base_config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", **llama,
        "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "transformers_version": "4.31.0",
    }
    (base_dir / "config.json").write_text(json.dumps(base_config, indent=2))
    radialog_config = {**base_config, "mm_vision_tower": "biovil", "mm_hidden_size": 512,
                       "_name_or_path": "liuhaotian/llava-v1.5-7b", "tokenizer_model_max_length": 2048}
    (model_dir / "config.json").write_text(json.dumps(radialog_config, indent=2))

    # Base LLM: two .bin shards + index, with LLaVA-only keys (CLIP-sized projector, rotary buffers).
    language_model = LlamaForCausalLM(llama_config_from_llava(base_config)).eval()
    state = {k: v.clone() for k, v in language_model.state_dict().items()}
    hidden = llama["hidden_size"]
    state["model.mm_projector.0.weight"] = torch.randn(hidden, 1024, generator=generator) * 0.02
    state["model.mm_projector.0.bias"] = torch.zeros(hidden)
    state["model.mm_projector.2.weight"] = torch.randn(hidden, hidden, generator=generator) * 0.02
    state["model.mm_projector.2.bias"] = torch.zeros(hidden)
    head_dim = hidden // llama["num_attention_heads"]
    for layer in range(llama["num_hidden_layers"]):
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        )
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    weight_map = {}
    for name, shard_keys in shards.items():
        torch.save({k: state[k].to(torch.float16) for k in shard_keys}, base_dir / name)
        weight_map.update({k: name for k in shard_keys})
    (base_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2)
    )
    # Load the fp16-rounded weights back so the adapter is made for exactly what the loader will see.
    language_model.load_state_dict({k: state[k].to(torch.float16).float() for k in language_model.state_dict()})

    # RaDialog: vision tower + projector (non_lora_trainables.bin), LoRA adapter, classifier.
    llava = RadialogLlava(language_model, resnet_width=TINY_RESNET_WIDTH)
    _randomise_bn(llava.vision_tower, generator)
    with torch.no_grad():
        llava.vision_tower.encoder.missing_previous_emb.normal_(0, 0.02, generator=generator)
        llava.vision_tower.encoder.vit_pooler.type_embed.normal_(0, 0.02, generator=generator)
    non_lora = {f"base_model.model.model.vision_tower.{k}": v for k, v in llava.vision_tower.state_dict().items()}
    non_lora |= {f"base_model.model.model.mm_projector.{k}": v for k, v in llava.mm_projector.state_dict().items()}
    torch.save(non_lora, model_dir / "non_lora_trainables.bin")

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(language_model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero; a non-zero B makes the merge observable
                param.normal_(0, 0.05, generator=generator)
    adapter = get_peft_model_state_dict(peft_model)
    torch.save({k: v.clone() for k, v in adapter.items()}, model_dir / "adapter_model.bin")
    (model_dir / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "liuhaotian/llava-v1.5-7b", "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "lora_alpha": 16, "lora_dropout": 0.05,
        "modules_to_save": None, "peft_type": "LORA", "r": 8, "revision": None,
        "target_modules": LORA_TARGETS, "task_type": "CAUSAL_LM",
    }, indent=2))

    classifier = ChexpertClassifier(resnet_width=TINY_RESNET_WIDTH)
    _randomise_bn(classifier.biovil_encoder, generator)
    ckpt_path = model_dir / CLASSIFIER_RELPATH
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {f"model.{k}": v for k, v in classifier.state_dict().items()}
    state_dict["criterion.pos_weight"] = torch.ones(len(CHEXPERT_LABELS))
    torch.save({
        "epoch": 3, "global_step": 21000, "pytorch-lightning_version": "2.1.0",
        "state_dict": state_dict,
        "hyper_parameters": HyperParameters(
            num_classes=14, class_names=list(CHEXPERT_LABELS),
            args=argparse.Namespace(lr=1e-4, batch_size=64, output_dir=Path("/tmp/chexpert_train")),
        ),
        "optimizer_states": [], "lr_schedulers": [], "callbacks": {},
    }, ckpt_path)

    (model_dir / TINY_MARKER).write_text(MARKER_TEXT)
    return model_dir, base_dir
