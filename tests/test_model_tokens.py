"""The ids the product sends equal the reference's, for every kind of prompt it builds.

The reference (RaDialog v2 on LLaVA's code, transformers 4.31) builds them so: the prompt is split at
``<image>``; each chunk goes through the slow sentencepiece ``LlamaTokenizer`` on its own, which puts
``<s>`` in front (kept for the first chunk only); -200 stands between the chunks. The slow tokenizer
cuts a text at its special tokens (``<s>``, ``</s>``, ``<unk>``), which become their ids; every text
piece is encoded by sentencepiece as the model file says (dummy prefix "▁" in front, also before a
leading space). With ``legacy: false`` a "▁" typed in the text counts as a space, and a text piece that
follows a special token and does not start with a space has the "▁" taken off its first token.
:func:`reference_ids` is that description, written here independently of the product's encoder.

The tiny tokenizer is trained like Llama's (identity normaliser, whitespace kept), so a missing or extra
"▁" changes the ids here as it does for the real model.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from workers.models.base import Turn
from workers.models.conversation import conversation_prompt
from workers.models.llama_tokenizer import SlowLlamaEncoder
from workers.models.prompts import (
    EASY_LANGUAGE,
    IMPRESSION,
    LIST_FINDINGS,
    SUMMARY,
    VIEW_PROMPT,
    correction_prompt,
    report_prompt,
    yes_no_prompt,
)
from workers.models.radialog_v2.backend import RadialogV2Backend
from workers.models.radialog_v2.checkpoint_io import ModelFileError
from workers.models.radialog_v2.files import locate
from workers.models.radialog_v2.loader import load_tokenizer

BOS, IMAGE = 1, -200
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}


def reference_ids(prompt: str, sp: spm.SentencePieceProcessor, legacy: bool) -> list[int]:
    """LLaVA's splice around ``<image>`` over the slow tokenizer, from the description in the module doc."""
    out = [BOS]
    for number, chunk in enumerate(prompt.split("<image>")):
        if number:
            out.append(IMAGE)
        out += slow_tokenizer_ids(chunk, sp, legacy)
    return out


def slow_tokenizer_ids(text: str, sp: spm.SentencePieceProcessor, legacy: bool) -> list[int]:
    if not legacy:
        text = text.replace("\u2581", " ")
    ids: list[int] = []
    after_special = False
    position = 0
    for match in [*re.finditer("<unk>|</s>|<s>", text), None]:
        piece = text[position : match.start() if match else len(text)]
        if piece:
            tokens = sp.encode(piece, out_type=str)
            if not legacy and after_special and not piece.startswith(" ") and tokens[0].startswith("\u2581"):
                tokens[0] = tokens[0][1:]
            ids += [sp.piece_to_id(t) for t in tokens if t]
        if match:
            ids.append(SPECIALS[match.group()])
            position, after_special = match.end(), True
    return ids


REPORT = Turn(report_prompt("cardiomegaly, pleural effusion"), "The heart is enlarged. Small right effusion.")
#: Every kind of prompt the product builds: first turns, follow-ups after the report (each quick action),
#: free questions with and without leading whitespace, and longer conversations.
PROMPTS = {
    "report": conversation_prompt([], report_prompt("cardiomegaly, pleural effusion")),
    "report, nothing found": conversation_prompt([], report_prompt("no common findings")),
    "view (first turn)": conversation_prompt([], VIEW_PROMPT),
    "correction, both": conversation_prompt([REPORT], correction_prompt(["Edema"], ["Cardiomegaly"])),
    "correction, remove": conversation_prompt([REPORT], correction_prompt([], ["Pleural Effusion", "Edema"])),
    "correction, add": conversation_prompt([REPORT], correction_prompt(["Pneumothorax"], [])),
    "yes/no": conversation_prompt([REPORT], yes_no_prompt("Pleural Effusion")),
    "list": conversation_prompt([REPORT], LIST_FINDINGS),
    "impression": conversation_prompt([REPORT], IMPRESSION),
    "easy language": conversation_prompt([REPORT], EASY_LANGUAGE),
    "summary": conversation_prompt([REPORT], SUMMARY),
    "free": conversation_prompt([REPORT], "Is the heart enlarged?"),
    "free, leading space": conversation_prompt([REPORT], " Is the heart enlarged?"),
    "free, leading newline and double spaces": conversation_prompt([REPORT], "\nIs the heart  enlarged?\n"),
    "free, typed ▁": conversation_prompt([REPORT], "What does ▁ mean?"),
    "after the view question": conversation_prompt([Turn(VIEW_PROMPT, "PA view.")], "Is it a lateral view?"),
    "multi-turn": conversation_prompt(
        [REPORT, Turn(LIST_FINDINGS, "cardiomegaly, pleural effusion"), Turn(yes_no_prompt("Edema"), "No.")],
        IMPRESSION,
    ),
    "edited report ending in a newline": conversation_prompt([Turn(REPORT.question, "Heart enlarged.\n")], SUMMARY),
}


