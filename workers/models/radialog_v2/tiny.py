"""A tiny random-initialised RaDialog v2 in exactly the published file layout, for tests, demo and CI.

It goes through the real loader: a sharded llava-style base (.bin shards + index, LLaVA-only keys,
a Llama-like sentencepiece tokenizer.model), RaDialog's config.json, a LLaVA-era adapter_config.json +
adapter_model.bin, non_lora_trainables.bin with ``base_model.model.model.`` prefixes, and a
Lightning-style classifier checkpoint whose pickled hyper-parameters (argparse.Namespace and a
dict subclass like Lightning's AttributeDict) need the restricted unpickler. A marker file says loudly
that this is a tiny random model and not clinical. Nothing is downloaded.

The model is *lively*, so that tests comparing batched with one-at-a-time generation can fail: its
classifier head is fitted so that labels vary with the image (:func:`liven_classifier`), its LLM mixes its
context and ends its answers with ``</s>`` at different lengths, and it never generates ``<unk>``, ``<s>``
or byte-fallback pieces, so its text holds no control characters
(:mod:`workers.models.tiny_llama`). Its words are still random.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from workers.models.base import Turn
from workers.models.conversation import conversation_prompt
from workers.models.llama_tokenizer import SlowLlamaEncoder, decoding_tokenizer
from workers.models.prompts import (
    CHEXPERT_LABELS,
    EASY_LANGUAGE,
    IMPRESSION,
    LIST_FINDINGS,
    NO_COMMON_FINDINGS,
    SUMMARY,
    SYSTEM,
    VIEW_PROMPT,
    correction_prompt,
    report_prompt,
    yes_no_prompt,
)
from workers.models.radialog_v2.backend import TINY_MAX_NEW_TOKENS
from workers.models.radialog_v2.classifier import ChexpertClassifier
from workers.models.radialog_v2.files import CLASSIFIER_RELPATH, TINY_MARKER
from workers.models.radialog_v2.llava import RadialogLlava
from workers.models.radialog_v2.transforms import CLASSIFIER_CROP, batch_tensors
from workers.models.tiny_llama import (
    choose_end_triggers,
    keep_channel_free_in_lora,
    liven_weights,
    plant_end_trigger,
    silent_token_ids,
    write_llama_tokenizer,
)

TINY_RESNET_WIDTH = 8  # trunk output 256 channels instead of 2048; everything after it is full size
EOS_ID = 2
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MARKER_TEXT = "TINY RANDOM MODEL - NOT CLINICAL. Random weights written by `radialog model make-tiny`.\n"
#: Synthetic images the classifier head is fitted on and the end token is chosen with.
CALIBRATION_IMAGES = 16


class HyperParameters(dict):
    """Stands in for Lightning's AttributeDict (a dict subclass) in the checkpoint's pickled hparams."""


def _llama_fields(vocab_size: int) -> dict[str, Any]:
    return {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "use_cache": True,
        "torch_dtype": "float16",
    }


def _corpus() -> list[str]:
    """Text to train the tiny tokenizer on: our prompts (every task) and the conversation markers."""
    lines = [SYSTEM, LIST_FINDINGS, IMPRESSION, EASY_LANGUAGE, SUMMARY, VIEW_PROMPT, "USER: ASSISTANT: </s>"]
    lines += [report_prompt(label.lower()) for label in CHEXPERT_LABELS] + [report_prompt(NO_COMMON_FINDINGS)]
    lines += [yes_no_prompt(label) for label in CHEXPERT_LABELS[1:]]
    lines += [correction_prompt([CHEXPERT_LABELS[2]], [CHEXPERT_LABELS[5]])]
    return lines


def write_tokenizer(base_dir: Path) -> int:
    """The tiny Llama-like sentencepiece tokenizer (see :func:`workers.models.tiny_llama.write_llama_tokenizer`)."""
    return write_llama_tokenizer(base_dir, _corpus())


def calibration_images() -> list[np.ndarray]:
    """Synthetic chest images the tiny model is livened on: 8-bit pixel arrays in the sizes the tests use,
    and DICOM radiographs as the demo and the pipeline tests make them, windowed as a worker does."""
    from radialog.imaging import dataset_to_model_image
    from radialog.synthetic import chest_pixels, make_cxr  # its module imports pydicom: import late

    sizes = [(560, 520), (600, 550), (640, 580), (700, 640), (720, 600), (384, 320)]
    arrays = [
        chest_pixels(*sizes[i % len(sizes)], 8, seed=1000 + i).astype(np.uint8) for i in range(CALIBRATION_IMAGES // 2)
    ]
    dicom_sizes = [(512, 512), (640, 560), (256, 256)]
    radiographs = [
        dataset_to_model_image(make_cxr(rows=r, cols=c, seed=2000 + i))
        for i, (r, c) in enumerate(dicom_sizes * (CALIBRATION_IMAGES // 2 // len(dicom_sizes) + 1))
    ]
    return arrays + radiographs[: CALIBRATION_IMAGES - len(arrays)]


@torch.no_grad()
def liven_classifier(
    classifier: ChexpertClassifier, images: Sequence[np.ndarray], generator: torch.Generator, directions: int = 4
) -> None:
    """Refit the head so that labels vary with the image: logits of about +-3 around the threshold.

    A random BioViL-T gives nearly equal features for similar radiographs (they differ by ~1e-5), so a
    random head labels every image alike, and a head that amplifies every feature direction also
    amplifies float noise (a different batch size changes the features by ~1e-7). fc1 reads only the
    ``directions`` in which the features of ``images`` vary most (their principal components: image
    differences stand further above that noise there; batch size then moves the logits by ~3e-3 instead
    of ~3e-2), scaled to unit spread and centred on the mean; fc2 is scaled and centred the same way on
    fc1's output.
    """
    pixels = batch_tensors(list(images), CLASSIFIER_CROP)
    embeddings = classifier.biovil_encoder(pixels).projected_patch_embeddings
    features = torch.nn.functional.avg_pool2d(embeddings, 4).flatten(1).double()
    mean = features.mean(0)
    _, spread, components = torch.linalg.svd(features - mean, full_matrices=False)
    principal = components[:directions] / spread[:directions, None] * (len(images) - 1) ** 0.5  # whitened
    mixing = torch.randn(classifier.fc1.out_features, directions, generator=generator, dtype=torch.float64)
    w1 = mixing @ principal
    w1 /= ((features - mean) @ w1.T).std()
    classifier.fc1.weight.copy_(w1)
    classifier.fc1.bias.copy_(-(w1 @ mean))
    hidden = torch.relu((features - mean) @ w1.T)
    w2 = torch.randn(classifier.fc2.out_features, hidden.shape[1], generator=generator, dtype=torch.float64)
    w2 *= 3 / (hidden @ w2.T).std(0).mean()
    classifier.fc2.weight.copy_(w2)
    classifier.fc2.bias.copy_(-(w2 @ hidden.mean(0)))


@torch.no_grad()
def _probe_answers(
    llava: RadialogLlava, classifier: ChexpertClassifier, base_dir: Path, images: Sequence[np.ndarray]
) -> tuple[list[list[int]], set[int]]:
    """Greedy answers of the in-memory model (a report per image, a follow-up question after each, the
    view question) and the last token of every prompt (an end trigger there would end an answer at once)."""
    from workers.models.radialog_v2.backend import RadialogV2Backend
    from workers.models.radialog_v2.loader import LoadedModel

    encoder = SlowLlamaEncoder.from_directory(base_dir)
    loaded = LoadedModel(
        llava,
        classifier,
        decoding_tokenizer(base_dir, encoder),
        None,
        torch.device("cpu"),
        torch.float32,
        torch.float32,
        "make-tiny",
        encoder=encoder,
    )
    backend = RadialogV2Backend(loaded)
    phrases, prompts = backend.report_prompts(backend.classify(images))
    reports = backend.generate(prompts, images, TINY_MAX_NEW_TOKENS)
    questions = [LIST_FINDINGS, IMPRESSION, yes_no_prompt("Edema"), EASY_LANGUAGE]
    follow_prompts = [
        conversation_prompt([Turn(report_prompt(phrase), backend.decode(out))], questions[i % len(questions)])
        for i, (phrase, out) in enumerate(zip(phrases, reports))
    ] + [conversation_prompt([], VIEW_PROMPT)]
    follow_ups = backend.generate(follow_prompts, [*images, images[0]], TINY_MAX_NEW_TOKENS)
    last_tokens = {backend.prompt_ids(p)[-1] for p in [*prompts, *follow_prompts]}
    return reports + follow_ups, last_tokens


def _randomise_bn(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give BatchNorm layers plausible non-trivial running statistics and affine parameters."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None and m.num_batches_tracked is not None
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
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **llama,
        "mm_hidden_size": 1024,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "transformers_version": "4.31.0",
    }
    (base_dir / "config.json").write_text(json.dumps(base_config, indent=2))
    radialog_config = {
        **base_config,
        "mm_vision_tower": "biovil",
        "mm_hidden_size": 512,
        "_name_or_path": "liuhaotian/llava-v1.5-7b",
        "tokenizer_model_max_length": 2048,
    }
    (model_dir / "config.json").write_text(json.dumps(radialog_config, indent=2))

    # Base LLM, livened, rounded to the fp16 the shards hold (the adapter is made for what the loader sees).
    language_model = LlamaForCausalLM(llama_config_from_llava(base_config)).eval()
    silent = silent_token_ids(base_dir / "tokenizer.model")
    liven_weights(language_model, [*silent, EOS_ID])  # </s> silent until plant_end_trigger
    language_model.load_state_dict({k: v.to(torch.float16).float() for k, v in language_model.state_dict().items()})
    base_state = {k: v.clone() for k, v in language_model.state_dict().items()}

    # RaDialog: vision tower + projector (non_lora_trainables.bin), LoRA adapter, classifier.
    llava = RadialogLlava(language_model, resnet_width=TINY_RESNET_WIDTH)
    _randomise_bn(llava.vision_tower, generator)
    with torch.no_grad():
        llava.vision_tower.encoder.missing_previous_emb.normal_(0, 0.02, generator=generator)
        llava.vision_tower.encoder.vit_pooler.type_embed.normal_(0, 0.02, generator=generator)
    non_lora = {f"base_model.model.model.vision_tower.{k}": v for k, v in llava.vision_tower.state_dict().items()}
    non_lora |= {f"base_model.model.model.mm_projector.{k}": v for k, v in llava.mm_projector.state_dict().items()}
    torch.save(non_lora, model_dir / "non_lora_trainables.bin")

    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(language_model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero; a non-zero B makes the merge observable
                param.normal_(0, 0.05, generator=generator)
    keep_channel_free_in_lora(peft_model)
    adapter = get_peft_model_state_dict(peft_model)
    torch.save({k: v.clone() for k, v in adapter.items()}, model_dir / "adapter_model.bin")
    (model_dir / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": "liuhaotian/llava-v1.5-7b",
                "bias": "none",
                "fan_in_fan_out": False,
                "inference_mode": True,
                "init_lora_weights": True,
                "lora_alpha": 16,
                "lora_dropout": 0.05,
                "modules_to_save": None,
                "peft_type": "LORA",
                "r": 8,
                "revision": None,
                "target_modules": LORA_TARGETS,
                "task_type": "CAUSAL_LM",
            },
            indent=2,
        )
    )
    llava.language_model = cast(LlamaForCausalLM, peft_model.merge_and_unload().eval())  # what the loader will serve

    classifier = ChexpertClassifier(resnet_width=TINY_RESNET_WIDTH).eval()
    _randomise_bn(classifier.biovil_encoder, generator)
    images = calibration_images()
    liven_classifier(classifier, images, generator)
    _write_classifier(classifier, model_dir / CLASSIFIER_RELPATH)

    # </s> follows the first of some rare tokens that together would end most answers (see tiny_llama).
    answers, last_prompt_tokens = _probe_answers(llava, classifier, base_dir, images)
    triggers = choose_end_triggers(answers, {EOS_ID, *silent, *last_prompt_tokens}, limit=TINY_MAX_NEW_TOKENS)
    plant_end_trigger(llava.language_model, EOS_ID, triggers)
    for key in ("lm_head.weight", "model.embed_tokens.weight"):  # neither is LoRA-tuned
        base_state[key] = llava.language_model.get_parameter(key).detach().clone()
    _write_base_shards(base_state, base_dir, llama, generator)

    (model_dir / TINY_MARKER).write_text(MARKER_TEXT)
    return model_dir, base_dir


def _write_base_shards(
    state: dict[str, torch.Tensor], base_dir: Path, llama: dict[str, Any], generator: torch.Generator
) -> None:
    """Two fp16 .bin shards + index, with LLaVA-only keys (CLIP-sized projector, rotary buffers)."""
    state = dict(state)
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
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
        "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, shard_keys in shards.items():
        torch.save({k: state[k].to(torch.float16) for k in shard_keys}, base_dir / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    (base_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2)
    )


def _write_classifier(classifier: ChexpertClassifier, ckpt_path: Path) -> None:
    """A Lightning-style checkpoint with pickled hyper-parameters, as published."""
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {f"model.{k}": v for k, v in classifier.state_dict().items()}
    state_dict["criterion.pos_weight"] = torch.ones(len(CHEXPERT_LABELS))
    torch.save(
        {
            "epoch": 3,
            "global_step": 21000,
            "pytorch-lightning_version": "2.1.0",
            "state_dict": state_dict,
            "hyper_parameters": HyperParameters(
                num_classes=14,
                class_names=list(CHEXPERT_LABELS),
                args=argparse.Namespace(lr=1e-4, batch_size=64, output_dir=Path("/tmp/chexpert_train")),
            ),
            "optimizer_states": [],
            "lr_schedulers": [],
            "callbacks": {},
        },
        ckpt_path,
    )
