"""Prompt strings, the conversation format and the context rule, against the reference's exact text."""

from __future__ import annotations

import pytest

from workers.models import prompts
from workers.models.base import ContextTooLong, Turn
from workers.models.conversation import conversation_prompt, fit_history

REFERENCE_REPORT_PROMPT = (
    "<image>. Predicted Findings: cardiomegaly, edema. You are to act as a radiologist and write the finding "
    "section of a chest x-ray radiology report for this X-ray image and the given predicted findings. Write in "
    "the style of a radiologist, write one fluent text without enumeration, be concise and don't provide "
    "explanations or reasons."
)
REFERENCE_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant acting as an experienced radiologist. "
    "The assistant gives professional, detailed, and polite answers to the user's questions."
)


def test_system_and_report_prompt_are_the_reference_text() -> None:
    assert prompts.SYSTEM == REFERENCE_SYSTEM
    assert prompts.report_prompt("cardiomegaly, edema") == REFERENCE_REPORT_PROMPT


def test_fixed_task_prompts() -> None:
    assert prompts.LIST_FINDINGS == "List all the findings in this report."
    assert prompts.IMPRESSION == "Write the impression section corresponding to this radiology report."
    assert prompts.VIEW_PROMPT == "<image> From what view was this image taken?"
    assert set(prompts.TASK_MAX_NEW_TOKENS) == {
        "report",
        "correction",
        "yes_no",
        "list",
        "impression",
        "easy_language",
        "summary",
        "view",
        "free",
    }
    assert prompts.MAX_CONTEXT_TOKENS == 4000


def test_yes_no_question_names_the_chexpert_label_as_written() -> None:
    """The reference's training template and evaluation ask "Is there any Pleural Effusion?" (the label
    as written; lower case gives other token ids)."""
    assert prompts.yes_no_prompt("Pleural Effusion") == "Is there any Pleural Effusion?"
    assert prompts.yes_no_prompt("pleural effusion") == "Is there any Pleural Effusion?"
    assert prompts.yes_no_prompt("Enlarged Cardiomediastinum") == "Is there any Enlarged Cardiomediastinum?"
    with pytest.raises(ValueError):
        prompts.yes_no_prompt("pleural effusions")


#: The reference's generation limits: v2's evaluation (test.py) uses max_new_tokens=300 for every task it
#: evaluates; its demo uses 600 for whatever is asked in the chat.
REFERENCE_MAX_NEW_TOKENS = {
    "report": 300,
    "correction": 300,
    "yes_no": 300,
    "list": 300,
    "impression": 300,
    "view": 300,
    "easy_language": 600,
    "summary": 600,
    "free": 600,
}


def test_answer_limits_are_the_reference_values() -> None:
    """A lower cap cuts answers mid-sentence (the reference's view answers are sentences, not a word)."""
    assert prompts.TASK_MAX_NEW_TOKENS == REFERENCE_MAX_NEW_TOKENS


@pytest.mark.parametrize(
    ("labels", "phrase"),
    [
        ([], "no common findings"),
        (["No Finding"], "no finding"),
        (["No Finding", "Support Devices"], "no finding, support devices"),
        (["No Finding", "Cardiomegaly", "Support Devices"], "cardiomegaly, support devices"),
        (["Enlarged Cardiomediastinum", "Pleural Effusion"], "enlarged cardiomediastinum, pleural effusion"),
    ],
)
def test_findings_phrase(labels: list[str], phrase: str) -> None:
    assert prompts.findings_phrase(labels) == phrase


def test_correction_prompts_follow_the_three_reference_forms() -> None:
    assert prompts.correction_prompt(["Edema", "Pneumonia", "Fracture"], ["Cardiomegaly"]) == (
        "Please adapt the report with the following corrections: Include edema, pneumonia and fracture and "
        "remove cardiomegaly. Don't make other changes."
    )
    assert prompts.correction_prompt([], ["Edema", "Atelectasis"]) == (
        "The patient does not have edema and atelectasis. Update the report. Don't make other changes."
    )
    assert prompts.correction_prompt(["Pneumothorax"], ["No Finding"]) == (
        "The patient also has pneumothorax, correct the report. Don't make other changes."
    )
    with pytest.raises(ValueError):
        prompts.correction_prompt([], ["No Finding"])


def test_correction_findings_are_in_chexpert_order() -> None:
    """The reference lists false negatives / positives from the label vector, i.e. in CheXpert order."""
    assert prompts.correction_prompt(["Fracture", "Edema", "Pneumonia"], ["Support Devices", "Cardiomegaly"]) == (
        "Please adapt the report with the following corrections: Include edema, pneumonia and fracture and "
        "remove cardiomegaly and support devices. Don't make other changes."
    )
    assert prompts.correction_prompt([], ["Pleural Effusion", "Lung Opacity", "pleural effusion"]) == (
        "The patient does not have lung opacity and pleural effusion. Update the report. Don't make other changes."
    )
    with pytest.raises(ValueError):
        prompts.correction_prompt(["Heart failure"], [])


def test_conversation_is_vicuna_v1_1() -> None:
    first = Turn(prompts.report_prompt("edema"), "Mild pulmonary edema.")
    assert conversation_prompt([], "Q?") == f"{REFERENCE_SYSTEM} USER: Q? ASSISTANT:"
    assert conversation_prompt([first], "Is there any edema?") == (
        f"{REFERENCE_SYSTEM} USER: {first.question} ASSISTANT: Mild pulmonary edema.</s>"
        "USER: Is there any edema? ASSISTANT:"
    )


def test_context_rule_drops_oldest_follow_ups_then_refuses() -> None:
    report = Turn("<image>. report", "r " * 10)
    follow_ups = [Turn(f"q{i}", "a " * 100) for i in range(3)]
    words = lambda text: len(text.split())
    base = words(conversation_prompt([report], "now?"))
    kept, dropped = fit_history([report, *follow_ups], "now?", words, max_new_tokens=10, limit=base + 10 + 205)
    assert dropped == 2 and kept == [report, follow_ups[2]]
    kept, dropped = fit_history([report, *follow_ups], "now?", words, max_new_tokens=10, limit=10_000)
    assert dropped == 0 and len(kept) == 4
    with pytest.raises(ContextTooLong):
        fit_history([report, *follow_ups], "now?", words, max_new_tokens=10, limit=base)
