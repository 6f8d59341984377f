"""Pieces for tiny random Llama-family checkpoints (tests, demo, CI): any backend built on a Llama/Vicuna.

- :func:`write_llama_tokenizer`: a small sentencepiece model trained like Llama's (BPE, identity
  normaliser, dummy prefix, byte fallback, whitespace kept as typed, unk 0 / bos 1 / eos 2, no pad)
  plus the Hugging Face files a LLaVA/Vicuna base directory holds. With ``nmt_nfkc`` (sentencepiece's
  default) runs of spaces would collapse and leading spaces vanish, so a tokenizer test could not see
  the whitespace slips the real Llama tokenizer makes visible.
- Livening: a random Llama with the default initialisation (std 0.02) barely mixes its context, so it
  repeats one token and never ends; batched-vs-alone comparisons on it cannot fail. :func:`liven_weights`
  scales the matrices so the next token depends on the context and silences the tokens that must never
  be generated (``<unk>``, ``<s>``, byte-fallback pieces: an answer made of them could hold control
  characters or broken UTF-8), and keeps one channel of the residual stream free. After the LoRA (if
  any) is made with :func:`keep_channel_free_in_lora`, :func:`choose_end_triggers` picks, from answers
  the model generated, rare tokens that together would end most answers (not all), and
  :func:`plant_end_trigger` makes ``</s>`` follow the first of them (through the free channel) and
  nothing else. Answers then end at different lengths and are never empty.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: Trainer options of Llama's own tokenizer.model (its trainer_spec), at tiny size.
LLAMA_TRAINER_OPTIONS: dict[str, Any] = {
    "model_type": "bpe",
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": True,
    "byte_fallback": True,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "character_coverage": 1.0,
    "hard_vocab_limit": False,
    "minloglevel": 2,
}
#: Radiology phrasing for the tokenizer corpus (backends add their own prompts).
RADIOLOGY_LINES = (
    "The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
    "There is mild cardiomegaly with small bilateral pleural effusions and bibasilar atelectasis.",
    "Support devices are in standard position. No acute cardiopulmonary process.",
    # no newline or tab: as in Llama's vocabulary they are left to byte fallback (<0x0A>)
    "PA and lateral views of the chest. Yes. No. The image was taken in the AP view.",
    "  Findings:  1. Enlarged cardiac silhouette.   2. Small left pleural effusion.",
    "Compared to 2019-03-04, the right lower lobe opacity has improved (12 mm -> 8 mm).",
)
#: The residual-stream channel kept free for the end trigger (see plant_end_trigger).
END_CHANNEL = 0
#: How strongly :func:`liven_weights` scales the matrices (the default initialisation has std 0.02).
LIVELY_SCALE = 12.0


def _token(text: str) -> dict[str, object]:
    """A special token as llava-v1.5-7b's tokenizer_config.json writes it (transformers 4.31 needs "__type")."""
    return {
        "__type": "AddedToken",
        "content": text,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def write_llama_tokenizer(
    directory: Path, corpus: Iterable[str], vocab_size: int = 1000, *, legacy: bool = False
) -> int:
    """Train the tokenizer on ``corpus`` and write tokenizer.model, tokenizer_config.json (``legacy`` as
    given; LLaVA-1.5 has false) and special_tokens_map.json into ``directory``; returns the vocabulary size."""
    import sentencepiece as spm

    lines = list(corpus) + list(RADIOLOGY_LINES)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=model, vocab_size=vocab_size, **LLAMA_TRAINER_OPTIONS
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": legacy,
                "bos_token": _token("<s>"),
                "eos_token": _token("</s>"),
                "unk_token": _token("<unk>"),
                "pad_token": None,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 4096,
                "padding_side": "right",
                "sp_model_kwargs": {},
            },
            indent=2,
        )
    )
    (directory / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": _token("<s>"),
                "eos_token": _token("</s>"),
                "unk_token": _token("<unk>"),
                "pad_token": "<unk>",
            }
        )
    )
    return int(spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size())


