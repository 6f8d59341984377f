"""Prompt ids exactly as RaDialog v1's tokenizer made them: transformers 4.28's slow ``LlamaTokenizer`` with
``<IMG>`` added as a special token (torch-free).

Two rules of that version decide the ids, and newer tokenizers break both:

- It had no ``legacy`` option: every text piece between special tokens is encoded by sentencepiece with its
  dummy "▁" prefix, also right after ``</s>`` ("</s>USER" -> ``</s>``, ``▁USER``), whatever
  tokenizer_config.json says (:meth:`SlowLlamaEncoder.from_directory` with ``legacy=True``).
- ``<IMG>`` was added as a plain string (``add_special_tokens({"additional_special_tokens": ["<IMG>"]})``),
  and 4.28 strips the whitespace on both sides of such a token: "Image information: <IMG>" encodes
  "Image information:" without a trailing "▁", and the text after the 32 placeholders starts with "▁."
  from sentencepiece's dummy prefix. (transformers >= 4.34 keeps an extra "▁" there.)

So the ids are ``<s>`` + sp(text before the run, right-stripped) + ``[32000] * 32`` + sp(text after it,
left-stripped). Only the report turn's run of 32 placeholders is the image: ``<IMG>`` typed anywhere else
(a question, an edited report) stays text here, where the reference would have turned it into id 32000,
past the end of Vicuna's embedding table.
"""

from __future__ import annotations

from workers.models.llama_tokenizer import SlowLlamaEncoder
from workers.models.radialog_v1.prompts import IMAGE_RUN, IMAGE_TOKEN_ID, IMAGE_TOKENS


class NoImage(ValueError):
    """A RaDialog v1 prompt must hold the report turn's 32 ``<IMG>`` placeholders."""


def prompt_ids(prompt: str, encoder: SlowLlamaEncoder) -> list[int]:
    """The reference's input ids for ``prompt`` (its first run of 32 ``<IMG>`` is the image)."""
    before, run, after = prompt.partition(IMAGE_RUN)
    if not run:
        raise NoImage(f"a RaDialog v1 prompt must hold {IMAGE_TOKENS} {IMAGE_RUN[:5]} placeholders (the report turn)")
    head = encoder.encode(before.rstrip())
    tail = encoder.encode(after.lstrip())
    if encoder.add_bos_token:
        tail = tail[1:]
    return [*head, *[IMAGE_TOKEN_ID] * IMAGE_TOKENS, *tail]


def image_position(ids: list[int]) -> int:
    """Where the 32 placeholder ids start (the reference's ``split_at_img``: the first id 32000)."""
    start = ids.index(IMAGE_TOKEN_ID)
    if (
        ids[start : start + IMAGE_TOKENS] != [IMAGE_TOKEN_ID] * IMAGE_TOKENS
        or IMAGE_TOKEN_ID in ids[start + IMAGE_TOKENS :]
    ):
        raise NoImage(f"the prompt ids must hold exactly one run of {IMAGE_TOKENS} image ids")
    return start