@pytest.fixture(scope="module")
def legacy_true(tiny_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny tokenizer whose tokenizer_config.json says ``legacy: true``."""
    directory = Path(shutil.copytree(tiny_model[1], tmp_path_factory.mktemp("legacy") / "llava"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    return directory


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_prompt_ids_are_the_references(kind: str, tiny_backend: RadialogV2Backend, tiny_model, legacy_true) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model[1] / "tokenizer.model"))
    assert json.loads((tiny_model[1] / "tokenizer_config.json").read_text())["legacy"] is False  # as LLaVA-1.5's
    prompt = PROMPTS[kind]
    assert tiny_backend.prompt_ids(prompt) == reference_ids(prompt, sp, legacy=False)
    legacy = RadialogV2Backend(
        dataclasses.replace(tiny_backend.loaded, encoder=SlowLlamaEncoder.from_directory(legacy_true))
    )
    assert legacy.prompt_ids(prompt) == reference_ids(prompt, sp, legacy=True)


def test_the_tokenizer_sees_the_whitespace_slips(tiny_model: tuple[Path, Path]) -> None:
    """The cases above can fail: a chunk's leading space, and legacy after ``</s>``, change the ids."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model[1] / "tokenizer.model"))
    view = PROMPTS["view (first turn)"]
    assert reference_ids(view, sp, False) != reference_ids(view.replace("<image> ", "<image>"), sp, False)
    assert reference_ids(PROMPTS["list"], sp, False) != reference_ids(PROMPTS["list"], sp, True)
    for text in (" a  b", "\tx\n", "  Findings:\n 1.  Ödem"):  # identity normaliser: nothing collapses
        assert sp.decode(sp.encode(text)) == text, text


def test_legacy_flag_comes_from_tokenizer_config(legacy_true: Path, tmp_path: Path) -> None:
    assert SlowLlamaEncoder.from_directory(legacy_true).legacy is True
    absent = Path(shutil.copytree(legacy_true, tmp_path / "absent"))
    config = json.loads((absent / "tokenizer_config.json").read_text())
    del config["legacy"]
    (absent / "tokenizer_config.json").write_text(json.dumps(config))
    assert SlowLlamaEncoder.from_directory(absent).legacy is True  # transformers 4.31's default


def _json_only(directory: Path) -> None:
    """tokenizer.json (what transformers 5 saves) instead of tokenizer.model."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(directory), local_files_only=True).backend_tokenizer.save(
        str(directory / "tokenizer.json")
    )
    (directory / "tokenizer.model").unlink()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_json_only, "tokenizer.model"),
        (lambda d: _config(d, legacy="no"), "legacy must be true or false"),
        (lambda d: _config(d, add_eos_token=True), "add_eos_token"),
        (lambda d: _config(d, tokenizer_class="GPT2Tokenizer"), "is not LlamaTokenizer"),
        (lambda d: (d / "added_tokens.json").write_text('{"<IMG>": 600}'), "added tokens"),
    ],
)
def test_tokenizers_we_cannot_reproduce_are_refused(change, message: str, tiny_model, tmp_path: Path) -> None:
    base_dir = Path(shutil.copytree(tiny_model[1], tmp_path / "llava"))
    change(base_dir)
    with pytest.raises(ModelFileError, match=message):
        load_tokenizer(locate(tiny_model[0], base_dir))


def _config(directory: Path, **changes: object) -> None:
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))


def test_special_token_strip_flags_are_honoured(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    """An ``</s>`` configured with rstrip eats the spaces after it (LLaVA's has lstrip/rstrip false)."""
    directory = Path(shutil.copytree(tiny_model[1], tmp_path / "llava"))
    plain = SlowLlamaEncoder.from_directory(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["eos_token"] = {**config["eos_token"], "rstrip": True, "lstrip": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    stripping = SlowLlamaEncoder.from_directory(directory)
    assert plain.encode("a </s>  USER:") != plain.encode("a</s>USER:")
    assert stripping.encode("a </s>  USER:") == stripping.encode("a</s>USER:") == plain.encode("a</s>USER:")