def silent_token_ids(tokenizer_model: Path) -> list[int]:
    """Ids a tiny model must never generate: ``<unk>``, ``<s>``, byte-fallback and whitespace-only pieces."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    return [
        i
        for i in range(sp.get_piece_size())
        if sp.is_unknown(i) or sp.is_byte(i) or i == sp.bos_id() or not sp.id_to_piece(i).strip("\u2581")
    ]


def liven_weights(model, silent_ids: Sequence[int], scale: float = LIVELY_SCALE, channel: int = END_CHANNEL) -> None:
    """Scale every matrix but the embeddings by ``scale``, zero the lm_head rows of ``silent_ids``, and keep
    hidden ``channel`` of the residual stream free for :func:`plant_end_trigger`.

    A zero lm_head row scores exactly 0, and with a few hundred random rows in a 64-wide space some allowed
    token always scores above 0 (the rows span every direction), so a silenced token never wins greedily.
    The channel: no embedding, attention or MLP output writes it, no layer and no lm_head row reads it.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(scale)
        model.lm_head.weight[list(silent_ids)] = 0
        model.get_input_embeddings().weight[:, channel] = 0
        model.lm_head.weight[:, channel] = 0
        for layer in model.model.layers:
            for reader in (
                *(getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")),
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
            ):
                reader.weight[:, channel] = 0
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                writer.weight[channel, :] = 0


def keep_channel_free_in_lora(peft_model, channel: int = END_CHANNEL) -> None:
    """Zero the LoRA factors that would read or write the free channel once merged (see liven_weights)."""
    import torch

    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name and not any(f"{n}.lora_A" in name for n in ("o_proj", "down_proj")):
                param[:, channel] = 0  # reads the residual stream
            if ".lora_B." in name and any(f"{n}.lora_B" in name for n in ("o_proj", "down_proj")):
                param[channel, :] = 0  # writes it


def choose_end_triggers(
    answers: Sequence[Sequence[int]], excluded: Iterable[int], *, share: float = 0.7, limit: int = 32
) -> list[int]:
    """Tokens such that, if every answer ended right after the first of them it generates, about ``share``
    of the answers would end within ``limit`` tokens.

    Many tokens, each generated rarely, are taken until their rates add up (token ids in order, so the
    choice is reproducible): an answer's chance to end then hardly depends on which tokens its prompt
    favours, unlike with one common token.
    """
    banned = set(excluded)
    counts: dict[int, int] = {}
    for answer in answers:
        for token in answer:
            counts[token] = counts.get(token, 0) + 1
    steps = sum(len(answer) for answer in answers)
    target = 1 - (1 - share) ** (1 / limit)  # per step: 1 - (1 - target) ** limit == share
    chosen: list[int] = []
    total = 0.0
    for token in sorted(counts):
        rate = counts[token] / steps
        if token in banned or rate > target / 4:
            continue
        chosen.append(token)
        total += rate
        if total >= target:
            return chosen
    raise ValueError("the answers hold too few tokens that may serve as end triggers")


def plant_end_trigger(
    model, eos_id: int, triggers: Sequence[int], channel: int = END_CHANNEL, mark: float = 0.1, gain: float = 1e4
) -> None:
    """After any of ``triggers`` is generated the next token is ``</s>``; nowhere else can ``</s>`` win.

    The triggers' embeddings mark the free channel; ``</s>``'s lm_head row reads only that channel, with a
    large gain. The channel is zero at every other token's position (nothing writes it), so ``</s>``
    scores exactly 0 there and some other token always scores more (see liven_weights). So an answer is
    never empty, and ends right after its first trigger.
    """
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[list(triggers), channel] = mark
        model.lm_head.weight[eos_id] = 0
        model.lm_head.weight[eos_id, channel] = gain


def vicuna_v1_config(vocab_size: int) -> dict[str, Any]:
    """Vicuna-7B v1 / v1.3's config.json fields (LLaMA-1, transformers 4.28 era) at tiny sizes: the LLM of
    XrayGPT and of RaDialog v1, whose tiny sets differ only in their vocabulary."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 172,
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.28.0.dev0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def write_vicuna_v1_configs(llm_dir: Path, fields: dict[str, Any]) -> None:
    """config.json (``fields``) and the generation_config.json Vicuna v1 / v1.3 ship beside it."""
    (llm_dir / "config.json").write_text(json.dumps(fields, indent=2))
    generation = {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "transformers_version": "4.28.0.dev0",
    }
    (llm_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
