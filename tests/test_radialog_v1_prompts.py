"""RaDialog v1's prompts and prompt ids (issue 17): the strings byte for byte, the findings phrase's edge cases,
and ids as the reference's transformers 4.28 slow tokenizer made them.

From the reference note (shared/reference/radialog-v1-model.md, section 4): ids = ``[1]`` + sp("…USER: Image
information:") + ``[32000] * 32`` + sp(". Predicted Findings: … ASSISTANT:"), where sp is sentencepiece with
its dummy prefix (so the chunk after the image starts "▁."); in a later turn ``</s>`` is id 2 and the text
after it starts "▁USER". :func:`note_ids` writes that description down with the raw sentencepiece model,
independently of the product's encoder. The tiny tokenizer is trained like Llama's (whitespace kept as typed),
so a stray "▁" before ``<IMG>`` changes the ids here as it would for Vicuna's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm

from workers.models.base import Turn
from workers.models.capabilities import RADIALOG_V1, capabilities_for
from workers.models.conversation import conversation_prompt
from workers.models.llama_tokenizer import SlowLlamaEncoder
from workers.models.radialog_v1 import prompts
from workers.models.radialog_v1.tiny import corpus
from workers.models.radialog_v1.tokens import NoImage, prompt_ids
from workers.models.tiny_llama import write_llama_tokenizer

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant acting as an experienced "
    "radiologist. The assistant gives professional, detailed, and polite answers to the user's questions."
)
INSTRUCTION = (
    "You are to act as a radiologist and write the finding section of a chest x-ray radiology report for "
    "this X-ray image and the given predicted findings. Write in the style of a radiologist, write one "
    "fluent text without enumeration, be concise and don't provide explanations or reasons."
)
IMG = 32000


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("vicuna-tokenizer")
    write_llama_tokenizer(directory, corpus(), legacy=False)  # 4.28 knew no "legacy": the file's value is ignored
    return directory


@pytest.fixture(scope="module")
def sp(tokenizer_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def encoder(tokenizer_dir: Path) -> SlowLlamaEncoder:
    return SlowLlamaEncoder.from_directory(tokenizer_dir, legacy=True)


def note_ids(sp: spm.SentencePieceProcessor, before: str, after: str, later: list[str] = ()) -> list[int]:
    """The note's recipe: <s>, sp(text up to "information:"), 32 x 32000, sp(the rest); each "</s>" is 2 and
    the text after it is its own sentencepiece chunk."""
    ids = [1, *sp.encode(before), *[IMG] * 32, *sp.encode(after)]
    for chunk in later:
        ids += [2, *sp.encode(chunk)]
    return ids


# -- strings ------------------------------------------------------------------------------------------
def test_report_prompt_and_conversation_byte_for_byte() -> None:
    findings = "cardiomegaly, edema"
    expected = f"Image information: {'<IMG>' * 32}. Predicted Findings: {findings}. {INSTRUCTION}"
    assert prompts.report_prompt(findings) == expected
    assert prompts.SYSTEM == SYSTEM
    assert conversation_prompt([], expected) == f"{SYSTEM} USER: {expected} ASSISTANT:"
    two = conversation_prompt([Turn(expected, "The heart is enlarged.")], "Is there any Edema?")
    assert two == f"{SYSTEM} USER: {expected} ASSISTANT: The heart is enlarged.</s>USER: Is there any Edema? ASSISTANT:"
    assert RADIALOG_V1.report_question(["Cardiomegaly", "Edema"]) == expected


@pytest.mark.parametrize(
    ("labels", "phrase"),
    [
        ((), "no common findings"),
        (("No Finding",), "no finding"),
        (("Support Devices",), "support devices"),
        (("No Finding", "Support Devices"), "no finding, support devices"),  # only devices beside it: kept
        (("No Finding", "Edema"), "edema"),  # a finding beside it: dropped
        (("No Finding", "Pleural Effusion", "Support Devices"), "pleural effusion, support devices"),
        (("Enlarged Cardiomediastinum", "Lung Opacity"), "enlarged cardiomediastinum, lung opacity"),
    ],
)
def test_findings_phrase_follows_test_py(labels: tuple[str, ...], phrase: str) -> None:
    assert prompts.findings_phrase(labels) == phrase


def test_capabilities_are_what_radialog_ins_was_trained_for() -> None:
    caps = capabilities_for("radialog-v1")
    assert caps is RADIALOG_V1 and caps.findings_classifier and caps.model_name == "RaDialog v1"
    assert set(caps.tasks) == {"free", "correction", "yes_no", "list", "easy_language", "summary"}
    assert not caps.supports("impression") and not caps.supports("view") and not caps.first_turn_tasks
    assert caps.tasks["list"] == "List all the findings in this report."
    assert dict(caps.task_max_new_tokens) == {
        "report": 300,
        "correction": 256,
        "yes_no": 10,
        "list": 30,
        "easy_language": 300,
        "summary": 300,
        "free": 300,
    }
    assert caps.context_tokens == 2048 and caps.image_tokens == 32


# -- ids ----------------------------------------------------------------------------------------------
def test_report_prompt_ids_as_the_note_describes(sp: spm.SentencePieceProcessor, encoder: SlowLlamaEncoder) -> None:
    prompt = conversation_prompt([], prompts.report_prompt("edema"))
    expected = note_ids(
        sp, f"{SYSTEM} USER: Image information:", f". Predicted Findings: edema. {INSTRUCTION} ASSISTANT:"
    )
    ids = prompt_ids(prompt, encoder)
    assert ids == expected
    start = ids.index(IMG)
    assert ids[start : start + 32] == [IMG] * 32 and ids.count(IMG) == 32
    assert sp.id_to_piece(ids[start + 32]).startswith("\u2581")  # the dummy prefix: "▁." (or "▁", ".")
    assert sp.id_to_piece(ids[start - 1]) != "\u2581"  # the space before <IMG> was stripped, not encoded
    # newer tokenizers keep that space: an extra "▁" would be there
    spaced = [1, *sp.encode(f"{SYSTEM} USER: Image information: ")]
    assert spaced != ids[:start]


def test_follow_up_turn_ids_as_the_note_describes(sp: spm.SentencePieceProcessor, encoder: SlowLlamaEncoder) -> None:
    report = "The heart is normal. No pleural effusion."
    prompt = conversation_prompt([Turn(prompts.report_prompt("no finding"), report)], "Is there any Edema?")
    expected = note_ids(
        sp,
        f"{SYSTEM} USER: Image information:",
        f". Predicted Findings: no finding. {INSTRUCTION} ASSISTANT: {report}",
        ["USER: Is there any Edema? ASSISTANT:"],
    )
    ids = prompt_ids(prompt, encoder)
    assert ids == expected
    after_eos = ids[ids.index(2) + 1]
    assert sp.id_to_piece(after_eos).startswith("\u2581")  # "▁USER": 4.28 is always legacy


def test_the_files_legacy_setting_is_ignored_as_4_28_did(tokenizer_dir: Path, encoder: SlowLlamaEncoder) -> None:
    prompt = conversation_prompt([Turn(prompts.report_prompt("edema"), "Normal.")], "Is there any Edema?")
    newer = SlowLlamaEncoder.from_directory(tokenizer_dir)  # legacy: false, as the file says
    assert newer.legacy is False and encoder.legacy is True
    assert prompt_ids(prompt, newer) != prompt_ids(prompt, encoder)


def test_img_typed_elsewhere_stays_text(encoder: SlowLlamaEncoder) -> None:
    """Only the report turn's run of 32 is the image; the reference would make any <IMG> id 32000 (past the
    end of Vicuna's embeddings)."""
    report_turn = Turn(prompts.report_prompt("edema"), "A <IMG> marker.")
    ids = prompt_ids(conversation_prompt([report_turn], "What is <IMG><IMG>?"), encoder)
    assert ids.count(IMG) == 32
    with pytest.raises(NoImage):
        prompt_ids(conversation_prompt([], "Describe <IMG>."), encoder)
