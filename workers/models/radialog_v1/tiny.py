"""A tiny random-initialised RaDialog v1 in exactly the published file formats, for tests, the demo and CI.

It goes through the real loader. ``radialog-v1/`` (RADIALOG_V1_DIR) holds the release files in the reference
repository's layout: ``checkpoint_4.pth`` (``{"model": ...}`` in LAVIS's layout with the parts the query path
ignores and the visual encoder's BatchNorm buffers, beside ``optimizer``, ``config``, ``scaler``, ``epoch``;
*no* projector, as the real one is expected to lack it, so the replay path runs), the RaDialog-INS adapter
directory (old-peft ``adapter_config.json`` with ``enable_lora`` / ``merge_weights``, ``adapter_model.bin`` in
old peft names plus ``img_proj_layer``) and the Lightning classifier checkpoint. ``vicuna-7b-v1.3/`` is a
sharded fp16 Vicuna-style directory (vocabulary 32,000 so ``<IMG>`` is 32000 as in the reference; a small
Llama-like sentencepiece tokenizer whose config says ``legacy: false``, which transformers 4.28 ignored) and
``biovil/biovil_t_image_model_proj_size_128.pt`` the BioViL-T image model with its own 128-channel projector.

Constants of the reference stay (1408 channels, the 768-wide Q-Former output, 32 queries, vocabulary 32,000,
fc1's 2,048 inputs); the ResNet trunk, the Q-Former's depth and the Llama are small. The model is lively
(:mod:`workers.models.tiny_llama`): labels vary with the image, answers end at different lengths, never
``<unk>``/``<s>``/byte pieces. A marker file says loudly that this is a tiny random model. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from workers.models.base import Turn
from workers.models.common.qformer import QFormerSize, to_lavis
from workers.models.conversation import conversation_prompt
from workers.models.radialog_v1 import prompts
from workers.models.radialog_v1.files import (
    BIOVIL_FILE,
    CLASSIFIER_RELPATH,
    INSTRUCT_ADAPTER,
    QFORMER_RELPATHS,
    TINY_MARKER,
)
from workers.models.radialog_v1.loader import LoadedRadialogV1, load_tokenizer, write_sizes
from workers.models.radialog_v1.model import RadialogV1
from workers.models.radialog_v1.projector import replay
from workers.models.radialog_v2.biovil import BioViLT
from workers.models.radialog_v2.classifier import ChexpertClassifier
from workers.models.radialog_v2.tiny import _randomise_bn, _write_classifier, calibration_images, liven_classifier
from workers.models.tiny_llama import (
    choose_end_triggers,
    keep_channel_free_in_lora,
    liven_weights,
    plant_end_trigger,
    silent_token_ids,
    vicuna_v1_config,
    write_llama_tokenizer,
    write_vicuna_v1_configs,
)

TINY_RESNET_WIDTH = 8  # trunk output 256 channels instead of 2,048; everything after it is full size
TINY_QFORMER = QFormerSize(vision_width=1408, hidden_size=768, layers=2, heads=12, intermediate_size=256, queries=32)
LLM_DIR_NAME = "vicuna-7b-v1.3"
EOS_ID = 2
#: Spread of the tiny image embeddings across images: enough to change answers, not so much that float noise
#: between batch sizes in the vision tower (~1e-6 at the Q-Former output) flips a greedy token.
IMAGE_SPREAD = 0.25
VOCAB = 32000
MARKER_TEXT = (
    "TINY RANDOM MODEL - NOT CLINICAL. Random weights written by `radialog model make-tiny --backend radialog-v1`.\n"
)


@dataclass(frozen=True)
class TinyPaths:
    """The settings a worker needs (RADIALOG_V1_DIR / _LLM_DIR / _BIOVIL_FILE; the adapter is the default)."""

    root: Path
    llm_dir: Path
    biovil: Path

    def env(self) -> dict[str, str]:
        return {
            "RADIALOG_MODEL_BACKEND": "radialog-v1",
            "RADIALOG_V1_DIR": str(self.root.resolve()),
            "RADIALOG_V1_LLM_DIR": str(self.llm_dir.resolve()),
            "RADIALOG_V1_BIOVIL_FILE": str(self.biovil.resolve()),
        }


def corpus() -> list[str]:
    """Text to train the tiny tokenizer on: v1's prompts for every task and the conversation markers."""
    from workers.models.prompts import CHEXPERT_LABELS, correction_prompt, yes_no_prompt

    lines = [prompts.SYSTEM, prompts.LIST_FINDINGS, prompts.EASY_LANGUAGE, prompts.SUMMARY, "USER: ASSISTANT: </s>"]
    lines += [prompts.report_prompt(label.lower()).replace(prompts.IMAGE_RUN, "") for label in CHEXPERT_LABELS]
    lines += [yes_no_prompt(label) for label in CHEXPERT_LABELS[1:]] + [correction_prompt(["Edema"], ["Fracture"])]
    return lines


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights of a plausible scale (transformers' Q-Former init is nearly flat)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02, generator=generator)
            elif param.dim() == 1:  # LayerNorm weights
                param.uniform_(0.8, 1.2, generator=generator)
            else:
                fan_in = param[0].numel() if param.dim() > 1 else param.shape[-1]
                param.normal_(0, fan_in**-0.5, generator=generator)


def _qformer_checkpoint(model: RadialogV1, generator: torch.Generator) -> dict[str, Any]:
    """checkpoint_4.pth as LAVIS's runner saves it: trainable parameters and every buffer (so the visual
    encoder's BatchNorm statistics, not its frozen weights and not the projector's convolutions)."""
    state = to_lavis(model.bridge.state_dict())
    h, f = model.bridge.size.hidden_size, model.bridge.size.intermediate_size

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    bert_vocab = 64  # the real one has 30,523 rows; the loader ignores these by name, shapes unchecked
    state |= {
        "Qformer.bert.embeddings.word_embeddings.weight": rand(bert_vocab, h),
        "Qformer.bert.embeddings.position_embeddings.weight": rand(512, h),
        "Qformer.bert.embeddings.position_ids": torch.arange(512).expand(1, -1).clone(),
        "Qformer.cls.predictions.bias": rand(bert_vocab),
        "Qformer.cls.predictions.transform.dense.weight": rand(h, h),
        "Qformer.cls.predictions.transform.dense.bias": rand(h),
        "Qformer.cls.predictions.transform.LayerNorm.weight": torch.ones(h),
        "Qformer.cls.predictions.transform.LayerNorm.bias": torch.zeros(h),
        "Qformer.cls.predictions.decoder.weight": rand(bert_vocab, h),
        "Qformer.cls.predictions.decoder.bias": rand(bert_vocab),
        "vision_proj.weight": rand(256, h),
        "vision_proj.bias": rand(256),
        "text_proj.weight": rand(256, h),
        "text_proj.bias": rand(256),
        "itm_head.weight": rand(2, h),
        "itm_head.bias": rand(2),
        "temp": torch.tensor(0.07),
    }
    for i in range(model.bridge.size.layers):  # the text FFN
        p = f"Qformer.bert.encoder.layer.{i}"
        state |= {
            f"{p}.intermediate.dense.weight": rand(f, h),
            f"{p}.intermediate.dense.bias": rand(f),
            f"{p}.output.dense.weight": rand(h, f),
            f"{p}.output.dense.bias": rand(h),
            f"{p}.output.LayerNorm.weight": torch.ones(h),
            f"{p}.output.LayerNorm.bias": torch.zeros(h),
        }
    buffers = {name for name, _ in model.visual_encoder.named_buffers()}
    state |= {f"visual_encoder.{k}": v.clone() for k, v in model.visual_encoder.state_dict().items() if k in buffers}
    return {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "config": {"model": {"arch": "blip2", "vit_model": "biovil"}, "run": {"seed": 42}},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "epoch": 4,
    }


def _biovil_file(model: RadialogV1, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """BioViL-T's published image model: the same encoder, with its own 128-channel projector."""
    published = BioViLT(joint_feature_size=128, per_image_norm=False, resnet_width=TINY_RESNET_WIDTH)
    _randomise_bn(published.projector, generator)
    published.encoder.load_state_dict(model.visual_encoder.encoder.state_dict())
    return {k: v.clone() for k, v in published.state_dict().items()}


@torch.no_grad()
def liven_img_proj(model: RadialogV1, generator: torch.Generator) -> None:
    """Fit ``img_proj`` so that the image matters to the LLM: a random BioViL-T gives nearly equal features for
    similar radiographs, so the Q-Former outputs differ by little around a large common part (one per query
    position). The projection ignores that common part (its rows are made orthogonal to the 32 mean outputs
    over the calibration images) and is scaled to unit spread of what is left, as :func:`liven_classifier`
    does for the classifier's head; output channel 0 stays zero (the free channel, see tiny_llama)."""
    from workers.models.radialog_v2.transforms import LLM_CROP, batch_tensors

    queries = model.bridge(model.image_features(batch_tensors(calibration_images(), LLM_CROP))).double()
    mean = queries.mean(0)  # [32, 768]: per query position
    basis, _ = torch.linalg.qr(mean.T)  # [768, 32]: the common part's directions
    weight = torch.randn(model.img_proj.out_features, queries.shape[-1], generator=generator, dtype=torch.float64)
    weight -= (weight @ basis) @ basis.T
    weight *= IMAGE_SPREAD / (queries @ weight.T).std()
    weight[0] = 0
    model.img_proj.weight.copy_(weight)
    model.img_proj.bias.zero_()


def _adapter_config() -> dict[str, Any]:
    """peft 0.3's adapter_config.json (the reference's peft@e536616), as the released adapters carry it."""
    return {
        "base_model_name_or_path": "lmsys/vicuna-7b-v1.3",
        "bias": "none",
        "enable_lora": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "merge_weights": False,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 8,
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
    }


@torch.no_grad()
def _probe_answers(
    model: RadialogV1,
    classifier: ChexpertClassifier,
    llm_dir: Path,
) -> tuple[list[list[int]], set[int]]:
    """Greedy answers of the in-memory model (a report per calibration image, a follow-up after each) and the
    last token of every prompt (an end trigger there would end an answer at once)."""
    from workers.models.radialog_v1.backend import RadialogV1Backend

    tokenizer, encoder = load_tokenizer(llm_dir)
    backend = RadialogV1Backend(
        LoadedRadialogV1(
            model, classifier, tokenizer, encoder, None, torch.device("cpu"), torch.float32, torch.float32, "make-tiny"
        )
    )
    images = calibration_images()
    phrases, report_prompts = backend.report_prompts(backend.classify(images))
    reports = backend.generate(report_prompts, images, backend.report_token_limit())
    questions = [prompts.LIST_FINDINGS, prompts.SUMMARY, "Is there any Edema?", prompts.EASY_LANGUAGE]
    follow = [
        conversation_prompt([Turn(prompts.report_prompt(phrase), backend.decode(out))], questions[i % 4])
        for i, (phrase, out) in enumerate(zip(phrases, reports))
    ]
    answers = backend.generate(follow, images, backend.report_token_limit())
    return reports + answers, {backend.prompt_ids(p)[-1] for p in [*report_prompts, *follow]}


def _write_llm(llm_dir: Path, state: dict[str, torch.Tensor], fields: dict[str, Any]) -> None:
    """Two fp16 .bin shards + index with the old rotary inv_freq buffers, config and generation config."""
    write_vicuna_v1_configs(llm_dir, fields)
    state = dict(state)
    head_dim = fields["hidden_size"] // fields["num_attention_heads"]
    for layer in range(fields["num_hidden_layers"]):
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
        torch.save({k: state[k].to(torch.float16) for k in shard_keys}, llm_dir / name)
        weight_map |= dict.fromkeys(shard_keys, name)
    (llm_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2)
    )


def make_tiny(directory: Path | str, seed: int = 0) -> TinyPaths:
    """Write ``directory/radialog-v1``, ``directory/vicuna-7b-v1.3`` and ``directory/biovil/<BioViL-T file>``."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    paths = TinyPaths(directory / "radialog-v1", directory / LLM_DIR_NAME, directory / "biovil" / BIOVIL_FILE)
    for folder in (paths.root, paths.llm_dir, paths.biovil.parent):
        folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    # Vicuna: tokenizer, livened base weights rounded to the fp16 the shards hold.
    pieces = write_llama_tokenizer(paths.llm_dir, corpus(), legacy=False)
    fields = vicuna_v1_config(VOCAB)
    config = LlamaConfig(
        **{
            k: v
            for k, v in fields.items()
            if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")
        }
    )
    llama = LlamaForCausalLM(config).eval()
    silent = [*silent_token_ids(paths.llm_dir / "tokenizer.model"), *range(pieces, VOCAB)]
    liven_weights(llama, [*silent, EOS_ID])  # </s> silent until plant_end_trigger
    llama.load_state_dict({k: v.to(torch.float16).float() for k, v in llama.state_dict().items()})
    base_state = {k: v.clone() for k, v in llama.state_dict().items()}

    # Vision: BioViL-T (tiny trunk) with the replayed projector, Q-Former, img_proj.
    model = RadialogV1(fields["hidden_size"], TINY_QFORMER, resnet_width=TINY_RESNET_WIDTH, llama_model=llama)
    _randomise_bn(model.visual_encoder.encoder, generator)
    with torch.no_grad():
        model.visual_encoder.encoder.missing_previous_emb.normal_(0, 0.02, generator=generator)
        model.visual_encoder.encoder.vit_pooler.type_embed.normal_(0, 0.02, generator=generator)
    model.visual_encoder.projector.load_state_dict(replay(), strict=False)  # what the loader will use
    _randomise(model.bridge, generator)
    torch.save(_biovil_file(model, generator), paths.biovil)
    qformer_path = paths.root / QFORMER_RELPATHS[0]
    qformer_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_qformer_checkpoint(model, generator), qformer_path)

    # LoRA (q_proj, v_proj) + img_proj in the adapter file, under old peft names.
    adapter_dir = paths.root / INSTRUCT_ADAPTER
    adapter_dir.mkdir(parents=True, exist_ok=True)
    settings = _adapter_config()
    lora = LoraConfig(
        r=settings["r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules=settings["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(llama, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero; a non-zero B makes the merge observable
                param.normal_(0, 0.05, generator=generator)
    keep_channel_free_in_lora(peft_model)
    liven_img_proj(model, generator)
    adapter = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    adapter |= {
        "base_model.model.model.img_proj_layer.weight": model.img_proj.weight.detach().clone(),
        "base_model.model.model.img_proj_layer.bias": model.img_proj.bias.detach().clone(),
    }
    torch.save(adapter, adapter_dir / "adapter_model.bin")
    (adapter_dir / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    model.llama_model = cast(LlamaForCausalLM, peft_model.merge_and_unload().eval())  # what the loader will serve

    classifier = ChexpertClassifier(resnet_width=TINY_RESNET_WIDTH).eval()
    _randomise_bn(classifier.biovil_encoder, generator)
    liven_classifier(classifier, calibration_images(), generator)
    _write_classifier(classifier, paths.root / CLASSIFIER_RELPATH)

    # </s> follows the first of some rare tokens that together would end most answers (see tiny_llama).
    model.eval()
    answers, last_prompt_tokens = _probe_answers(model, classifier, paths.llm_dir)
    triggers = choose_end_triggers(answers, {EOS_ID, *silent, *last_prompt_tokens}, limit=32)
    plant_end_trigger(model.llm(), EOS_ID, triggers)
    for key in ("lm_head.weight", "model.embed_tokens.weight"):  # neither is LoRA-tuned
        base_state[key] = model.llm().get_parameter(key).detach().clone()
    _write_llm(paths.llm_dir, base_state, fields)

    write_sizes(paths.root, TINY_QFORMER)
    (paths.root / TINY_MARKER).write_text(MARKER_TEXT)
    return paths
