"""Token ids exactly as the reference code's slow sentencepiece ``LlamaTokenizer`` makes them (torch-free).

RaDialog v2, LLaVA-1.5 and the other Llama/Vicuna seeds were run with transformers 4.31's slow
``LlamaTokenizer`` (``use_fast=False``). transformers 5 has only the fast tokenizer, whose Metaspace
pre-tokenizer (``prepend_scheme="first"``) gives other ids for a text that starts with whitespace
(" From" -> ``▁From`` instead of ``▁ ▁From``) and, for ``legacy: true``, for text right after ``</s>``.
LLaVA encodes the text on each side of ``<image>`` separately, so the first case hits the view question.
:class:`SlowLlamaEncoder` reproduces the slow tokenizer's rules with the ``sentencepiece`` library and
the model's own ``tokenizer.model``:

1. ``legacy: false`` only: "▁" typed in the text becomes a space and one "▁" is put in front.
2. The text is cut at the special tokens (``<s>``, ``</s>``, ``<unk>``); each becomes its id. A
   special token configured with ``lstrip``/``rstrip`` eats the whitespace beside it (not so in LLaVA).
3. Each text piece is encoded by sentencepiece as the model file says (dummy prefix, byte fallback).
   ``legacy: false``: the first piece loses the "▁" put there in step 1 (sentencepiece adds its dummy
   prefix instead); a later piece (after a special token) that does not start with a space loses the
   leading "▁" of its first sentencepiece token -- that token string is then looked up again and may be
   ``<unk>`` when the vocabulary lacks it, as in the reference.
4. ``<s>`` in front when ``add_bos_token`` (the default).

:func:`image_prompt_ids` is LLaVA's ``tokenizer_image_token``: the prompt is cut at ``<image>``, each
chunk encoded with its own ``<s>``, which is kept only for the first chunk; the image index in between.
Generated ids are decoded by transformers' tokenizer (:func:`decoding_tokenizer`): the same text as the
slow one, except for how invalid UTF-8 byte sequences become U+FFFD. ``bench/slow_tokenizer.py`` checks
all this against the real transformers 4.31.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPIECE_UNDERLINE = "\u2581"
DEFAULT_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


class TokenizerFileError(RuntimeError):
    """The tokenizer files are missing or configured in a way we cannot reproduce faithfully."""


@dataclass(frozen=True)
class SpecialToken:
    content: str
    id: int
    lstrip: bool = False  # eats whitespace on its left
    rstrip: bool = False  # eats whitespace on its right


def _special(value: Any, name: str, default: str) -> tuple[str, bool, bool]:
    """(content, lstrip, rstrip) of a special token entry in tokenizer_config.json / special_tokens_map.json."""
    if value is None:
        return default, False, False
    if isinstance(value, str):
        return value, False, False  # LlamaTokenizer wraps a plain string as AddedToken(lstrip=False, rstrip=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"], bool(value.get("lstrip", False)), bool(value.get("rstrip", False))
    raise TokenizerFileError(f"tokenizer_config.json: cannot read {name} {value!r}")


class SlowLlamaEncoder:
    """Text -> ids as transformers 4.31's slow ``LlamaTokenizer`` (the reference's) does; see the module doc."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        legacy: bool,
        add_bos_token: bool = True,
        specials: dict[str, tuple[str, bool, bool]] | None = None,
    ):
        """``specials``: role ("unk_token", "bos_token", "eos_token") -> (content, lstrip, rstrip)."""
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.legacy = legacy
        self.add_bos_token = add_bos_token
        specials = specials or {role: (default, False, False) for role, default in DEFAULT_SPECIALS.items()}
        self.special_contents = {role: content for role, (content, _l, _r) in specials.items()}
        self.specials: dict[str, SpecialToken] = {}
        for content, lstrip, rstrip in specials.values():
            token_id = self.sp.piece_to_id(content)
            if self.sp.id_to_piece(token_id) != content:
                raise TokenizerFileError(f"special token {content!r} is not in the sentencepiece vocabulary")
            self.specials[content] = SpecialToken(content, token_id, lstrip, rstrip)
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerFileError("the sentencepiece model has no <s> / </s> ids")
        longest_first = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in longest_first) + ")")

    @classmethod
    def from_directory(cls, directory: Path | str, *, legacy: bool | None = None) -> SlowLlamaEncoder:
        """From a Hugging Face tokenizer directory: ``tokenizer.model`` + ``tokenizer_config.json``.

        ``legacy``: None = as tokenizer_config.json says (transformers 4.31's rules); True for code that ran
        transformers 4.28, whose LlamaTokenizer had no such option and always behaved as ``legacy: true``
        whatever the file says (RaDialog v1). Refuses (TokenizerFileError) what we could not tokenise as the
        reference does: no ``tokenizer.model``, extra added tokens, ``add_eos_token: true``, another class.
        """
        directory = Path(directory)
        model = directory / "tokenizer.model"
        if not model.is_file():
            raise TokenizerFileError(
                f"{model} is missing: the reference tokenises with the sentencepiece model (slow LlamaTokenizer); "
                "tokenizer.json alone cannot reproduce its ids"
            )
        config = _read_json(directory / "tokenizer_config.json")
        specials_map = _read_json(directory / "special_tokens_map.json")
        tokenizer_class = config.get("tokenizer_class", "LlamaTokenizer")
        if tokenizer_class not in ("LlamaTokenizer", "LlamaTokenizerFast"):
            raise TokenizerFileError(
                f"tokenizer_config.json: tokenizer_class {tokenizer_class!r} is not LlamaTokenizer"
            )
        if config.get("add_eos_token", False):
            raise TokenizerFileError("tokenizer_config.json: add_eos_token is true; LLaVA prompts never end in </s>")
        if (directory / "added_tokens.json").is_file() or _added_beyond_specials(config):
            raise TokenizerFileError(
                f"{directory}: the tokenizer has added tokens beyond <unk>/<s>/</s>; this encoder does not handle them"
            )
        if legacy is None:
            legacy = config.get("legacy", True)  # transformers 4.31's LlamaTokenizer default
        if not isinstance(legacy, bool):
            raise TokenizerFileError(f"tokenizer_config.json: legacy must be true or false, not {legacy!r}")
        add_bos = config.get("add_bos_token", True)
        specials = {
            role: _special(config.get(role, specials_map.get(role)), role, default)
            for role, default in DEFAULT_SPECIALS.items()
        }
        return cls(model.read_bytes(), legacy=legacy, add_bos_token=bool(add_bos), specials=specials)

    def pieces(self, text: str) -> list[str]:
        """Token strings without ``<s>`` (the slow tokenizer's ``tokenize``)."""
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        parts = self._split.split(text)  # text, special, text, special, ..., text
        for i in range(1, len(parts), 2):
            special = self.specials[parts[i]]
            if special.rstrip and i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
            if special.lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
        out: list[str] = []
        for i, part in enumerate(parts):
            if not part:
                continue
            out.extend([part] if i % 2 else self._encode_text(part))
        return out

    def _encode_text(self, text: str) -> list[str]:
        if self.legacy:
            return list(self.sp.encode(text, out_type=str))
        first = text.startswith(SPIECE_UNDERLINE)
        if first:
            text = text[1:]
        pieces = list(self.sp.encode(text, out_type=str))
        if not first and not text.startswith(" ") and pieces and pieces[0].startswith(SPIECE_UNDERLINE):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return pieces

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text`` with ``<s>`` in front (when the config says so and ``add_special_tokens``), like
        ``tokenizer(text, add_special_tokens=...).input_ids``."""
        ids = [self.specials[p].id if p in self.specials else int(self.sp.piece_to_id(p)) for p in self.pieces(text)]
        return [self.bos_id, *ids] if self.add_bos_token and add_special_tokens else ids


def image_prompt_ids(prompt: str, encoder: SlowLlamaEncoder, placeholder: str, image_index: int) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: chunks around ``placeholder`` encoded apart, ``image_index`` between.

    Each chunk is encoded with its own ``<s>``; the first chunk's is kept once at the start and every
    later chunk's is dropped (when the first chunk begins with ``<s>``; otherwise nothing is dropped).
    """
    chunks = [encoder.encode(chunk) for chunk in prompt.split(placeholder)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == encoder.bos_id else 0
    ids: list[int] = [encoder.bos_id] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_index)
        ids.extend(chunk[offset:])
    return ids


def decoding_tokenizer(directory: Path | str, encoder: SlowLlamaEncoder) -> Any:
    """transformers' tokenizer from the same directory, for decoding (and streaming) generated ids.

    The special tokens are passed as plain strings: the ``{"__type": "AddedToken", ...}`` entries of
    LLaVA-era configs make the tokenizers library print "Ignored unknown kwarg option __type" otherwise.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **encoder.special_contents)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TokenizerFileError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{path}: not a JSON object")
    return data


def _added_beyond_specials(config: dict[str, Any]) -> bool:
    """tokenizer_config.json's ``added_tokens_decoder`` (newer files) lists tokens other than unk/bos/eos."""
    decoder = config.get("added_tokens_decoder") or {}
    contents = {entry.get("content") for entry in decoder.values() if isinstance(entry, dict)}
    return bool(contents - {"<unk>", "<s>", "</s>"})
