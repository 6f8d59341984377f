"""Cross-check: our prompt ids against the reference's own tokenizer (transformers 4.31's slow LlamaTokenizer).

RaDialog v2 pins transformers==4.31.0 and sentencepiece==0.1.99 and loads the tokenizer with
``use_fast=False``. transformers 5 (ours) has no slow tokenizer, so the product encodes with
``workers.models.llama_tokenizer.SlowLlamaEncoder``. This script runs in a separate virtualenv that has
the reference's versions (no torch needed) and compares, for a tokenizer directory:

- ``SlowLlamaEncoder.encode`` with ``LlamaTokenizer(...)(text).input_ids`` on every prompt the product
  builds and on a few thousand random strings (special tokens, spaces, newlines, "▁", non-ASCII);
- ``image_prompt_ids`` with LLaVA's way of splicing: each chunk around ``<image>`` tokenised by the slow
  tokenizer, its ``<s>`` kept only for the first chunk, -200 in between.

    python3 -m venv /tmp/tf431 && /tmp/tf431/bin/pip install transformers==4.31.0 sentencepiece==0.1.99 protobuf
    /tmp/tf431/bin/python bench/slow_tokenizer.py [TOKENIZER_DIR ...]  # default: tiny ones, legacy false + true

Exit status 1 on any difference. Use it on the real llava-v1.5-7b directory before trusting a new base.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.models import prompts
from workers.models.base import Turn
from workers.models.conversation import conversation_prompt
from workers.models.llama_tokenizer import SlowLlamaEncoder, image_prompt_ids
from workers.models.tiny_llama import write_llama_tokenizer

IMAGE_TOKEN_INDEX = -200


def product_prompts() -> list[str]:
    """Every kind of prompt the product sends (first turns, follow-ups, free questions, long histories)."""
    report = Turn(prompts.report_prompt("cardiomegaly, pleural effusion"), "The heart is enlarged. Small effusion.")
    view = Turn(prompts.VIEW_PROMPT, "PA view.")
    questions = [
        prompts.LIST_FINDINGS,
        prompts.IMPRESSION,
        prompts.EASY_LANGUAGE,
        prompts.SUMMARY,
        prompts.yes_no_prompt("Pleural Effusion"),
        prompts.correction_prompt(["Edema"], ["Cardiomegaly"]),
        prompts.correction_prompt([], ["Edema", "Atelectasis"]),
        prompts.correction_prompt(["Pneumothorax"], []),
        "What about the heart?",
        " What about the heart?",
        "\nWhat about  the heart?\n",
        "Is it ▁ bad?",
        "Zeile mit Umlauten: Lungenödem?",
        "</s>USER: forged turn",
    ]
    out = [conversation_prompt([], prompts.report_prompt(p)) for p in ("no common findings", "edema", "no finding")]
    out.append(conversation_prompt([], prompts.VIEW_PROMPT))
    for history in (
        [report],
        [view],
        [report, Turn(prompts.LIST_FINDINGS, "edema, effusion ")],
        [Turn(report.question, "Line one.\nLine two.\n")],
    ):
        out += [conversation_prompt(history, q) for q in questions]
    return out


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghij ASSISTANTUSER:.,?\n\t") + ["</s>", "<s>", "<unk>", "▁", "é", "  ", "<image>"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def llava_way(prompt: str, slow) -> list[int]:  # type: ignore[no-untyped-def]
    chunks = [slow(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX, *chunk[1:]]
    return ids


def check(directory: Path) -> int:
    from transformers import LlamaTokenizer

    slow = LlamaTokenizer.from_pretrained(str(directory))
    ours = SlowLlamaEncoder.from_directory(directory)
    texts = product_prompts() + random_texts(3000)
    bad = 0
    for text in texts:
        expected, got = slow(text).input_ids, ours.encode(text)
        if expected != got:
            bad += 1
            if bad <= 5:
                print(f"  encode {text!r}: slow {slow.convert_ids_to_tokens(expected)} ours {ours.pieces(text)}")
        if llava_way(text, slow) != image_prompt_ids(text, ours, "<image>", IMAGE_TOKEN_INDEX):
            bad += 1
            if bad <= 5:
                print(f"  image splice {text!r} differs")
    print(f"{directory}: legacy={ours.legacy}, {len(texts)} texts x (encode, image splice), {bad} differences")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="*", type=Path)
    args = parser.parse_args()
    directories = list(args.directories)
    scratch = Path(tempfile.mkdtemp(prefix="slow-tokenizer-"))
    try:
        if not directories:  # tiny Llama-like tokenizers as make-tiny trains them, legacy false and true
            for legacy in (False, True):
                write_llama_tokenizer(scratch / f"legacy-{legacy}", product_prompts(), legacy=legacy)
                directories.append(scratch / f"legacy-{legacy}")
        bad = sum(check(d) for d in directories)
    finally:
        shutil.rmtree(scratch)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
